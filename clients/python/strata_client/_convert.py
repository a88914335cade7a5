"""Conversions between the typed values in `strata_client.types` and the protobuf messages."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from ._pb import pb
from .types import (
    ChatMessage,
    Finished,
    FinishReason,
    MessageLike,
    ModelInfo,
    SamplingParams,
    Stage,
    TensorPlan,
    Timings,
    Token,
    Tokenization,
    TopLogprob,
    Usage,
    WorkerInfo,
    WorkerState,
    messages_list,
)

_OPTIONAL_FIELDS = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "seed",
)

_FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: FinishReason.UNSPECIFIED,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_EOS: FinishReason.EOS,
    pb.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
}

_WORKER_STATES = {
    pb.WORKER_STATE_UNSPECIFIED: WorkerState.UNSPECIFIED,
    pb.WORKER_STATE_LOADING: WorkerState.LOADING,
    pb.WORKER_STATE_READY: WorkerState.READY,
    pb.WORKER_STATE_FAILED: WorkerState.FAILED,
}


def sampling_params(
    params: Optional[SamplingParams], overrides: Mapping[str, Any]
) -> SamplingParams:
    base = params if params is not None else SamplingParams()
    return base.merged(overrides) if overrides else base


def sampling_to_pb(p: SamplingParams) -> Any:
    msg = pb.SamplingParameters()
    for name in _OPTIONAL_FIELDS:
        value = getattr(p, name)
        if value is not None:
            setattr(msg, name, value)
    stop: Union[str, Sequence[str]] = p.stop or ()
    if isinstance(stop, str):
        stop = (stop,)
    for s in stop:
        msg.stop.add(text=s)
    msg.logprobs = bool(p.logprobs)
    msg.top_logprobs = int(p.top_logprobs or 0)
    msg.ignore_eos = bool(p.ignore_eos)
    msg.include_special_tokens = bool(p.include_special_tokens)
    return msg


def generate_request(
    prompt: Optional[str],
    token_ids: Optional[Sequence[int]],
    params: SamplingParams,
    add_special_tokens: bool,
) -> Any:
    if (prompt is None) == (token_ids is None):
        raise ValueError("give exactly one of `prompt` (text) and `token_ids`")
    req = pb.GenerateRequest(
        parameters=sampling_to_pb(params), add_special_tokens=add_special_tokens
    )
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(
                f"prompt must be a str (token ids go in `token_ids`), not {type(prompt).__name__}"
            )
        req.prompt = prompt
    else:
        assert token_ids is not None
        req.token_ids.ids.extend(int(i) for i in token_ids)
        # An empty list still selects `token_ids` (the server then rejects it with a clear message).
        req.token_ids.SetInParent()
    return req


def chat_request(
    messages: Sequence[MessageLike],
    params: SamplingParams,
    add_generation_prompt: Optional[bool],
) -> Any:
    req = pb.ChatRequest(parameters=sampling_to_pb(params))
    for m in messages_list(messages):
        req.messages.add(role=m.role, content=m.content)
    if add_generation_prompt is not None:
        req.add_generation_prompt = add_generation_prompt
    return req


def token_from_pb(t: Any) -> Token:
    return Token(
        id=t.id,
        text=t.text,
        index=t.index,
        logprob=t.logprob if t.HasField("logprob") else None,
        top_logprobs=tuple(
            TopLogprob(id=a.id, text=a.text, logprob=a.logprob) for a in t.top_logprobs
        ),
    )


def finished_from_pb(f: Any) -> Finished:
    return Finished(
        reason=_FINISH_REASONS.get(f.reason, FinishReason.UNSPECIFIED),
        usage=Usage(
            prompt_tokens=f.usage.prompt_tokens, completion_tokens=f.usage.completion_tokens
        ),
        timings=Timings(
            queue_ms=f.timings.queue_ms,
            time_to_first_token_ms=f.timings.time_to_first_token_ms,
            total_ms=f.timings.total_ms,
            decode_tokens_per_second=f.timings.decode_tokens_per_second,
        ),
        seed=f.seed,
        text=f.text,
        stop_sequence=f.stop_sequence or None,
    )


def event_from_pb(msg: Any) -> Union[Token, Finished, None]:
    kind = msg.WhichOneof("event")
    if kind == "token":
        return token_from_pb(msg.token)
    if kind == "finished":
        return finished_from_pb(msg.finished)
    return None  # an event this client does not know: skipped


def tokenization_from_pb(r: Any) -> Tokenization:
    return Tokenization(ids=tuple(r.ids), tokens=tuple(r.tokens))


def model_info_from_pb(r: Any) -> ModelInfo:
    return ModelInfo(
        model=r.model,
        architecture=r.architecture,
        num_layers=r.num_layers,
        hidden_size=r.hidden_size,
        vocab_size=r.vocab_size,
        context_length=r.context_length,
        eos_token_ids=tuple(r.eos_token_ids),
        has_chat_template=r.has_chat_template,
        topology=r.topology,
        route=tuple(
            Stage(
                index=s.index,
                device=s.device,
                layer_start=s.layer_start,
                layer_end=s.layer_end,
                embed=s.embed,
                head=s.head,
                worker=s.worker,
            )
            for s in r.route
        ),
        tensors=tuple(
            TensorPlan(
                name=t.name,
                source=t.source,
                shape=tuple(t.shape),
                stored=t.stored,
                isq=t.isq,
                requested=t.requested,
                dtype=t.dtype,
                device=t.device,
                stage=t.stage,
                bytes_stored=t.bytes_stored,
                bytes_loaded=t.bytes_loaded,
                reason=t.reason,
                note=t.note,
            )
            for t in r.tensors
        ),
        workers=tuple(
            WorkerInfo(
                device=w.device,
                address=w.address,
                state=_WORKER_STATES.get(w.state, WorkerState.UNSPECIFIED),
                stages=tuple(w.stages),
                weight_bytes=w.weight_bytes,
                rss_bytes=w.rss_bytes,
                peak_rss_bytes=w.peak_rss_bytes,
                load_seconds=w.load_seconds,
                error=w.error,
            )
            for w in r.workers
        ),
        kv_cache_tokens=r.kv_cache_tokens,
        kv_cache_reserved_tokens=r.kv_cache_reserved_tokens,
        running=r.running,
        waiting=r.waiting,
    )


__all__ = [
    "ChatMessage",
    "chat_request",
    "event_from_pb",
    "generate_request",
    "model_info_from_pb",
    "sampling_params",
    "sampling_to_pb",
    "tokenization_from_pb",
]
