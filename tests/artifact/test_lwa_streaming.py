"""The API function as Lambda Web Adapter runs it (ApiStreaming=true): the built run.sh is started the way LWA's
/opt/bootstrap starts a handler ($LAMBDA_TASK_ROOT/$_HANDLER with the function's environment: PORT, AWS_LWA_*),
with only the built layer and boto3 in its Python; after the readiness check answers, a streamed chat completion
is forwarded to it as LWA forwards an invocation (its x-amzn-* context headers). An upstream that trickles its
reply over seconds must reach the client chunk by chunk, the call must be metered, and the metrics written
before the response ends (Lambda may freeze the process right after)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from aikit.keys import IssuedKey
from tests.artifact.builds import ROOT, invoke, lambda_env
from tests.fakes.llm_servers import FakeOpenAI, _Handler
from tests.support.artifact import lambda_settings_env, tokens_in_postgres
from tests.support.servers import free_port, stop_process

# The first test builds the artifacts (sam build, venvs) in its setup: minutes on a clean checkout.
pytestmark = pytest.mark.timeout(1800)

WORDS = 12
WORD_DELAY = 0.25  # the upstream takes WORDS * WORD_DELAY seconds to finish


class TricklingOpenAI(FakeOpenAI):
    """The OpenAI fake, writing its stream one chunk every WORD_DELAY seconds (a long completion)."""

    def handle(self, h: _Handler, rec: Any, fault: str | None) -> None:
        write = h.chunk

        def slowly(data: bytes) -> None:
            write(data)
            self.wait(WORD_DELAY)

        h.chunk = slowly  # type: ignore[method-assign]
        super().handle(h, rec, fault)


@pytest.fixture
def upstream() -> Iterator[TricklingOpenAI]:
    server = TricklingOpenAI(reply=" ".join(f"word{i}" for i in range(WORDS)))
    server.start()
    yield server
    server.close()


class Output:
    """A process's stdout lines with the time each arrived."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def emf(self) -> list[tuple[float, dict[str, Any]]]:
        return [(t, json.loads(line)) for t, line in list(self.lines) if line.startswith('{"_aws"')]


@contextmanager
def lwa_started(build_dir: Path, venv: Path, settings: dict[str, str]) -> Iterator[tuple[str, Output]]:
    task_root = build_dir / "ApiFunction"
    port = free_port()
    env = lambda_env(task_root, "aikit-api", **settings)
    env.update({
        # What template.yaml sets for ApiStreaming=true, and what Lambda sets for the handler.
        "AWS_LAMBDA_EXEC_WRAPPER": "/opt/bootstrap", "AWS_LWA_INVOKE_MODE": "response_stream",
        "AWS_LWA_READINESS_CHECK_PATH": "/healthz", "PORT": str(port), "_HANDLER": "run.sh",
        # Tracing: Active, as deployed (the X-Ray SDK must stay out of the server process).
        "POWERTOOLS_TRACE_DISABLED": "false", "_X_AMZN_TRACE_ID": "Root=1-5759e988-bd862e3fe1be46a994272793",
        # The runtime's python3 first on PATH; the layer where Lambda mounts it (/opt/python) is not here.
        "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
        "PYTHONPATH": str(build_dir / "AikitLayer" / "python"),
    })
    proc = subprocess.Popen([str(task_root / env["_HANDLER"])], cwd=task_root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = Output(proc.stdout)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:  # LWA's readiness check: GET the path until it answers below 500
            assert proc.poll() is None, "\n".join(line for _, line in output.lines)
            try:
                if httpx.get(base + env["AWS_LWA_READINESS_CHECK_PATH"], timeout=2).status_code < 500:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "run.sh never became ready"
            time.sleep(0.2)
        yield base, output
    finally:
        stop_process(proc, 10)


def lwa_headers(request_id: str) -> dict[str, str]:
    """The context headers LWA adds to every forwarded invocation."""
    context = {"requestId": request_id, "stage": "live", "httpMethod": "POST", "path": "/v1/chat/completions"}
    return {"x-amzn-request-context": json.dumps(context),
            "x-amzn-lambda-context": json.dumps({"request_id": f"lambda-{request_id}", "deadline": 0})}


@dataclass
class StreamedReply:
    arrivals: list[tuple[float, str]]  # (seconds after the request was sent, data of one SSE event)
    total: float  # seconds until the response ended
    finished: float  # time.monotonic() when it ended

    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(data) for _, data in self.arrivals if data != "[DONE]"]

    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.chunks() if c["choices"])

    def first_text_after(self) -> float:
        return next(t for t, data in self.arrivals if any(c.get("delta", {}).get("content")
                                                          for c in json.loads(data)["choices"]))


def stream_chat(base: str, api_key: str, body: dict[str, Any]) -> StreamedReply:
    """POSTs the completion the way LWA forwards an invocation, noting when each SSE event arrives."""
    started = time.monotonic()
    arrivals: list[tuple[float, str]] = []
    headers = {"authorization": f"Bearer {api_key}", **lwa_headers("apigw-req-1")}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        arrivals = [(time.monotonic() - started, line.removeprefix("data: ")) for line in r.iter_lines()
                    if line.startswith("data: ")]
    finished = time.monotonic()
    return StreamedReply(arrivals, finished - started, finished)


def test_run_sh_streams_the_first_chunk_long_before_the_upstream_finishes_and_meters_it(
        sam_build: Path, runtime_venv: Path, pg_url: str, redis_prefix: str, key: IssuedKey,
        upstream: TricklingOpenAI) -> None:
    settings = lambda_settings_env(pg_url, redis_prefix, LLM_PROVIDER="openai", OPENAI_API_KEY=upstream.api_key,
                            OPENAI_BASE_URL=upstream.base_url)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "tell me a long story"}],
            "stream": True, "stream_options": {"include_usage": True}}
    with lwa_started(sam_build, runtime_venv, settings) as (base, output):
        reply = stream_chat(base, key.api_key, body)
        time.sleep(0.5)  # the pipe from the server process

    assert reply.text().split() == [f"word{i}" for i in range(WORDS)]
    assert reply.total >= (WORDS + 2) * WORD_DELAY * 0.9, reply.total  # the upstream's pace
    # Token by token: the first words reach the client while the upstream is still writing.
    first = reply.first_text_after()
    print(f"first text chunk after {first:.2f} s of {reply.total:.2f} s")
    assert first < reply.total / 3, (first, reply.total)
    assert len({round(t, 1) for t, _ in reply.arrivals}) >= WORDS // 2  # spread out, not one burst at the end
    assert reply.chunks()[-1]["usage"]["total_tokens"] == 42 + 6

    # The request's metrics were written by the time its last byte went out; no key or X-Ray error in the logs.
    metered = [(t, r) for t, r in output.emf() if "TokensMetered" in r]
    assert [r["TokensMetered"] for _, r in metered] == [[48.0]]
    assert metered[0][0] <= reply.finished + 0.2
    assert not [line for _, line in output.lines if key.api_key in line]
    assert not [line for _, line in output.lines if "segment" in line.lower() or "Traceback" in line]

    # Durable: the flush moves exactly that usage to Postgres.
    flush_env = lambda_env(sam_build / "FlushFunction", "aikit-flush", **lambda_settings_env(pg_url, redis_prefix))
    scheduled = json.loads((ROOT / "events" / "flush_scheduled.json").read_text())
    flushed = invoke(sam_build, runtime_venv, "FlushFunction", scheduled, flush_env, remaining_ms=290_000)
    assert flushed.result["ok"], flushed.result
    assert tokens_in_postgres(pg_url, key.api_key_id) == 48
