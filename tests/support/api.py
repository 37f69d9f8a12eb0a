"""Talking to the API in tests: issuing keys, the bearer header, a chat request (one, or many at once), reading an
SDK stream, and the app with every router mounted.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from aikit.api.app import create_app
from aikit.db.engine import get_engine
from aikit.keys import IssuedKey, create_key
from aikit.runtime import Runtime
from aikit.settings import Settings


def issue_key(settings: Settings, **kwargs: Any) -> IssuedKey:
    kwargs.setdefault("email", f"{uuid.uuid4().hex[:8]}@example.com")
    with Session(get_engine(settings.database_url)) as session:
        issued = create_key(session, settings, **kwargs)
        session.commit()
    return issued


def read_sdk_stream(stream: Any) -> tuple[str, Any]:
    """The text and the final usage chunk's usage of an openai SDK chat stream."""
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage


def full_app(runtime: Runtime) -> FastAPI:
    """The API with every router, mounting any the app factory does not mount (yet)."""
    from aikit.api.routes import billing, usage, webhooks

    app = create_app(runtime=runtime)
    paths = set(app.openapi()["paths"])
    for module, probe in ((usage, "/v1/usage"), (billing, "/v1/billing/checkout"),
                          (webhooks, "/v1/webhooks/stripe")):
        if probe not in paths:
            app.include_router(module.router)
    app.openapi_schema = None  # built again, with every route, on the next request for it
    return app


def bearer(key: IssuedKey | str) -> dict[str, str]:
    token = key if isinstance(key, str) else key.api_key
    return {"Authorization": f"Bearer {token}"}


def chat(client: TestClient | httpx.Client, key: IssuedKey | str, content: str = "hello there world",
         **body: Any) -> httpx.Response:
    """POST /v1/chat/completions to the echo model with one user message; `body` adds or replaces fields."""
    payload = {"model": "echo-1", "messages": [{"role": "user", "content": content}], **body}
    return client.post("/v1/chat/completions", json=payload, headers=bearer(key))


def parallel_chats(base: str, key: IssuedKey | str, n: int) -> list[int]:
    """The status codes of `n` chat requests sent at once to the API served at `base`; each costs 3 input + 4
    output tokens on the echo model and reserves max_tokens=4 + prompt."""

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            rs = await asyncio.gather(*[
                http.post("/v1/chat/completions", headers=bearer(key),
                          json={"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 4})
                for _ in range(n)])
        return [r.status_code for r in rs]

    return asyncio.run(burst())
