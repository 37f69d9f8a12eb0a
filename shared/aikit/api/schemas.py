"""Request bodies of the OpenAI-compatible endpoints; validation errors name the field (422)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Model names reach Redis hash fields and SQL rows: keep them to a safe alphabet.
ModelName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/@+-]+$")]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Annotated[str, Field(max_length=1_000_000)]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=1_000_000)] | Annotated[list[TextPart], Field(max_length=256)]
    name: Annotated[str, Field(max_length=64)] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown OpenAI parameters are accepted and ignored, as SDKs send new ones over time.
    model_config = ConfigDict(extra="ignore")

    model: ModelName | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    stop: Annotated[str, Field(max_length=256)] | Annotated[list[str], Field(max_length=4)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: int | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def provider_params(self) -> dict[str, Any]:
        keys = ("temperature", "top_p", "stop", "presence_penalty", "frequency_penalty", "seed")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def messages_payload(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]
