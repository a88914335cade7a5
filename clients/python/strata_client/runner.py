"""OpenAI-shaped convenience, after the `mistralrs` Python API, for a remote Strata service.

    runner = Runner("127.0.0.1:50051")
    res = runner.send_chat_completion_request(
        ChatCompletionRequest(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=64,
            temperature=0.0,
        )
    )
    print(res.choices[0].message.content, res.usage)

With ``stream=True`` the call returns an iterator of `ChatCompletionChunk`s instead
(``chunk.choices[0].delta.content``). `send_completion_request(CompletionRequest(prompt=...))`
does the same for plain text completion. `AsyncRunner` is the asyncio twin.

Where mistral.rs has options a remote Strata cannot honour (several choices, logit bias,
grammars, adapters) this module leaves them out or accepts only their neutral value.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import (
    Any,
    Dict,
    Generic,
    List,
    Optional,
    Sequence,
    TypeVar,
    Union,
)

from .aio import AsyncClient, AsyncGenerateStream
from .client import Client, GenerateStream
from .types import Finished, MessageLike, SamplingParams, Token
from .types import Usage as _StrataUsage

__all__ = [
    "AsyncRunner",
    "ChatCompletionChunk",
    "ChatCompletionChunkResponse",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatCompletionStreamer",
    "AsyncChatCompletionStreamer",
    "Choice",
    "ChunkChoice",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionChunkChoice",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStreamer",
    "AsyncCompletionStreamer",
    "Delta",
    "Logprobs",
    "ResponseLogprob",
    "ResponseMessage",
    "ResponseTopLogprob",
    "Runner",
    "Usage",
]


# Requests -------------------------------------------------------------------------------------


@dataclass
class ChatCompletionRequest:
    """A chat completion, as in mistral.rs / OpenAI.

    `messages` is a list of ``{"role": ..., "content": ...}`` dicts (or `ChatMessage`s), or a
    string: a prompt already rendered with the chat template, sent as is. `model` is only echoed
    in the response (the service serves one model). `stop_seqs` (or its OpenAI name `stop`) ends
    generation at any of the given strings.
    """

    messages: Union[Sequence[MessageLike], str]
    model: str = "default"
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    max_tokens: Optional[int] = None
    n_choices: int = 1
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop_seqs: Optional[Union[Sequence[str], str]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stream: bool = False
    stop: Optional[Union[Sequence[str], str]] = None
    ignore_eos: bool = False


@dataclass
class CompletionRequest:
    """A text completion, as in mistral.rs / OpenAI. `echo_prompt` puts the prompt before the
    completion in the returned text."""

    prompt: str
    model: str = "default"
    echo_prompt: bool = False
    max_tokens: Optional[int] = None
    n_choices: int = 1
    best_of: int = 1
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop_seqs: Optional[Union[Sequence[str], str]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    stream: bool = False
    stop: Optional[Union[Sequence[str], str]] = None
    ignore_eos: bool = False
    add_special_tokens: bool = False


# Responses ------------------------------------------------------------------------------------


@dataclass
class Usage:
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int
    avg_tok_per_sec: float
    avg_prompt_tok_per_sec: float
    avg_compl_tok_per_sec: float
    total_time_sec: float
    total_prompt_time_sec: float
    total_completion_time_sec: float


@dataclass
class ResponseTopLogprob:
    token: int
    logprob: float
    bytes: str


@dataclass
class ResponseLogprob:
    token: str
    logprob: float
    bytes: List[int]
    top_logprobs: List[ResponseTopLogprob]


@dataclass
class Logprobs:
    content: Optional[List[ResponseLogprob]]


@dataclass
class ResponseMessage:
    content: str
    role: str = "assistant"


@dataclass
class Choice:
    finish_reason: str
    index: int
    message: ResponseMessage
    logprobs: Optional[Logprobs] = None


@dataclass
class ChatCompletionResponse:
    id: str
    choices: List[Choice]
    created: int
    model: str
    system_fingerprint: str
    object: str
    usage: Usage


@dataclass
class Delta:
    content: str
    role: Optional[str] = None


@dataclass
class ChunkChoice:
    finish_reason: Optional[str]
    index: int
    delta: Delta
    logprobs: Optional[Logprobs] = None


@dataclass
class ChatCompletionChunk:
    id: str
    choices: List[ChunkChoice]
    created: int
    model: str
    system_fingerprint: str
    object: str
    #: Set on the last chunk only.
    usage: Optional[Usage] = None


#: The mistral.rs name.
ChatCompletionChunkResponse = ChatCompletionChunk


@dataclass
class CompletionChoice:
    finish_reason: str
    index: int
    text: str
    logprobs: Optional[Logprobs] = None


@dataclass
class CompletionResponse:
    id: str
    choices: List[CompletionChoice]
    created: int
    model: str
    system_fingerprint: str
    object: str
    usage: Usage


@dataclass
class CompletionChunkChoice:
    finish_reason: Optional[str]
    index: int
    text: str
    logprobs: Optional[Logprobs] = None


@dataclass
class CompletionChunk:
    id: str
    choices: List[CompletionChunkChoice]
    created: int
    model: str
    system_fingerprint: str
    object: str
    #: Set on the last chunk only.
    usage: Optional[Usage] = None


FINGERPRINT = "strata"


# Conversions ----------------------------------------------------------------------------------


def _stop(request: Union[ChatCompletionRequest, CompletionRequest]) -> Sequence[str]:
    out: List[str] = []
    for s in (request.stop_seqs, request.stop):
        if s is None:
            continue
        out.extend([s] if isinstance(s, str) else list(s))
    return tuple(out)


def _params(request: Union[ChatCompletionRequest, CompletionRequest]) -> SamplingParams:
    if request.n_choices != 1:
        raise ValueError("Strata generates one choice per request: n_choices must be 1")
    if isinstance(request, CompletionRequest) and request.best_of != 1:
        raise ValueError("Strata generates one choice per request: best_of must be 1")
    top = request.top_logprobs or 0
    return SamplingParams(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
        frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty,
        seed=request.seed,
        stop=_stop(request),
        logprobs=bool(request.logprobs or top),
        top_logprobs=top,
        ignore_eos=request.ignore_eos,
    )


def _usage(f: Finished) -> Usage:
    u: _StrataUsage = f.usage
    t = f.timings
    total = t.total_ms / 1000.0
    prompt_time = max(t.time_to_first_token_ms - t.queue_ms, 0.0) / 1000.0
    completion_time = max(t.total_ms - t.time_to_first_token_ms, 0.0) / 1000.0

    def rate(n: float, s: float) -> float:
        return n / s if s > 0 else 0.0

    return Usage(
        completion_tokens=u.completion_tokens,
        prompt_tokens=u.prompt_tokens,
        total_tokens=u.total_tokens,
        avg_tok_per_sec=rate(u.total_tokens, total),
        avg_prompt_tok_per_sec=rate(u.prompt_tokens, prompt_time),
        avg_compl_tok_per_sec=t.decode_tokens_per_second,
        total_time_sec=total,
        total_prompt_time_sec=prompt_time,
        total_completion_time_sec=completion_time,
    )


def _logprob(t: Token) -> ResponseLogprob:
    return ResponseLogprob(
        token=t.text,
        logprob=t.logprob if t.logprob is not None else 0.0,
        bytes=list(t.text.encode()),
        top_logprobs=[
            ResponseTopLogprob(token=a.id, logprob=a.logprob, bytes=a.text) for a in t.top_logprobs
        ],
    )


def _logprobs(tokens: Sequence[Token], wanted: bool) -> Optional[Logprobs]:
    if not wanted:
        return None
    return Logprobs(content=[_logprob(t) for t in tokens])


def _wants_logprobs(request: Union[ChatCompletionRequest, CompletionRequest]) -> bool:
    return bool(request.logprobs or request.top_logprobs)


def _chat_input(request: ChatCompletionRequest) -> Dict[str, Any]:
    if isinstance(request.messages, str):
        # A prompt the caller rendered with the chat template already.
        return {"prompt": request.messages}
    return {"messages": request.messages}


C = TypeVar("C", ChatCompletionChunk, CompletionChunk)


class _Chunks(Generic[C]):
    def event(self, event: Union[Token, Finished]) -> Optional[C]:
        raise NotImplementedError


class _ChatChunks(_Chunks[ChatCompletionChunk]):
    """Turns stream events into chat chunks (shared by the sync and async streamers)."""

    def __init__(self, request: ChatCompletionRequest) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = request.model
        self.logprobs = _wants_logprobs(request)
        self.first = True

    def chunk(
        self, content: str, finish: Optional[Finished], tokens: Sequence[Token]
    ) -> ChatCompletionChunk:
        role = "assistant" if self.first else None
        self.first = False
        return ChatCompletionChunk(
            id=self.id,
            choices=[
                ChunkChoice(
                    finish_reason=finish.reason.openai() if finish is not None else None,
                    index=0,
                    delta=Delta(content=content, role=role),
                    logprobs=_logprobs(tokens, self.logprobs) if tokens else None,
                )
            ],
            created=self.created,
            model=self.model,
            system_fingerprint=FINGERPRINT,
            object="chat.completion.chunk",
            usage=_usage(finish) if finish is not None else None,
        )

    def event(self, event: Union[Token, Finished]) -> Optional[ChatCompletionChunk]:
        if isinstance(event, Finished):
            return self.chunk(event.text, event, ())
        if event.text or self.logprobs:
            return self.chunk(event.text, None, (event,))
        return None  # nothing to say yet (held-back or partial text)


class _CompletionChunks(_Chunks[CompletionChunk]):
    def __init__(self, request: CompletionRequest) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = request.model
        self.logprobs = _wants_logprobs(request)
        self.prefix = request.prompt if request.echo_prompt else ""

    def chunk(
        self, text: str, finish: Optional[Finished], tokens: Sequence[Token]
    ) -> CompletionChunk:
        text, self.prefix = self.prefix + text, ""
        return CompletionChunk(
            id=self.id,
            choices=[
                CompletionChunkChoice(
                    finish_reason=finish.reason.openai() if finish is not None else None,
                    index=0,
                    text=text,
                    logprobs=_logprobs(tokens, self.logprobs) if tokens else None,
                )
            ],
            created=self.created,
            model=self.model,
            system_fingerprint=FINGERPRINT,
            object="text_completion",
            usage=_usage(finish) if finish is not None else None,
        )

    def event(self, event: Union[Token, Finished]) -> Optional[CompletionChunk]:
        if isinstance(event, Finished):
            return self.chunk(event.text, event, ())
        if event.text or self.logprobs or self.prefix:
            return self.chunk(event.text, None, (event,))
        return None


def _chat_response(
    request: ChatCompletionRequest, tokens: Sequence[Token], f: Finished
) -> ChatCompletionResponse:
    text = "".join(t.text for t in tokens) + f.text
    return ChatCompletionResponse(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        choices=[
            Choice(
                finish_reason=f.reason.openai(),
                index=0,
                message=ResponseMessage(content=text, role="assistant"),
                logprobs=_logprobs(tokens, _wants_logprobs(request)),
            )
        ],
        created=int(time.time()),
        model=request.model,
        system_fingerprint=FINGERPRINT,
        object="chat.completion",
        usage=_usage(f),
    )


def _completion_response(
    request: CompletionRequest, tokens: Sequence[Token], f: Finished
) -> CompletionResponse:
    text = "".join(t.text for t in tokens) + f.text
    if request.echo_prompt:
        text = request.prompt + text
    return CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}",
        choices=[
            CompletionChoice(
                finish_reason=f.reason.openai(),
                index=0,
                text=text,
                logprobs=_logprobs(tokens, _wants_logprobs(request)),
            )
        ],
        created=int(time.time()),
        model=request.model,
        system_fingerprint=FINGERPRINT,
        object="text_completion",
        usage=_usage(f),
    )


# Streamers ------------------------------------------------------------------------------------


class _Streamer(Generic[C]):
    def __init__(self, stream: GenerateStream, chunks: _Chunks[C]) -> None:
        self.stream = stream
        self._chunks: _Chunks[C] = chunks

    def __iter__(self) -> "_Streamer[C]":
        return self

    def __next__(self) -> C:
        for event in self.stream:
            chunk = self._chunks.event(event)
            if chunk is not None:
                return chunk
        raise StopIteration

    def cancel(self) -> bool:
        """Stops the generation on the server; iteration then ends."""
        return self.stream.cancel()

    close = cancel

    def __enter__(self) -> "_Streamer[C]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class ChatCompletionStreamer(_Streamer[ChatCompletionChunk]):
    """An iterator of `ChatCompletionChunk`s. The first chunk carries ``delta.role ==
    "assistant"``, the last one `finish_reason` and `usage`. `cancel()` (or leaving a ``with``
    block, or dropping the streamer) stops the generation on the server."""


class CompletionStreamer(_Streamer[CompletionChunk]):
    """An iterator of `CompletionChunk`s (``chunk.choices[0].text``)."""


class _AsyncStreamer(Generic[C]):
    def __init__(self, stream: AsyncGenerateStream, chunks: _Chunks[C]) -> None:
        self.stream = stream
        self._chunks: _Chunks[C] = chunks

    def __aiter__(self) -> "_AsyncStreamer[C]":
        return self

    async def __anext__(self) -> C:
        async for event in self.stream:
            chunk = self._chunks.event(event)
            if chunk is not None:
                return chunk
        raise StopAsyncIteration

    def cancel(self) -> bool:
        return self.stream.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> "_AsyncStreamer[C]":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncChatCompletionStreamer(_AsyncStreamer[ChatCompletionChunk]):
    """The asyncio twin of `ChatCompletionStreamer` (``async for``)."""


class AsyncCompletionStreamer(_AsyncStreamer[CompletionChunk]):
    """An async iterator of `CompletionChunk`s."""


# Runners --------------------------------------------------------------------------------------


class Runner:
    """Sends OpenAI-shaped requests to a Strata service, as `mistralrs.Runner` does to a local
    engine. Takes an address and the options of `Client` (TLS, `api_key`, `timeout`, ...), or a
    ready `client=`."""

    def __init__(
        self, address: Optional[str] = None, *, client: Optional[Client] = None, **options: Any
    ) -> None:
        if client is not None and (address is not None or options):
            raise ValueError("give either `client` or an address and its options")
        self.client = (
            client if client is not None else Client(address or "127.0.0.1:50051", **options)
        )

    def send_chat_completion_request(
        self, request: ChatCompletionRequest
    ) -> Union[ChatCompletionResponse, ChatCompletionStreamer]:
        """The completed chat as a `ChatCompletionResponse`, or with ``request.stream`` a
        `ChatCompletionStreamer` of `ChatCompletionChunk`s."""
        params = _params(request)
        inp = _chat_input(request)
        if "prompt" in inp:
            stream = self.client.generate(inp["prompt"], params=params)
        else:
            stream = self.client.chat(inp["messages"], params=params)
        if request.stream:
            return ChatCompletionStreamer(stream, _ChatChunks(request))
        g = stream.collect()
        return _chat_response(request, g.tokens, g.finished)

    def send_completion_request(
        self, request: CompletionRequest
    ) -> Union[CompletionResponse, CompletionStreamer]:
        """The completion as a `CompletionResponse`, or with ``request.stream`` a
        `CompletionStreamer` of `CompletionChunk`s."""
        stream = self.client.generate(
            request.prompt, params=_params(request), add_special_tokens=request.add_special_tokens
        )
        if request.stream:
            return CompletionStreamer(stream, _CompletionChunks(request))
        g = stream.collect()
        return _completion_response(request, g.tokens, g.finished)

    def tokenize_text(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return list(self.client.tokenize(text, add_special_tokens=add_special_tokens).ids)

    def detokenize_text(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.client.detokenize(tokens, include_special_tokens=not skip_special_tokens)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRunner:
    """The asyncio twin of `Runner`: the same methods, as coroutines; streamed responses are
    async iterators."""

    def __init__(
        self, address: Optional[str] = None, *, client: Optional[AsyncClient] = None, **options: Any
    ) -> None:
        if client is not None and (address is not None or options):
            raise ValueError("give either `client` or an address and its options")
        self.client = (
            client if client is not None else AsyncClient(address or "127.0.0.1:50051", **options)
        )

    async def send_chat_completion_request(
        self, request: ChatCompletionRequest
    ) -> Union[ChatCompletionResponse, AsyncChatCompletionStreamer]:
        params = _params(request)
        inp = _chat_input(request)
        if "prompt" in inp:
            stream = self.client.generate(inp["prompt"], params=params)
        else:
            stream = self.client.chat(inp["messages"], params=params)
        if request.stream:
            return AsyncChatCompletionStreamer(stream, _ChatChunks(request))
        g = await stream.collect()
        return _chat_response(request, g.tokens, g.finished)

    async def send_completion_request(
        self, request: CompletionRequest
    ) -> Union[CompletionResponse, AsyncCompletionStreamer]:
        stream = self.client.generate(
            request.prompt, params=_params(request), add_special_tokens=request.add_special_tokens
        )
        if request.stream:
            return AsyncCompletionStreamer(stream, _CompletionChunks(request))
        g = await stream.collect()
        return _completion_response(request, g.tokens, g.finished)

    async def tokenize_text(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return list((await self.client.tokenize(text, add_special_tokens=add_special_tokens)).ids)

    async def detokenize_text(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return await self.client.detokenize(tokens, include_special_tokens=not skip_special_tokens)

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> "AsyncRunner":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
