"""A real `aikit serve` in a subprocess, for attacks over sockets, and a watcher that keeps asking it /healthz
and sampling its memory while an attack runs."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil

from tests.support.servers import free_port, stop_process

MB = 1024 * 1024


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


@contextlib.contextmanager
def aikit_serve_logged(env: dict[str, str]) -> Iterator[Served]:
    """`python -m aikit.cli serve` on a free port, configured by `env` only."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="aikit-served-")
    log_path = os.path.join(workdir, "server.log")
    # Only what a shell needs: nothing leaks in from the test runner's environment (other tests set Stripe
    # keys and the like there), and the working directory holds no .env.
    inherited = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    full_env = {**inherited, "POWERTOOLS_METRICS_DISABLED": "true", "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1", **env}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "aikit.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port)], env=full_env, cwd=workdir, stdout=log, stderr=log)
    served = Served(proc, port, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"aikit serve exited: {served.log()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(served.url + "/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("aikit serve did not start")
            time.sleep(0.1)
        yield served
    finally:
        stop_process(proc, 20)


@dataclass
class Watch:
    """/healthz latency and the server's RSS while an attack runs."""

    served: Served
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def healthz_max(self) -> float:
        return max(self.latencies, default=0.0)

    def figures(self) -> dict[str, Any]:
        return {"rss_before_mb": round(self.rss_before / MB, 1), "rss_peak_mb": round(self.rss_peak / MB, 1),
                "rss_after_mb": round(self.rss_after / MB, 1), "healthz_max_s": round(self.healthz_max, 3),
                "healthz_probes": len(self.latencies), "healthz_failures": len(self.failures)}


@contextlib.contextmanager
def watching(served: Served, interval: float = 0.05) -> Iterator[Watch]:
    watch = Watch(served, rss_before=served.rss())
    watch.rss_peak = watch.rss_before
    stop = threading.Event()

    def probe() -> None:
        # A fresh connection each time: it must get through whatever the attack holds open.
        while not stop.is_set():
            started = time.monotonic()
            try:
                r = httpx.get(served.url + "/healthz", timeout=30)
                if r.status_code != 200:
                    watch.failures.append(f"{r.status_code} {r.text[:100]}")
            except httpx.HTTPError as exc:
                watch.failures.append(repr(exc))
            watch.latencies.append(time.monotonic() - started)
            with contextlib.suppress(psutil.Error):
                watch.rss_peak = max(watch.rss_peak, served.rss())
            stop.wait(interval)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join(60)
        watch.rss_after = served.rss()


# --- raw HTTP over sockets -----------------------------------------------------------------------------


def connect(port: int, source: str = "127.0.0.1", timeout: float = 30) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def read_response(sock: socket.socket) -> RawResponse | None:
    """One response (Content-Length framed) or None when the server closed without answering."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return None
        if not chunk:
            return None
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawResponse(status, headers, body)
