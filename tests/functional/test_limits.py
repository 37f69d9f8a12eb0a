"""The limiter's guarantees against real Redis and Postgres: the quota's overshoot is bounded by one call
whatever the script of the prompt, a quota counter that Redis lost or evicted is re-seeded from the database
plus what is still unflushed (never restarted from recent usage), and every limit runs on Redis' clock, so
instances with skewed clocks agree."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from aikit.api.app import create_app
from aikit.flush import Flusher
from aikit.keys import IssuedKey, KeyInfo
from aikit.limits import RateLimiter
from aikit.runtime import Runtime
from aikit.settings import Settings
from tests.fakes.llm_servers import FakeOpenAI, openai_server
from tests.support.api import chat, issue_key
from tests.support.redis import quota_counter
from tests.support.servers import serve_app
from tests.support.settings import REDIS_URL, make_settings

TOKENS = 3 + 4  # echo: "hello there world"


def rclient() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, decode_responses=True)


def key_info(runtime: Runtime, key: IssuedKey) -> KeyInfo:
    info = runtime.keys.lookup(key.api_key)
    assert info is not None
    return info


def evict_quota_counter(runtime: Runtime, key: IssuedKey) -> None:
    """What a cache at its memory cap does to a key with a TTL: it is gone, whatever else survived."""
    with rclient() as c:
        assert c.delete(runtime.layout.quota(key.api_key_id, key_info(runtime, key).quota_period_start)) == 1


# ---------------------------------------------------------------------------------------- overshoot

PROMPTS = {
    "latin": "The quick brown fox jumps over the lazy dog, then naps in the afternoon sun. " * 3,
    "cjk": "敏捷的棕色狐狸跳过了懒狗，然后在午后的阳光下小睡。素早い茶色の狐がのろまな犬を飛び越えた。" * 2,  # noqa: RUF001
    "korean": "빠른 갈색 여우가 게으른 개를 뛰어넘었다. 오후 햇살 아래에서 낮잠을 잤다. " * 2,
    "emoji": "🦊🐶🚀✨🎉👍🏽👨‍👩‍👧‍👦🏳️‍🌈 " * 6,
    "arabic_cyrillic_hindi": ("الثعلب البني السريع يقفز فوق الكلب الكسول. Быстрая коричневая лиса прыгает через "
                              "ленивую собаку. तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूद गई।"),
}
QUOTA = 300
MAX_TOKENS = 64


@pytest.fixture
def costly_upstream() -> Iterator[FakeOpenAI]:
    """Bills every byte as a token (the worst a byte-level tokenizer can do) and answers slowly."""
    with openai_server(slow_seconds=0.6) as srv:
        srv.bill_bytes = True
        yield srv


@pytest.mark.parametrize("script", list(PROMPTS))
def test_parallel_slow_calls_serve_at_most_the_quota_plus_one_call(
        pg_url: str, redis_prefix: str, costly_upstream: FakeOpenAI, script: str) -> None:
    prompt = PROMPTS[script]
    costly_upstream.reply = prompt  # a reply in the same script, cut to max_tokens by the upstream
    costly_upstream.inject("slow", times=50)
    settings = make_settings(pg_url, redis_prefix, llm_provider="openai", openai_base_url=costly_upstream.base_url,
                             openai_api_key=FakeOpenAI.api_key, llm_timeout_seconds=10)
    runtime = Runtime(settings)
    key = issue_key(settings, rpm=1000, rpd=1000, monthly_tokens=QUOTA)
    body = {"model": "gpt-4o-mini", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": prompt}]}
    one_call_max = len(prompt.encode()) + 4 + MAX_TOKENS  # what the upstream bills one call at most

    async def burst(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            return await asyncio.gather(*[
                http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key.api_key}"})
                for _ in range(50)])

    with serve_app(create_app(runtime=runtime)) as base:
        responses = asyncio.run(burst(base))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 1
    served = sum(r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200)
    assert served <= QUOTA + one_call_max, (script, codes.count(200), served)
    assert quota_counter(runtime, key) == served  # what was metered is what was served


# ---------------------------------------------------------------------------------- evicted counters


def test_an_evicted_quota_counter_is_reseeded_from_rollups_and_unflushed_usage(
        runtime: Runtime, settings: Settings) -> None:
    key = issue_key(settings, rpm=1000, rpd=1000, monthly_tokens=100)
    with TestClient(create_app(runtime=runtime)) as client:
        assert [chat(client, key).status_code for _ in range(5)] == [200] * 5
        assert Flusher(settings).run().rows_inserted == 5  # 35 tokens in the rollups
        assert [chat(client, key).status_code for _ in range(3)] == [200] * 3  # 21 tokens unflushed
        assert quota_counter(runtime, key) == 8 * TOKENS

        evict_quota_counter(runtime, key)
        # Usage recorded while the counter is missing must not resurrect it holding only that usage...
        asyncio.run(record_and_close(runtime, key))
        assert quota_counter(runtime, key) is None
        # ...the next call seeds it from everything: 35 flushed + 21 + 7 unflushed, then adds its own 7.
        assert chat(client, key).status_code == 200
        assert quota_counter(runtime, key) == 10 * TOKENS
        # 70 of 100 used: five more calls start (the last with 2 left), the sixth is refused.
        assert [chat(client, key).status_code for _ in range(6)] == [200] * 5 + [429]


async def record_once(runtime: Runtime, key: IssuedKey) -> None:
    await runtime.meter.record(key.api_key_id, TOKENS, None, input_tokens=3, output_tokens=4, model="echo-1",
                               quota_period_start=key_info(runtime, key).quota_period_start)


async def record_and_close(runtime: Runtime, key: IssuedKey) -> None:
    await record_once(runtime, key)
    await runtime.aclose()


@pytest.mark.anyio
async def test_usage_recorded_while_the_counter_is_being_seeded_is_kept(runtime: Runtime,
                                                                        settings: Settings) -> None:
    """The seed reads the database (slow) while calls keep finishing: their usage is caught up."""
    key = issue_key(settings, rpm=1000, rpd=1000, monthly_tokens=1000)
    info = key_info(runtime, key)

    async def slow_database(_: KeyInfo, __: int) -> int:
        await record_once(runtime, key)  # a call of another instance finishes meanwhile
        return 500  # what the rollups hold

    limiter = RateLimiter(runtime.redis, runtime.layout, settings, used_since=slow_database)
    decision = await limiter.admit(info, "req_seeding", 10)
    assert decision.allowed
    assert quota_counter(runtime, key) == 500 + TOKENS
    await runtime.aclose()


# ----------------------------------------------------------------------------------------- one clock


def test_instances_with_skewed_clocks_share_minutes_and_reservations(
        pg_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(pg_url, redis_prefix)
    key = issue_key(settings, rpm=2, rpd=100, monthly_tokens=100)
    a, b = Runtime(settings), Runtime(settings)
    info = key_info(a, key)
    real_time = time.time

    async def scenario() -> tuple[Any, Any, Any]:
        first = await a.limiter.admit(info, "req_a", 80)  # a call of instance A, still running
        monkeypatch.setattr(time, "time", lambda: real_time() + 7200)  # instance B's clock is 2 h ahead
        second = await b.limiter.admit(info, "req_b", 30)
        monkeypatch.setattr(time, "time", real_time)
        third = await a.limiter.admit(info, "req_c", 1)
        await a.aclose()
        await b.aclose()
        return first, second, third

    first, second, third = asyncio.run(scenario())
    assert first.allowed and second.allowed
    # B saw A's reservation (not expired on the one clock) and counted in the same minute as A.
    assert second.headers["X-RateLimit-Remaining-Tokens"] == "0"  # 100 - 80 held by A - 30 held by B
    assert second.headers["X-RateLimit-Remaining-Requests"] == "0"
    assert not third.allowed and third.limit_hit == "minute"
    with rclient() as c:
        assert set(c.hgetall(a.layout.inflight(key.api_key_id))) == {"req_a", "req_b"}
