"""Amazon Bedrock through the Converse / ConverseStream APIs of boto3's `bedrock-runtime` client.

boto3 blocks, so every call (and every read of a stream) runs in a worker thread. The client is made on first
use, so importing this module and building the provider cost nothing and tests can point it anywhere.
SDK retries are off by default, like the HTTP providers: the caller decides whether to retry.
Bedrock reports `inputTokens` beside `cacheReadInputTokens` / `cacheWriteInputTokens`; the normalized input
is their sum. OpenAI-format requests are translated as for Anthropic: system messages go to `system`,
max_tokens/temperature/top_p/stop go to `inferenceConfig`; other OpenAI-only parameters are dropped.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio.to_thread
import botocore.eventstream
import botocore.exceptions
import botocore.parsers
import urllib3.exceptions

from aikit.llm._http import as_int, log
from aikit.llm.base import (
    ChatRequest,
    ChatResult,
    InvalidRequestError,
    Provider,
    ProviderError,
    ProviderEvent,
    ProviderTimeout,
    StreamEnd,
    TextDelta,
    Usage,
    content_parts,
    usage_with_cache_beside,
)

T = TypeVar("T")

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}

# Error codes (as the Converse API names them; stream events spell them with a lower-case first letter).
_CUSTOMER_FAULT = frozenset({"ValidationException", "ResourceNotFoundException"})
_AUTH = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "MissingAuthenticationTokenException",
    }
)
_TIMEOUT = frozenset({"ModelTimeoutException", "RequestTimeout", "RequestTimeoutException"})


def finish_reason(stop_reason: object) -> str:
    return STOP_REASONS.get(str(stop_reason), "stop")


def usage_from(raw: dict[str, Any]) -> Usage:
    return usage_with_cache_beside(as_int(raw.get("inputTokens")), as_int(raw.get("cacheReadInputTokens")),
                                   as_int(raw.get("cacheWriteInputTokens")), as_int(raw.get("outputTokens")))


def build_kwargs(req: ChatRequest) -> dict[str, Any]:
    system: list[dict[str, str]] = []
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(req.messages):
        parts = content_parts(message.get("content", ""), f"messages[{i}].content")
        if message["role"] in ("system", "developer"):
            system.extend({"text": p} for p in parts if p)
        else:
            messages.append({"role": message["role"], "content": [{"text": p} for p in parts]})
    params = req.params
    if params.get("n", 1) != 1:
        raise InvalidRequestError("n: bedrock returns one choice; n must be 1")
    config: dict[str, Any] = {}
    if req.max_tokens is not None:
        config["maxTokens"] = req.max_tokens
    if params.get("temperature") is not None:
        config["temperature"] = params["temperature"]
    if params.get("top_p") is not None:
        config["topP"] = params["top_p"]
    stop = params.get("stop")
    if stop is not None:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    kwargs: dict[str, Any] = {"modelId": req.model, "messages": messages}
    if system:
        kwargs["system"] = system
    if config:
        kwargs["inferenceConfig"] = config
    return kwargs


def client_error(provider: str, exc: botocore.exceptions.ClientError) -> ProviderError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    code = code[:1].upper() + code[1:]  # stream exception events say "throttlingException"
    if code in _AUTH:
        log.error("%s refused our credentials (%s)", provider, code)
        return ProviderError(f"{provider}: provider authentication failed", 502)
    if code in _CUSTOMER_FAULT:
        message = str(error.get("Message", "") or code)[:500]
        return ProviderError(f"{provider} rejected the request: {message}", 400)
    if code in _TIMEOUT:
        return ProviderTimeout(f"{provider} timed out")
    if code in ("ThrottlingException", "ModelNotReadyException", "TooManyRequestsException"):
        return ProviderError(f"{provider} is rate limiting requests", 502)
    return ProviderError(f"{provider} failed ({code or 'unknown error'})", 502)


@contextmanager
def boto_errors(provider: str) -> Iterator[None]:
    try:
        yield
    except botocore.exceptions.ClientError as exc:  # EventStreamError included
        raise client_error(provider, exc) from None
    except botocore.exceptions.ReadTimeoutError:
        # The request was sent and the model is working on it: it bills the call.
        raise ProviderTimeout(f"{provider} timed out", cut_off=True) from None
    except (botocore.exceptions.ConnectTimeoutError, urllib3.exceptions.TimeoutError):
        raise ProviderTimeout(f"{provider} timed out") from None
    except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError):
        log.error("%s: no AWS credentials available", provider)
        raise ProviderError(f"{provider}: provider authentication failed", 502) from None
    except botocore.exceptions.NoRegionError:
        log.error("%s: no AWS region configured (BEDROCK_REGION)", provider)
        raise ProviderError(f"{provider} is not configured", 502) from None
    except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError) as exc:
        raise ProviderError(f"{provider} connection failed: {type(exc).__name__}", 502) from None
    except botocore.eventstream.ParserError:
        raise ProviderError(f"{provider} sent a malformed event stream", 502) from None
    except (botocore.parsers.ResponseParserError, KeyError, TypeError, AttributeError, ValueError):
        # botocore turns an undecodable body into {"message": body}, so bad JSON surfaces as a missing key.
        raise ProviderError(f"{provider} returned a malformed answer", 502) from None


_session_lock = threading.Lock()
_session: Any = None  # one boto3 Session per process: building one loads the service models (~50 ms)


def _new_client(**kwargs: Any) -> Any:
    # A boto3 Session is not safe to use from several threads at once; clients made from it are.
    global _session
    with _session_lock:
        if _session is None:
            import boto3

            _session = boto3.session.Session()
        return _session.client("bedrock-runtime", **kwargs)


class BedrockProvider(Provider):
    name = "bedrock"

    def __init__(
        self,
        *,
        region: str | None,
        endpoint_url: str | None,
        timeout_seconds: float,
        default_model: str | None = None,
        max_attempts: int = 1,
    ) -> None:
        self.default_model = default_model or "anthropic.claude-3-haiku-20240307-v1:0"
        self._region = region
        self._endpoint_url = endpoint_url
        self._timeout = timeout_seconds
        self._max_attempts = max_attempts
        self._client: Any = None  # a botocore BedrockRuntime client
        self._lock = threading.Lock()

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                from botocore.config import Config

                config = Config(
                    connect_timeout=min(self._timeout, 10.0),
                    read_timeout=self._timeout,
                    retries={"total_max_attempts": self._max_attempts, "mode": "standard"},
                )
                self._client = _new_client(
                    region_name=self._region, endpoint_url=self._endpoint_url, config=config
                )
            return self._client

    def _call(self, method: str, kwargs: dict[str, Any]) -> Any:
        return getattr(self._get_client(), method)(**kwargs)

    async def _in_thread(self, func: Callable[[], T], abandon_on_cancel: bool = False) -> T:
        return await anyio.to_thread.run_sync(func, abandon_on_cancel=abandon_on_cancel)

    async def chat(self, req: ChatRequest) -> ChatResult:
        kwargs = build_kwargs(req)
        with boto_errors(self.name):
            resp = await self._in_thread(functools.partial(self._call, "converse", kwargs))
            blocks = resp["output"]["message"]["content"]
            meta = resp.get("ResponseMetadata") or {}
            return ChatResult(
                id="chatcmpl-" + str(meta.get("RequestId") or uuid.uuid4().hex),
                model=req.model,
                content="".join(b["text"] for b in blocks if "text" in b),
                finish_reason=finish_reason(resp.get("stopReason")),
                usage=usage_from(resp["usage"]),
            )

    async def stream(self, req: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        kwargs = build_kwargs(req)
        stop_reason: object = None
        usage: Usage | None = None
        text: list[str] = []
        with boto_errors(self.name):
            resp = await self._in_thread(functools.partial(self._call, "converse_stream", kwargs))
            events = resp["stream"]
            try:
                reader = iter(events)
                stopped = False
                while True:
                    # Abandon the read on cancellation; closing the stream below ends the thread's read.
                    event = await self._in_thread(
                        functools.partial(next, reader, None), abandon_on_cancel=True
                    )
                    if event is None:
                        break
                    if "contentBlockDelta" in event:
                        piece = event["contentBlockDelta"]["delta"].get("text")
                        if piece:
                            text.append(piece)
                            yield TextDelta(piece)
                    elif "messageStop" in event:
                        stop_reason = event["messageStop"].get("stopReason")
                        stopped = True
                    elif "metadata" in event:
                        usage = usage_from(event["metadata"]["usage"])
            finally:
                events.close()
            if not stopped:
                raise ProviderError(f"{self.name} stream ended before completion", 502)
        if usage is None:
            log.warning("bedrock sent no usage metadata for model %s; estimating", req.model)
            usage = Usage(
                self.estimate_input_tokens(req), self.estimate_output_tokens("".join(text), len(text))
            )
        yield StreamEnd(finish_reason=finish_reason(stop_reason), usage=usage)
