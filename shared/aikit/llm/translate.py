"""What the translating providers (Anthropic, Bedrock) share: reading an OpenAI-format request and refusing,
with a 422 naming the field and the provider, whatever they cannot express. Nothing is dropped silently."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aikit.errors import InvalidRequestError
from aikit.llm.base import ChatRequest, content_parts, unsupported

# Values of OpenAI parameters that ask for nothing (OpenAI's defaults): a provider without the feature can
# still honour them. None always means "not given".
NEUTRAL: dict[str, object] = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "top_logprobs": 0,
    "parallel_tool_calls": True,
    "store": False,
    "logit_bias": {},
    "metadata": {},
    "tool_choice": "auto",
    "response_format": {"type": "text"},
}
# Fields that shape our answer to the client, not the model's work: every provider honours them.
OURS = frozenset({"stream_options", "max_completion_tokens"})
_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)(?:;[\w.+-]+=[\w.+-]+)*;base64,(?P<data>.*)$", re.S)


def is_neutral(key: str, value: object) -> bool:
    return value is None or (key in NEUTRAL and value == NEUTRAL[key])


def refuse_unhandled(provider: str, params: Mapping[str, Any], handled: Iterable[str]) -> None:
    """A 422 for the first parameter the provider has no equivalent for (unknown ones included)."""
    known = OURS | frozenset(handled)
    for key, value in params.items():
        if key not in known and not is_neutral(key, value):
            raise unsupported(provider, key)


def refuse_keys(provider: str, obj: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """A 422 for a field of a message, part or tool the provider has no equivalent for."""
    allowed = frozenset(allowed)
    for key, value in obj.items():
        if key not in allowed and value is not None:
            raise unsupported(provider, f"{where}.{key}")


def parts(message: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    return content_parts(message.get("content"), f"{where}.content")


def texts_only(provider: str, message: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """The parts of a message that may hold only text (system prompts, tool results)."""
    found = parts(message, where)
    for j, part in enumerate(found):
        if part["type"] != "text":
            reason = f"{part['type']} parts are allowed only in user messages"
            raise unsupported(provider, f"{where}.content[{j}]", reason)
    return found


@dataclass(frozen=True, slots=True)
class Image:
    media_type: str | None  # for base64 data
    data: str | None  # base64, as sent
    url: str | None  # an http(s) URL

    def raw(self) -> bytes:
        assert self.data is not None
        return base64.b64decode(self.data, validate=True)


IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})


def image(provider: str, part: Mapping[str, Any], where: str) -> Image:
    """An image_url part as base64 data (a data: URL) or a URL; what the provider cannot read is refused."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or not isinstance(url, str):
        raise InvalidRequestError(f"{where}.image_url.url must be a string", f"{where}.image_url.url")
    refuse_keys(provider, spec, ("url", "detail"), f"{where}.image_url")
    if spec.get("detail") not in (None, "auto"):
        raise unsupported(provider, f"{where}.image_url.detail", "it sizes images itself; send 'auto'")
    if url.startswith(("http://", "https://")):
        return Image(None, None, url)
    match = _DATA_URL.match(url)
    if not match:
        raise InvalidRequestError(f"{where}.image_url.url must be an http(s) URL or a base64 data: URL",
                                  f"{where}.image_url.url")
    media_type = match["type"].lower()
    if media_type not in IMAGE_TYPES:
        raise unsupported(provider, f"{where}.image_url.url", f"image type {media_type}; use png, jpeg, gif or webp")
    try:
        base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{where}.image_url.url holds invalid base64", f"{where}.image_url.url") from None
    return Image(media_type, match["data"], None)


def tool_input(provider: str, call: Mapping[str, Any], where: str) -> tuple[str, str, dict[str, Any]]:
    """(id, name, input) of an assistant's function tool call; the arguments must be a JSON object."""
    if call.get("type", "function") != "function":
        raise unsupported(provider, f"{where}.type", "only function tools")
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequestError(f"{where}.function.name is required", f"{where}.function.name")
    if not isinstance(call.get("id"), str):
        raise InvalidRequestError(f"{where}.id is required", f"{where}.id")
    arguments = function.get("arguments") or "{}"
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise unsupported(provider, f"{where}.function.arguments", "the arguments must be a JSON object")
    return str(call["id"]), str(function["name"]), value


@dataclass(frozen=True, slots=True)
class FunctionTool:
    name: str
    description: str | None
    parameters: dict[str, Any]
    strict: bool | None
    extra: dict[str, Any]  # cache_control, where given


def function_tools(provider: str, req: ChatRequest, extra_keys: Iterable[str] = ()) -> list[FunctionTool]:
    found: list[FunctionTool] = []
    for j, tool in enumerate(req.tools):
        where = f"tools[{j}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise unsupported(provider, f"{where}.type", "only function tools")
        refuse_keys(provider, tool, ("type", "function", *extra_keys), where)
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(f"{where}.function.name is required", f"{where}.function.name")
        refuse_keys(provider, function, ("name", "description", "parameters", "strict"), f"{where}.function")
        parameters = function.get("parameters")
        found.append(FunctionTool(
            name=function["name"],
            description=function.get("description"),
            parameters=parameters if isinstance(parameters, dict) else {"type": "object", "properties": {}},
            strict=function.get("strict"),
            extra={k: tool[k] for k in extra_keys if tool.get(k) is not None},
        ))
    return found


def tool_choice(req: ChatRequest) -> tuple[str, str | None]:
    """("auto" | "none" | "required" | "named", the named tool) from OpenAI's tool_choice."""
    choice = req.params.get("tool_choice")
    if choice is None:
        return "auto", None
    if isinstance(choice, str) and choice in ("auto", "none", "required"):
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return "named", function["name"]
    raise InvalidRequestError("tool_choice must be 'none', 'auto', 'required' or a named function",
                              "tool_choice")


@dataclass(frozen=True, slots=True)
class JsonSchema:
    name: str
    schema: dict[str, Any]
    description: str | None


def json_schema(provider: str, req: ChatRequest) -> JsonSchema | None:
    """The JSON schema response_format asks for; JSON mode without a schema is refused (no equivalent)."""
    fmt = req.params.get("response_format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        raise unsupported(provider, "response_format.type", "it has no JSON mode without a schema; send json_schema")
    spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
    if kind != "json_schema" or not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise InvalidRequestError("response_format must be text, json_object or json_schema with a name",
                                  "response_format")
    schema = spec.get("schema")
    return JsonSchema(spec["name"], schema if isinstance(schema, dict) else {"type": "object"},
                      spec.get("description"))


def stop_list(req: ChatRequest) -> list[str] | None:
    stop = req.params.get("stop")
    if stop is None:
        return None
    return [stop] if isinstance(stop, str) else list(stop)


def effort(provider: str, req: ChatRequest, levels: Iterable[str]) -> str | None:
    value = req.params.get("reasoning_effort")
    if value is None:
        return None
    if value not in frozenset(levels):
        raise unsupported(provider, "reasoning_effort", f"{value!r}; it knows {', '.join(levels)}")
    return str(value)
