"""Real servers for tests: the API under uvicorn on a free port, throwaway redis-server processes and a
local Redis Cluster."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
import uvicorn
from fastapi import FastAPI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


AIKIT = str(Path(sys.executable).with_name("aikit"))


def stop_process(proc: subprocess.Popen[Any], grace: float, sig: int = signal.SIGTERM) -> None:
    """Ask a process to stop with `sig`; kill it when it has not stopped within `grace` seconds."""
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def aikit_serve(env: dict[str, str], *, cwd: Path | None = None, stop: int = signal.SIGTERM) -> Iterator[str]:
    """`aikit serve` as a user starts it, in its own process; yields its base URL. Stopped with `stop` at the
    end; its output must hold no traceback."""
    port = free_port()
    proc = subprocess.Popen([AIKIT, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "aikit serve did not come up"
                time.sleep(0.1)
        yield base
    finally:
        stop_process(proc, 15, stop)
        output = proc.stdout.read() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
        assert "Traceback" not in output, output


@contextlib.contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """Run `app` under uvicorn in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is valid and free too: redis-server refuses to start in
    cluster mode on ports above 55535."""
    for _ in range(200):
        port = free_port()
        if port + 10000 <= 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class RedisProcess:
    port: int
    proc: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = ()
    workdir: str = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        if not self.workdir:
            self.workdir = tempfile.mkdtemp(prefix="aikit-redis-")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def cleanup(self) -> None:
        self.kill()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def throwaway_redis() -> Iterator[RedisProcess]:
    proc = RedisProcess(free_port()).start()
    try:
        yield proc
    finally:
        proc.cleanup()


@contextlib.contextmanager
def redis_cluster(nodes: int = 3) -> Iterator[str]:
    """A local Redis Cluster of `nodes` masters; yields a URL of one node for RedisCluster.from_url."""
    procs = [RedisProcess(cluster_port(), extra=("--cluster-enabled", "yes", "--cluster-node-timeout", "2000"))
             for _ in range(nodes)]
    try:
        for p in procs:
            p.extra = (*p.extra, "--cluster-config-file", f"nodes-{p.port}.conf")
            p.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p.port}" for p in procs],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        client = redis.Redis(port=procs[0].port)
        deadline = time.monotonic() + 20
        while client.cluster("info").get("cluster_state") != "ok":
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not become ok")
            time.sleep(0.1)
        client.close()
        yield f"redis://127.0.0.1:{procs[0].port}/0"
    finally:
        for p in procs:
            p.cleanup()
