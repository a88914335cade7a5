"""Python client for Strata, a layer-sharded LLM inference service.

    from strata_client import Client

    with Client("127.0.0.1:50051") as client:
        for event in client.generate("The capital of France is", max_tokens=16, temperature=0):
            print(event.text, end="", flush=True)

`Client` (sync) and `AsyncClient` (asyncio) speak the gRPC API of `proto/strata/v1/strata.proto`:
`generate` and `chat` stream `Token`s and a final `Finished`; `tokenize`, `detokenize` and
`model_info` return typed values. Failures raise `StrataError` subclasses that keep the gRPC
status (`.code`) and message (`.details`). `Runner` / `AsyncRunner` offer OpenAI-shaped
requests and responses after the mistral.rs Python API.
"""

from ._version import __version__
from .aio import AsyncClient, AsyncGenerateStream
from .client import Client, GenerateStream
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    StrataError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from .runner import (
    AsyncChatCompletionStreamer,
    AsyncCompletionStreamer,
    AsyncRunner,
    ChatCompletionChunk,
    ChatCompletionChunkResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamer,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamer,
    Runner,
)
from .types import (
    ChatMessage,
    Event,
    Finished,
    FinishReason,
    Generation,
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
)

__all__ = [
    "__version__",
    # clients
    "AsyncClient",
    "AsyncGenerateStream",
    "Client",
    "GenerateStream",
    # values
    "ChatMessage",
    "Event",
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
    # errors
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ProtocolError",
    "ResourceExhausted",
    "StrataError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    # OpenAI-shaped convenience
    "AsyncChatCompletionStreamer",
    "AsyncCompletionStreamer",
    "AsyncRunner",
    "ChatCompletionChunk",
    "ChatCompletionChunkResponse",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatCompletionStreamer",
    "CompletionChunk",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStreamer",
    "Runner",
]
