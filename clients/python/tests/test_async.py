"""The asyncio client: eight concurrent streams, errors, cancellation, unary calls."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, List, Tuple

import grpc
import pytest

from strata_client import (
    AsyncClient,
    Client,
    Finished,
    FinishReason,
    InvalidArgument,
    Token,
)

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colors are",
    "In 1969, the first man on the moon was",
    "My favourite fruit is",
    "Water boils at",
    "The quick brown fox",
]
N = 8


def test_eight_concurrent_streams_match_each_request_alone(addr: str, client: Client) -> None:
    assert len(PROMPTS) == 8
    alone = [client.generate(p, max_tokens=N, temperature=0).collect() for p in PROMPTS]

    async def main() -> Tuple[List[Tuple[List[Token], Finished]], int]:
        in_flight = 0
        most = 0

        async with AsyncClient(addr, timeout=120) as ac:

            async def one(prompt: str) -> Tuple[List[Token], Finished]:
                nonlocal in_flight, most
                stream = ac.generate(prompt, max_tokens=N, temperature=0)
                tokens: List[Token] = []
                async for event in stream:
                    if isinstance(event, Token):
                        if not tokens:
                            in_flight += 1
                            most = max(most, in_flight)
                        tokens.append(event)
                in_flight -= 1
                assert stream.finished is not None
                return tokens, stream.finished

            results = await asyncio.gather(*(one(p) for p in PROMPTS))
        return list(results), most

    results, most = asyncio.run(main())
    for prompt, want, (tokens, fin) in zip(PROMPTS, alone, results):
        assert tuple(t.id for t in tokens) == want.token_ids, prompt
        assert "".join(t.text for t in tokens) + fin.text == want.text, prompt
        assert [t.index for t in tokens] == list(range(len(tokens)))
        assert fin.reason == want.reason
        assert fin.usage == want.usage
    # The streams really ran together: several had started before one had finished.
    assert most >= 2, most


def test_async_unary_calls_and_chat(addr: str) -> None:
    async def main() -> None:
        async with AsyncClient(addr, timeout=120) as ac:
            info = await ac.model_info()
            assert info.vocab_size > 0
            tok = await ac.tokenize("The capital of France is")
            assert tok.ids == (504, 3575, 282, 4649, 314)
            assert await ac.detokenize(tok.ids) == "The capital of France is"
            g = await ac.chat(
                [{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=30,
                temperature=0,
            ).collect()
            assert g.text == "The capital of France is Paris."
            assert g.reason is FinishReason.EOS
            pieces = [
                p
                async for p in ac.generate(
                    "The capital of France is", max_tokens=4, temperature=0
                ).texts()
            ]
            assert "".join(pieces) == " Paris.\n\n"

    asyncio.run(main())


def test_async_errors_keep_the_status(addr: str) -> None:
    async def main() -> None:
        async with AsyncClient(addr, timeout=120) as ac:
            with pytest.raises(InvalidArgument) as info:
                async for _ in ac.generate("", max_tokens=4):
                    pass
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "prompt: must not be empty" in info.value.details
            with pytest.raises(InvalidArgument) as info:
                await ac.chat([], max_tokens=4).collect()
            assert "messages" in info.value.details

    asyncio.run(main())


def test_async_cancellation(addr: str, idle: Callable[..., Any]) -> None:
    idle()

    async def main() -> None:
        async with AsyncClient(addr, timeout=120) as ac:
            # Breaking out of `async with stream`: cancelled on exit.
            async with ac.generate(
                "Tell me a long story about", max_tokens=400, ignore_eos=True
            ) as stream:
                async for event in stream:
                    if isinstance(event, Token) and event.index == 2:
                        busy = await ac.model_info()
                        assert busy.running == 1
                        break
            assert stream.cancelled and stream.finished is None
            await _wait_idle(ac)

            # Cancelling the task that reads a stream cancels the call.
            reading = asyncio.Event()

            async def read_all() -> None:
                async for _ in ac.generate(
                    "Tell me a long story about", max_tokens=400, ignore_eos=True
                ):
                    reading.set()

            task = asyncio.ensure_future(read_all())
            await asyncio.wait_for(reading.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _wait_idle(ac)

            # And the next stream is served.
            g = await ac.generate("The capital of France is", max_tokens=2, temperature=0).collect()
            assert g.text == " Paris."

    asyncio.run(main())
    idle()


async def _wait_idle(ac: AsyncClient, within: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        info = await ac.model_info()
        if (info.running, info.waiting, info.kv_cache_reserved_tokens) == (0, 0, 0):
            return
        assert loop.time() < deadline, (
            f"not idle: {info.running} running, {info.kv_cache_reserved_tokens} KV"
        )
        await asyncio.sleep(0.05)
