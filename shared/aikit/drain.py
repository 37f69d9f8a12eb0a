"""The drain: the Redis buffer -> Postgres (api_key_usage rows, usage_daily rollups, open meter reports).

Money rules:
- An entry leaves Redis only after the transaction that stored it committed (store, then ACK).
- Rows are idempotent on request_id, so a replayed batch (crash before ACK, two flushes at once) adds nothing.
- A shard's stream is read as a contiguous prefix, batch after batch, each read starting right after the previous
  batch (never at an acknowledgement), and stored and removed strictly in order: reading ahead cannot skip an
  entry, and removing a batch removes exactly what was stored (ACK_FAST; ACK_THROUGH when a concurrent flush
  removed part of it already or malformed entries are kept aside).
- Entries that do not decode (aikit.metering.record) are kept aside in the shard's `:malformed` stream, never
  stored; their key's pending counters still move.

Throughput: shards are stored by STORE_WORKERS parallel lanes, each reading ahead while it stores (COPY into a
temp table, one merge statement, REPORT_LOCK only for the outbox upsert), and a stored batch leaves Redis with
ACK_FAST (the pending-counter deltas computed while reading). Memory stays at a few batches per lane.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Engine

from aikit.faults import crash_point
from aikit.metering.layout import RedisLayout
from aikit.metering.record import PENDING_COUNTERS, Batch, decode_batch
from aikit.metering.scripts import ACK_FAST, ACK_THROUGH
from aikit.metering.sql_sink import report_meter, store_copy, store_events
from aikit.observability import FLUSH_LAG, emit, logger
from aikit.settings import Settings

STORE_WORKERS = 2  # shards stored in parallel, each lane on its own connection


class _DrainTally(Protocol):
    """What a drain counts (a lane's _DrainCounts, or the run's FlushSummary)."""

    events_read: int
    rows_inserted: int
    malformed: int
    stopped_early: bool  # the time budget ran out; the rest goes next run
    flush_lag_seconds: float
    drain_seconds: float


@dataclass
class _DrainCounts:
    events_read: int = 0
    rows_inserted: int = 0
    malformed: int = 0
    stopped_early: bool = False
    flush_lag_seconds: float = 0.0
    drain_seconds: float = 0.0


def _next_stream_id(entry_id: str) -> str:
    """The smallest stream id greater than `entry_id` (XTRIM MINID removes ids below it)."""
    ms, _, seq = entry_id.partition("-")
    if int(seq) >= 2**64 - 1:
        return f"{int(ms) + 1}-0"
    return f"{ms}-{int(seq) + 1}"


def _raw_xrange(response: Any, **_: Any) -> Any:
    return response


def read_raw_entries(client: Any) -> None:
    """Have a client return stream entries as Redis sends them ([id, [name, value, ...]]): no dict per entry on
    the hot path (aikit.metering.record decodes either form)."""
    client.set_response_callback("XRANGE", _raw_xrange)


class Drain:
    def __init__(self, settings: Settings, redis: Any, engine: Engine, layout: RedisLayout, *, metering_on: bool,
                 clock: Callable[[], float], store_workers: int) -> None:
        """`metering_on`: stored rows with a customer are billable (aikit.metering.record.billable_row)."""
        self.settings = settings
        self.redis = redis
        self.engine = engine
        self.layout = layout
        self.metering_on = metering_on
        self.clock = clock
        self._postgres = engine.dialect.name == "postgresql"
        # SQLite has one writer at a time: no point in storing shards in parallel there.
        self.store_workers = max(1, min(store_workers if self._postgres else 1, layout.shards))

    def run(self, tally: _DrainTally, deadline: float) -> None:
        """Move the buffer into Postgres. Shards are split over `store_workers` lanes that store in parallel
        (each on its own connection); within a lane a helper thread reads the next batch while the current
        one is stored, so Redis, Python and Postgres work at the same time. A shard's batches are stored and
        removed strictly in order. Memory: at most three batches per lane."""
        started = self.clock()
        self._measure_lag(tally)
        lanes = self.store_workers
        stop = threading.Event()
        parts = [_DrainCounts() for _ in range(lanes)]
        failures: list[BaseException] = []

        def lane(j: int) -> None:
            try:
                self._drain_lane(list(range(j, self.layout.shards, lanes)), parts[j], deadline, stop)
            except BaseException as exc:
                failures.append(exc)
                stop.set()

        if lanes == 1:
            lane(0)
        else:
            threads = [threading.Thread(target=lane, args=(j,), name=f"flush-lane-{j}", daemon=True)
                       for j in range(lanes)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        for part in parts:
            tally.events_read += part.events_read
            tally.rows_inserted += part.rows_inserted
            tally.malformed += part.malformed
            tally.stopped_early = tally.stopped_early or part.stopped_early
        tally.drain_seconds = round(self.clock() - started, 3)
        if failures:
            raise failures[0]

    def _drain_lane(self, shards: list[int], part: _DrainTally, deadline: float, stop: threading.Event) -> None:
        ahead: queue.Queue[Batch | BaseException | None] = queue.Queue(maxsize=1)
        halt = threading.Event()
        reader = threading.Thread(target=self._read_ahead, args=(shards, ahead, halt), daemon=True,
                                  name="flush-reader")
        reader.start()
        try:
            while not stop.is_set():
                item = ahead.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                crash_point("after_read")
                if self.clock() >= deadline:
                    part.stopped_early = True
                    break
                self.store_batch(item, part)
        finally:
            halt.set()
            while reader.is_alive():  # unblock a reader waiting to hand over a batch
                with suppress(queue.Empty):
                    ahead.get(timeout=0.05)
            reader.join()

    def _measure_lag(self, tally: _DrainTally) -> None:
        oldest: float | None = None
        for shard in range(self.layout.shards):
            first = self.redis.xrange(self.layout.stream(shard), count=1)
            if first:
                ms = int(first[0][0].split("-")[0]) / 1000
                oldest = ms if oldest is None else min(oldest, ms)
        tally.flush_lag_seconds = round(max(0.0, time.time() - oldest), 3) if oldest else 0.0
        emit(FLUSH_LAG, tally.flush_lag_seconds, unit="Seconds")

    def _read_ahead(self, shards: list[int], out: queue.Queue[Batch | BaseException | None],
                    halt: threading.Event) -> None:
        try:
            for batch in self.batches(shards):
                while not halt.is_set():
                    try:
                        out.put(batch, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if halt.is_set():
                    return
            out.put(None)
        except BaseException as exc:  # handed to the storing thread, which raises it
            out.put(exc)

    def batches(self, shards: list[int]) -> Iterator[Batch]:
        """Each shard's stream from its head, in contiguous batches: each read starts right after the previous
        batch (exclusive), never at an acknowledgement, so reading ahead cannot skip an entry. A shard ends at
        its first short batch: entries arriving meanwhile wait for the next run."""
        size = self.settings.flush_batch_size
        for shard in shards:
            stream = self.layout.stream(shard)
            start = "-"
            while True:
                entries = self.redis.xrange(stream, min=start, count=size)
                if not entries:
                    break
                batch = decode_batch(shard, entries, metering_on=self.metering_on, copy=self._postgres,
                                     full=len(entries) >= size, book=self.settings.price_book)
                del entries  # the raw entries are the bulk of a batch's memory: not kept while it waits
                yield batch
                if not batch.full:
                    break
                start = "(" + batch.last_id

    def store_batch(self, batch: Batch, part: _DrainTally) -> None:
        window = self.settings.stripe_report_window_seconds
        meter = report_meter(self.settings)
        if batch.valid:
            with self.engine.begin() as conn:
                if self._postgres:
                    inserted = store_copy(conn, batch.copy_rows, window_seconds=window, meter=meter)
                else:
                    inserted = store_events(conn, batch.events, billable=self.metering_on, window_seconds=window,
                                            meter=meter)
            part.rows_inserted += inserted
        crash_point("after_store")
        # Only now, with the rows committed, may the entries leave Redis.
        self._ack(batch)
        crash_point("after_ack")
        part.events_read += batch.size
        part.malformed += len(batch.malformed_ids)

    def _ack(self, batch: Batch) -> None:
        stream = self.layout.stream(batch.shard)
        prefix = self.layout.pending_prefix(batch.shard)
        if not batch.malformed_ids:
            by_key: dict[str, list[str]] = defaultdict(list)
            for (k, d, m), amounts in batch.deltas.items():
                fields = by_key[prefix + k]
                for suffix, amount in zip(PENDING_COUNTERS, amounts, strict=True):
                    fields += (f"{d}|{m}|{suffix}", str(amount))
            keys, args = [stream], [batch.first_id, _next_stream_id(batch.last_id)]
            for key in sorted(by_key):
                keys.append(key)
                args += (str(len(by_key[key]) // 2), *by_key[key])
            if int(ACK_FAST.run(self.redis, keys, args)) >= 0:
                return
        # Malformed entries to keep aside, or a concurrent flush removed part of the batch already.
        if batch.malformed_ids:
            logger.error("malformed_usage_entries", extra={
                "shard": batch.shard, "count": len(batch.malformed_ids),
                "kept_in": self.layout.tag(batch.shard) + ":malformed"})
        ACK_THROUGH.run(
            self.redis,
            [stream, self.layout.tag(batch.shard) + ":malformed", *sorted(prefix + k for k in batch.key_ids)],
            [prefix, batch.last_id, _next_stream_id(batch.last_id), *batch.malformed_ids],
        )
