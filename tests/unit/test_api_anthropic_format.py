"""Anthropic's Messages API as a wire format of ours: requests read into our request (and, for the Anthropic
provider, back to the very body the client sent), answers and streams read back by the official anthropic SDK."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import anthropic
import httpx2  # the anthropic SDK's HTTP client
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aikit.api.anthropic_format import MessagesRequest, MessageStream, error_json, message_json
from aikit.api.errors import install_error_handlers
from aikit.api.schemas import ChatCompletionRequest
from aikit.errors import UnsupportedError
from aikit.llm import anthropic as anthropic_provider
from aikit.llm import bedrock as bedrock_provider
from aikit.llm.base import ChatResult, ExtraDelta, StreamEnd, StreamEvent, TextDelta, ToolCall, ToolCallDelta, Usage

PNG_DATA = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
CACHE = {"type": "ephemeral"}
# A Messages request using everything this API translates.
BODY: dict[str, Any] = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 512,
    "system": [{"type": "text", "text": "You are a weather bot.", "cache_control": CACHE}],
    "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "Weather here?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_DATA}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/sky.jpg"}, "cache_control": CACHE},
        ]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Lyon"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "22 degrees"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "down"}],
             "is_error": True},
            {"type": "text", "text": "Thanks. Summarize.", "cache_control": CACHE},
        ]},
    ],
    "tools": [{"name": "get_weather", "description": "Weather of a city", "cache_control": CACHE,
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
    "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    "stop_sequences": ["END"],
    "metadata": {"user_id": "user-7"},
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 40,
    "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}, "effort": "high"},
}


def parsed(body: dict[str, Any]) -> MessagesRequest:
    return MessagesRequest.model_validate(body)


# -------------------------------------------------------------------------------------------- requests in


def test_routed_to_the_anthropic_provider_the_body_comes_out_as_it_went_in() -> None:
    request = parsed(BODY).chat_request("anthropic")
    sent = anthropic_provider.build_body(request)
    expected = copy.deepcopy(BODY)
    expected["messages"][2]["content"][1]["content"] = [{"type": "text", "text": "down"}]
    assert sent == expected


def test_translated_for_bedrock_cache_control_becomes_cache_points() -> None:
    body = copy.deepcopy({**BODY, "output_config": None, "tool_choice": {"type": "any"}})
    del body["messages"][0]["content"][2]  # an image by URL: Converse takes bytes only
    kwargs = bedrock_provider.build_kwargs(parsed(body).chat_request("bedrock"))
    assert kwargs["system"] == [{"text": "You are a weather bot."}, {"cachePoint": {"type": "default"}}]
    result = kwargs["messages"][2]["content"][1]
    assert result == {"toolResult": {"toolUseId": "toolu_2", "content": [{"text": "down"}], "status": "error"}}
    assert kwargs["messages"][2]["content"][-1] == {"cachePoint": {"type": "default"}}
    assert kwargs["toolConfig"]["toolChoice"] == {"any": {}}
    assert kwargs["toolConfig"]["tools"][1] == {"cachePoint": {"type": "default"}}
    assert kwargs["inferenceConfig"] == {"maxTokens": 512, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"]}
    assert kwargs["additionalModelRequestFields"] == {"top_k": 40}
    assert kwargs["requestMetadata"] == {"user": "user-7"}


def test_for_openai_compatible_upstreams_the_request_is_an_openai_request() -> None:
    request = parsed({**BODY, "top_k": None}).chat_request("openai")
    assert request.max_tokens == 512
    # What an OpenAI client could have sent: it passes our own OpenAI request model.
    ChatCompletionRequest.model_validate({"model": request.model, "messages": request.messages, **request.params})
    system, user, assistant, result1, result2, follow = request.messages
    assert system == {"role": "system", "content": [{"type": "text", "text": "You are a weather bot."}]}
    assert user["content"][1] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_DATA}"}}
    assert assistant["tool_calls"][1] == {"id": "toolu_2", "type": "function",
                                          "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}
    assert result1 == {"role": "tool", "tool_call_id": "toolu_1", "content": "22 degrees"}
    assert result2["content"] == [{"type": "text", "text": "Error: "}, {"type": "text", "text": "down"}]
    assert follow == {"role": "user", "content": [{"type": "text", "text": "Thanks. Summarize."}]}
    assert request.params["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert request.params["parallel_tool_calls"] is False
    assert request.params["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert (request.params["user"], request.params["stop"], request.params["reasoning_effort"]) == (
        "user-7", ["END"], "high")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"service_tier": "auto"}, "service_tier"),
        ({"metadata": {"user_id": "u", "team": "x"}}, "metadata.team"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "citations": [{"a": 1}]}]}]},
         "messages[0].content[0].citations"),
    ],
)
def test_what_this_api_cannot_translate_is_refused_by_name(change: dict[str, Any], param: str) -> None:
    with pytest.raises(UnsupportedError) as info:
        parsed({**BODY, **change}).chat_request("anthropic")
    assert (info.value.status, info.value.param) == (422, param)


def test_null_fields_the_sdk_echoes_back_are_fine() -> None:
    """The SDK's own blocks, sent back as model_dump() gives them, carry nulls (caller, citations...)."""
    echoed = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}, "caller": None, "toolset_name": None}
    body = {**BODY, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [echoed]},
                                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]}]}
    parsed(body).chat_request("anthropic")


def validation_app() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest) -> dict[str, str]:
        return {"model": body.model}

    return TestClient(app)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**BODY, "max_tokens": None}, "max_tokens"),
        ({**BODY, "stream": "yes"}, "stream"),
        ({**BODY, "temperature": 1.5}, "temperature"),
        ({**BODY, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({**BODY, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
         "messages[0].content[0].type"),
        ({**BODY, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": "AA"}}]}]},
         "messages[0].content[0].source.media_type"),
        ({**BODY, "tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({**BODY, "tools": [{"name": "f"}]}, "tools[0].input_schema"),
    ],
)
def test_bad_messages_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with validation_app() as client:
        r = client.post("/v1/messages", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == param


# -------------------------------------------------------------------------------------------- answers out

USAGE = Usage(input_tokens=150, output_tokens=40, cached_tokens=100, cache_write_tokens=20)


def sdk(answer: Callable[[httpx2.Request], httpx2.Response]) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="ak_test", base_url="http://aikit.test", max_retries=0,
                               http_client=httpx2.Client(transport=httpx2.MockTransport(answer)))


QUESTION: Any = [{"role": "user", "content": "weather?"}]


def test_a_message_read_by_the_sdk() -> None:
    result = ChatResult(id="x", model="claude-x", content="Checking.", finish_reason="tool_calls", usage=USAGE,
                        tool_calls=(ToolCall("toolu_1", "get_weather", '{"city": "Paris"}'),
                                    ToolCall("toolu_2", "broken", "{not json")))
    body = message_json("msg_1", result)
    message = sdk(lambda _: httpx2.Response(200, json=body)).messages.create(
        model="claude-x", max_tokens=10, messages=QUESTION)
    text, use, broken = message.content
    assert text.type == "text" and text.text == "Checking."
    assert use.type == "tool_use" and (use.id, use.name, use.input) == ("toolu_1", "get_weather", {"city": "Paris"})
    assert broken.type == "tool_use" and broken.input == {"arguments": "{not json"}  # kept, not lost
    assert (message.id, message.stop_reason) == ("msg_1", "tool_use")
    # Billed as Anthropic bills: uncached input beside cache reads and writes; the total is what was metered.
    usage = message.usage
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens,
            usage.output_tokens) == (30, 100, 20, 40)


@pytest.mark.parametrize(
    ("finish", "sequence", "reason"),
    [("stop", None, "end_turn"), ("stop", "END", "stop_sequence"), ("length", None, "max_tokens"),
     ("content_filter", None, "refusal"), ("tool_calls", None, "tool_use")],
)
def test_stop_reasons(finish: str, sequence: str | None, reason: str) -> None:
    result = ChatResult(id="x", model="m", content="a", finish_reason=finish, usage=USAGE, stop_sequence=sequence)
    assert (message_json("msg", result)["stop_reason"], message_json("msg", result)["stop_sequence"]) == (
        reason, sequence)


def stream_body(events: list[StreamEvent]) -> bytes:
    writer = MessageStream("msg_s", "claude-x")
    lines = [writer.start()]
    for event in events:
        lines.extend(writer.event(event))
    return "".join(lines).encode()


def serving_stream(body: bytes) -> anthropic.Anthropic:
    return sdk(lambda _: httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"}))


def test_a_stream_read_by_the_sdk() -> None:
    events: list[StreamEvent] = [
        TextDelta("Let me "), TextDelta("check."),
        ToolCallDelta(0, id="call_1", name="get_weather"), ToolCallDelta(0, arguments='{"city": '),
        ToolCallDelta(0, arguments='"Paris"}'),
        ExtraDelta({"reasoning_content": "x"}),  # no place for it in Anthropic's format
        ToolCallDelta(1, id="call_2", name="get_time", arguments="{}"),
        StreamEnd("tool_calls", USAGE),
    ]
    with serving_stream(stream_body(events)).messages.stream(
        model="claude-x", max_tokens=10, messages=QUESTION
    ) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    text, first, second = message.content
    assert text.type == "text" and text.text == "Let me check."
    assert first.type == "tool_use" and (first.id, first.name, first.input) == ("call_1", "get_weather",
                                                                                {"city": "Paris"})
    assert second.type == "tool_use" and (second.name, second.input) == ("get_time", {})
    assert message.stop_reason == "tool_use"
    usage = message.usage  # message_delta carries the final figures
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens,
            usage.output_tokens) == (30, 100, 20, 40)


def test_a_stream_error_reaches_the_sdk() -> None:
    writer = MessageStream("msg_e", "claude-x")
    body = (writer.start() + "".join(writer.event(TextDelta("Hi"))) + writer.error(502, "upstream failed")).encode()
    with pytest.raises(anthropic.APIStatusError, match="upstream failed"), serving_stream(body).messages.stream(
        model="claude-x", max_tokens=10, messages=QUESTION
    ) as stream:
        stream.get_final_message()


def test_error_bodies_use_anthropics_types() -> None:
    assert error_json(429, "slow down") == {"type": "error", "error": {"type": "rate_limit_error",
                                                                       "message": "slow down"}}
    assert error_json(422, "x")["error"]["type"] == "invalid_request_error"
    assert error_json(402, "x")["error"]["type"] == "billing_error"
    assert error_json(500, "x")["error"]["type"] == "api_error"
