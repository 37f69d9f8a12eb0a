"""The LLM layer: one `LLM` facade over interchangeable providers, metering tokens as it goes.

    llm = LLM(build_provider(settings), meter=meter)
    result = await llm.chat(messages=[{"role": "user", "content": "hi"}], track_tokens=True)
    async for event in llm.stream(messages=..., track_tokens=True): ...

With `track_tokens=True` the usage is recorded once per call, for `caller=` or else `current_caller`, under
the requested model name. A failed call records nothing. A stream records the provider's final usage; a stream
cut short (the consumer hangs up, or the upstream dies after sending text) records what was generated, with
estimated figures where the provider had not reported them yet (see `LLM.stream`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Coroutine
from typing import Any, TypeVar

import anyio

from aikit.llm.base import (
    ChatRequest,
    ChatResult,
    InputUsage,
    InvalidRequestError,
    Provider,
    ProviderError,
    ProviderEvent,
    ProviderTimeout,
    StreamEnd,
    StreamEvent,
    TextDelta,
    Usage,
    output_text,
    validate_max_tokens,
    validate_messages,
)
from aikit.llm.context import Caller, current_caller, use_caller
from aikit.metering.base import Meter
from aikit.settings import Settings, SettingsError, get_settings

__all__ = [
    "LLM",
    "Caller",
    "ChatRequest",
    "ChatResult",
    "InputUsage",
    "InvalidRequestError",
    "Provider",
    "ProviderError",
    "ProviderEvent",
    "ProviderTimeout",
    "StreamEnd",
    "StreamEvent",
    "TextDelta",
    "Usage",
    "build_provider",
    "current_caller",
    "use_caller",
]

log = logging.getLogger("aikit.llm")
T = TypeVar("T")

# Records still running after their caller was cancelled; held here so they are not garbage-collected.
_detached: set[asyncio.Future[Any]] = set()


def _finished(task: asyncio.Future[Any]) -> None:
    _detached.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("usage record failed after its caller was cancelled", exc_info=task.exception())


async def _shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to the end even if our task is cancelled meanwhile: a lost usage record is lost money.

    The anyio shield covers level-triggered cancellation (Starlette cancels a streaming response's task group
    when the client disconnects); asyncio.shield keeps the work going through a plain task.cancel().
    """
    task = asyncio.ensure_future(coro)
    _detached.add(task)
    task.add_done_callback(_finished)
    with anyio.CancelScope(shield=True):
        result = await asyncio.shield(task)
    return result


async def _close(upstream: AsyncGenerator[ProviderEvent, None]) -> None:
    try:
        with anyio.move_on_after(5, shield=True):
            await upstream.aclose()
    except Exception:
        log.warning("closing the upstream stream failed", exc_info=True)


class LLM:
    def __init__(
        self, provider: Provider, meter: Meter | None = None, default_model: str | None = None
    ) -> None:
        self._provider = provider
        self._meter = meter
        self._default_model = default_model

    @property
    def provider(self) -> Provider:
        return self._provider

    @property
    def default_model(self) -> str:
        return self._default_model or self._provider.default_model

    def _request(
        self, messages: object, model: str | None, max_tokens: object, params: dict[str, Any]
    ) -> ChatRequest:
        model = model if model is not None else self.default_model
        if not isinstance(model, str) or not model.strip():
            raise InvalidRequestError("model must be a non-empty string")
        return ChatRequest(
            messages=validate_messages(messages),
            model=model,
            max_tokens=validate_max_tokens(max_tokens),
            params=params,
        )

    def _who(self, track_tokens: bool, caller: Caller | None) -> Caller | None:
        if not track_tokens:
            return None
        if self._meter is None:
            raise RuntimeError("track_tokens=True needs an LLM built with a meter: LLM(provider, meter=...)")
        who = caller or current_caller.get()
        if who is None:
            raise RuntimeError(
                "track_tokens=True needs a caller: pass caller=Caller(...) or set one with use_caller()"
            )
        return who

    async def _record(self, who: Caller, req: ChatRequest, usage: Usage, request_id: str | None) -> None:
        assert self._meter is not None  # checked by _who
        await _shielded(
            self._meter.record(
                who.api_key_id,
                usage.total_tokens,
                who.customer_id,
                request_id=request_id,
                model=req.model,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cached_tokens=usage.cached_tokens,
            )
        )

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str | None = None,
        track_tokens: bool = False,
        request_id: str | None = None,
        caller: Caller | None = None,
        max_tokens: int | None = None,
        **params: Any,
    ) -> ChatResult:
        """One completion. Raises ProviderError (status_code tells the API what to answer) on failure."""
        who = self._who(track_tokens, caller)
        req = self._request(messages, model, max_tokens, params)
        result = await self._provider.chat(req)
        if who is not None:
            await self._record(who, req, result.usage, request_id)
        return result

    def stream(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str | None = None,
        track_tokens: bool = False,
        request_id: str | None = None,
        caller: Caller | None = None,
        max_tokens: int | None = None,
        **params: Any,
    ) -> AsyncGenerator[StreamEvent, None]:
        """TextDelta events then one StreamEnd. Close it (`aclose()`) when stopping early.

        The request and the caller are checked here, before the first event; the caller is taken now, so the
        record does not depend on the context the generator is finished in. Metering, exactly once:
        - completed: the provider's final usage;
        - cut short after some text (consumer closed/cancelled it, or the upstream died): input as the
          provider reported it if it did (Anthropic's message_start), else ceil(prompt chars / 4); output
          max(text deltas, ceil(text chars / 4)) (each provider may count better; echo is exact);
        - consumer hung up before any text: the input only, if the provider had reported it;
        - provider failed before any text: nothing.
        """
        who = self._who(track_tokens, caller)
        req = self._request(messages, model, max_tokens, params)
        return self._stream(req, who, request_id)

    async def _stream(
        self, req: ChatRequest, who: Caller | None, request_id: str | None
    ) -> AsyncGenerator[StreamEvent, None]:
        upstream = self._provider.stream(req)
        reported: Usage | None = None
        final: Usage | None = None
        text: list[str] = []
        failed = False
        try:
            async for event in upstream:
                if isinstance(event, InputUsage):
                    reported = event.usage
                    continue
                if isinstance(event, StreamEnd):
                    final = event.usage
                elif piece := output_text(event):  # text, refusal and tool-call pieces are all billed output
                    text.append(piece)
                yield event
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except BaseException:
            failed = True
            raise
        finally:
            await _close(upstream)
            if who is not None:
                usage = final or self._partial_usage(req, reported, text, failed)
                if usage is not None:
                    await self._record(who, req, usage, request_id)

    def _partial_usage(
        self, req: ChatRequest, reported: Usage | None, text: list[str], failed: bool
    ) -> Usage | None:
        if not text:
            if failed or reported is None:
                return None
            return Usage(reported.input_tokens, 0, reported.cached_tokens, reported.cache_write_tokens)
        output = self._provider.estimate_output_tokens("".join(text), len(text))
        if reported is not None:
            return Usage(reported.input_tokens, output, reported.cached_tokens, reported.cache_write_tokens)
        return Usage(self._provider.estimate_input_tokens(req), output)

    async def aclose(self) -> None:
        await self._provider.aclose()


def build_provider(settings: Settings | None = None) -> Provider:
    """The provider `settings.llm_provider` names, configured from settings."""
    s = settings or get_settings()
    model = s.llm_default_model
    if s.llm_provider == "echo":
        from aikit.llm.echo import EchoProvider

        return EchoProvider(default_model=model)
    if s.llm_provider == "openai":
        from aikit.llm.openai import OpenAIProvider

        return OpenAIProvider(
            base_url=s.openai_base_url,
            api_key=s.openai_api_key,
            timeout_seconds=s.llm_timeout_seconds,
            default_model=model,
        )
    if s.llm_provider == "anthropic":
        from aikit.llm.anthropic import AnthropicProvider

        if not s.anthropic_api_key:
            raise SettingsError("invalid setting ANTHROPIC_API_KEY: required when LLM_PROVIDER=anthropic")
        return AnthropicProvider(
            base_url=s.anthropic_base_url,
            api_key=s.anthropic_api_key,
            version=s.anthropic_version,
            timeout_seconds=s.llm_timeout_seconds,
            default_model=model,
        )
    from aikit.llm.bedrock import BedrockProvider

    return BedrockProvider(
        region=s.bedrock_region,
        endpoint_url=s.bedrock_endpoint_url,
        timeout_seconds=s.llm_timeout_seconds,
        default_model=model,
    )
