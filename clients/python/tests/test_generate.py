"""Generate, Chat, Tokenize, Detokenize and ModelInfo over the sync client."""

from __future__ import annotations

import time

from strata_client import (
    ChatMessage,
    Client,
    Finished,
    FinishReason,
    Generation,
    SamplingParams,
    Token,
)

PROMPT = "The capital of France is"
# Greedy continuations of PROMPT by the default model (tests/golden/smollm2/prompts.json).
PROMPT_IDS = (504, 3575, 282, 4649, 314)
GREEDY_4 = " Paris.\n\n"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_REPLY = "The capital of France is Paris."


def test_model_info(client: Client) -> None:
    info = client.model_info()
    assert info.model
    assert info.architecture
    assert info.num_layers > 0 and info.hidden_size > 0
    assert info.vocab_size > max(PROMPT_IDS)
    assert info.context_length > 0
    assert info.eos_token_ids
    assert info.has_chat_template
    assert info.topology == "none"
    assert info.route and info.route[0].embed and info.route[-1].head
    assert info.tensors
    assert info.kv_cache_tokens > 0


def test_generate_streams_tokens_then_finished(client: Client) -> None:
    stream = client.generate(PROMPT, max_tokens=4, temperature=0)
    assert stream.finished is None
    events = []
    arrivals = []
    for event in stream:
        events.append(event)
        arrivals.append(time.monotonic())
    tokens = [e for e in events if isinstance(e, Token)]
    fin = events[-1]
    assert len(tokens) == len(events) - 1
    assert isinstance(fin, Finished)
    # One event per token, in order, then the Finished event.
    assert [t.index for t in tokens] == [0, 1, 2, 3]
    assert arrivals == sorted(arrivals)
    # The texts of the tokens plus Finished.text are the output.
    assert "".join(t.text for t in tokens) + fin.text == GREEDY_4
    assert fin.reason is FinishReason.LENGTH
    assert fin.usage.prompt_tokens == len(PROMPT_IDS)
    assert fin.usage.completion_tokens == 4
    assert fin.usage.total_tokens == len(PROMPT_IDS) + 4
    assert fin.stop_sequence is None
    t = fin.timings
    assert 0 <= t.queue_ms <= t.time_to_first_token_ms <= t.total_ms
    # The stream keeps what it saw.
    assert stream.done and stream.finished == fin
    assert stream.tokens == tuple(tokens)
    assert stream.text == GREEDY_4
    assert list(stream) == []


def test_collect_texts_and_params(client: Client) -> None:
    g = client.generate(PROMPT, params=SamplingParams(max_tokens=4, temperature=0)).collect()
    assert isinstance(g, Generation)
    assert g.text == GREEDY_4 and g.reason is FinishReason.LENGTH and len(g.tokens) == 4
    # Keywords override `params`.
    g2 = client.generate(
        PROMPT, params=SamplingParams(max_tokens=16, temperature=0), max_tokens=2
    ).collect()
    assert g2.token_ids == g.token_ids[:2]
    assert "".join(client.generate(PROMPT, max_tokens=4, temperature=0).texts()) == GREEDY_4


def test_generate_from_token_ids(client: Client) -> None:
    ids = client.tokenize(PROMPT).ids
    assert ids == PROMPT_IDS
    by_ids = client.generate(token_ids=ids, max_tokens=4, temperature=0).collect()
    by_text = client.generate(PROMPT, max_tokens=4, temperature=0).collect()
    assert by_ids.token_ids == by_text.token_ids
    assert by_ids.text == GREEDY_4


def test_stop_sequence(client: Client) -> None:
    g = client.generate(PROMPT, max_tokens=8, temperature=0, stop=["."]).collect()
    assert g.reason is FinishReason.STOP
    assert g.finished.stop_sequence == "."
    assert g.text == " Paris"  # the stop sequence is never emitted


def test_logprobs(client: Client) -> None:
    g = client.generate(
        PROMPT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=3
    ).collect()
    for t in g.tokens:
        assert t.logprob is not None and t.logprob <= 0
        assert len(t.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].id == t.id
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
    plain = client.generate(PROMPT, max_tokens=1, temperature=0).collect()
    assert plain.tokens[0].logprob is None and plain.tokens[0].top_logprobs == ()


def test_seed_reproduces_a_sampled_generation(client: Client) -> None:
    a = client.generate(PROMPT, max_tokens=8, temperature=1.0, seed=1234).collect()
    b = client.generate(PROMPT, max_tokens=8, temperature=1.0, seed=1234).collect()
    assert a.finished.seed == 1234
    assert a.token_ids == b.token_ids and a.text == b.text


def test_chat(client: Client) -> None:
    stream = client.chat(CHAT, max_tokens=30, temperature=0)
    tokens = [e for e in stream if isinstance(e, Token)]
    assert stream.finished is not None
    assert stream.text == CHAT_REPLY
    assert stream.finished.reason is FinishReason.EOS
    # Usage counts the end-of-sequence token, which is not streamed as a Token.
    assert stream.finished.usage.completion_tokens == 8
    assert len(tokens) in (7, 8)
    assert [t.index for t in tokens] == list(range(len(tokens)))
    # ChatMessage values and (role, content) pairs say the same.
    for messages in (
        [ChatMessage("user", "What is the capital of France?")],
        [("user", "What is the capital of France?")],
    ):
        assert client.chat(messages, max_tokens=30, temperature=0).collect().text == CHAT_REPLY


def test_tokenize_detokenize_round_trip(client: Client) -> None:
    text = "Hello, world! Strata streams tokens: naïve café 🚀."
    tok = client.tokenize(text)
    assert len(tok.ids) == len(tok.tokens) == len(tok) > 0
    assert all(isinstance(i, int) for i in tok.ids)
    assert client.detokenize(tok.ids) == text
    assert client.detokenize([]) == ""
