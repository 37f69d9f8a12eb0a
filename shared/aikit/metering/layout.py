"""Redis key names. Every key one script touches shares a hash tag, so the code runs on a Redis Cluster.

Usage buffers are spread over a fixed number of shards ({prefix:s<n>} hash tags); all live counters of a key
sit in its shard's slot, so recording an event and updating the counters is one atomic script.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

# Quota counters (and their seeded markers) outlive the longest quota period; they hold no billing data.
QUOTA_TTL_SECONDS = 40 * 86400


@dataclass(frozen=True, slots=True)
class RedisLayout:
    prefix: str
    shards: int

    def shard_of(self, api_key_id: str) -> int:
        return zlib.crc32(api_key_id.encode()) % self.shards

    def tag(self, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}"

    def stream(self, shard: int) -> str:
        return f"{self.tag(shard)}:usage"

    def pending_prefix(self, shard: int) -> str:
        return f"{self.tag(shard)}:pend:"

    def pending(self, api_key_id: str) -> str:
        """Hash of usage recorded but not yet flushed, by `date|model|field`."""
        return self.pending_prefix(self.shard_of(api_key_id)) + api_key_id

    def minute(self, api_key_id: str) -> str:
        """Requests in the current minute, as "<minute>:<count>" (the minute from Redis' own clock)."""
        return f"{self.tag(self.shard_of(api_key_id))}:rpm:{api_key_id}"

    def day(self, api_key_id: str) -> str:
        """Requests in the current UTC day, as "<day>:<count>"."""
        return f"{self.tag(self.shard_of(api_key_id))}:rpd:{api_key_id}"

    def quota(self, api_key_id: str, period_start: int) -> str:
        return f"{self.tag(self.shard_of(api_key_id))}:quota:{api_key_id}:{period_start}"

    def quota_catchup(self, api_key_id: str, period_start: int) -> str:
        """Tokens recorded while a missing quota counter is being re-seeded from the database; the seed adds
        them, so usage recorded during the seeding is not lost from the counter."""
        return f"{self.tag(self.shard_of(api_key_id))}:quotacatchup:{api_key_id}:{period_start}"

    def inflight(self, api_key_id: str) -> str:
        return f"{self.tag(self.shard_of(api_key_id))}:inflight:{api_key_id}"

    def admit_keys(self, api_key_id: str, period_start: int) -> tuple[str, ...]:
        """ADMIT's KEYS (aikit.limits) for a key counted against the quota period starting at `period_start`."""
        return _admit_keys(self, api_key_id, period_start)

    def record_keys(self, api_key_id: str, period_start: int) -> tuple[str, ...]:
        """RECORD's KEYS for an event of `api_key_id` counted against the quota period starting at
        `period_start` (its ARGV: aikit.metering.record.encode)."""
        return _record_keys(self, api_key_id, period_start)


# The two scripts of every billed request name the same keys request after request: built once per key and
# period (issue 16: eleven shard computations and string builds per request otherwise).
_KEY_LISTS_CACHED = 16_384


@functools.lru_cache(maxsize=_KEY_LISTS_CACHED)
def _admit_keys(layout: RedisLayout, api_key_id: str, period_start: int) -> tuple[str, ...]:
    return (layout.minute(api_key_id), layout.day(api_key_id), layout.quota(api_key_id, period_start),
            layout.inflight(api_key_id), layout.stream(layout.shard_of(api_key_id)),
            layout.quota_catchup(api_key_id, period_start))


@functools.lru_cache(maxsize=_KEY_LISTS_CACHED)
def _record_keys(layout: RedisLayout, api_key_id: str, period_start: int) -> tuple[str, ...]:
    return (layout.stream(layout.shard_of(api_key_id)), layout.pending(api_key_id),
            layout.quota(api_key_id, period_start), layout.inflight(api_key_id),
            layout.quota_catchup(api_key_id, period_start))
