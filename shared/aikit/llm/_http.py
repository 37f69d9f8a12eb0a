"""What the HTTP providers share: the client, server-sent events, turning upstream failures into errors."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from aikit.errors import ProviderError, ProviderTimeout

log = logging.getLogger("aikit.llm")

# Statuses whose upstream answer means "your request is wrong": the customer can fix it, so it is a 400.
_CLIENT_FAULT = frozenset({400, 404, 409, 413, 422})
_MAX_MESSAGE = 500


def make_client(base_url: str, timeout_seconds: float, headers: Mapping[str, str]) -> httpx.AsyncClient:
    timeout = httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 10.0))
    return httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, headers=dict(headers))


def _scrub(message: str, secrets: tuple[str | None, ...]) -> str:
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    return message[:_MAX_MESSAGE]


def upstream_message(body: bytes) -> str | None:
    """The human message in an OpenAI/Anthropic-style error body, if there is one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return str(data["message"])
    return None


def status_error(provider: str, status: int, body: bytes, secrets: tuple[str | None, ...]) -> ProviderError:
    if status in (401, 403):
        # Our credentials, not the customer's request: a gateway failure from their point of view.
        log.error("%s refused our credentials (HTTP %s)", provider, status)
        return ProviderError(f"{provider}: provider authentication failed", 502)
    message = upstream_message(body)
    if status in _CLIENT_FAULT and message:
        return ProviderError(f"{provider} rejected the request: {_scrub(message, secrets)}", 400)
    if status == 429:
        return ProviderError(f"{provider} is rate limiting requests", 502)
    if status in (408, 504):
        return ProviderTimeout(f"{provider} timed out")
    return ProviderError(f"{provider} failed (HTTP {status})", 502)


@contextmanager
def transport_errors(provider: str) -> Iterator[None]:
    """Map httpx failures and undecodable answers to ProviderError; ProviderError passes through."""
    try:
        yield
    except httpx.ReadTimeout:
        # The request was sent and the upstream is working on it: it bills the call.
        raise ProviderTimeout(f"{provider} timed out", cut_off=True) from None
    except httpx.TimeoutException:
        raise ProviderTimeout(f"{provider} timed out") from None
    except httpx.HTTPError as exc:
        raise ProviderError(f"{provider} connection failed: {type(exc).__name__}", 502) from None
    except ValueError:  # json.JSONDecodeError included
        raise ProviderError(f"{provider} returned malformed JSON", 502) from None
    except (KeyError, TypeError, IndexError, AttributeError):
        raise ProviderError(f"{provider} returned an unexpected answer", 502) from None


def loads_object(data: str | bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise TypeError("expected a JSON object")
    return value


def as_int(value: object) -> int:
    """A token count from an upstream answer; absent means 0, anything else odd is a bad answer."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError("token counts must be non-negative integers")
    return value


async def iter_sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str | None, str]]:
    """(event, data) pairs of a server-sent event stream."""
    event: str | None = None
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith(":"):
            continue  # a comment / keep-alive
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
    if data:
        yield event, "\n".join(data)
