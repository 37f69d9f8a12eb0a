"""aikit.api.json_response: orjson's bytes are Starlette's JSONResponse bytes for what the API answers, and
what orjson cannot write falls back to Starlette's rendering."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.responses import JSONResponse

from aikit.api.json_response import FastJSONResponse

SAMPLES: list[Any] = [
    {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "echo-1",
     "choices": [{"index": 0, "message": {"role": "assistant", "content": "echo: héllo \"w\" \\ \n\t 😀 \u2028"},
                  "finish_reason": "stop", "logprobs": None}],
     "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    {"a": "".join(chr(i) for i in range(0x30)), "f": [0.1, 1 / 3, 2.0, -0.0, 1e16, 123456789.125], "t": True},
    [], {}, "text", 12, None,
]


@pytest.mark.parametrize("content", SAMPLES)
def test_the_bytes_are_starlettes(content: Any) -> None:
    assert FastJSONResponse(content).body == JSONResponse(content).body


@pytest.mark.parametrize("content", [{"big": 2**70}, {1: "int key"}, {"s": "\ud800"}])
def test_what_orjson_cannot_write_is_rendered_by_starlette(content: Any) -> None:
    if "s" in content:
        with pytest.raises(UnicodeEncodeError):  # as Starlette's JSONResponse does
            FastJSONResponse(content)
        return
    assert FastJSONResponse(content).body == JSONResponse(content).body
