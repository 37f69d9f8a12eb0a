"""`LLM.embed`: checked before anything runs, metered once (input tokens as the provider reports them, output
0) for the caller it is given, and nothing metered without track_tokens."""

from __future__ import annotations

import pytest

from aikit.llm import LLM, Caller, CallerRequired, InvalidRequestError
from aikit.llm.echo import EchoProvider, vector
from tests.support.meters import MemoryMeter

pytestmark = pytest.mark.anyio
CALLER = Caller(api_key_id="key_1", customer_id="cus_1")


async def test_embed_meters_the_reported_input_to_the_caller() -> None:
    meter = MemoryMeter()
    llm = LLM(EchoProvider(), meter=meter)
    result = await llm.embed(["one two", "three"], dimensions=4, track_tokens=True, caller=CALLER,
                             request_id="req_1")
    assert result.embeddings == [vector("one two", 4), vector("three", 4)]
    assert (result.model, result.usage.input_tokens, result.usage.output_tokens) == ("echo-embed-1", 3, 0)
    [event] = meter.events
    assert (event.api_key_id, event.customer_id, event.request_id, event.model) == (
        "key_1", "cus_1", "req_1", "echo-embed-1")
    assert (event.input_tokens, event.output_tokens, event.tokens) == (3, 0, 3)
    await llm.embed("untracked")
    assert len(meter.events) == 1


async def test_embed_token_ids_count_themselves() -> None:
    result = await LLM(EchoProvider()).embed([[1, 2, 3], [4]], model="echo-embed-2")
    assert (result.model, result.usage.input_tokens, len(result.embeddings)) == ("echo-embed-2", 4, 2)


@pytest.mark.parametrize(("value", "param"), [
    ("", "input"), ([], "input"), (["ok", ""], "input"), ([1, "a"], "input"), ([True], "input"), (3, "input"),
    ([[1], []], "input"),
])
async def test_bad_input_is_refused_before_anything_runs(value: object, param: str) -> None:
    meter = MemoryMeter()
    with pytest.raises(InvalidRequestError) as caught:
        await LLM(EchoProvider(), meter=meter).embed(value, track_tokens=True, caller=CALLER)  # type: ignore[arg-type]
    assert (caught.value.status, caught.value.param) == (400, param)
    assert meter.events == []


async def test_bad_dimensions_and_model_are_refused() -> None:
    llm = LLM(EchoProvider())
    with pytest.raises(InvalidRequestError, match="dimensions"):
        await llm.embed("x", dimensions=0)
    with pytest.raises(InvalidRequestError, match="model"):
        await llm.embed("x", model=" ")


async def test_track_tokens_without_a_caller_raises_before_the_call() -> None:
    with pytest.raises(CallerRequired):
        await LLM(EchoProvider(), meter=MemoryMeter()).embed("x", track_tokens=True)
