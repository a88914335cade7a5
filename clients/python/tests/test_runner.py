"""The OpenAI-shaped convenience after the mistral.rs Python API."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest

from strata_client import (
    AsyncChatCompletionStreamer,
    AsyncRunner,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamer,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamer,
    InvalidArgument,
    Runner,
)

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
REPLY = "The capital of France is Paris."


def test_chat_completion(addr: str) -> None:
    with Runner(addr, timeout=120) as runner:
        res = runner.send_chat_completion_request(
            ChatCompletionRequest(
                model="smollm2", messages=MESSAGES, max_tokens=30, temperature=0.0
            )
        )
    assert isinstance(res, ChatCompletionResponse)
    assert res.object == "chat.completion" and res.model == "smollm2"
    assert res.id.startswith("chatcmpl-") and res.created > 0
    choice = res.choices[0]
    assert len(res.choices) == 1 and choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY
    assert choice.finish_reason == "stop"
    assert choice.logprobs is None
    u = res.usage
    assert u.completion_tokens == 8 and u.prompt_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.total_time_sec > 0


def test_chat_completion_stream(addr: str) -> None:
    runner = Runner(addr, timeout=120)
    streamer = runner.send_chat_completion_request(
        ChatCompletionRequest(messages=MESSAGES, max_tokens=30, temperature=0.0, stream=True)
    )
    assert isinstance(streamer, ChatCompletionStreamer)
    chunks = list(streamer)
    assert len(chunks) >= 2
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chunks) == REPLY
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    assert last.usage is not None and last.usage.completion_tokens == 8
    runner.close()


def test_length_stop_and_logprobs(addr: str) -> None:
    runner = Runner(addr, timeout=120)
    res = runner.send_chat_completion_request(
        ChatCompletionRequest(
            messages=MESSAGES, max_tokens=3, temperature=0.0, logprobs=True, top_logprobs=2
        )
    )
    assert isinstance(res, ChatCompletionResponse)
    assert res.choices[0].finish_reason == "length"
    assert res.choices[0].logprobs is not None
    content = res.choices[0].logprobs.content
    assert content is not None and len(content) == 3
    assert all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 for lp in content)
    assert "".join(lp.token for lp in content) == res.choices[0].message.content
    res = runner.send_chat_completion_request(
        ChatCompletionRequest(
            messages=MESSAGES, max_tokens=30, temperature=0.0, stop_seqs=[" Paris"]
        )
    )
    assert isinstance(res, ChatCompletionResponse)
    assert res.choices[0].message.content == "The capital of France is"
    assert res.choices[0].finish_reason == "stop"
    runner.close()


def test_completion(addr: str) -> None:
    runner = Runner(addr, timeout=120)
    res = runner.send_completion_request(
        CompletionRequest(prompt="The capital of France is", max_tokens=4, temperature=0.0)
    )
    assert isinstance(res, CompletionResponse)
    assert res.object == "text_completion"
    assert res.choices[0].text == " Paris.\n\n"
    assert res.choices[0].finish_reason == "length"
    assert res.usage.prompt_tokens == 5 and res.usage.completion_tokens == 4
    echoed = runner.send_completion_request(
        CompletionRequest(
            prompt="The capital of France is", max_tokens=4, temperature=0.0, echo_prompt=True
        )
    )
    assert isinstance(echoed, CompletionResponse)
    assert echoed.choices[0].text == "The capital of France is Paris.\n\n"
    streamer = runner.send_completion_request(
        CompletionRequest(
            prompt="The capital of France is", max_tokens=4, temperature=0.0, stream=True
        )
    )
    assert isinstance(streamer, CompletionStreamer)
    chunks = list(streamer)
    assert all(isinstance(c, CompletionChunk) for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == " Paris.\n\n"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert (
        runner.detokenize_text(runner.tokenize_text("The capital of France is"))
        == "The capital of France is"
    )
    runner.close()


def test_runner_errors_and_early_exit(addr: str, idle: Callable[..., Any]) -> None:
    runner = Runner(addr, timeout=120)
    with pytest.raises(InvalidArgument) as info:
        runner.send_chat_completion_request(
            ChatCompletionRequest(messages=MESSAGES, temperature=-1.0)
        )
    assert "parameters.temperature" in info.value.details
    with pytest.raises(ValueError):
        runner.send_chat_completion_request(ChatCompletionRequest(messages=MESSAGES, n_choices=2))
    idle()
    streamer = runner.send_chat_completion_request(
        ChatCompletionRequest(
            messages=[{"role": "user", "content": "Write a long poem."}],
            max_tokens=400,
            ignore_eos=True,
            stream=True,
        )
    )
    assert isinstance(streamer, ChatCompletionStreamer)
    with streamer:
        for chunk in streamer:
            assert chunk.choices[0].delta.role == "assistant"
            assert runner.client.model_info().running == 1
            break
    idle()
    runner.close()


def test_async_runner(addr: str) -> None:
    async def main() -> None:
        async with AsyncRunner(addr, timeout=120) as runner:
            res = await runner.send_chat_completion_request(
                ChatCompletionRequest(messages=MESSAGES, max_tokens=30, temperature=0.0)
            )
            assert isinstance(res, ChatCompletionResponse)
            assert res.choices[0].message.content == REPLY
            stream = await runner.send_chat_completion_request(
                ChatCompletionRequest(
                    messages=MESSAGES, max_tokens=30, temperature=0.0, stream=True
                )
            )
            assert isinstance(stream, AsyncChatCompletionStreamer)
            text = ""
            async for chunk in stream:
                text += chunk.choices[0].delta.content
            assert text == REPLY
            comp = await runner.send_completion_request(
                CompletionRequest(prompt="The capital of France is", max_tokens=4, temperature=0.0)
            )
            assert isinstance(comp, CompletionResponse)
            assert comp.choices[0].text == " Paris.\n\n"

    asyncio.run(main())
