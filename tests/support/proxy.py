"""The API as a proxy in front of the local fake OpenAI (LLM_PROVIDER=openai), with a short upstream timeout."""

from __future__ import annotations

from aikit.settings import Settings
from tests.fakes.llm_servers import FakeOpenAI
from tests.support.settings import make_settings

UPSTREAM_TIMEOUT = 0.5  # LLM_TIMEOUT_SECONDS; the fake's "slow" fault stalls three times as long


def proxy_settings_for(pg_url: str, redis_prefix: str, upstream: FakeOpenAI) -> Settings:
    return make_settings(pg_url, redis_prefix, llm_provider="openai", openai_base_url=upstream.base_url,
                         openai_api_key=FakeOpenAI.api_key, llm_timeout_seconds=UPSTREAM_TIMEOUT)
