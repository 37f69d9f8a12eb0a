"""Local HTTP servers that imitate the LLM providers' wire protocols, for tests.

Each runs a real HTTP/1.1 server on 127.0.0.1 (a free port) in a background thread:

    with openai_server() as srv:        # srv.base_url -> "http://127.0.0.1:PORT/v1"
        srv.inject("500")               # the next request fails that way (times=N for more)
        ...                             # srv.requests: what the server received

Faults every server knows: "500", "503", "401", "429", "slow" (answers after `slow_seconds`), "malformed"
(broken JSON; in a stream after the first text), "die_mid_stream" (the connection drops after two text
pieces), "truncate" (the stream body ends cleanly after two text pieces, unfinished).
OpenAI also: "invalid_model" (404 model_not_found), "bad_request" (400), "no_usage" (stream without a usage
chunk), "trickle" (a stream whose pieces come `trickle_seconds` apart). With `bill_bytes = True` it bills like
the most expensive byte-level tokenizer: one token per UTF-8 byte of the messages' text (+4 per message), and
one per byte of the reply, which max_tokens cuts to that many bytes.
Anthropic also: "invalid_model" (404), "bad_request" (400), "529" (overloaded), "error_event"
(an overloaded error event after two text pieces), "error_before_text" (right after message_start).
Bedrock also: "validation" (400), "invalid_model" (404 ResourceNotFound), "throttle" (429),
"model_timeout" (408), "stream_exception" (a throttlingException event after two text pieces).

The Bedrock server speaks the AWS event-stream binary framing for ConverseStream, so the real boto3 client
is used against it unchanged (`endpoint_url=srv.base_url`).
"""

from __future__ import annotations

import json
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
        words = self.reply.split(" ")
        return [w + " " for w in words[:-1]] + words[-1:]

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


class FakeOpenAI(FakeLLMServer):
    base_path = "/v1"
    faults = FakeLLMServer.faults | {"invalid_model", "bad_request", "no_usage", "trickle"}
    api_key = "sk-test-fake-openai"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.usage = {"prompt_tokens": 42, "completion_tokens": 6, "cached_tokens": 10}
        self.finish_reason = "stop"
        self.trickle_seconds = 0.2
        self.bill_bytes = False

    def _reply_for(self, body: dict[str, Any]) -> str:
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if not self.bill_bytes or limit is None:
            return self.reply
        return self.reply.encode()[:limit].decode(errors="ignore")

    def _billed(self, body: dict[str, Any]) -> dict[str, int]:
        """What this request is billed: the fixed `usage`, or with `bill_bytes` one token per byte."""
        if not self.bill_bytes:
            return self.usage
        messages = body.get("messages") or []
        prompt = sum(len(str(m.get("content", "")).encode()) + 4 for m in messages)
        return {"prompt_tokens": prompt, "completion_tokens": len(self._reply_for(body).encode()),
                "cached_tokens": 0}

    def _usage(self, body: dict[str, Any] | None = None) -> dict[str, Any]:
        u = self._billed(body or {})
        return {
            "prompt_tokens": u["prompt_tokens"],
            "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": u["cached_tokens"], "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }

    @staticmethod
    def _error(h: _Handler, status: int, message: str, kind: str, code: str | None = None) -> None:
        h.send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": code}})

    def handle(self, h: _Handler, rec: Recorded, fault: str | None) -> None:
        if rec.path != "/v1/chat/completions":
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
        created = int(time.time())
        ident = "chatcmpl-" + uuid.uuid4().hex[:24]
        if not body.get("stream"):
            if fault == "malformed":
                return h.send_bytes(200, b'{"id": "chatcmpl-x", "choices": [', "application/json")
            answer = {"role": "assistant", "content": self._reply_for(body), "refusal": None}
            return h.send_json(
                200,
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "message": answer, "finish_reason": self.finish_reason}],
                    "usage": self._usage(body),
                },
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            chunk: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
            }
            if include_usage:
                chunk["usage"] = usage
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        h.start_chunked("text/event-stream")
        h.chunk(event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
        reply = self._reply_for(body)
        pieces = [w + " " for w in reply.split(" ")[:-1]] + reply.split(" ")[-1:]
        for i, piece in enumerate(pieces):
            if fault == "trickle" and self.wait(self.trickle_seconds):
                return  # server shutting down
            if i == 2 and fault in ("die_mid_stream", "truncate", "malformed"):
                if fault == "die_mid_stream":
                    return h.die()
                if fault == "malformed":
                    h.chunk(b'data: {"id": "chatcmpl-x", "choices": [\n\n')
                return h.end_chunked()
            h.chunk(event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
        h.chunk(event([{"index": 0, "delta": {}, "finish_reason": self.finish_reason}]))
        if include_usage and fault != "no_usage":
            h.chunk(event([], self._usage(body)))
        h.chunk(b"data: [DONE]\n\n")
        h.end_chunked()


# ------------------------------------------------------------------------------------------- Anthropic


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

    @staticmethod
    def _error(h: _Handler, status: int, kind: str, message: str) -> None:
        h.send_json(status, {"type": "error", "error": {"type": kind, "message": message}})

    def handle(self, h: _Handler, rec: Recorded, fault: str | None) -> None:
        if rec.path != "/v1/messages":
            return self._error(h, 404, "not_found_error", "Not found")
        if fault == "401" or rec.headers.get("x-api-key") != self.api_key:
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
        if fault == "bad_request" or "max_tokens" not in body:
            return self._error(h, 400, "invalid_request_error", "max_tokens: Field required")
        ident = "msg_" + uuid.uuid4().hex[:24]
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
                    "content": [{"type": "text", "text": self.reply}],
                    "stop_reason": self.stop_reason,
                    "stop_sequence": None,
                    "usage": dict(self.usage),
                },
            )

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        start_usage = {**self.usage, "output_tokens": 1}
        message = {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage,
        }
        overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        h.start_chunked("text/event-stream; charset=utf-8")
        h.chunk(event("message_start", {"type": "message_start", "message": message}))
        if fault == "error_before_text":
            h.chunk(event("error", overloaded))
            return h.end_chunked()
        block = {"type": "text", "text": ""}
        h.chunk(
            event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
        )
        h.chunk(event("ping", {"type": "ping"}))
        for i, piece in enumerate(self.words()):
            if i == 2 and fault in ("die_mid_stream", "truncate", "malformed", "error_event"):
                if fault == "die_mid_stream":
                    return h.die()
                if fault == "malformed":
                    h.chunk(b"event: content_block_delta\ndata: {oops\n\n")
                if fault == "error_event":
                    h.chunk(event("error", overloaded))
                return h.end_chunked()
            delta = {"type": "text_delta", "text": piece}
            h.chunk(event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
        h.chunk(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        h.chunk(
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": self.usage["output_tokens"]},
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

    def _usage(self) -> dict[str, Any]:
        u = self.usage
        total = u["inputTokens"] + u["outputTokens"] + u["cacheReadInputTokens"] + u["cacheWriteInputTokens"]
        return {**u, "totalTokens": total}

    def handle(self, h: _Handler, rec: Recorded, fault: str | None) -> None:
        parts = urllib.parse.urlsplit(rec.path).path.split("/")  # ["", "model", id, operation]
        request_id = str(uuid.uuid4())
        if len(parts) != 4 or parts[1] != "model" or parts[3] not in ("converse", "converse-stream"):
            return self._error(h, 404, "UnknownOperationException", "unknown operation", request_id)
        if not rec.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 "):
            return self._error(h, 403, "MissingAuthenticationTokenException", "Missing token", request_id)
        if fault in self._errors:
            status, code, message = self._errors[fault]
            return self._error(h, status, code, message, request_id)
        body = rec.json
        if not body.get("messages"):
            return self._error(h, 400, "ValidationException", "messages: required", request_id)
        if parts[3] == "converse":
            if fault == "malformed":
                return h.send_bytes(200, b'{"output": {"message": ', "application/json")
            return h.send_json(
                200,
                {
                    "output": {"message": {"role": "assistant", "content": [{"text": self.reply}]}},
                    "stopReason": self.stop_reason,
                    "usage": self._usage(),
                    "metrics": {"latencyMs": 12},
                },
                {"x-amzn-RequestId": request_id},
            )
        h.start_chunked("application/vnd.amazon.eventstream", {"x-amzn-RequestId": request_id})
        h.chunk(bedrock_event("messageStart", {"role": "assistant"}))
        for i, piece in enumerate(self.words()):
            if i == 2 and fault in ("die_mid_stream", "truncate", "malformed", "stream_exception"):
                if fault == "die_mid_stream":
                    return h.die()
                if fault == "malformed":
                    h.chunk(b"\x00\x00\x00\x10garbage-garbage!")
                if fault == "stream_exception":
                    h.chunk(bedrock_exception("throttlingException", "Too many requests"))
                return h.end_chunked()
            delta = {"contentBlockIndex": 0, "delta": {"text": piece}}
            h.chunk(bedrock_event("contentBlockDelta", delta))
        h.chunk(bedrock_event("contentBlockStop", {"contentBlockIndex": 0}))
        h.chunk(bedrock_event("messageStop", {"stopReason": self.stop_reason}))
        h.chunk(bedrock_event("metadata", {"usage": self._usage(), "metrics": {"latencyMs": 12}}))
        h.end_chunked()

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
