"""Streamed answers as server-sent events, in either wire format (OpenAI chunks, Anthropic message events).

One path for both: the first event is pulled before the response starts, so a refused call (limits, a field
the provider cannot honour, an upstream that fails at once) is a clean HTTP error rather than a broken
stream; after that, failures are reported in-band, in the format's own error event. The usage the client is
told is sent only after the stream has been metered (`LLM.stream` records as it finishes), so a usage that
could not be recorded is never shown: the client gets an error event instead.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

from fastapi.responses import StreamingResponse

from aikit.api.anthropic_format import MessageStream
from aikit.api.openai_format import ChunkStream
from aikit.errors import MeterUnavailable, ProviderError
from aikit.llm.base import StreamEnd, StreamEvent

# Proxies must pass events on as they come.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventFormat(Protocol):
    def start(self) -> list[str]: ...

    def event(self, event: StreamEvent) -> list[str]:
        """The events of one output event (never a StreamEnd)."""
        ...

    def finish(self, end: StreamEnd) -> list[str]:
        """The closing events: stop reason and the (metered) usage."""
        ...

    def error(self, status: int, message: str, code: str | None) -> str: ...


class OpenAIEvents:
    """`chat.completion.chunk` events, ending with `data: [DONE]`."""

    def __init__(self, chunks: ChunkStream) -> None:
        self.chunks = chunks

    def start(self) -> list[str]:
        return [self.chunks.start()]

    def event(self, event: StreamEvent) -> list[str]:
        found = self.chunks.event(event)
        return [] if found is None else [found]

    def finish(self, end: StreamEnd) -> list[str]:
        return [*self.chunks.finish(end), self.chunks.done()]

    def error(self, status: int, message: str, code: str | None) -> str:
        return self.chunks.error(status, message, code)


class AnthropicEvents:
    """Anthropic's message_start, content_block_*, message_delta and message_stop events."""

    def __init__(self, messages: MessageStream) -> None:
        self.messages = messages

    def start(self) -> list[str]:
        return [self.messages.start()]

    def event(self, event: StreamEvent) -> list[str]:
        return self.messages.event(event)

    def finish(self, end: StreamEnd) -> list[str]:
        return self.messages.finish(end)

    def error(self, status: int, message: str, code: str | None) -> str:
        return self.messages.error(status, message)


async def _events(stream: AsyncGenerator[StreamEvent, None], first: StreamEvent | None,
                  fmt: EventFormat) -> AsyncIterator[str]:
    try:
        for line in fmt.start():
            yield line
        event = first
        while event is not None:
            if isinstance(event, StreamEnd):
                following = await anext(stream, None)  # ends the stream, which meters it, before telling usage
                lines = fmt.finish(event)
            else:
                lines = fmt.event(event)
            for line in lines:
                yield line
            event = following if isinstance(event, StreamEnd) else await anext(stream, None)
    except (ProviderError, MeterUnavailable) as exc:
        # Headers are gone: the failure (the deadline included: 504) goes in-band, after metering what was
        # produced; a usage that could not be recorded is reported instead of shown.
        yield fmt.error(exc.status, exc.client_message(), exc.code)
    finally:
        await stream.aclose()


async def respond(stream: AsyncGenerator[StreamEvent, None], fmt: EventFormat) -> StreamingResponse:
    """The stream as server-sent events; whatever its first event raises is raised here, before answering."""
    first = await anext(stream, None)
    return StreamingResponse(_events(stream, first, fmt), media_type="text/event-stream", headers=HEADERS)
