"""gRPC failures surface as StrataError subclasses that keep the status and the message."""

from __future__ import annotations

from typing import Any, Callable

import grpc
import pytest

from strata_client import (
    Client,
    DeadlineExceeded,
    InvalidArgument,
    StrataError,
    Unavailable,
)

PROMPT = "The capital of France is"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt": ""}, "prompt: must not be empty"),
        ({"prompt": "hi", "temperature": -0.5}, "parameters.temperature"),
        ({"prompt": "hi", "top_p": 1.01}, "parameters.top_p"),
        ({"prompt": "hi", "presence_penalty": -3.0}, "parameters.presence_penalty"),
        ({"prompt": "hi", "top_logprobs": 50}, "parameters.top_logprobs"),
        ({"prompt": "hi", "max_tokens": 0}, "parameters.max_tokens: must be at least 1"),
        ({"prompt": "hi", "stop": [""]}, "parameters.stop[0].text: must not be empty"),
        ({"token_ids": [1, 999_999]}, "token_ids.ids[1]: 999999 is outside the vocabulary"),
    ],
)
def test_invalid_generate_names_the_field(client: Client, kwargs: Any, field: str) -> None:
    stream = client.generate(**kwargs)
    # The call is under way; its status arrives with the first read.
    with pytest.raises(InvalidArgument) as info:
        next(stream)
    e = info.value
    assert isinstance(e, StrataError)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.status == "INVALID_ARGUMENT"
    assert field in e.details, e.details
    assert str(e).startswith("INVALID_ARGUMENT: ")
    # The stream is over; iterating it again ends quietly.
    assert stream.done and list(stream) == []


def test_invalid_chat(client: Client) -> None:
    with pytest.raises(InvalidArgument) as info:
        client.chat([], max_tokens=4).collect()
    assert "messages" in info.value.details


def test_catch_all_with_strata_error(client: Client) -> None:
    with pytest.raises(StrataError) as info:
        for _ in client.generate(PROMPT, temperature=101.0):
            pass
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters.temperature" in info.value.details


def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=10) as c:
        with pytest.raises(Unavailable) as info:
            c.model_info()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(Unavailable):
            c.generate(PROMPT, max_tokens=1).collect()


def test_deadline_exceeded_mid_stream(client: Client, idle: Callable[..., Any]) -> None:
    idle()
    stream = client.generate(
        "Tell me a long story about", max_tokens=400, ignore_eos=True, timeout=0.5
    )
    with pytest.raises(DeadlineExceeded) as info:
        stream.collect()
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server notices that the client left and frees the sequence.
    idle()


def test_client_side_mistakes_raise_before_sending(client: Client) -> None:
    with pytest.raises(ValueError):
        client.generate(PROMPT, token_ids=[1, 2])
    with pytest.raises(ValueError):
        client.generate()
    with pytest.raises(TypeError):
        client.generate(PROMPT, temprature=0)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        client.chat([{"content": "no role"}])
