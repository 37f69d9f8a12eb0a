"""Request bodies of the OpenAI-compatible endpoints, validated for type and size; errors name the field (422).

Fields are kept as the client sent them, unknown ones too: they pass on to OpenAI-compatible upstreams, and a
provider that cannot honour one refuses it by name. Types are strict: "yes" is not a boolean, "1" not a number.
Every union is discriminated (by role, by type, by JSON kind), so an error names one field of the client's
JSON, never a branch of ours.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from aikit.llm.base import ChatRequest, EmbeddingRequest, image_count, request_text

# Size limits, in characters unless said otherwise (the README lists them).
MAX_MESSAGES = 2048  # messages in one request
MAX_TEXT = 1_000_000  # one text: a content string, a text part, a tool result, a tool call's arguments
MAX_PARTS = 256  # content parts in one message
MAX_DATA_URL = 20_000_000  # an image URL or inline file/audio data (base64: about 15 MB of bytes)
MAX_TOOLS = 128  # tool definitions, and tool calls in one assistant message
MAX_NAME = 64  # function, schema and participant names
MAX_ID = 256  # tool call ids, file ids
MAX_DESCRIPTION = 100_000  # a tool's description
MAX_JSON = 1_000_000  # a JSON schema or an unknown field's value, serialized
MAX_UNKNOWN_FIELDS = 64  # unknown fields on one object
MAX_STOP = 4  # stop sequences (OpenAI's limit), each up to MAX_STOP_CHARS
MAX_STOP_CHARS = 256
MAX_METADATA = 16  # metadata pairs (OpenAI's limit): keys up to 64 characters, values up to 512
MAX_EMBEDDING_INPUTS = 2048  # inputs in one embeddings request (OpenAI's limit)
MAX_EMBEDDING_TEXT = 100_000  # one embedding input; upstreams enforce their token limits
MAX_DIMENSIONS = 16_384

# Model names reach Redis hash fields and SQL rows: keep them to a safe alphabet.
ModelName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/@+-]+$")]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
FunctionName = Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9_-]+$")]
Ident = Annotated[str, Field(min_length=1, max_length=MAX_ID)]
ShortText = Annotated[str, Field(max_length=256)]
JsonObject = dict[str, Any]  # a JSON schema and the like; its serialized size is bounded by MAX_JSON


def _oversized(value: object) -> bool:
    return len(json.dumps(value)) > MAX_JSON


class Open(BaseModel):
    """An object of the OpenAI API: known fields strictly typed, unknown ones kept as sent (and bounded)."""

    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="after")
    def _bounded_unknown_fields(self) -> Open:
        extra = self.__pydantic_extra__
        if not extra:
            return self
        if len(extra) > MAX_UNKNOWN_FIELDS:
            raise PydanticCustomError("too_many_fields", "more than {limit} unknown fields",
                                      {"limit": MAX_UNKNOWN_FIELDS})
        for key, value in extra.items():
            if _oversized(value):  # the type names the field (see one_of)
                raise PydanticCustomError(f"too_long:{key}", "longer than {limit} characters of JSON",
                                          {"limit": MAX_JSON})
        return self


def _check_json(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and _oversized(value):
        raise PydanticCustomError("too_long", "longer than {limit} characters of JSON", {"limit": MAX_JSON})
    return value


def by_field(prefix: str, key: str, known: frozenset[str]) -> Any:
    """A discriminator reading `key` of a JSON object (or a model): 'prefix:value', None when unknown."""

    def tag(value: Any) -> str | None:
        found = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
        return f"{prefix}:{found}" if isinstance(found, str) and found in known else None

    return tag


def by_kind(value: Any) -> str | None:
    """A discriminator by JSON kind: 'kind:str' or 'kind:list'."""
    if isinstance(value, str):
        return "kind:str"
    if isinstance(value, list):
        return "kind:list"
    return None


def one_of(tag: Any, message: str, field: str | None = None) -> Any:
    """A union discriminated by a function returning the branch's Tag, whose failure to pick a branch is one clear
    error. Its type, `invalid_choice:<field>`, names the field that picks the branch: an error type
    `<kind>:<field>` is about that field of the object at the error's location (api.errors reads it).
    Unions picked by a field (role, type) use pydantic's own discriminator: faster, and api.errors words its
    errors the same way."""
    return Discriminator(tag, custom_error_type=f"invalid_choice:{field}" if field else "invalid_choice",
                         custom_error_message=message)


# ------------------------------------------------------------------------------------------ content parts


class TextPart(Open):
    type: Literal["text"]
    text: Text


class RefusalPart(Open):
    type: Literal["refusal"]
    refusal: Text


class ImageURL(Open):
    url: Annotated[str, Field(min_length=1, max_length=MAX_DATA_URL, pattern=r"^(https?://|data:image/)")]
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Open):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(Open):
    data: Annotated[str, Field(min_length=1, max_length=MAX_DATA_URL)]
    format: Annotated[str, Field(min_length=1, max_length=16)]


class AudioPart(Open):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileSpec(Open):
    file_data: Annotated[str, Field(max_length=MAX_DATA_URL)] | None = None
    file_id: Ident | None = None
    filename: ShortText | None = None


class FilePart(Open):
    type: Literal["file"]
    file: FileSpec


UserPart = Annotated[
    TextPart | ImagePart | AudioPart | FilePart,
    Field(discriminator="type"),
]
AssistantPart = Annotated[
    TextPart | RefusalPart,
    Field(discriminator="type"),
]
_CONTENT = "must be a string or a list of content parts"
TextContent = Annotated[
    Annotated[Text, Tag("kind:str")]
    | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_PARTS), Tag("kind:list")],
    one_of(by_kind, _CONTENT),
]
UserContent = Annotated[
    Annotated[Text, Tag("kind:str")]
    | Annotated[list[UserPart], Field(min_length=1, max_length=MAX_PARTS), Tag("kind:list")],
    one_of(by_kind, _CONTENT),
]
AssistantContent = Annotated[
    Annotated[Text, Tag("kind:str")]
    | Annotated[list[AssistantPart], Field(min_length=1, max_length=MAX_PARTS), Tag("kind:list")],
    one_of(by_kind, _CONTENT),
]

# ------------------------------------------------------------------------------------------------ messages


class CalledFunction(Open):
    name: FunctionName
    arguments: Text


class FunctionCall(Open):
    id: Ident
    type: Literal["function"]
    function: CalledFunction


class CalledCustom(Open):
    name: FunctionName
    input: Text


class CustomCall(Open):
    id: Ident
    type: Literal["custom"]
    custom: CalledCustom


ToolCall = Annotated[
    FunctionCall | CustomCall,
    Field(discriminator="type"),
]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]


class SystemMessage(Open):
    role: Literal["system"]
    content: TextContent
    name: Name | None = None


class DeveloperMessage(Open):
    role: Literal["developer"]
    content: TextContent
    name: Name | None = None


class UserMessage(Open):
    role: Literal["user"]
    content: UserContent
    name: Name | None = None


class AssistantMessage(Open):
    role: Literal["assistant"]
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None  # before content: see below
    content: Annotated[AssistantContent | None, Field(validate_default=True)] = None
    refusal: Text | None = None
    name: Name | None = None

    @field_validator("content")
    @classmethod
    def _says_something(cls, content: object, info: ValidationInfo) -> object:
        if content is None and not info.data.get("tool_calls"):
            raise PydanticCustomError("missing", "required unless tool_calls are given")
        return content


class ToolMessage(Open):
    role: Literal["tool"]
    content: TextContent
    tool_call_id: Ident


Message = Annotated[
    SystemMessage
    | DeveloperMessage
    | UserMessage
    | AssistantMessage
    | ToolMessage,
    Field(discriminator="role"),
]

# --------------------------------------------------------------------------------------------------- tools


class FunctionDefinition(Open):
    name: FunctionName
    description: Annotated[str, Field(max_length=MAX_DESCRIPTION)] | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _bounded(self) -> FunctionDefinition:
        _check_json(self.parameters)
        return self


class FunctionTool(Open):
    type: Literal["function"]
    function: FunctionDefinition


class CustomDefinition(Open):
    name: FunctionName
    description: Annotated[str, Field(max_length=MAX_DESCRIPTION)] | None = None
    format: JsonObject | None = None


class CustomTool(Open):
    type: Literal["custom"]
    custom: CustomDefinition


Tool = Annotated[
    FunctionTool | CustomTool,
    Field(discriminator="type"),
]


class NamedFunction(Open):
    name: FunctionName


class FunctionChoice(Open):
    type: Literal["function"]
    function: NamedFunction


class CustomChoice(Open):
    type: Literal["custom"]
    custom: NamedFunction


class AllowedToolsChoice(Open):
    type: Literal["allowed_tools"]
    allowed_tools: JsonObject


def _choice_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "choice:mode"
    tag: str | None = by_field("choice", "type", frozenset({"function", "custom", "allowed_tools"}))(value)
    return tag


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("choice:mode")]
    | Annotated[FunctionChoice, Tag("choice:function")]
    | Annotated[CustomChoice, Tag("choice:custom")]
    | Annotated[AllowedToolsChoice, Tag("choice:allowed_tools")],
    one_of(_choice_tag, "must be 'none', 'auto', 'required' or an object naming a tool"),
]

# ---------------------------------------------------------------------------------------- response format


class TextFormat(Open):
    type: Literal["text"]


class JsonObjectFormat(Open):
    type: Literal["json_object"]


class JsonSchemaSpec(Open):
    name: FunctionName
    description: Annotated[str, Field(max_length=MAX_DESCRIPTION)] | None = None
    schema_: Annotated[JsonObject | None, Field(alias="schema")] = None
    strict: bool | None = None

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)

    @model_validator(mode="after")
    def _bounded(self) -> JsonSchemaSpec:
        _check_json(self.schema_)
        return self


class JsonSchemaFormat(Open):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextFormat
    | JsonObjectFormat
    | JsonSchemaFormat,
    Field(discriminator="type"),
]
Stop = Annotated[
    Annotated[Annotated[str, Field(max_length=MAX_STOP_CHARS)], Tag("kind:str")]
    | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP),
                Tag("kind:list")],
    one_of(by_kind, "must be a string or a list of strings"),
]
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=MAX_METADATA),
]


class StreamOptions(Open):
    include_usage: bool | None = None


# ---------------------------------------------------------------------------------------- the request


class ChatCompletionRequest(Open):
    model: ModelName | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    stop: Stop | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: Annotated[
        dict[Annotated[str, Field(pattern=r"^\d{1,10}$")], Annotated[int, Field(ge=-100, le=100)]],
        Field(max_length=1024),
    ] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    user: ShortText | None = None
    metadata: Metadata | None = None
    store: bool | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z_]+$")] | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def provider_params(self) -> dict[str, Any]:
        """The sampling parameters alone (what bench/bench_api.py's mounted routes forward; the chat route
        forwards every field, `params()`)."""
        keys = ("temperature", "top_p", "stop", "presence_penalty", "frequency_penalty", "seed")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    @cached_property
    def _payload(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        # Dumped once per request: the route, the limiter and the provider all read it (and none changes it).
        messages = [m.model_dump(exclude_none=True, by_alias=True) for m in self.messages]
        params = self.model_dump(exclude_none=True, by_alias=True,
                                 exclude={"model", "messages", "stream", "max_tokens"})
        return messages, params

    def messages_payload(self) -> list[dict[str, Any]]:
        """The messages as sent (a null field means absent in the OpenAI API, so nulls are left out)."""
        return self._payload[0]

    def params(self) -> dict[str, Any]:
        """Every field but model, messages, stream and max_tokens, as sent (unknown ones included): the
        `**params` of `LLM.chat` / `LLM.stream`."""
        return self._payload[1]

    def chat_request(self, default_model: str) -> ChatRequest:
        return ChatRequest(self.messages_payload(), self.model or default_model, self.max_tokens, self.params())

    def prompt_chars(self) -> int:
        """Characters the model reads (messages, tool definitions, output schema), for reserving quota."""
        return len(request_text(self.chat_request("")))

    def images(self) -> int:
        return image_count(self.messages_payload())


# ------------------------------------------------------------------------------------------------ embeddings


def _embedding_input_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "input:text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, str):
        return "input:texts"
    if isinstance(first, int) and not isinstance(first, bool):
        return "input:ids"
    return "input:id_lists" if isinstance(first, list) else None


EmbeddingText = Annotated[str, Field(min_length=1, max_length=MAX_EMBEDDING_TEXT)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_EMBEDDING_TEXT)]
EmbeddingInput = Annotated[
    Annotated[EmbeddingText, Tag("input:text")]
    | Annotated[list[EmbeddingText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS), Tag("input:texts")]
    | Annotated[TokenIds, Tag("input:ids")]
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS), Tag("input:id_lists")],
    one_of(_embedding_input_tag, "must be a string, a list of strings, or token ids (a list of integers or of lists)"),
]


class EmbeddingsRequest(Open):
    model: ModelName | None = None
    input: EmbeddingInput
    dimensions: Annotated[int, Field(ge=1, le=MAX_DIMENSIONS)] | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: ShortText | None = None

    def params(self) -> dict[str, Any]:
        """Every field but model, input and dimensions, as sent: the EmbeddingRequest's params."""
        return self.model_dump(exclude_none=True, exclude={"model", "input", "dimensions"})

    def embedding_request(self, default_model: str) -> EmbeddingRequest:
        return EmbeddingRequest(self.input, self.model or default_model, self.dimensions, self.params())
