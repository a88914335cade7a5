"""The synchronous client."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc

from . import _convert
from ._channel import (
    DEFAULT_ADDRESS,
    MetadataLike,
    Pem,
    call_metadata,
    connection,
    sync_channel,
)
from ._pb import pb, pb_grpc
from .errors import Cancelled, ProtocolError, from_rpc_error
from .types import (
    Event,
    Finished,
    Generation,
    MessageLike,
    ModelInfo,
    SamplingParams,
    Token,
    Tokenization,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .types import SamplingKwargs

__all__ = ["Client", "GenerateStream"]


class GenerateStream:
    """A running Generate or Chat call: iterate it for `Token`s, then one `Finished`.

    The call starts when the stream is created; an error the server returns (e.g.
    INVALID_ARGUMENT) is raised as a `StrataError` from the iteration. After the end,
    `finished` holds the final event. Leaving early cancels the generation on the server:
    call `cancel()`, use the stream as a context manager, or just `break` out of a loop over
    `client.generate(...)` (the stream is cancelled when it is garbage collected).
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self._tokens: List[Token] = []
        self.finished: Optional[Finished] = None
        self._done = False
        self._cancelled = False

    # Iteration -------------------------------------------------------------------------------

    def __iter__(self) -> "GenerateStream":
        return self

    def __next__(self) -> Event:
        while True:
            if self._done:
                raise StopIteration
            try:
                msg = next(self._call)
            except StopIteration:
                self._done = True
                if self.finished is None and not self._cancelled:
                    raise ProtocolError(
                        grpc.StatusCode.UNKNOWN, "the stream ended without a Finished event"
                    ) from None
                raise
            except grpc.RpcError as e:
                self._done = True
                if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                    raise StopIteration from None
                raise from_rpc_error(e) from None
            event = _convert.event_from_pb(msg)
            if event is None:
                continue
            if isinstance(event, Finished):
                self.finished = event
            else:
                self._tokens.append(event)
            return event

    def tokens_only(self) -> Iterator[Token]:
        """The remaining tokens (the Finished event is kept in `finished`)."""
        for event in self:
            if isinstance(event, Token):
                yield event

    def texts(self) -> Iterator[str]:
        """The remaining output text, piece by piece (empty ones skipped, `Finished.text` last)."""
        for event in self:
            if event.text:
                yield event.text

    def collect(self) -> Generation:
        """Reads the stream to its end and returns the whole generation."""
        for _ in self:
            pass
        if self.finished is None:
            raise Cancelled(grpc.StatusCode.CANCELLED, "the stream was cancelled by the client")
        return Generation(tokens=tuple(self._tokens), finished=self.finished)

    # State -----------------------------------------------------------------------------------

    @property
    def tokens(self) -> Tuple[Token, ...]:
        """The tokens received so far."""
        return tuple(self._tokens)

    @property
    def text(self) -> str:
        """The output text received so far (with `Finished.text` once finished)."""
        tail = self.finished.text if self.finished is not None else ""
        return "".join(t.text for t in self._tokens) + tail

    @property
    def done(self) -> bool:
        return self._done

    @property
    def cancelled(self) -> bool:
        """Whether the client cancelled the stream before its end."""
        return self._cancelled

    def cancel(self) -> bool:
        """Cancels the generation (the server stops it and frees its cache). Returns whether the
        stream was still running; iteration then ends without a Finished event."""
        if self._done:
            return False
        self._done = True
        self._cancelled = True
        self._call.cancel()
        return True

    close = cancel

    def __enter__(self) -> "GenerateStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            if not self._done:
                self._cancelled = True
                self._call.cancel()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Client:
    """A synchronous client of a Strata gateway.

    ``Client("127.0.0.1:50051")`` connects in plaintext. TLS is on with ``tls=True``, an
    ``https://`` address or any certificate (PEM bytes or a file path): ``root_certificates`` to
    trust, ``private_key`` and ``certificate_chain`` for a client certificate,
    ``tls_server_name`` to override the name checked. ``api_key`` is sent with every call as
    ``authorization: Bearer <key>``; ``metadata`` adds other headers. ``timeout`` (seconds) is
    the default deadline of every call (for a stream: of the whole stream).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        tls: Optional[bool] = None,
        root_certificates: Optional[Pem] = None,
        private_key: Optional[Pem] = None,
        certificate_chain: Optional[Pem] = None,
        tls_server_name: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: Optional[float] = None,
        metadata: MetadataLike = (),
        options: Sequence[Tuple[str, Any]] = (),
        wait_for_ready: Optional[bool] = None,
        channel: Optional[grpc.Channel] = None,
    ) -> None:
        self._conn = connection(
            address,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            tls_server_name=tls_server_name,
            api_key=api_key,
            metadata=metadata,
            options=options,
        )
        self.address = self._conn.target
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self._own_channel = channel is None
        self._channel = channel if channel is not None else sync_channel(self._conn)
        self._stub = pb_grpc.StrataStub(self._channel)

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def _kwargs(self, timeout: Optional[float], metadata: Optional[MetadataLike]) -> Dict[str, Any]:
        return {
            "timeout": timeout if timeout is not None else self.timeout,
            "metadata": call_metadata(self._conn, metadata),
            "wait_for_ready": self.wait_for_ready,
        }

    # Streaming -------------------------------------------------------------------------------

    def generate(
        self,
        prompt: Optional[str] = None,
        *,
        token_ids: Optional[Sequence[int]] = None,
        params: Optional[SamplingParams] = None,
        add_special_tokens: bool = False,
        timeout: Optional[float] = None,
        metadata: Optional[MetadataLike] = None,
        **sampling: "Unpack[SamplingKwargs]",
    ) -> GenerateStream:
        """Generates a continuation of `prompt` (text) or `token_ids`, streaming one `Token` per
        generated token and then a `Finished`. Sampling parameters come from `params` and/or
        keywords (`max_tokens=16, temperature=0, stop=["\\n"], ...`; keywords win)."""
        req = _convert.generate_request(
            prompt, token_ids, _convert.sampling_params(params, sampling), add_special_tokens
        )
        return GenerateStream(self._stub.Generate(req, **self._kwargs(timeout, metadata)))

    def chat(
        self,
        messages: Sequence[MessageLike],
        *,
        params: Optional[SamplingParams] = None,
        add_generation_prompt: Optional[bool] = None,
        timeout: Optional[float] = None,
        metadata: Optional[MetadataLike] = None,
        **sampling: "Unpack[SamplingKwargs]",
    ) -> GenerateStream:
        """Renders `messages` (ChatMessage, `{"role", "content"}` dicts or `(role, content)`
        pairs) with the model's chat template and streams the reply, as `generate` does."""
        req = _convert.chat_request(
            messages, _convert.sampling_params(params, sampling), add_generation_prompt
        )
        return GenerateStream(self._stub.Chat(req, **self._kwargs(timeout, metadata)))

    # Unary -----------------------------------------------------------------------------------

    def tokenize(
        self,
        text: str,
        *,
        add_special_tokens: bool = False,
        timeout: Optional[float] = None,
        metadata: Optional[MetadataLike] = None,
    ) -> Tokenization:
        """Splits `text` into the model's token ids (and their token strings)."""
        req = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        try:
            resp = self._stub.Tokenize(req, **self._kwargs(timeout, metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return _convert.tokenization_from_pb(resp)

    def detokenize(
        self,
        ids: Sequence[int],
        *,
        include_special_tokens: bool = False,
        timeout: Optional[float] = None,
        metadata: Optional[MetadataLike] = None,
    ) -> str:
        """Turns token ids back into text."""
        req = pb.DetokenizeRequest(ids=list(ids), include_special_tokens=include_special_tokens)
        try:
            resp = self._stub.Detokenize(req, **self._kwargs(timeout, metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return str(resp.text)

    def model_info(
        self, *, timeout: Optional[float] = None, metadata: Optional[MetadataLike] = None
    ) -> ModelInfo:
        """The served model, its load plan, its workers and the current load."""
        try:
            resp = self._stub.ModelInfo(pb.ModelInfoRequest(), **self._kwargs(timeout, metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return _convert.model_info_from_pb(resp)

    # Lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel (when the client created it); running streams are cancelled."""
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.address!r}, tls={self._conn.secure})"
