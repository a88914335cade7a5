"""Leaving a stream early cancels the generation on the server, which frees it at once."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from strata_client import Cancelled, Client, GenerateStream, Token

LONG = "Tell me a long story about"


def _long(client: Client) -> GenerateStream:
    return client.generate(LONG, max_tokens=400, ignore_eos=True, temperature=0)


def _next_request_works(client: Client) -> None:
    g = client.generate("The capital of France is", max_tokens=2, temperature=0).collect()
    assert g.text == " Paris."
    assert g.usage.completion_tokens == 2


def test_breaking_out_of_the_iterator_cancels(client: Client, idle: Callable[..., Any]) -> None:
    idle()
    seen = 0
    for event in _long(client):
        assert isinstance(event, Token)
        seen += 1
        if seen == 3:
            busy = client.model_info()
            assert busy.running == 1
            assert busy.kv_cache_reserved_tokens > 0
            break
    # Nothing is left behind on the server, and it serves the next request.
    idle()
    _next_request_works(client)


def test_cancel_method(client: Client, idle: Callable[..., Any]) -> None:
    idle()
    stream = _long(client)
    first = next(stream)
    assert isinstance(first, Token) and first.index == 0
    assert stream.cancel() is True
    assert stream.cancel() is False
    assert stream.cancelled and stream.done
    assert list(stream) == []  # iteration ends quietly
    assert stream.finished is None
    with pytest.raises(Cancelled):
        stream.collect()
    idle()
    _next_request_works(client)


def test_leaving_a_with_block_cancels(client: Client, idle: Callable[..., Any]) -> None:
    idle()
    with _long(client) as stream:
        for event in stream:
            if isinstance(event, Token) and event.index >= 1:
                break
    assert stream.cancelled
    idle()
    _next_request_works(client)
