"""The request models of the OpenAI-compatible endpoints, met as a client meets them: requests the official
openai SDK builds are accepted and kept as sent; bad ones get a 422 naming the client's field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pydantic
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from aikit.api.errors import install_error_handlers
from aikit.api.openai_format import completion_json, embeddings_json
from aikit.api.schemas import MAX_JSON, MAX_STOP, MAX_TEXT, MAX_TOOLS, ChatCompletionRequest, EmbeddingsRequest
from aikit.llm.base import ChatResult, EmbeddingResult, Usage

PNG_URL = "data:image/png;base64,iVBORw0KGgo="
USER = {"role": "user", "content": "hi"}


def make_app() -> FastAPI:
    """Routes that validate with the real models and remember what they got, beside the raw JSON."""
    app = FastAPI()
    install_error_handlers(app)
    app.state.seen = []

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> dict[str, Any]:
        app.state.seen.append((body, await request.json()))
        result = ChatResult(id="x", model=body.model or "m", content="ok", finish_reason="stop", usage=Usage(1, 1))
        return completion_json("chatcmpl-1", result, 0)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest, request: Request) -> dict[str, Any]:
        app.state.seen.append((body, await request.json()))
        count = len(body.input) if isinstance(body.input, list) and not isinstance(body.input[0], int) else 1
        result = EmbeddingResult(model="e", embeddings=[[0.5, -0.25]] * count, usage=Usage(3, 0))
        return embeddings_json(result, body.encoding_format)

    return app


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(make_app()) as found:
        yield found


@pytest.fixture
def sdk(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(api_key="ak_test", base_url="http://testserver/v1", http_client=client, max_retries=0)


def seen(client: TestClient) -> tuple[Any, dict[str, Any]]:
    found: tuple[Any, dict[str, Any]] = client.app.state.seen[-1]  # type: ignore[attr-defined]
    return found


def without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


# ---------------------------------------------------------------------------- what the openai SDK sends


class Weather(pydantic.BaseModel):
    city: str
    temperature: float


def test_a_full_sdk_request_is_kept_as_sent(sdk: openai.OpenAI, client: TestClient) -> None:
    messages: Any = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}], "refusal": "no"},
        {"role": "user", "content": "and tomorrow?", "name": "alice"},
    ]
    sdk.chat.completions.create(
        model="gpt-4o", messages=messages, tools=[openai.pydantic_function_tool(Weather, name="get_weather")],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False,
        logprobs=True, top_logprobs=3, stop=["END"], seed=7, user="u-1", metadata={"team": "a"},
        reasoning_effort="low", max_completion_tokens=100, temperature=1, store=False, service_tier="flex",
        extra_body={"verbosity": "low", "prompt_cache_key": "k"},
    )
    body, raw = seen(client)
    assert body.messages_payload() == without_nulls(raw["messages"])
    assert body.params() == {k: v for k, v in raw.items() if k not in ("model", "messages", "stream")}
    assert body.params()["tools"][0]["function"]["strict"] is True  # the SDK's strict schema, untouched
    assert (body.params()["verbosity"], body.limit()) == ("low", 100)
    assert body.images() == 2


def test_the_sdk_structured_output_request_validates(sdk: openai.OpenAI, client: TestClient) -> None:
    with pytest.raises(Exception, match="ok"):  # our stub answers "ok", which is not a Weather
        sdk.chat.completions.parse(model="gpt-4o", messages=[{"role": "user", "content": "w"}], response_format=Weather)
    body, raw = seen(client)
    assert raw["response_format"]["type"] == "json_schema"
    assert body.params()["response_format"] == raw["response_format"]  # the "schema" key, not our alias


def test_sdk_embeddings_requests(sdk: openai.OpenAI, client: TestClient) -> None:
    found = sdk.embeddings.create(model="text-embedding-3-small", input=["a", "b"], dimensions=2)  # SDK asks base64
    assert [d.embedding for d in found.data] == [[0.5, -0.25], [0.5, -0.25]]
    body, raw = seen(client)
    assert (raw["encoding_format"], body.params()) == ("base64", {"encoding_format": "base64"})
    request = body.embedding_request("default")
    assert (request.input, request.model, request.dimensions) == (["a", "b"], "text-embedding-3-small", 2)
    plain = sdk.embeddings.create(model="m", input=[1, 2, 3], encoding_format="float")
    assert plain.usage.prompt_tokens == 3


# -------------------------------------------------------------------------------- errors name the field

BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"messages": [USER], "stream": "yes"}, "stream", "valid boolean"),
    ({"messages": [USER], "temperature": "1"}, "temperature", "valid number"),
    ({"messages": [USER], "max_tokens": 1.5}, "max_tokens", "valid integer"),
    ({"messages": [USER], "logprobs": 1}, "logprobs", "valid boolean"),
    ({"messages": [USER], "parallel_tool_calls": "true"}, "parallel_tool_calls", "valid boolean"),
    ({"messages": [USER], "seed": "7"}, "seed", "valid integer"),
    ({"messages": [USER], "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                {"type": "image_url", "image_url": "https://x"}]}]},
     "messages[0].content[1].image_url", "valid dictionary"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]},
     "messages[0].content[0].image_url.url", "should match pattern"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]},
     "messages[0].content[0].type", "must be one of text, image_url, input_audio, file"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "Field required"),
    ({"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}]},
     "messages[0].content[0].type", "must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "a string or a list of content parts"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "at least 1 item"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "must be one of system"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "Field required"),
    ({"messages": [{"role": "assistant"}]}, "messages[0].content", "required unless tool_calls are given"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content", "required unless tool_calls"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "Field required"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0].function.arguments", "Field required"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "file"}]}]},
     "messages[0].tool_calls[0].type", "must be one of function, custom"),
    ({"messages": [USER], "tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools[0].function.name", "should match pattern"),
    ({"messages": [USER], "tools": [{"type": "retrieval"}]}, "tools[0].type", "must be one of function, custom"),
    ({"messages": [USER], "tool_choice": "maybe"}, "tool_choice", "'none', 'auto' or 'required'"),
    ({"messages": [USER], "tool_choice": {"type": "function"}}, "tool_choice.function", "Field required"),
    ({"messages": [USER], "tool_choice": 3}, "tool_choice", "must be 'none', 'auto', 'required' or an object"),
    ({"messages": [USER], "response_format": {"type": "yaml"}}, "response_format.type", "must be one of text"),
    ({"messages": [USER], "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name", "Field required"),
    ({"messages": [USER], "stop": ["a"] * (MAX_STOP + 1)}, "stop", f"at most {MAX_STOP} items"),
    ({"messages": [USER], "stop": 5}, "stop", "a string or a list of strings"),
    ({"messages": [USER], "metadata": {"a": 1}}, "metadata.a", "valid string"),
    ({"messages": [USER], "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16 items"),
    ({"messages": [USER], "logit_bias": {"abc": 1}}, "logit_bias.abc", "should match pattern"),
    ({"messages": [USER], "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "boolean"),
    ({"messages": [USER], "reasoning_effort": "MAX!"}, "reasoning_effort", "should match pattern"),
    ({"messages": [USER], "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
     "tools", f"at most {MAX_TOOLS} items"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_TEXT + 1)}]}, "messages[0].content", "at most"),
    ({"messages": [USER], "novel_field": "x" * MAX_JSON}, "novel_field", "longer than"),
    ({"messages": [USER], **{f"f{i}": i for i in range(65)}}, "body", "more than 64 unknown fields"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({}, "messages", "Field required"),
]


@pytest.mark.parametrize(("body", "param", "fragment"), BAD)
def test_bad_chat_requests_name_the_clients_field(
    client: TestClient, body: dict[str, Any], param: str, fragment: str
) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert (error["param"], error["type"], error["code"]) == (param, "invalid_request_error", "invalid_value")
    assert error["message"].startswith(f"{param}: ")
    assert fragment in error["message"]
    detail = error["message"].removeprefix(f"{param}: ")
    for internal in ("constrained-str", "function-after", "tagged-union", "kind:", "role:", "part:", "list["):
        assert internal not in detail and internal not in param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": [True]}, "input"),
        ({"input": 5}, "input"),
        ({"input": ["a", 3]}, "input[1]"),
        ({"input": [[1], ["a"]]}, "input[1][0]"),
        ({"input": ""}, "input"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "dimensions": "8"}, "dimensions"),
    ],
)
def test_bad_embeddings_requests_name_the_field(client: TestClient, body: dict[str, Any], param: str) -> None:
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == 422
    assert r.json()["error"]["param"] == param


def test_not_json_and_not_an_object(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"{oops", headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]["message"]) == (422, "request body is not valid JSON")
    r = client.post("/v1/chat/completions", json=[USER])
    assert (r.status_code, r.json()["error"]["param"]) == (422, "body")


def test_unknown_fields_are_kept_everywhere(client: TestClient) -> None:
    body = {
        "messages": [{"role": "user", "x_trace": "t1",
                      "content": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}]}],
        "tools": [{"type": "function", "function": {"name": "f", "x_hint": 1}, "cache_control": {"type": "ephemeral"}}],
        "web_search_options": {"search_context_size": "low"},
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    model, _ = seen(client)
    assert model.messages_payload() == body["messages"]
    assert model.params() == {"tools": body["tools"], "web_search_options": body["web_search_options"]}


def test_prompt_size_counts_what_the_model_reads(client: TestClient) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "abcd"}], "tools": tools}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    model, _ = seen(client)
    assert model.prompt_chars() == len("abcd") + 1 + len(json.dumps(tools))
