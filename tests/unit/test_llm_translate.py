"""OpenAI-shaped requests translated for Anthropic's Messages API and Bedrock's Converse, without a network:
the corners of tools, tool choice, tool results, images, output formats, and what each one refuses."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from aikit.errors import InvalidRequestError, ProviderError, UnsupportedError
from aikit.llm import anthropic as anthropic_mod
from aikit.llm import bedrock as bedrock_mod
from aikit.llm.base import ChatRequest

PNG = b"\x89PNG\r\n\x1a\n0000"
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
USER = {"role": "user", "content": "hi"}


def anthropic_body(messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    return anthropic_mod.build_body(ChatRequest(messages, "claude-x", None, params))


def bedrock_kwargs(messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    return bedrock_mod.build_kwargs(ChatRequest(messages, "amazon.nova", None, params))


CONVERSATION: list[dict[str, Any]] = [
    USER,
    {"role": "assistant", "content": "", "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "one"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "two"}]},
    {"role": "user", "content": "and so?"},
]


def test_tool_results_and_what_follows_form_one_user_turn() -> None:
    body = anthropic_body(CONVERSATION, tools=[TOOL])
    assert body["messages"][1:] == [
        {"role": "assistant", "content": [  # the empty text is left out: Anthropic refuses empty blocks
            {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
            {"type": "tool_use", "id": "call_2", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "one"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "two"}]},
            {"type": "text", "text": "and so?"}]},
    ]
    kwargs = bedrock_kwargs(CONVERSATION, tools=[TOOL])
    assert kwargs["messages"][2] == {"role": "user", "content": [
        {"toolResult": {"toolUseId": "call_1", "content": [{"text": "one"}]}},
        {"toolResult": {"toolUseId": "call_2", "content": [{"text": "two"}]}},
        {"text": "and so?"}]}


@pytest.mark.parametrize(
    ("choice", "parallel", "anthropic_choice", "bedrock_choice"),
    [
        (None, None, None, None),
        ("auto", None, None, None),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}, "refused"),
        ("required", None, {"type": "any"}, {"any": {}}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}, {"tool": {"name": "f"}}),
        ("none", None, {"type": "none"}, "no tools"),
    ],
)
def test_tool_choice(choice: Any, parallel: Any, anthropic_choice: Any, bedrock_choice: Any) -> None:
    params = {"tools": [TOOL], "tool_choice": choice, "parallel_tool_calls": parallel}
    assert anthropic_body([USER], **params).get("tool_choice") == anthropic_choice
    if bedrock_choice == "refused":
        with pytest.raises(UnsupportedError, match="parallel_tool_calls"):
            bedrock_kwargs([USER], **params)
        return
    kwargs = bedrock_kwargs([USER], **params)
    if bedrock_choice == "no tools":  # Converse has no "none": the tools are left out instead
        assert "toolConfig" not in kwargs
    else:
        assert kwargs["toolConfig"].get("toolChoice") == bedrock_choice


def test_bedrock_refuses_tool_choice_none_once_tools_were_called() -> None:
    with pytest.raises(UnsupportedError) as info:
        bedrock_kwargs(CONVERSATION, tools=[TOOL], tool_choice="none")
    assert info.value.param == "tool_choice"


def test_a_forced_tool_needs_tools() -> None:
    for build in (anthropic_body, bedrock_kwargs):
        with pytest.raises(InvalidRequestError, match="tool_choice needs tools"):
            build([USER], tool_choice="required")


def test_strict_tools_and_cache_control() -> None:
    tool = {"type": "function", "cache_control": {"type": "ephemeral"},
            "function": {"name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True}}
    assert anthropic_body([USER], tools=[tool])["tools"] == [
        {"name": "f", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}, "description": "d",
         "strict": True}]
    assert bedrock_kwargs([USER], tools=[tool])["toolConfig"]["tools"] == [
        {"toolSpec": {"name": "f", "inputSchema": {"json": {"type": "object"}}, "description": "d", "strict": True}},
        {"cachePoint": {"type": "default"}}]


def test_effort_and_schema_output() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "description": "the answer",
                                                  "schema": {"type": "object"}}}
    assert anthropic_body([USER], response_format=fmt, reasoning_effort="low")["output_config"] == {
        "format": {"type": "json_schema", "schema": {"type": "object"}}, "effort": "low"}
    assert bedrock_kwargs([USER], response_format=fmt, reasoning_effort="xhigh")["outputConfig"] == {
        "textFormat": {"type": "json_schema", "structure": {"jsonSchema": {
            "schema": '{"type": "object"}', "name": "out", "description": "the answer"}}},
        "effort": "xhigh"}
    assert "output_config" not in anthropic_body([USER], response_format={"type": "text"})


def test_max_completion_tokens_is_the_output_limit() -> None:
    assert anthropic_body([USER], max_completion_tokens=77)["max_tokens"] == 77
    assert bedrock_kwargs([USER], max_completion_tokens=77)["inferenceConfig"] == {"maxTokens": 77}


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}]}, USER],
         "messages[0].content[0]"),
        ([USER, {"role": "assistant", "content": None, "tool_calls": [
            {**CALL, "function": {"name": "f", "arguments": "[1, 2]"}}]}],
         "messages[1].tool_calls[0].function.arguments"),
        ([USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "custom",
                                                                        "custom": {"name": "f", "input": "x"}}]}],
         "messages[1].tool_calls[0].type"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}}]}],
         "messages[0].content[0].image_url.detail"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AAAA"}}]}],
         "messages[0].content[0].image_url.url"),
        ([{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "text", "text": "x", "annotations": []}]}],
         "messages[0].content[0].annotations"),
        ([{**USER, "x_trace": "1"}], "messages[0].x_trace"),
    ],
)
def test_refused_parts_name_the_field(messages: list[dict[str, Any]], param: str) -> None:
    for build in (anthropic_body, bedrock_kwargs):
        with pytest.raises(UnsupportedError) as info:
            build(messages)
        assert info.value.param == param


def test_custom_tools_are_refused() -> None:
    custom = {"type": "custom", "custom": {"name": "sql"}}
    for build in (anthropic_body, bedrock_kwargs):
        with pytest.raises(UnsupportedError) as info:
            build([USER], tools=[custom])
        assert info.value.param == "tools[0].type"


def test_a_broken_data_url_is_a_400() -> None:
    broken = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,#"}}]}
    for build in (anthropic_body, bedrock_kwargs):
        with pytest.raises(ProviderError) as info:
            build([broken])
        assert (info.value.status, info.value.param) == (400, "messages[0].content[0].image_url.url")


def test_images_and_refusals_in_history() -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URL, "detail": "auto"}}]},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}], "refusal": None}]
    body = anthropic_body(messages)
    assert body["messages"][0]["content"][0]["source"]["media_type"] == "image/png"
    assert body["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "no"}]}
    kwargs = bedrock_kwargs(messages)
    assert kwargs["messages"][0]["content"][0] == {"image": {"format": "png", "source": {"bytes": PNG}}}
    assert kwargs["messages"][1] == {"role": "assistant", "content": [{"text": "no"}]}


def test_user_and_metadata() -> None:
    assert anthropic_body([USER], user="u1", metadata={"user_id": "u0"})["metadata"] == {"user_id": "u1"}
    assert bedrock_kwargs([USER], user="u1", metadata={"team": "a"})["requestMetadata"] == {"team": "a", "user": "u1"}
