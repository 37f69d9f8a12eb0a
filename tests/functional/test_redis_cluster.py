"""The request path and the flush against a real three-master Redis Cluster (ElastiCache Serverless is
cluster-only): scripts routed by their keys' hash slot, limits, quota reservations, exact drain to Postgres."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import openai
import pytest
from fastapi.testclient import TestClient
from redis.cluster import RedisCluster
from sqlalchemy import func, select

from aikit.api.app import create_app
from aikit.db.models import ApiKeyUsage, UsageDaily
from aikit.flush import Flusher
from aikit.runtime import Runtime
from aikit.settings import Settings
from tests.support.api import chat, issue_key, parallel_chats
from tests.support.redis import pending_tokens
from tests.support.servers import redis_cluster, serve_app
from tests.support.settings import make_settings

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    with redis_cluster() as url:
        yield url


@pytest.fixture
def cluster_settings(pg_url: str, cluster_url: str) -> Settings:
    prefix = f"c{uuid.uuid4().hex[:10]}"
    return make_settings(pg_url, prefix, redis_url=cluster_url, redis_cluster=True)


@pytest.fixture
def cluster(cluster_url: str) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(cluster_url, decode_responses=True)
    yield client
    client.close()


def stored(runtime: Runtime, api_key_id: str) -> tuple[int, int]:
    with runtime.engine.connect() as conn:
        rows, tokens = conn.execute(select(func.count(), func.coalesce(func.sum(ApiKeyUsage.tokens), 0))
                                    .where(ApiKeyUsage.api_key_id == api_key_id)).one()
        daily = conn.execute(select(func.coalesce(func.sum(UsageDaily.tokens), 0))
                             .where(UsageDaily.api_key_id == api_key_id)).scalar_one()
    assert int(daily) == int(tokens)  # the rollup moves with the rows
    return int(rows), int(tokens)


def node_of(cluster: RedisCluster, key: str) -> str:
    node = cluster.get_node_from_key(key)
    assert node is not None
    return str(node.name)


def test_chat_limits_and_flush_across_cluster_nodes(cluster_settings: Settings, cluster: RedisCluster) -> None:
    runtime = Runtime(cluster_settings)
    keys = [issue_key(cluster_settings, rpm=1000, rpd=10_000, monthly_tokens=1_000_000) for _ in range(12)]
    # The keys' counters and buffers really are spread over the masters, not all on one.
    nodes = {node_of(cluster, runtime.layout.pending(k.api_key_id)) for k in keys}
    assert len(nodes) >= 2, nodes

    expected: dict[str, tuple[int, int]] = {}
    with TestClient(create_app(runtime=runtime)) as client:
        for i, key in enumerate(keys):
            words = " ".join(["w"] * (i + 1))
            total = 0
            for _ in range(2):
                r = chat(client, key, words)
                assert r.status_code == 200, r.text
                assert int(r.headers["X-RateLimit-Remaining-Requests"]) >= 998
                total += r.json()["usage"]["total_tokens"]
            # One streamed call per key too; the usage arrives in the last chunk.
            with client.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {key.api_key}"},
                               json={"model": "echo-1", "messages": [{"role": "user", "content": words}],
                                     "stream": True, "stream_options": {"include_usage": True}}) as s:
                assert s.status_code == 200
                body = s.read().decode()
            assert body.rstrip().endswith("data: [DONE]")
            total += (i + 1) + (i + 2)
            expected[key.api_key_id] = (3, total)
            assert pending_tokens(runtime, key.api_key_id, cluster) == total
            # Every reservation was settled by its RECORD.
            assert cluster.hlen(runtime.layout.inflight(key.api_key_id)) == 0

    summary = Flusher(cluster_settings).run()
    assert summary.ok, summary.errors
    assert summary.rows_inserted == summary.events_read == 3 * len(keys)
    for key in keys:
        assert stored(runtime, key.api_key_id) == expected[key.api_key_id]
        assert pending_tokens(runtime, key.api_key_id, cluster) == 0
    for shard in range(cluster_settings.redis_usage_shards):
        assert cluster.xlen(runtime.layout.stream(shard)) == 0
    assert Flusher(cluster_settings).run().rows_inserted == 0


def test_rate_limits_and_quota_on_the_cluster(cluster_settings: Settings, cluster: RedisCluster) -> None:
    runtime = Runtime(cluster_settings)
    per_minute = issue_key(cluster_settings, rpm=3, rpd=100)
    quota = issue_key(cluster_settings, rpm=100, rpd=100, monthly_tokens=20)  # 7 tokens per call
    with TestClient(create_app(runtime=runtime)) as client:
        assert [chat(client, per_minute).status_code for _ in range(4)] == [200, 200, 200, 429]
        r = chat(client, per_minute)
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
        codes = [chat(client, quota, max_tokens=4).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = chat(client, quota)
        assert r.status_code == 429 and "monthly token quota" in r.json()["error"]["message"]
    assert pending_tokens(runtime, per_minute.api_key_id, cluster) == 3 * 7
    assert pending_tokens(runtime, quota.api_key_id, cluster) == 3 * 7
    assert cluster.hlen(runtime.layout.inflight(quota.api_key_id)) == 0


def test_parallel_requests_cannot_overspend_the_quota_on_the_cluster(cluster_settings: Settings,
                                                                      cluster: RedisCluster) -> None:
    runtime = Runtime(cluster_settings)
    key = issue_key(cluster_settings, rpm=1000, rpd=1000, monthly_tokens=20)

    with serve_app(create_app(runtime=runtime)) as base:
        codes = parallel_chats(base, key, 20)
    assert set(codes) <= {200, 429}
    assert 1 <= codes.count(200) <= 3
    assert pending_tokens(runtime, key.api_key_id, cluster) == 7 * codes.count(200)
    assert cluster.hlen(runtime.layout.inflight(key.api_key_id)) == 0


def test_openai_sdk_through_uvicorn_on_the_cluster(cluster_settings: Settings, cluster: RedisCluster) -> None:
    runtime = Runtime(cluster_settings)
    keys = [issue_key(cluster_settings, rpm=1000, rpd=10_000) for _ in range(10)]

    async def drive(base: str) -> dict[str, int]:
        totals: dict[str, int] = {}
        for key in keys:
            sdk = openai.AsyncOpenAI(api_key=key.api_key, base_url=base + "/v1", max_retries=0)
            replies = await asyncio.gather(*[
                sdk.chat.completions.create(model="echo-1", messages=[{"role": "user", "content": "a b " * i}])
                for i in range(1, 5)])
            stream = await sdk.chat.completions.create(
                model="echo-1", messages=[{"role": "user", "content": "x y z"}], stream=True,
                stream_options={"include_usage": True})
            streamed = [chunk.usage.total_tokens async for chunk in stream if chunk.usage is not None]
            await sdk.close()
            totals[key.api_key_id] = sum(r.usage.total_tokens for r in replies if r.usage) + sum(streamed)
        return totals

    with serve_app(create_app(runtime=runtime)) as base:
        totals = asyncio.run(drive(base))
    assert all(totals.values())
    for key in keys:
        assert pending_tokens(runtime, key.api_key_id, cluster) == totals[key.api_key_id]
    summary = Flusher(cluster_settings).run()
    assert summary.ok and summary.rows_inserted == 5 * len(keys)
    for key in keys:
        assert stored(runtime, key.api_key_id) == (5, totals[key.api_key_id])
