"""The LLM layer: one `LLM` facade over interchangeable providers, metering tokens as it goes.

Inside a route of the API (built-in or mounted with AIKIT_ROUTERS), the module-level functions meter to the
calling key, within its limits:

    from aikit import llm
    result = await llm.chat(messages=[{"role": "user", "content": "hi"}], track_tokens=True)
    async for event in llm.stream(messages=..., track_tokens=True): ...
    vectors = (await llm.embed(["some text", "more"], track_tokens=True)).embeddings

Standalone: `LLM(build_provider(settings), meter=meter).chat(..., track_tokens=True, caller=Caller(...))`.

With `track_tokens=True` each call is metered once, under the requested model name: for `caller=`, else the
current request's key (admitted against its limits first: see `CallGate`), else `current_caller`; with none
of them it raises `CallerRequired` before anything runs. A call the upstream refused records nothing; a call
cut off (a read timeout, the LLM_DEADLINE_SECONDS deadline, a cancellation) records what the upstream bills:
the input (reported, else estimated) plus what was generated. A stream records the provider's final usage; a
stream cut short records what was generated, with estimated figures where the provider had not reported
them yet (see `LLM.stream`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from aikit.deadlines import within
from aikit.errors import CallerRequired, InvalidRequestError, ProviderError, ProviderTimeout, SettingsError
from aikit.llm.base import (
    ChatRequest,
    ChatResult,
    EmbeddingRequest,
    EmbeddingResult,
    InputUsage,
    Provider,
    ProviderEvent,
    StreamEnd,
    StreamEvent,
    TextDelta,
    Usage,
    output_text,
    validate_embedding_input,
    validate_max_tokens,
    validate_messages,
)
from aikit.llm.context import Admitted, Caller, CallGate, RequestScope, current_caller, current_request, use_caller
from aikit.metering.base import Meter
from aikit.settings import Settings, get_settings

__all__ = [
    "LLM",
    "BoundLLM",
    "CallGate",
    "Caller",
    "CallerRequired",
    "ChatRequest",
    "ChatResult",
    "EmbeddingRequest",
    "EmbeddingResult",
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
    "chat",
    "current_caller",
    "embed",
    "stream",
    "use_caller",
]

log = logging.getLogger("aikit.llm")
T = TypeVar("T")
Answer = TypeVar("Answer", ChatResult, EmbeddingResult)

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


@dataclass(frozen=True, slots=True)
class _Billing:
    """Who pays for one call, and the request's gate when the call is admitted against limits."""

    caller: Caller
    gate: CallGate | None = None


_NO_CALLER = (
    "track_tokens=True ran outside an authenticated request: call it inside a route of the API (built-in, or a "
    "router mounted with AIKIT_ROUTERS / create_app(routers=...), where the caller's API key is checked), or "
    "pass caller=Caller(api_key_id=..., customer_id=...) or wrap it in use_caller(...)"
)


class LLM:
    def __init__(self, provider: Provider, meter: Meter | None = None, default_model: str | None = None,
                 deadline_seconds: float | None = None) -> None:
        self._provider = provider
        self._meter = meter
        self._default_model = default_model
        self._deadline = deadline_seconds

    @property
    def provider(self) -> Provider:
        return self._provider

    @property
    def default_model(self) -> str:
        return self._default_model or self._provider.default_model

    @property
    def default_embedding_model(self) -> str:
        return self._provider.default_embedding_model

    def _embedding_request(self, input: object, model: str | None, dimensions: object,
                           params: dict[str, Any]) -> EmbeddingRequest:
        model = model if model is not None else self.default_embedding_model
        if not isinstance(model, str) or not model.strip():
            raise InvalidRequestError("model must be a non-empty string", "model")
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                       or dimensions < 1):
            raise InvalidRequestError("dimensions must be a positive integer", "dimensions")
        return EmbeddingRequest(validate_embedding_input(input), model, dimensions, params)

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

    def _billing(self, track_tokens: bool, caller: Caller | None) -> _Billing | RequestScope | None:
        """Who pays, decided now (a scope whose route opted out of auth authenticates on first use)."""
        if not track_tokens:
            return None
        if self._meter is None:
            raise RuntimeError("track_tokens=True needs an LLM built with a meter: LLM(provider, meter=...)")
        if caller is not None:
            return _Billing(caller)
        scope = current_request.get()
        if scope is not None and scope.gate is not None:
            return _Billing(scope.gate.caller, scope.gate)
        if scope is not None and scope.authenticate is not None:
            return scope
        who = current_caller.get()
        if who is None:
            raise CallerRequired(_NO_CALLER)
        return _Billing(who)

    @staticmethod
    async def _resolved(billing: _Billing | RequestScope | None) -> _Billing | None:
        if not isinstance(billing, RequestScope):
            return billing
        if billing.gate is None:
            assert billing.authenticate is not None  # checked by _billing
            billing.gate = await billing.authenticate()
        return _Billing(billing.gate.caller, billing.gate)

    async def _record(self, who: Caller, req: ChatRequest | EmbeddingRequest, usage: Usage,
                      request_id: str | None) -> None:
        assert self._meter is not None  # checked by _billing
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
                quota_period_start=who.quota_period_start,
            )
        )

    def _deadline_hit(self) -> ProviderTimeout:
        return ProviderTimeout(f"the LLM call exceeded its deadline of {self._deadline:g}s", cut_off=True)

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
        """One completion. Raises ProviderError (its status is what the API answers) on failure, and
        the gate's refusal (e.g. `aikit.errors.RateLimited`) when a limit refuses the call."""
        billing = self._billing(track_tokens, caller)
        req = self._request(messages, model, max_tokens, params)
        return await self._chat(req, await self._resolved(billing), request_id)

    async def _chat(self, req: ChatRequest, billing: _Billing | None, request_id: str | None) -> ChatResult:
        return await self._metered(req, billing, request_id, self._provider.chat)

    async def _metered(self, req: Admitted, billing: _Billing | None, request_id: str | None,
                       call: Callable[[Admitted], Awaitable[Answer]]) -> Answer:
        """One call, admitted against the gate's limits, metered once (see `_settle_failed` when it raises)."""
        gate = billing.gate if billing else None
        if gate is not None:
            request_id = request_id or gate.new_call_id()
            req = await gate.admit(request_id, req, self._provider)
        try:
            result = await self._in_time(call(req))
        except BaseException as exc:
            if billing is not None:
                await self._settle_failed(billing, req, exc, request_id)
            raise
        if billing is not None:
            await self._record(billing.caller, req, result.usage, request_id)
        return result

    async def _in_time(self, call: Awaitable[T]) -> T:
        if self._deadline is None:
            return await call
        try:
            with within(self._deadline) as waited:
                return await call
        except TimeoutError:
            if not waited.expired():
                raise
        raise self._deadline_hit()

    async def embed(
        self,
        input: str | list[str] | list[int] | list[list[int]],
        *,
        model: str | None = None,
        dimensions: int | None = None,
        track_tokens: bool = False,
        request_id: str | None = None,
        caller: Caller | None = None,
        **params: Any,
    ) -> EmbeddingResult:
        """Embedding vectors of `input` (a text, texts, or token ids), one per input. With `track_tokens=True`
        it is admitted and metered exactly like `chat`: the input tokens the provider reported, output 0."""
        billing = self._billing(track_tokens, caller)
        req = self._embedding_request(input, model, dimensions, params)
        return await self._embed(req, await self._resolved(billing), request_id)

    async def _embed(self, req: EmbeddingRequest, billing: _Billing | None,
                     request_id: str | None) -> EmbeddingResult:
        return await self._metered(req, billing, request_id, self._provider.embed)

    async def _settle_failed(self, billing: _Billing, req: ChatRequest | EmbeddingRequest, exc: BaseException,
                             request_id: str | None) -> None:
        """A call that raised: metered for its input if the upstream was working on it when it was cut off
        (a timeout, the deadline, a cancellation), else its reservation is given back."""
        cut_off = isinstance(exc, asyncio.CancelledError) or (isinstance(exc, ProviderTimeout) and exc.cut_off)
        if cut_off:
            if isinstance(req, EmbeddingRequest):
                usage = Usage(self._provider.estimate_embedding_tokens(req), 0)
            else:
                usage = Usage(self._provider.estimate_input_tokens(req), 0)
            await self._record(billing.caller, req, usage, request_id)
        elif billing.gate is not None and request_id is not None:
            await _shielded(billing.gate.release(request_id))

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
        record does not depend on the context the generator is finished in. Admission against the limits
        happens at the first event. Metering, exactly once:
        - completed: the provider's final usage;
        - cut short after some text (consumer closed/cancelled it, the upstream died, a read timeout or the
          deadline): input as the provider reported it if it did (Anthropic's message_start), else
          estimated from the prompt; output max(text deltas, estimated from the text) (each provider may
          count better; echo is exact);
        - cut off by a read timeout or the deadline before any text: the input (reported or estimated);
        - consumer hung up before any text: the input only, if the provider had reported it;
        - provider failed before any text: nothing.
        """
        billing = self._billing(track_tokens, caller)
        req = self._request(messages, model, max_tokens, params)
        return self._stream(req, billing, request_id)

    async def _stream(
        self, req: ChatRequest, pending: _Billing | RequestScope | None, request_id: str | None
    ) -> AsyncGenerator[StreamEvent, None]:
        billing = await self._resolved(pending)
        gate = billing.gate if billing else None
        if gate is not None:
            request_id = request_id or gate.new_call_id()
            req = await gate.admit(request_id, req, self._provider)
        upstream = self._provider.stream(req)
        deadline = math.inf if self._deadline is None else anyio.current_time() + self._deadline
        reported: Usage | None = None
        final: Usage | None = None
        text: list[str] = []
        failed = cut_off = False
        try:
            async for event in self._within(upstream, deadline):
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
        except ProviderTimeout as exc:
            cut_off, failed = exc.cut_off, not exc.cut_off
            raise
        except BaseException:
            failed = True
            raise
        finally:
            await _close(upstream)
            if billing is not None:
                usage = final or self._partial_usage(req, reported, text, failed, cut_off)
                if usage is not None:
                    await self._record(billing.caller, req, usage, request_id)
                elif gate is not None and request_id is not None:
                    await _shielded(gate.release(request_id))

    async def _within(self, upstream: AsyncGenerator[ProviderEvent, None],
                      deadline: float) -> AsyncIterator[ProviderEvent]:
        """The upstream's events until `deadline` (anyio time); past it, a cut-off ProviderTimeout."""
        if deadline == math.inf:
            async for event in upstream:
                yield event
            return
        while True:
            got: ProviderEvent | None = None
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                try:
                    got = await upstream.__anext__()
                except StopAsyncIteration:
                    return
            if got is None:
                raise self._deadline_hit()
            yield got

    def _partial_usage(
        self, req: ChatRequest, reported: Usage | None, text: list[str], failed: bool, cut_off: bool
    ) -> Usage | None:
        if not text:
            if cut_off:
                if reported is not None:
                    return Usage(reported.input_tokens, 0, reported.cached_tokens, reported.cache_write_tokens)
                return Usage(self._provider.estimate_input_tokens(req), 0)
            if failed or reported is None:
                return None
            return Usage(reported.input_tokens, 0, reported.cached_tokens, reported.cache_write_tokens)
        output = self._provider.estimate_output_tokens("".join(text), len(text))
        if reported is not None:
            return Usage(reported.input_tokens, output, reported.cached_tokens, reported.cache_write_tokens)
        return Usage(self._provider.estimate_input_tokens(req), output)

    async def aclose(self) -> None:
        await self._provider.aclose()


class BoundLLM:
    """An LLM bound to one request's billing (what the `MeteredLLM` dependency gives a route): its calls are
    metered to the request's key and admitted against its limits; `track_tokens=False` opts a call out."""

    __slots__ = ("_gate", "_llm")

    def __init__(self, llm: LLM, gate: CallGate) -> None:
        self._llm = llm
        self._gate = gate

    @property
    def default_model(self) -> str:
        return self._llm.default_model

    @property
    def default_embedding_model(self) -> str:
        return self._llm.default_embedding_model

    @property
    def provider(self) -> Provider:
        return self._llm.provider

    def _billing(self, track_tokens: bool) -> _Billing | None:
        return _Billing(self._gate.caller, self._gate) if track_tokens else None

    async def chat(self, messages: list[dict[str, Any]], *, model: str | None = None, track_tokens: bool = True,
                   request_id: str | None = None, max_tokens: int | None = None, **params: Any) -> ChatResult:
        req = self._llm._request(messages, model, max_tokens, params)
        return await self._llm._chat(req, self._billing(track_tokens), request_id)

    def stream(self, messages: list[dict[str, Any]], *, model: str | None = None, track_tokens: bool = True,
               request_id: str | None = None, max_tokens: int | None = None,
               **params: Any) -> AsyncGenerator[StreamEvent, None]:
        req = self._llm._request(messages, model, max_tokens, params)
        return self._llm._stream(req, self._billing(track_tokens), request_id)

    async def embed(self, input: str | list[str] | list[int] | list[list[int]], *, model: str | None = None,
                    dimensions: int | None = None, track_tokens: bool = True, request_id: str | None = None,
                    **params: Any) -> EmbeddingResult:
        req = self._llm._embedding_request(input, model, dimensions, params)
        return await self._llm._embed(req, self._billing(track_tokens), request_id)


def current_llm() -> LLM:
    """The LLM of the API serving the current request, else the process's (configured from the environment)."""
    scope = current_request.get()
    if scope is not None and scope.source is not None:
        return scope.source.llm
    from aikit.runtime import get_runtime

    return get_runtime().llm


async def chat(
    messages: list[dict[str, Any]],
    *,
    model: str | None = None,
    track_tokens: bool = False,
    request_id: str | None = None,
    caller: Caller | None = None,
    max_tokens: int | None = None,
    **params: Any,
) -> ChatResult:
    """`LLM.chat` on the current API's LLM: with `track_tokens=True`, metered to the calling key."""
    return await current_llm().chat(messages, model=model, track_tokens=track_tokens, request_id=request_id,
                                    caller=caller, max_tokens=max_tokens, **params)


def stream(
    messages: list[dict[str, Any]],
    *,
    model: str | None = None,
    track_tokens: bool = False,
    request_id: str | None = None,
    caller: Caller | None = None,
    max_tokens: int | None = None,
    **params: Any,
) -> AsyncGenerator[StreamEvent, None]:
    """`LLM.stream` on the current API's LLM: with `track_tokens=True`, metered to the calling key."""
    return current_llm().stream(messages, model=model, track_tokens=track_tokens, request_id=request_id,
                                caller=caller, max_tokens=max_tokens, **params)


async def embed(
    input: str | list[str] | list[int] | list[list[int]],
    *,
    model: str | None = None,
    dimensions: int | None = None,
    track_tokens: bool = False,
    request_id: str | None = None,
    caller: Caller | None = None,
    **params: Any,
) -> EmbeddingResult:
    """`LLM.embed` on the current API's LLM: with `track_tokens=True`, metered to the calling key."""
    return await current_llm().embed(input, model=model, dimensions=dimensions, track_tokens=track_tokens,
                                     request_id=request_id, caller=caller, **params)


def build_provider(settings: Settings | None = None) -> Provider:
    """The provider `settings.llm_provider` names, configured from settings."""
    s = settings or get_settings()
    provider = _provider(s)
    if s.llm_embedding_model:
        provider.default_embedding_model = s.llm_embedding_model
    return provider


def _provider(s: Settings) -> Provider:
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
