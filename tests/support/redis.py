"""Reading what the API left in Redis: stream entries, pending token counters, open reservations, quota
counters.
"""

from __future__ import annotations

from typing import Any

import redis

from aikit.keys import IssuedKey
from aikit.runtime import Runtime
from tests.support.settings import REDIS_URL


def entries(runtime: Runtime, api_key_id: str, *, settled: bool = False) -> list[dict[str, str]]:
    """The key's entries in its usage stream; with `settled`, also asserts the key holds no open reservation."""
    with redis.Redis.from_url(REDIS_URL, decode_responses=True) as client:
        found = client.xrange(runtime.layout.stream(runtime.layout.shard_of(api_key_id)))
        if settled:
            assert client.hgetall(runtime.layout.inflight(api_key_id)) == {}  # every reservation settled
    return [fields for _, fields in found if fields["k"] == api_key_id]


def held(runtime: Runtime, key: IssuedKey) -> dict[str, str]:
    """Open quota reservations of the key."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    found = client.hgetall(runtime.layout.inflight(key.api_key_id))
    client.close()
    return found


def pending_tokens(runtime: Runtime, api_key_id: str, client: Any = None) -> int:
    """Tokens of the key still pending in Redis (not flushed yet), read with `client` (a Redis, a Redis Cluster or
    the embedded fake), else with a client of the runtime's own Redis URL."""
    if client is None:
        with redis.Redis.from_url(runtime.settings.redis_url, decode_responses=True) as own:
            values = own.hgetall(runtime.layout.pending(api_key_id))
    else:
        values = client.hgetall(runtime.layout.pending(api_key_id))
    return sum(int(v) for k, v in values.items() if k.endswith("|t"))


def quota_counter(runtime: Runtime, key: IssuedKey) -> int | None:
    info = runtime.keys.lookup(key.api_key)
    assert info is not None
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    value = client.get(runtime.layout.quota(key.api_key_id, info.quota_period_start))
    client.close()
    return None if value is None else int(value)
