"""aikit.server's uvicorn configuration: the access log is a setting, off by default; httptools parses (issue 16)."""

from __future__ import annotations

from aikit.server import uvicorn_config
from aikit.settings import Settings
from tests.support.settings import make_settings


def test_the_access_log_is_off_unless_asked_for(settings: Settings, pg_url: str, redis_prefix: str) -> None:
    assert settings.access_log is False
    assert uvicorn_config(settings, "127.0.0.1", 8000).access_log is False
    on = make_settings(pg_url, redis_prefix, access_log=True)
    assert uvicorn_config(on, "127.0.0.1", 8000).access_log is True


def test_requests_are_parsed_by_httptools_with_the_header_timeout(settings: Settings) -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    protocol = uvicorn_config(settings, "127.0.0.1", 8000).http
    assert isinstance(protocol, type) and issubclass(protocol, HttpToolsProtocol)
    assert protocol.__name__ == "HeaderTimeoutHttpToolsProtocol"
