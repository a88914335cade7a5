"""Typed values of the Strata API: sampling parameters, streamed events, tokenizer and model info.

Plain frozen dataclasses, independent of protobuf; `strata_client` converts them to and from the
wire messages of `proto/strata/v1/strata.proto`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, TypedDict, Union

__all__ = [
    "ChatMessage",
    "FinishReason",
    "Finished",
    "Generation",
    "ModelInfo",
    "SamplingParams",
    "Stage",
    "TensorPlan",
    "Timings",
    "Token",
    "Tokenization",
    "TopLogprob",
    "Usage",
    "WorkerInfo",
    "WorkerState",
    "Event",
    "MessageLike",
    "SamplingKwargs",
]


@dataclass
class SamplingParams:
    """How to sample, mirroring `strata.v1.SamplingParameters`.

    `None` (and the zero values of the flags) leave the server's default: max_tokens 256 (never
    past the context window), temperature 1.0 (0 is greedy), top_k off, top_p 1, min_p 0,
    repetition_penalty 1, frequency/presence penalties 0, a random seed (reported in
    `Finished.seed`).
    """

    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    seed: Optional[int] = None
    #: Stop sequences (text): generation ends when one appears; it is never emitted.
    stop: Sequence[str] = ()
    #: Return each token's log-probability.
    logprobs: bool = False
    #: Also return this many most likely alternatives per token (at most 20).
    top_logprobs: int = 0
    #: Keep generating past the end-of-sequence token.
    ignore_eos: bool = False
    #: Keep special tokens (e.g. `<|im_end|>`) in the streamed text.
    include_special_tokens: bool = False

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def merged(self, overrides: Mapping[str, Any]) -> "SamplingParams":
        """A copy with `overrides` applied (unknown names raise TypeError)."""
        unknown = set(overrides) - set(self.field_names())
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(overrides)
        return SamplingParams(**values)


class SamplingKwargs(TypedDict, total=False):
    """The sampling parameters as keyword arguments (see SamplingParams)."""

    max_tokens: Optional[int]
    temperature: Optional[float]
    top_k: Optional[int]
    top_p: Optional[float]
    min_p: Optional[float]
    repetition_penalty: Optional[float]
    frequency_penalty: Optional[float]
    presence_penalty: Optional[float]
    seed: Optional[int]
    stop: Sequence[str]
    logprobs: bool
    top_logprobs: int
    ignore_eos: bool
    include_special_tokens: bool


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn. `role` is "system", "user" or "assistant" (any role the template accepts)."""

    role: str
    content: str


#: A chat message: a ChatMessage, an OpenAI-style dict or a (role, content) pair.
MessageLike = Union[ChatMessage, Mapping[str, str], Tuple[str, str]]


@dataclass(frozen=True)
class TopLogprob:
    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class Token:
    """One generated token.

    `text` is the text this token completes. It may be empty (a partial UTF-8 character, or text
    held back while it could be the start of a stop sequence); the texts of all tokens plus
    `Finished.text` are the output.
    """

    id: int
    text: str
    index: int
    logprob: Optional[float] = None
    top_logprobs: Tuple[TopLogprob, ...] = ()


class FinishReason(str, enum.Enum):
    """Why a generation ended."""

    UNSPECIFIED = "unspecified"
    #: max_tokens reached (or the context window is full).
    LENGTH = "length"
    #: A stop sequence appeared.
    STOP = "stop"
    #: The model produced its end-of-sequence token.
    EOS = "eos"
    #: The server cancelled the generation (it is shutting down).
    CANCELLED = "cancelled"

    def openai(self) -> str:
        """The OpenAI `finish_reason`: "stop" (EOS or a stop sequence), "length" or "canceled"."""
        return {
            FinishReason.LENGTH: "length",
            FinishReason.STOP: "stop",
            FinishReason.EOS: "stop",
            FinishReason.CANCELLED: "canceled",
        }.get(self, "unknown")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    #: From arrival to the first step that ran this request.
    queue_ms: float
    #: From arrival to the first generated token.
    time_to_first_token_ms: float
    #: From arrival to the end.
    total_ms: float
    #: Generated tokens per second after the first one.
    decode_tokens_per_second: float


@dataclass(frozen=True)
class Finished:
    """The last event of a stream."""

    reason: FinishReason
    usage: Usage
    timings: Timings
    #: The seed the sampler used.
    seed: int
    #: Output text not yet delivered with a token.
    text: str
    #: The stop sequence that ended generation, when reason is STOP.
    stop_sequence: Optional[str] = None


#: What a generation stream yields: tokens, then one Finished.
Event = Union[Token, Finished]


@dataclass(frozen=True)
class Generation:
    """A whole generation, collected from a stream."""

    tokens: Tuple[Token, ...]
    finished: Finished

    @property
    def text(self) -> str:
        """The output: every token's text, then `Finished.text`."""
        return "".join(t.text for t in self.tokens) + self.finished.text

    @property
    def token_ids(self) -> Tuple[int, ...]:
        return tuple(t.id for t in self.tokens)

    @property
    def reason(self) -> FinishReason:
        return self.finished.reason

    @property
    def usage(self) -> Usage:
        return self.finished.usage


@dataclass(frozen=True)
class Tokenization:
    ids: Tuple[int, ...]
    tokens: Tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Stage:
    index: int
    device: str
    layer_start: int
    layer_end: int
    embed: bool
    head: bool
    #: Address of the worker running it.
    worker: str


@dataclass(frozen=True)
class TensorPlan:
    name: str
    source: str
    shape: Tuple[int, ...]
    stored: str
    isq: str
    requested: str
    dtype: str
    device: str
    stage: int
    bytes_stored: int
    bytes_loaded: int
    reason: str
    note: str


class WorkerState(str, enum.Enum):
    UNSPECIFIED = "unspecified"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class WorkerInfo:
    device: str
    address: str
    state: WorkerState
    stages: Tuple[int, ...]
    weight_bytes: int
    rss_bytes: int
    peak_rss_bytes: int
    load_seconds: float
    #: Why it failed, when state is FAILED.
    error: str


@dataclass(frozen=True)
class ModelInfo:
    """The served model, its load plan, its workers and the scheduler's load."""

    model: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    context_length: int
    eos_token_ids: Tuple[int, ...]
    has_chat_template: bool
    topology: str
    route: Tuple[Stage, ...]
    tensors: Tuple[TensorPlan, ...] = field(repr=False)
    workers: Tuple[WorkerInfo, ...]
    kv_cache_tokens: int
    kv_cache_reserved_tokens: int
    running: int
    waiting: int


def to_message(m: MessageLike) -> ChatMessage:
    if isinstance(m, ChatMessage):
        return m
    if isinstance(m, tuple):
        role, content = m
        return ChatMessage(str(role), str(content))
    if isinstance(m, Mapping):
        try:
            return ChatMessage(str(m["role"]), str(m["content"]))
        except KeyError as e:
            raise ValueError(f"a chat message needs `role` and `content`: {dict(m)!r}") from e
    raise TypeError(f"not a chat message: {m!r}")


def messages_list(messages: Union[Sequence[MessageLike], Dict[str, str]]) -> List[ChatMessage]:
    if isinstance(messages, (Mapping, ChatMessage)):
        return [to_message(messages)]
    return [to_message(m) for m in messages]
