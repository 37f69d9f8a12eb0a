"""Local HTTP servers that imitate the LLM providers' wire protocols, for tests.

Each runs a real HTTP/1.1 server on 127.0.0.1 (a free port) in a background thread:

    with openai_server() as srv:        # srv.base_url -> "http://127.0.0.1:PORT/v1"
        srv.inject("500")               # the next request fails that way (times=N for more)
        ...                             # srv.requests: what the server received

Faults every server knows: "500", "503", "401", "429", "slow" (answers after `slow_seconds`), "malformed"
(broken JSON; in a stream after the first text), "die_mid_stream" (the connection drops after two text
pieces), "truncate" (the stream body ends cleanly after two text pieces, unfinished).
OpenAI also: "invalid_model" (404 model_not_found), "bad_request" (400), "no_usage" (stream without a usage
chunk), "refusal" (the model refuses: `refusal` set, content null).
Anthropic also: "invalid_model" (404), "bad_request" (400), "529" (overloaded), "error_event"
(an overloaded error event after two text pieces), "error_before_text" (right after message_start).
Bedrock also: "validation" (400), "invalid_model" (404 ResourceNotFound), "throttle" (429),
"model_timeout" (408), "stream_exception" (a throttlingException event after two text pieces).

The Bedrock server speaks the AWS event-stream binary framing for ConverseStream, so the real boto3 client
is used against it unchanged (`endpoint_url=srv.base_url`).

Each fake checks requests the way its service does (unknown fields, tool results that answer no tool call,
tool calls left unanswered, bad images, malformed tools: 400 / ValidationException with the service's kind
of message), and plays a small conversation:
- tools given, tool choice not "none", and the last turn the user's: it calls the named (or first) tool
  with `tool_arguments` (`tool_calls_per_turn` calls, when parallel calls are allowed), streaming the
  arguments in pieces;
- the last turn a tool result: it answers "The tool said: <result>";
- JSON output asked for (OpenAI response_format json_object/json_schema, Anthropic output_config.format,
  Bedrock outputConfig.textFormat): it answers `json.dumps(json_reply)`;
- otherwise `reply`.
Input usage grows with what the model reads, as providers bill it: TOOL_TOKENS per tool definition and
IMAGE_TOKENS per image on top of the base figure. `last_usage` keeps the usage last reported, as sent.
OpenAI also serves /v1/embeddings (float and base64) and Bedrock InvokeModel for Titan and Cohere embedding
models (Cohere's tokens in the `X-Amzn-Bedrock-Input-Token-Count` header, as Bedrock reports them).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import socket
import struct
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

DEFAULT_REPLY = "Hello from the fake provider today"
TOOL_TOKENS = 50  # input tokens a tool definition costs
IMAGE_TOKENS = 255  # input tokens an image costs
IMAGE_MAGIC = {"png": b"\x89PNG", "jpeg": b"\xff\xd8\xff", "gif": b"GIF8", "webp": b"RIFF"}
_DATA_URL = re.compile(r"^data:image/(png|jpeg|gif|webp);base64,(.*)$", re.S)
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class Refused(Exception):
    """The request is invalid the way the imitated service says it: (status, message, param)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def image_bytes(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(f"{where}: invalid base64 image data", where) from None


def check_image(raw: bytes, fmt: str, where: str) -> None:
    if not raw.startswith(IMAGE_MAGIC.get(fmt, b"?")):
        raise Refused(f"{where}: the image data is not a valid {fmt} image", where)


def word_pieces(text: str) -> list[str]:
    """A text in stream pieces: each word with its following space."""
    if not text:
        return []
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + words[-1:]


def pieces(text: str, size: int = 5) -> list[str]:
    """A text in stream pieces of `size` characters."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def vector(text: str, dimensions: int) -> list[float]:
    raw = hashlib.sha256(text.encode()).digest() * (dimensions // 32 + 1)
    values = [b / 255 - 0.5 for b in raw[:dimensions]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        rec = Recorded("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        fake = self.server.fake
        fault = fake.record(rec)
        try:
            if fault == "slow" and fake.wait(fake.slow_seconds):
                return  # server shutting down
            fake.handle(self, rec, fault)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a timeout test); nothing to answer

    # Writing helpers for the fakes.
    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json", headers)

    def send_bytes(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def start_chunked(self, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def die(self) -> None:
        """Drop the connection in the middle of a chunked body."""
        self.wfile.flush()
        self.close_connection = True
        with suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeLLMServer) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # clients hanging up is what the fault tests do
        super().handle_error(request, client_address)


class FakeLLMServer:
    """The shared machinery: start/stop, recorded requests, queued faults."""

    base_path: ClassVar[str] = ""
    faults: ClassVar[frozenset[str]] = frozenset(
        {"500", "503", "401", "429", "slow", "malformed", "die_mid_stream", "truncate"}
    )

    def __init__(self, reply: str = DEFAULT_REPLY, slow_seconds: float = 2.0) -> None:
        self.reply = reply
        self.slow_seconds = slow_seconds
        self.tool_arguments: dict[str, Any] = {"city": "Paris", "unit": "celsius"}
        self.tool_calls_per_turn = 1
        self.json_reply: dict[str, Any] = {"city": "Paris", "temperature": 22}
        self.last_usage: dict[str, Any] | None = None
        self.requests: list[Recorded] = []
        self._faults: deque[str] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self.base_path}"

    def inject(self, fault: str, times: int = 1) -> None:
        if fault not in self.faults:
            raise ValueError(f"unknown fault {fault!r}; known: {sorted(self.faults)}")
        with self._lock:
            self._faults.extend([fault] * times)

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self.requests.clear()

    def record(self, rec: Recorded) -> str | None:
        with self._lock:
            self.requests.append(rec)
            return self._faults.popleft() if self._faults else None

    def wait(self, seconds: float) -> bool:
        """Sleep, waking early (True) when the server is stopping."""
        return self._stopping.wait(seconds)

    def words(self) -> list[str]:
        """The reply in stream pieces: each word with its following space."""
        return word_pieces(self.reply)

    def handle(self, h: _Handler, rec: Recorded, fault: str | None) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# ---------------------------------------------------------------------------------------------- OpenAI

OPENAI_FIELDS = frozenset(
    {
        "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
        "top_p", "n", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
        "seed", "user", "metadata", "store", "tools", "tool_choice", "parallel_tool_calls", "response_format",
        "reasoning_effort", "service_tier", "modalities", "audio", "prediction", "web_search_options", "verbosity",
        "safety_identifier", "prompt_cache_key", "functions", "function_call",
    }
)


def _openai_content_images(content: Any, where: str) -> int:
    """Check a message's parts as OpenAI does; the number of images in them."""
    if content is None or isinstance(content, str):
        return 0
    if not isinstance(content, list):
        raise Refused(f"Invalid type for '{where}': expected a string or an array", where)
    images = 0
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal"):
            if not isinstance(part.get(kind), str):
                raise Refused(f"Missing required parameter: '{at}.{kind}'.", f"{at}.{kind}")
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url")
            if not isinstance(url, str):
                raise Refused(f"Missing required parameter: '{at}.image_url.url'.", f"{at}.image_url.url")
            match = _DATA_URL.match(url)
            if match:
                check_image(image_bytes(match[2], at), match[1], at)
            elif not url.startswith(("http://", "https://")):
                raise Refused(f"Invalid image URL: '{at}.image_url.url'. Expected a base64-encoded data URL "
                              "with an image MIME type, or a valid URL.", f"{at}.image_url.url")
            images += 1
        elif kind not in ("input_audio", "file"):
            raise Refused(f"Invalid value: '{kind}'. Supported values are: 'text', 'image_url', 'input_audio', "
                          "'refusal', and 'file'.", f"{at}.type")
    return images


def _openai_check_messages(messages: Any) -> int:
    """OpenAI's checks of a conversation (tool calls answered, tool results answering); images counted."""
    if not isinstance(messages, list) or not messages:
        raise Refused("Invalid 'messages': empty array. Expected an array with minimum length 1.", "messages")
    images = 0
    open_calls: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role")
        if open_calls and role != "tool":
            missing = ", ".join(sorted(open_calls))
            raise Refused("An assistant message with 'tool_calls' must be followed by tool messages responding to "
                          f"each 'tool_call_id'. The following tool_call_ids did not have response messages: "
                          f"{missing}", where)
        if role == "tool":
            if message.get("tool_call_id") not in open_calls:
                raise Refused("Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                              "message with 'tool_calls'.", f"{where}.role")
            open_calls.discard(message["tool_call_id"])
        elif role == "assistant":
            open_calls = {c["id"] for c in message.get("tool_calls") or ()}
        elif role not in ("system", "developer", "user", "function"):
            raise Refused(f"Invalid value: '{role}'. Supported values are: 'system', 'assistant', 'user', "
                          "'function', 'tool', and 'developer'.", f"{where}.role")
        images += _openai_content_images(message.get("content"), f"{where}.content")
    if open_calls:
        raise Refused("An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                      f"'tool_call_id'. The following tool_call_ids did not have response messages: "
                      f"{', '.join(sorted(open_calls))}", "messages")
    return images


def _openai_check(body: dict[str, Any]) -> int:
    unknown = sorted(set(body) - OPENAI_FIELDS)
    if unknown:
        raise Refused(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    if body.get("stream_options") is not None and not body.get("stream"):
        raise Refused("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
    for j, tool in enumerate(body.get("tools") or ()):
        name = ((tool.get("function") or {}) if isinstance(tool, dict) else {}).get("name")
        if tool.get("type") != "function" or not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise Refused(f"Invalid 'tools[{j}].function.name': string does not match pattern. Expected a string "
                          "that matches the pattern '^[a-zA-Z0-9_-]+$'.", f"tools[{j}].function.name")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and not (fmt.get("json_schema") or {}).get("name"):
        raise Refused("Missing required parameter: 'response_format.json_schema.name'.",
                      "response_format.json_schema.name")
    return _openai_check_messages(body.get("messages"))


def _wants_tool(tools: list[Any], choice: Any, messages: list[dict[str, Any]]) -> str | None:
    """The tool the fake calls, if it calls one: named, else the first; only right after a user turn."""
    if not tools or choice == "none" or messages[-1].get("role") != "user":
        return None
    if isinstance(choice, dict):
        named = (choice.get("function") or {}).get("name") or choice.get("name")
        if isinstance(named, str):
            return named
    first = tools[0]
    return str((first.get("function") or first).get("name"))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


class FakeOpenAI(FakeLLMServer):
    base_path = "/v1"
    faults = FakeLLMServer.faults | {"invalid_model", "bad_request", "no_usage", "refusal"}
    api_key = "sk-test-fake-openai"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.usage = {"prompt_tokens": 42, "completion_tokens": 6, "cached_tokens": 10}
        self.finish_reason = "stop"
        self.refusal = "I can't help with that."
        self.reasoning: str | None = None  # set: answers carry `reasoning_content`, as DeepSeek or vLLM send it

    def _usage(self, tools: int = 0, images: int = 0) -> dict[str, Any]:
        u = self.usage
        prompt = u["prompt_tokens"] + TOOL_TOKENS * tools + IMAGE_TOKENS * images
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": u["completion_tokens"],
            "total_tokens": prompt + u["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": u["cached_tokens"], "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }
        self.last_usage = usage
        return usage

    @staticmethod
    def _error(h: _Handler, status: int, message: str, kind: str, code: str | None = None,
               param: str | None = None) -> None:
        h.send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": code}})

    def handle(self, h: _Handler, rec: Recorded, fault: str | None) -> None:
        if rec.path not in ("/v1/chat/completions", "/v1/embeddings"):
            return self._error(h, 404, f"Unknown request URL: POST {rec.path}", "invalid_request_error")
        if fault == "401" or rec.headers.get("authorization") != f"Bearer {self.api_key}":
            return self._error(h, 401, "Incorrect API key provided: sk-***", "invalid_request_error")
        body = rec.json
        model = body.get("model", "")
        if fault in ("500", "503"):
            return self._error(h, int(fault), "The server had an error", "server_error")
        if fault == "429":
            return self._error(h, 429, "Rate limit reached", "requests", "rate_limit_exceeded")
        if fault == "invalid_model":
            message = f"The model `{model}` does not exist or you do not have access to it."
            return self._error(h, 404, message, "invalid_request_error", "model_not_found")
        if fault == "bad_request":
            message = "Invalid value for 'temperature': must be between 0 and 2."
            return self._error(h, 400, message, "invalid_request_error", "invalid_value")
        try:
            if rec.path == "/v1/embeddings":
                return self._embeddings(h, body)
            images = _openai_check(body)
        except Refused as exc:
            return self._error(h, exc.status, exc.message, "invalid_request_error", "invalid_value", exc.param)
        self._chat(h, body, fault, images)

    def _answer(self, body: dict[str, Any], fault: str | None) -> tuple[str | None, list[dict[str, Any]], str]:
        """(content, tool calls, finish reason) of the fake's turn."""
        messages = body["messages"]
        tool = _wants_tool(body.get("tools") or [], body.get("tool_choice"), messages)
        if tool is not None and fault != "refusal":
            count = 1 if body.get("parallel_tool_calls") is False else self.tool_calls_per_turn
            calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": tool, "arguments": json.dumps(self.tool_arguments)}} for _ in range(count)]
            return None, calls, "tool_calls"
        if fault == "refusal":
            return None, [], "stop"
        if messages[-1].get("role") == "tool":
            return f"The tool said: {_text_of(messages[-1].get('content'))}", [], "stop"
        fmt = (body.get("response_format") or {}).get("type")
        if fmt in ("json_object", "json_schema"):
            return json.dumps(self.json_reply), [], "stop"
        return self.reply, [], self.finish_reason

    @staticmethod
    def _logprobs(text: str) -> dict[str, Any]:
        tokens = [w for w in re.split(r"(\s+)", text) if w]
        return {"content": [{"token": t, "logprob": -0.25, "bytes": list(t.encode()), "top_logprobs": []}
                            for t in tokens], "refusal": None}

    def _chat(self, h: _Handler, body: dict[str, Any], fault: str | None, images: int) -> None:
        model = body.get("model", "")
        created = int(time.time())
        ident = "chatcmpl-" + uuid.uuid4().hex[:24]
        content, calls, finish = self._answer(body, fault)
        usage = self._usage(len(body.get("tools") or ()), images)
        if not body.get("stream"):
            if fault == "malformed":
                return h.send_bytes(200, b'{"id": "chatcmpl-x", "choices": [', "application/json")
            refusal = self.refusal if fault == "refusal" else None
            answer: dict[str, Any] = {"role": "assistant", "content": content, "refusal": refusal, "annotations": []}
            if self.reasoning is not None:
                answer["reasoning_content"] = self.reasoning
            if calls:
                answer["tool_calls"] = calls
            logprobs = self._logprobs(content) if body.get("logprobs") and content else None
            return h.send_json(
                200,
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "message": answer, "finish_reason": finish, "logprobs": logprobs}],
                    "usage": usage,
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake",
                },
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def event(choices: list[dict[str, Any]], chunk_usage: dict[str, Any] | None = None) -> bytes:
            chunk: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": choices,
            }
            if include_usage:
                chunk["usage"] = chunk_usage
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        def delta(fields: dict[str, Any], logprobs: Any = None) -> bytes:
            return event([{"index": 0, "delta": fields, "logprobs": logprobs, "finish_reason": None}])

        h.start_chunked("text/event-stream")
        h.chunk(delta({"role": "assistant", "content": "", "refusal": None}))
        for piece in pieces(self.reasoning, 8) if self.reasoning else ():
            h.chunk(delta({"reasoning_content": piece}))
        if fault == "refusal":
            for piece in pieces(self.refusal, 8):
                h.chunk(delta({"refusal": piece}))
        for k, call in enumerate(calls):
            first = {"index": k, "id": call["id"], "type": "function",
                     "function": {"name": call["function"]["name"], "arguments": ""}}
            h.chunk(delta({"tool_calls": [first]}))
            for piece in pieces(call["function"]["arguments"]):
                h.chunk(delta({"tool_calls": [{"index": k, "function": {"arguments": piece}}]}))
        for i, piece in enumerate(word_pieces(content or "")):
            if i == 2 and fault in ("die_mid_stream", "truncate", "malformed"):
                if fault == "die_mid_stream":
                    return h.die()
                if fault == "malformed":
                    h.chunk(b'data: {"id": "chatcmpl-x", "choices": [\n\n')
                return h.end_chunked()
            h.chunk(delta({"content": piece}, self._logprobs(piece) if body.get("logprobs") else None))
        h.chunk(event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]))
        if include_usage and fault != "no_usage":
            h.chunk(event([], usage))
        h.chunk(b"data: [DONE]\n\n")
        h.end_chunked()

    def _embeddings(self, h: _Handler, body: dict[str, Any]) -> None:
        unknown = sorted(set(body) - {"model", "input", "dimensions", "encoding_format", "user"})
        if unknown:
            raise Refused(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
        raw = body.get("input")
        items: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw or [])
        if not items or any(item in ("", []) for item in items):
            raise Refused("'$.input' is invalid. Please check the API reference: "
                          "https://platform.openai.com/docs/api-reference.", "input")
        dimensions = body.get("dimensions") or 8
        texts = [item if isinstance(item, str) else " ".join(map(str, item)) for item in items]
        tokens = sum(len(item) if isinstance(item, list) else math.ceil(len(item) / 3) for item in items)
        encode = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(texts):
            values = vector(text, dimensions)
            embedding: Any = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode() if encode else values
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        self.last_usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        h.send_json(200, {"object": "list", "data": data, "model": body.get("model", ""), "usage": self.last_usage})


# ------------------------------------------------------------------------------------------- Anthropic

ANTHROPIC_FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature", "top_p",
        "top_k", "tools", "tool_choice", "output_config", "thinking", "service_tier", "container", "mcp_servers",
        "context_management", "inference_geo", "speed",
    }
)
ANTHROPIC_IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}
ANTHROPIC_TOOL_FIELDS = frozenset({"name", "description", "input_schema", "cache_control", "strict", "type"})


def _extra(where: str, obj: dict[str, Any], allowed: frozenset[str] | set[str]) -> None:
    for key in obj:
        if key not in allowed:
            raise Refused(f"{where}.{key}: Extra inputs are not permitted".lstrip("."))


def _anthropic_block(block: Any, where: str, expected_ids: set[str], first_other: list[bool]) -> int:
    """Check one content block as Anthropic does; the images in it."""
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        _extra(where, block, {"type", "text", "cache_control", "citations"})
        if not block.get("text"):
            raise Refused("messages: text content blocks must be non-empty")
        first_other[0] = True
        return 0
    if kind == "image":
        _extra(where, block, {"type", "source", "cache_control", "transformations"})
        source = block.get("source") or {}
        if source.get("type") == "base64":
            fmt = ANTHROPIC_IMAGE_TYPES.get(source.get("media_type", ""))
            if fmt is None:
                raise Refused(f"{where}.source.base64.media_type: Input should be 'image/jpeg', 'image/png', "
                              "'image/gif' or 'image/webp'")
            check_image(image_bytes(str(source.get("data", "")), f"{where}.source.base64.data"), fmt, where)
        elif source.get("type") != "url" or not str(source.get("url", "")).startswith(("http://", "https://")):
            raise Refused(f"{where}.source: Input tag '{source.get('type')}' found using 'type' does not match any "
                          "of the expected tags: 'base64', 'url'")
        first_other[0] = True
        return 1
    if kind == "tool_use":
        _extra(where, block, {"type", "id", "name", "input", "cache_control", "caller", "toolset_name"})
        if not isinstance(block.get("input"), dict):
            raise Refused(f"{where}.input: Input should be a valid dictionary")
        return 0
    if kind == "tool_result":
        _extra(where, block, {"type", "tool_use_id", "content", "is_error", "cache_control", "toolset_name"})
        if first_other[0]:
            raise Refused(f"{where}: tool_result blocks must come first in the user message")
        if block.get("tool_use_id") not in expected_ids:
            raise Refused(f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                          f"{block.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                          "`tool_use` block in the previous message.")
        expected_ids.discard(block["tool_use_id"])
        content = block.get("content")
        nested = content if isinstance(content, list) else []
        return sum(_anthropic_block(b, f"{where}.content.{k}", set(), [False]) for k, b in enumerate(nested))
    raise Refused(f"{where}: Input tag '{kind}' found using 'type' does not match any of the expected tags")


def _anthropic_messages(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise Refused("messages: at least one message is required")
    images = 0
    pending: set[str] = set()
    for i, message in enumerate(messages):
        _extra(f"messages.{i}", message, {"role", "content"})
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            raise Refused(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise Refused(f"messages.{i}.content: Input should be a valid list")
        expected = set(pending) if role == "user" else set()
        first_other = [False]
        for j, block in enumerate(blocks):
            if role == "assistant" and isinstance(block, dict) and block.get("type") in ("image", "tool_result"):
                raise Refused(f"messages.{i}.content.{j}: {block['type']} blocks are not allowed in assistant turns")
            images += _anthropic_block(block, f"messages.{i}.content.{j}", expected, first_other)
        if pending and (role != "user" or expected):
            raise Refused(f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                          f"{', '.join(sorted(pending))}. Each `tool_use` block must have a corresponding "
                          "`tool_result` block in the next message.")
        pending = {b["id"] for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"}
    if pending:
        raise Refused("messages: the conversation ends with `tool_use` blocks that have no `tool_result`")
    return images


def _anthropic_check(body: dict[str, Any]) -> int:
    unknown = sorted(set(body) - ANTHROPIC_FIELDS)
    if unknown:
        raise Refused(f"{unknown[0]}: Extra inputs are not permitted")
    if "max_tokens" not in body:
        raise Refused("max_tokens: Field required")
    names = set()
    for j, tool in enumerate(body.get("tools") or ()):
        _extra(f"tools.{j}", tool, ANTHROPIC_TOOL_FIELDS)
        name = tool.get("name")
        if not isinstance(name, str) or not re.match(r"^[a-zA-Z0-9_-]{1,128}$", name):
            raise Refused(f"tools.{j}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        if (tool.get("input_schema") or {}).get("type") != "object":
            raise Refused(f"tools.{j}.custom.input_schema.type: Field required")
        names.add(name)
    choice = body.get("tool_choice")
    if choice is not None:
        if choice.get("type") not in ("auto", "any", "tool", "none"):
            raise Refused("tool_choice: Input tag found using 'type' does not match any of the expected tags")
        if choice.get("type") == "tool" and choice.get("name") not in names:
            raise Refused(f"tool_choice.name: tool '{choice.get('name')}' is not among the tools")
    _extra("metadata", body.get("metadata") or {}, {"user_id"})
    output = body.get("output_config") or {}
    _extra("output_config", output, {"format", "effort"})
    fmt = output.get("format")
    if fmt is not None and (fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict)):
        raise Refused("output_config.format: a json_schema format with a schema is required")
    return _anthropic_messages(body["messages"])


class FakeAnthropic(FakeLLMServer):
    faults = FakeLLMServer.faults | {
        "invalid_model",
        "bad_request",
        "529",
        "error_event",
        "error_before_text",
    }
    api_key = "sk-ant-test-fake"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.usage = {
            "input_tokens": 12,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 30,
            "output_tokens": 6,
        }
        self.stop_reason = "end_turn"

    def _usage(self, tools: int, images: int) -> dict[str, Any]:
        usage = {**self.usage, "input_tokens": self.usage["input_tokens"] + TOOL_TOKENS * tools + IMAGE_TOKENS * images}
        self.last_usage = usage
        return usage

    @staticmethod
    def _error(h: _Handler, status: int, kind: str, message: str) -> None:
        h.send_json(status, {"type": "error", "error": {"type": kind, "message": message}})

    def _answer(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        """(content blocks, stop reason) of the fake's turn."""
        messages = body["messages"]
        last = messages[-1]
        content = last.get("content")
        results = [b for b in content if b.get("type") == "tool_result"] if isinstance(content, list) else []
        tools = body.get("tools") or []
        choice = body.get("tool_choice") or {}
        if tools and choice.get("type") != "none" and last.get("role") == "user" and not results:
            name = choice.get("name") if choice.get("type") == "tool" else tools[0]["name"]
            count = 1 if choice.get("disable_parallel_tool_use") else self.tool_calls_per_turn
            calls = [{"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": name,
                      "input": dict(self.tool_arguments)} for _ in range(count)]
            return calls, "tool_use"
        if results:
            return [{"type": "text", "text": f"The tool said: {_text_of(results[-1].get('content'))}"}], "end_turn"
        if (body.get("output_config") or {}).get("format"):
            return [{"type": "text", "text": json.dumps(self.json_reply)}], "end_turn"
        return [{"type": "text", "text": self.reply}], self.stop_reason

    def handle(self, h: _Handler, rec: Recorded, fault: str | None) -> None:
        if rec.path != "/v1/messages":
            return self._error(h, 404, "not_found_error", "Not found")
        # The API takes the key as x-api-key or (as recent SDKs send it) as a bearer token.
        keys = {rec.headers.get("x-api-key"), rec.headers.get("authorization", "").removeprefix("Bearer ")}
        if fault == "401" or self.api_key not in keys:
            return self._error(h, 401, "authentication_error", "invalid x-api-key")
        if not rec.headers.get("anthropic-version"):
            return self._error(h, 400, "invalid_request_error", "anthropic-version: header is required")
        body = rec.json
        model = body.get("model", "")
        if fault in ("500", "503", "529"):
            kind = "overloaded_error" if fault == "529" else "api_error"
            return self._error(h, int(fault), kind, "Internal server error")
        if fault == "429":
            return self._error(h, 429, "rate_limit_error", "Number of request tokens has exceeded your limit")
        if fault == "invalid_model":
            return self._error(h, 404, "not_found_error", f"model: {model}")
        if fault == "bad_request":
            return self._error(h, 400, "invalid_request_error", "max_tokens: Field required")
        try:
            images = _anthropic_check(body)
        except Refused as exc:
            return self._error(h, exc.status, "invalid_request_error", exc.message)
        ident = "msg_" + uuid.uuid4().hex[:24]
        blocks, stop_reason = self._answer(body)
        usage = self._usage(len(body.get("tools") or ()), images)
        if not body.get("stream"):
            if fault == "malformed":
                return h.send_bytes(200, b'{"id": "msg_x", "content": [', "application/json")
            return h.send_json(
                200,
                {
                    "id": ident,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": blocks,
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": usage,
                },
            )
        self._stream(h, fault, ident, model, blocks, stop_reason, usage)

    def _stream(self, h: _Handler, fault: str | None, ident: str, model: str, blocks: list[dict[str, Any]],
                stop_reason: str, usage: dict[str, Any]) -> None:
        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        message = {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        }
        overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        h.start_chunked("text/event-stream; charset=utf-8")
        h.chunk(event("message_start", {"type": "message_start", "message": message}))
        if fault == "error_before_text":
            h.chunk(event("error", overloaded))
            return h.end_chunked()
        for index, block in enumerate(blocks):
            start = {**block, "input": {}} if block["type"] == "tool_use" else {"type": "text", "text": ""}
            h.chunk(event("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": start}))
            if index == 0:
                h.chunk(event("ping", {"type": "ping"}))
            if block["type"] == "tool_use":
                for piece in pieces(json.dumps(block["input"])):
                    delta = {"type": "input_json_delta", "partial_json": piece}
                    h.chunk(event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                          "delta": delta}))
            for i, piece in enumerate(word_pieces(block.get("text", ""))):
                if i == 2 and fault in ("die_mid_stream", "truncate", "malformed", "error_event"):
                    if fault == "die_mid_stream":
                        return h.die()
                    if fault == "malformed":
                        h.chunk(b"event: content_block_delta\ndata: {oops\n\n")
                    if fault == "error_event":
                        h.chunk(event("error", overloaded))
                    return h.end_chunked()
                delta = {"type": "text_delta", "text": piece}
                h.chunk(event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
            h.chunk(event("content_block_stop", {"type": "content_block_stop", "index": index}))
        h.chunk(
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": usage["output_tokens"]},
                },
            )
        )
        h.chunk(event("message_stop", {"type": "message_stop"}))
        h.end_chunked()


# --------------------------------------------------------------------------------------------- Bedrock


def encode_event_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (lengths + CRC), string headers, payload, message CRC."""
    raw_headers = b""
    for name, value in headers.items():
        n, v = name.encode(), value.encode()
        raw_headers += bytes([len(n)]) + n + b"\x07" + struct.pack(">H", len(v)) + v  # 7 = string
    total = 12 + len(raw_headers) + len(payload) + 4
    prelude = struct.pack(">II", total, len(raw_headers))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + raw_headers + payload
    return message + struct.pack(">I", zlib.crc32(message))


def bedrock_event(event_type: str, data: dict[str, Any]) -> bytes:
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    return encode_event_message(headers, json.dumps(data).encode())


def bedrock_exception(exception_type: str, message: str) -> bytes:
    headers = {
        ":exception-type": exception_type,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return encode_event_message(headers, json.dumps({"message": message}).encode())


def _bedrock_block(block: dict[str, Any], where: str, expected: set[str]) -> int:
    """Check one Converse content block as Bedrock does; the images in it."""
    if "text" in block:
        if not str(block["text"]).strip():
            raise Refused(f"The text field in the ContentBlock object at {where} is blank. Add text to the text "
                          "field, and try again.")
        return 0
    if "image" in block:
        img = block["image"]
        raw = image_bytes(str((img.get("source") or {}).get("bytes", "")), where)
        check_image(raw, str(img.get("format")), where)
        return 1
    if "toolResult" in block:
        result = block["toolResult"]
        if result.get("toolUseId") not in expected:
            raise Refused(f"{where}: the toolResult's toolUseId {result.get('toolUseId')} does not match a toolUse "
                          "block of the previous turn.")
        expected.discard(result["toolUseId"])
        return 0
    if "toolUse" in block or "cachePoint" in block:
        return 0
    raise Refused(f"{where}: unsupported content block {sorted(block)}")


def _bedrock_check(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not messages:
        raise Refused("messages: required")
    images = 0
    pending: set[str] = set()
    uses_tools = False
    for i, message in enumerate(messages):
        expected = set(pending) if message.get("role") == "user" else set()
        for j, block in enumerate(message.get("content") or ()):
            uses_tools = uses_tools or "toolUse" in block or "toolResult" in block
            images += _bedrock_block(block, f"messages.{i}.content.{j}", expected)
        if pending and expected:
            raise Refused(f"Expected toolResult blocks at messages.{i}.content for the following Ids: "
                          f"{', '.join(sorted(expected))}")
        pending = {b["toolUse"]["toolUseId"] for b in message.get("content") or () if "toolUse" in b}
    if uses_tools and not body.get("toolConfig"):
        raise Refused("The toolConfig field must be defined when using toolUse and toolResult content blocks.")
    return images


TITAN_FIELDS = {"inputText", "dimensions", "normalize", "embeddingTypes"}
COHERE_FIELDS = {"texts", "input_type", "truncate", "embedding_types", "output_dimension", "images", "max_tokens"}


class FakeBedrock(FakeLLMServer):
    faults = FakeLLMServer.faults | {
        "validation",
        "invalid_model",
        "throttle",
        "model_timeout",
        "stream_exception",
    }
    _errors: ClassVar[dict[str, tuple[int, str, str]]] = {
        "500": (500, "InternalServerException", "Internal server error"),
        "503": (503, "ServiceUnavailableException", "Service unavailable"),
        "401": (403, "UnrecognizedClientException", "The security token included in the request is invalid."),
        "429": (429, "ThrottlingException", "Too many requests, please wait before trying again."),
        "throttle": (429, "ThrottlingException", "Too many requests, please wait before trying again."),
        "validation": (400, "ValidationException", "The provided request is not valid: maxTokens too large"),
        "invalid_model": (404, "ResourceNotFoundException", "The provided model identifier is invalid."),
        "model_timeout": (408, "ModelTimeoutException", "Model has timed out in processing the request."),
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.usage = {
            "inputTokens": 20,
            "outputTokens": 6,
            "cacheReadInputTokens": 8,
            "cacheWriteInputTokens": 4,
        }
        self.stop_reason = "end_turn"

    def _usage(self, tools: int = 0, images: int = 0) -> dict[str, Any]:
        u = {**self.usage, "inputTokens": self.usage["inputTokens"] + TOOL_TOKENS * tools + IMAGE_TOKENS * images}
        total = u["inputTokens"] + u["outputTokens"] + u["cacheReadInputTokens"] + u["cacheWriteInputTokens"]
        usage = {**u, "totalTokens": total}
        self.last_usage = usage
        return usage

    def _answer(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        """(content blocks, stop reason) of the fake's turn."""
        last = body["messages"][-1]
        results = [b["toolResult"] for b in last.get("content") or () if "toolResult" in b]
        config = body.get("toolConfig") or {}
        tools = [t["toolSpec"] for t in config.get("tools") or () if "toolSpec" in t]
        if tools and last.get("role") == "user" and not results:
            named = (config.get("toolChoice") or {}).get("tool", {}).get("name")
            calls = [{"toolUse": {"toolUseId": "tooluse_" + uuid.uuid4().hex[:22], "name": named or tools[0]["name"],
                                  "input": dict(self.tool_arguments)}} for _ in range(self.tool_calls_per_turn)]
            return calls, "tool_use"
        if results:
            said = "".join(str(c.get("text", "")) for c in results[-1].get("content") or ())
            return [{"text": f"The tool said: {said}"}], "end_turn"
        if (body.get("outputConfig") or {}).get("textFormat"):
            return [{"text": json.dumps(self.json_reply)}], "end_turn"
        return [{"text": self.reply}], self.stop_reason

    def handle(self, h: _Handler, rec: Recorded, fault: str | None) -> None:
        parts = urllib.parse.urlsplit(rec.path).path.split("/")  # ["", "model", id, operation]
        request_id = str(uuid.uuid4())
        if len(parts) != 4 or parts[1] != "model" or parts[3] not in ("converse", "converse-stream", "invoke"):
            return self._error(h, 404, "UnknownOperationException", "unknown operation", request_id)
        if not rec.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 "):
            return self._error(h, 403, "MissingAuthenticationTokenException", "Missing token", request_id)
        if fault in self._errors:
            status, code, message = self._errors[fault]
            return self._error(h, status, code, message, request_id)
        body = rec.json
        try:
            if parts[3] == "invoke":
                return self._invoke(h, urllib.parse.unquote(parts[2]), body, request_id)
            images = _bedrock_check(body)
        except Refused as exc:
            return self._error(h, 400, "ValidationException", exc.message, request_id)
        blocks, stop_reason = self._answer(body)
        tools = len([t for t in (body.get("toolConfig") or {}).get("tools") or () if "toolSpec" in t])
        usage = self._usage(tools, images)
        if parts[3] == "converse":
            if fault == "malformed":
                return h.send_bytes(200, b'{"output": {"message": ', "application/json")
            return h.send_json(
                200,
                {
                    "output": {"message": {"role": "assistant", "content": blocks}},
                    "stopReason": stop_reason,
                    "usage": usage,
                    "metrics": {"latencyMs": 12},
                },
                {"x-amzn-RequestId": request_id},
            )
        h.start_chunked("application/vnd.amazon.eventstream", {"x-amzn-RequestId": request_id})
        h.chunk(bedrock_event("messageStart", {"role": "assistant"}))
        for index, block in enumerate(blocks):
            if "toolUse" in block:
                use = block["toolUse"]
                start = {"start": {"toolUse": {"toolUseId": use["toolUseId"], "name": use["name"]}},
                         "contentBlockIndex": index}
                h.chunk(bedrock_event("contentBlockStart", start))
                for piece in pieces(json.dumps(use["input"])):
                    delta = {"contentBlockIndex": index, "delta": {"toolUse": {"input": piece}}}
                    h.chunk(bedrock_event("contentBlockDelta", delta))
            for i, piece in enumerate(word_pieces(block.get("text", ""))):
                if i == 2 and fault in ("die_mid_stream", "truncate", "malformed", "stream_exception"):
                    if fault == "die_mid_stream":
                        return h.die()
                    if fault == "malformed":
                        h.chunk(b"\x00\x00\x00\x10garbage-garbage!")
                    if fault == "stream_exception":
                        h.chunk(bedrock_exception("throttlingException", "Too many requests"))
                    return h.end_chunked()
                delta = {"contentBlockIndex": index, "delta": {"text": piece}}
                h.chunk(bedrock_event("contentBlockDelta", delta))
            h.chunk(bedrock_event("contentBlockStop", {"contentBlockIndex": index}))
        h.chunk(bedrock_event("messageStop", {"stopReason": stop_reason}))
        h.chunk(bedrock_event("metadata", {"usage": usage, "metrics": {"latencyMs": 12}}))
        h.end_chunked()

    def _invoke(self, h: _Handler, model: str, body: dict[str, Any], request_id: str) -> None:
        """InvokeModel for the embedding models: Titan Text Embeddings and Cohere Embed."""
        if "titan-embed-text" in model:
            extra = sorted(set(body) - TITAN_FIELDS)
            if extra:
                raise Refused(f"Malformed input request: extraneous key [{extra[0]}] is not permitted")
            text = body.get("inputText")
            if not isinstance(text, str) or not text:
                raise Refused("Malformed input request: inputText must be a non-empty string")
            dimensions = body.get("dimensions", 1024)
            if ("v2" not in model and "dimensions" in body) or dimensions not in (256, 512, 1024):
                raise Refused("Malformed input request: dimensions must be one of 256, 512, 1024")
            tokens = len(text.split()) + 1
            values = vector(text, 8)
            answer: dict[str, Any] = {"embedding": values, "inputTextTokenCount": tokens,
                                      "embeddingsByType": {"float": values}}
        elif "cohere.embed" in model:
            extra = sorted(set(body) - COHERE_FIELDS)
            if extra:
                raise Refused(f"Malformed input request: extraneous key [{extra[0]}] is not permitted")
            texts = body.get("texts")
            if not isinstance(texts, list) or not 1 <= len(texts) <= 96:
                raise Refused("Malformed input request: texts must hold 1 to 96 strings")
            if body.get("input_type") not in ("search_document", "search_query", "classification", "clustering"):
                raise Refused("Malformed input request: input_type is required")
            tokens = sum(len(t.split()) + 2 for t in texts)
            vectors = [vector(t, 8) for t in texts]
            by_type = "embedding_types" in body
            answer = {"id": str(uuid.uuid4()), "texts": texts,
                      "embeddings": {"float": vectors} if by_type else vectors,
                      "response_type": "embeddings_by_type" if by_type else "embeddings_floats"}
        else:
            raise Refused(f"The provided model {model} does not support embeddings")
        self.last_usage = {"inputTokens": tokens}
        h.send_json(200, answer, {"x-amzn-RequestId": request_id, "X-Amzn-Bedrock-Input-Token-Count": str(tokens),
                                  "X-Amzn-Bedrock-Invocation-Latency": "12"})

    @staticmethod
    def _error(h: _Handler, status: int, code: str, message: str, request_id: str) -> None:
        headers = {"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.bedrock/"}
        headers["x-amzn-RequestId"] = request_id
        h.send_json(status, {"message": message}, headers)


# ------------------------------------------------------------------------------------------ entry points


@contextmanager
def _running(server: FakeLLMServer) -> Iterator[Any]:
    server.start()
    try:
        yield server
    finally:
        server.close()


@contextmanager
def openai_server(**kwargs: Any) -> Iterator[FakeOpenAI]:
    with _running(FakeOpenAI(**kwargs)) as server:
        yield server


@contextmanager
def anthropic_server(**kwargs: Any) -> Iterator[FakeAnthropic]:
    with _running(FakeAnthropic(**kwargs)) as server:
        yield server


@contextmanager
def bedrock_server(**kwargs: Any) -> Iterator[FakeBedrock]:
    with _running(FakeBedrock(**kwargs)) as server:
        yield server
