"""Amazon Bedrock through the Converse / ConverseStream APIs (chat) and InvokeModel (embeddings) of boto3's
`bedrock-runtime` client.

boto3 blocks, so every call (and every read of a stream) runs in a worker thread. The client is made on first
use, so importing this module and building the provider cost nothing and tests can point it anywhere.
SDK retries are off by default, like the HTTP providers: the caller decides whether to retry.
Bedrock reports `inputTokens` beside `cacheReadInputTokens` / `cacheWriteInputTokens`; the normalized input
is their sum.
OpenAI-format requests are translated, and what has no equivalent is refused with a 422 naming it:
- system/developer messages go to `system`; tool messages become `toolResult` blocks of a user turn;
  assistant `tool_calls` become `toolUse` blocks; base64 image parts become image blocks (URLs are refused:
  Converse takes bytes); `cache_control` on parts and tools becomes a `cachePoint` after them;
- tools (`toolConfig`), tool_choice (`required` is `any`; `none` leaves the tools out), response_format
  json_schema and reasoning_effort (`outputConfig`), max_tokens/temperature/top_p/stop (`inferenceConfig`),
  top_k (`additionalModelRequestFields`), metadata and user (`requestMetadata`);
- anything else that asks for something (seed, logprobs, penalties, n > 1, parallel_tool_calls=false, JSON
  mode without a schema, message names, audio/file parts, unknown fields) is refused.
"""

from __future__ import annotations

import functools
import json
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

from aikit.errors import InvalidRequestError, ProviderError, ProviderTimeout
from aikit.llm._http import as_int, log
from aikit.llm.base import (
    ChatRequest,
    ChatResult,
    EmbeddingRequest,
    EmbeddingResult,
    Provider,
    ProviderEvent,
    StreamEnd,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
    unsupported,
    usage_with_cache_beside,
)
from aikit.llm.translate import (
    effort,
    function_tools,
    image,
    json_schema,
    parts,
    refuse_keys,
    refuse_unhandled,
    stop_list,
    texts_only,
    tool_choice,
    tool_input,
)

T = TypeVar("T")

STOP_REASONS = {
    "end_turn": "stop",
    "malformed_model_output": "stop",
    "malformed_tool_use": "tool_calls",
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

PROVIDER = "bedrock"
HANDLED = frozenset(
    {"temperature", "top_p", "top_k", "stop", "metadata", "user", "tools", "tool_choice", "response_format",
     "reasoning_effort"}
)
EFFORTS = ("low", "medium", "high", "xhigh")  # the OpenAI reasoning_effort values Converse also has
_MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "refusal", "is_error")


def finish_reason(stop_reason: object) -> str:
    return STOP_REASONS.get(str(stop_reason), "stop")


def usage_from(raw: dict[str, Any]) -> Usage:
    return usage_with_cache_beside(as_int(raw.get("inputTokens")), as_int(raw.get("cacheReadInputTokens")),
                                   as_int(raw.get("cacheWriteInputTokens")), as_int(raw.get("outputTokens")))


def _cache_point(part: dict[str, Any]) -> list[dict[str, Any]]:
    # `cache_control` on a part (the convention of OpenAI-compatible gateways) is a cache point after it.
    return [{"cachePoint": {"type": "default"}}] if part.get("cache_control") is not None else []


def _user_blocks(part: dict[str, Any], where: str) -> list[dict[str, Any]]:
    kind = part["type"]
    refuse_keys(PROVIDER, part, ("type", kind, "cache_control"), where)
    if kind == "text":
        return [{"text": part["text"]}, *_cache_point(part)]
    if kind == "image_url":
        img = image(PROVIDER, part, where)
        if img.url is not None:
            raise unsupported(PROVIDER, f"{where}.image_url.url", "images must be base64 data: URLs")
        assert img.media_type is not None
        block = {"image": {"format": img.media_type.removeprefix("image/"), "source": {"bytes": img.raw()}}}
        return [block, *_cache_point(part)]
    raise unsupported(PROVIDER, f"{where}.type", f"{kind} parts")


def _assistant_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(parts(message, where)):
        if part["type"] not in ("text", "refusal"):
            raise unsupported(PROVIDER, f"{where}.content[{j}].type", f"{part['type']} parts in assistant messages")
        refuse_keys(PROVIDER, part, ("type", part["type"], "cache_control"), f"{where}.content[{j}]")
        if part[part["type"]]:  # Bedrock refuses blank text blocks
            blocks.extend([{"text": part[part["type"]]}, *_cache_point(part)])
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        blocks.append({"text": message["refusal"]})
    for k, call in enumerate(message.get("tool_calls") or ()):
        ident, name, arguments = tool_input(PROVIDER, call, f"{where}.tool_calls[{k}]")
        blocks.append({"toolUse": {"toolUseId": ident, "name": name, "input": arguments}})
    return blocks


def _tool_result(message: dict[str, Any], where: str) -> dict[str, Any]:
    content = message.get("content")
    texts = [content] if isinstance(content, str) else [p["text"] for p in texts_only(PROVIDER, message, where)]
    result: dict[str, Any] = {"toolUseId": message["tool_call_id"], "content": [{"text": t} for t in texts]}
    if message.get("is_error") is True:  # carried from an Anthropic-shaped request
        result["status"] = "error"
    return {"toolResult": result}


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    # Tool results and the user text after them form one user turn, as Converse wants them.
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _messages(req: ChatRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(req.messages):
        where, role = f"messages[{i}]", message["role"]
        refuse_keys(PROVIDER, message, _MESSAGE_KEYS, where)
        if role in ("system", "developer"):
            for part in texts_only(PROVIDER, message, where):
                if part["text"]:
                    system.extend([{"text": part["text"]}, *_cache_point(part)])
        elif role == "user":
            _append(turns, "user", [b for j, p in enumerate(parts(message, where))
                                    for b in _user_blocks(p, f"{where}.content[{j}]")])
        elif role == "assistant":
            _append(turns, "assistant", _assistant_blocks(message, where))
        else:
            _append(turns, "user", [_tool_result(message, where)])
    return system, turns


def _tool_config(req: ChatRequest, turns: list[dict[str, Any]]) -> dict[str, Any] | None:
    tools: list[dict[str, Any]] = []
    for tool in function_tools(PROVIDER, req, ("cache_control",)):
        spec: dict[str, Any] = {"name": tool.name, "inputSchema": {"json": tool.parameters}}
        if tool.description:
            spec["description"] = tool.description
        if tool.strict is not None:
            spec["strict"] = tool.strict
        tools.append({"toolSpec": spec})
        if tool.extra.get("cache_control") is not None:
            tools.append({"cachePoint": {"type": "default"}})
    mode, name = tool_choice(req)
    if not tools:
        if mode in ("required", "named"):
            raise InvalidRequestError("tool_choice needs tools", "tool_choice")
        return None
    if mode == "none":
        # Converse has no "none"; leaving the tools out says the same unless the conversation already holds
        # tool calls (then Converse needs the tool configuration).
        if any("toolUse" in b or "toolResult" in b for turn in turns for b in turn["content"]):
            raise unsupported(PROVIDER, "tool_choice", "'none' once the conversation holds tool calls")
        return None
    config: dict[str, Any] = {"tools": tools}
    if mode == "required":
        config["toolChoice"] = {"any": {}}
    elif mode == "named":
        config["toolChoice"] = {"tool": {"name": name}}
    return config


def _request_metadata(req: ChatRequest) -> dict[str, str]:
    metadata = {str(k): str(v) for k, v in (req.params.get("metadata") or {}).items()}
    if req.params.get("user") is not None:
        metadata["user"] = str(req.params["user"])
    return metadata


def _output_config(req: ChatRequest) -> dict[str, Any]:
    output: dict[str, Any] = {}
    schema = json_schema(PROVIDER, req)
    if schema is not None:
        definition = {"schema": json.dumps(schema.schema), "name": schema.name}
        if schema.description:
            definition["description"] = schema.description
        output["textFormat"] = {"type": "json_schema", "structure": {"jsonSchema": definition}}
    level = effort(PROVIDER, req, EFFORTS)
    if level is not None:
        output["effort"] = level
    return output


def build_kwargs(req: ChatRequest) -> dict[str, Any]:
    params = req.params
    refuse_unhandled(PROVIDER, params, HANDLED)
    system, turns = _messages(req)
    config: dict[str, Any] = {}
    if req.output_limit is not None:
        config["maxTokens"] = req.output_limit
    if params.get("temperature") is not None:
        config["temperature"] = params["temperature"]
    if params.get("top_p") is not None:
        config["topP"] = params["top_p"]
    stop = stop_list(req)
    if stop is not None:
        config["stopSequences"] = stop
    kwargs: dict[str, Any] = {"modelId": req.model, "messages": turns}
    optional = {
        "system": system,
        "inferenceConfig": config,
        "toolConfig": _tool_config(req, turns),
        "additionalModelRequestFields": {"top_k": params["top_k"]} if params.get("top_k") is not None else None,
        "requestMetadata": _request_metadata(req),
        "outputConfig": _output_config(req),
    }
    kwargs.update({k: v for k, v in optional.items() if v})
    return kwargs


def result_from(resp: dict[str, Any], model: str) -> ChatResult:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in resp["output"]["message"]["content"]:
        if "text" in block:
            texts.append(str(block["text"]))
        elif "toolUse" in block:
            use = block["toolUse"]
            arguments = json.dumps(use.get("input") or {}, ensure_ascii=False)
            calls.append(ToolCall(id=str(use["toolUseId"]), name=str(use["name"]), arguments=arguments))
    meta = resp.get("ResponseMetadata") or {}
    return ChatResult(
        id="chatcmpl-" + str(meta.get("RequestId") or uuid.uuid4().hex),
        model=model,
        content="".join(texts) if texts or not calls else None,
        finish_reason=finish_reason(resp.get("stopReason")),
        usage=usage_from(resp["usage"]),
        tool_calls=tuple(calls),
    )


class _StreamState:
    """What a ConverseStream has said so far, turned into provider events."""

    def __init__(self) -> None:
        self.stop_reason: object = None
        self.stopped = False
        self.usage: Usage | None = None
        self.text: list[str] = []
        self.tool_index: dict[int, int] = {}  # content block index -> tool call index

    def read(self, event: dict[str, Any]) -> ProviderEvent | None:
        if "contentBlockStart" in event:
            start = event["contentBlockStart"]
            use = (start.get("start") or {}).get("toolUse")
            if use is None:
                return None
            index = self.tool_index[int(start["contentBlockIndex"])] = len(self.tool_index)
            return ToolCallDelta(index, id=str(use["toolUseId"]), name=str(use["name"]))
        if "contentBlockDelta" in event:
            block = event["contentBlockDelta"]
            delta = block["delta"]
            if delta.get("text"):
                self.text.append(delta["text"])
                return TextDelta(str(delta["text"]))
            piece = (delta.get("toolUse") or {}).get("input")
            if piece:
                self.text.append(piece)
                return ToolCallDelta(self.tool_index[int(block["contentBlockIndex"])], arguments=str(piece))
        elif "messageStop" in event:
            self.stop_reason = event["messageStop"].get("stopReason")
            self.stopped = True
        elif "metadata" in event:
            self.usage = usage_from(event["metadata"]["usage"])
        return None


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
    default_embedding_model = "amazon.titan-embed-text-v2:0"

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
            return result_from(resp, req.model)

    async def stream(self, req: ChatRequest) -> AsyncGenerator[ProviderEvent, None]:
        kwargs = build_kwargs(req)
        state = _StreamState()
        with boto_errors(self.name):
            resp = await self._in_thread(functools.partial(self._call, "converse_stream", kwargs))
            events = resp["stream"]
            try:
                reader = iter(events)
                while True:
                    # Abandon the read on cancellation; closing the stream below ends the thread's read.
                    event = await self._in_thread(
                        functools.partial(next, reader, None), abandon_on_cancel=True
                    )
                    if event is None:
                        break
                    found = state.read(event)
                    if found is not None:
                        yield found
            finally:
                events.close()
            if not state.stopped:
                raise ProviderError(f"{self.name} stream ended before completion", 502)
        usage = state.usage
        if usage is None:
            log.warning("bedrock sent no usage metadata for model %s; estimating", req.model)
            text = "".join(state.text)
            usage = Usage(self.estimate_input_tokens(req), self.estimate_output_tokens(text, len(state.text)))
        yield StreamEnd(finish_reason=finish_reason(state.stop_reason), usage=usage)

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResult:
        from aikit.llm.bedrock_embed import embed

        with boto_errors(self.name):
            return await embed(req, functools.partial(self._call, "invoke_model"))
