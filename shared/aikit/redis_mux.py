"""The request path's Redis scripts on one auto-pipelined connection (issue 16).

`RedisMux` owns one connection to a single Redis node. Every command issued during one event-loop iteration
(the limiter scripts and RECORDs of all concurrent requests) goes out in one socket write; replies come back
in the order the commands were written and resolve the callers' futures in that order (hiredis parses them).
A command issued while none is in flight has nothing to be coalesced with and is written at once.
Compared with redis-py's pool (a connection per concurrent caller, a lock around taking it, one write and
one parse per command) this costs about a seventh of the client CPU per script (bench/probe_redis_client.py).

What redis-py's client guaranteed on this path still holds, so callers keep their fallbacks unchanged:
- an error reply raises redis-py's exception class for it (READONLY, OOM, LOADING, MASTERDOWN, CLUSTERDOWN,
  TRYAGAIN, NOSCRIPT, ...), parsed by redis-py's own table, so `REDIS_DOWN_ERRORS` and `NoScriptError` match;
- no reply within `socket_timeout` raises redis.exceptions.TimeoutError, a refused or lost connection
  redis.exceptions.ConnectionError; either closes the connection and fails every command still waiting on it
  (a reply may never be matched to the wrong caller), and the next command connects anew;
- a command is sent once: nothing is retried (a script that may have run must not run twice).

Only single-node `redis://` and `rediss://` URLs are multiplexed; a cluster, `unix://` or the in-process
substitute keep redis-py's client (`make_script_client`).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any

import hiredis
import redis.exceptions
from redis._parsers import BaseParser
from redis.asyncio.connection import SSLConnection, parse_url

from aikit.redis_client import make_async_redis
from aikit.settings import Settings

_parse_error: Any = BaseParser.parse_error  # redis-py's table: error code -> exception class

_MUX_OPTIONS = frozenset({"host", "port", "db", "username", "password", "connection_class", "ssl_cert_reqs"})


def mux_options(settings: Settings) -> dict[str, Any] | None:
    """The URL's connection options when the multiplexer can serve them, else None (redis-py's client)."""
    url = settings.redis_url
    if settings.redis_cluster or not url.startswith(("redis://", "rediss://")):
        return None
    options: dict[str, Any] = dict(parse_url(url))
    if not set(options) <= _MUX_OPTIONS:
        return None
    cls = options.get("connection_class")
    if cls is not None and cls is not SSLConnection:
        return None
    return options


def pack_command(args: tuple[Any, ...]) -> bytes:
    """One command in RESP, as redis-py writes it (hiredis' packer: str as UTF-8, int and float as their repr);
    anything else (None, bools, containers) is refused with redis-py's DataError before anything is sent."""
    try:
        packed: bytes = hiredis.pack_command(args)
    except TypeError as exc:
        raise redis.exceptions.DataError(f"invalid command argument: {exc}") from None
    return packed


def _ssl_context(options: dict[str, Any]) -> ssl.SSLContext | None:
    if options.get("connection_class") is not SSLConnection:
        return None
    context = ssl.create_default_context()
    if str(options.get("ssl_cert_reqs", "required")).lower() in ("none", "cert_none"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _Protocol(asyncio.Protocol):
    """One connection: coalesced writes, in-order replies, a deadline on the oldest unanswered command."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._reader = hiredis.Reader(encoding="utf-8")
        self._waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._flush_due = False
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a TCP transport (uvloop's is no subclass)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                self._resolve(reply)
        except hiredis.ProtocolError as exc:
            self.fail(redis.exceptions.ConnectionError(f"protocol error from Redis: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis.exceptions.ConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    # -- sending
    def send(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        if self.closed:
            raise redis.exceptions.ConnectionError("connection to Redis closed")
        packed = pack_command(args)  # DataError before anything is queued
        waiter = self._loop.create_future()
        idle = not self._waiters  # then nothing is queued either: every queued command has its waiter
        self._waiters.append((waiter, time.monotonic() + self._timeout))
        if self._timer is None:
            # One timer per connection, left armed after the last reply (arming and cancelling it per command,
            # a libuv handle on uvloop, cost ~4.5 k instructions per command at one client: issue 16). It fires
            # at or before the oldest waiter's deadline, then disarms or re-arms for it (`_check_deadline`).
            self._timer = self._loop.call_later(self._timeout, self._check_deadline)
        if idle and self._transport is not None:
            # Nothing in flight: nothing to coalesce with, so the command goes now rather than one loop
            # iteration later (a lone request's two scripts each wait one less iteration).
            self._transport.write(packed)
            return waiter
        self._out.append(packed)
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush)
        return waiter

    def _flush(self) -> None:
        self._flush_due = False
        if self._out and self._transport is not None and not self.closed:
            data = b"".join(self._out)
            self._out.clear()
            self._transport.write(data)

    # -- replies
    def _resolve(self, reply: Any) -> None:
        if not self._waiters:
            self.fail(redis.exceptions.ConnectionError("a reply from Redis that no command asked for"))
            return
        waiter, _ = self._waiters.popleft()
        if waiter.done():  # its caller was cancelled: the reply is dropped, the order is kept
            return
        if isinstance(reply, hiredis.ReplyError):
            waiter.set_exception(_parse_error(str(reply)))
        else:
            waiter.set_result(reply)

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._waiters:
            return
        deadline = self._waiters[0][1]
        now = time.monotonic()
        if deadline <= now:
            self.fail(redis.exceptions.TimeoutError("Timeout reading from Redis"))
        else:
            self._timer = self._loop.call_later(deadline - now, self._check_deadline)

    def fail(self, exc: Exception) -> None:
        """Close the connection and fail every command still waiting on it (each gets its own instance)."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._out.clear()
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter, _ in waiters:
            if not waiter.done():
                waiter.set_exception(type(exc)(*exc.args))
        if self._transport is not None:
            self._transport.close()


class RedisMux:
    """An auto-pipelining client for one event loop: `evalsha`, `eval` and `execute_command`, with the
    replies redis-py gives with decode_responses=True."""

    def __init__(self, options: dict[str, Any], timeout: float, connect_timeout: float) -> None:
        self._host = str(options.get("host", "localhost"))
        self._port = int(options.get("port", 6379))
        self._handshake = self._handshake_commands(options)
        self._ssl = _ssl_context(options)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None  # the connection attempt under way
        self.connects = 0  # connections opened (tests and benches read it)

    @staticmethod
    def _handshake_commands(options: dict[str, Any]) -> list[tuple[Any, ...]]:
        commands: list[tuple[Any, ...]] = []
        if options.get("password") is not None:
            user = options.get("username")
            commands.append(("AUTH", user, options["password"]) if user else ("AUTH", options["password"]))
        if int(options.get("db") or 0):
            commands.append(("SELECT", int(options["db"])))
        return commands

    async def execute_command(self, *args: Any) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connected()
        return await protocol.send(args)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self.execute_command("EVAL", script, numkeys, *keys_and_args)

    async def _connected(self) -> _Protocol:
        """The open connection. Concurrent callers share one connection attempt (and its failure), which runs
        as a task of its own: a caller cancelled meanwhile does not cancel it for the others."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connect_done)
        return await asyncio.shield(self._connecting)

    def _connect_done(self, task: asyncio.Future[_Protocol]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:  # exception() also marks a failure as seen
            self._protocol = task.result()

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self._timeout), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None)
        except TimeoutError:
            raise redis.exceptions.TimeoutError(f"Timeout connecting to Redis at {self._host}:{self._port}") from None
        except OSError as exc:
            raise redis.exceptions.ConnectionError(
                f"Error connecting to Redis at {self._host}:{self._port}: {exc}") from None
        self.connects += 1
        try:
            for command in self._handshake:
                await protocol.send(command)
        except BaseException:
            protocol.fail(redis.exceptions.ConnectionError("handshake failed"))
            raise
        return protocol

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and not protocol.closed:
            protocol.fail(redis.exceptions.ConnectionError("client closed"))


def make_script_client(settings: Settings) -> Any:
    """The client of the request path's scripts: the multiplexer where it applies, else redis-py's."""
    options = mux_options(settings)
    if options is None:
        return make_async_redis(settings)
    return RedisMux(options, settings.redis_timeout_seconds, settings.redis_timeout_seconds)
