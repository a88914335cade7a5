"""The asyncio client, over `grpc.aio`."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

import grpc
import grpc.aio

from . import _convert
from ._channel import (
    DEFAULT_ADDRESS,
    MetadataLike,
    Pem,
    aio_channel,
    call_metadata,
    connection,
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

__all__ = ["AsyncClient", "AsyncGenerateStream"]


class AsyncGenerateStream:
    """A running Generate or Chat call: ``async for`` it for `Token`s, then one `Finished`.

    Errors the server returns are raised as `StrataError` from the iteration. Leaving early
    cancels the generation on the server: call `cancel()` (or `await aclose()`), use
    ``async with``, or let the stream be garbage collected. Cancelling the task that reads the
    stream cancels the call too.
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self._tokens: List[Token] = []
        self.finished: Optional[Finished] = None
        self._done = False
        self._cancelled = False

    def __aiter__(self) -> "AsyncGenerateStream":
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._done:
                raise StopAsyncIteration
            try:
                msg = await self._call.read()
            except grpc.RpcError as e:
                self._done = True
                if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                    raise StopAsyncIteration from None
                raise from_rpc_error(e) from None
            except asyncio.CancelledError:
                if self._cancelled:
                    # cancel() was called while this read waited.
                    raise StopAsyncIteration from None
                # The reading task was cancelled: stop the generation too.
                self.cancel()
                raise
            if msg is grpc.aio.EOF:
                self._done = True
                if self.finished is None and not self._cancelled:
                    raise ProtocolError(
                        grpc.StatusCode.UNKNOWN, "the stream ended without a Finished event"
                    )
                raise StopAsyncIteration
            event = _convert.event_from_pb(msg)
            if event is None:
                continue
            if isinstance(event, Finished):
                self.finished = event
            else:
                self._tokens.append(event)
            return event

    async def tokens_only(self) -> AsyncIterator[Token]:
        """The remaining tokens (the Finished event is kept in `finished`)."""
        async for event in self:
            if isinstance(event, Token):
                yield event

    async def texts(self) -> AsyncIterator[str]:
        """The remaining output text, piece by piece (empty ones skipped, `Finished.text` last)."""
        async for event in self:
            if event.text:
                yield event.text

    async def collect(self) -> Generation:
        """Reads the stream to its end and returns the whole generation."""
        async for _ in self:
            pass
        if self.finished is None:
            raise Cancelled(grpc.StatusCode.CANCELLED, "the stream was cancelled by the client")
        return Generation(tokens=tuple(self._tokens), finished=self.finished)

    @property
    def tokens(self) -> Tuple[Token, ...]:
        return tuple(self._tokens)

    @property
    def text(self) -> str:
        tail = self.finished.text if self.finished is not None else ""
        return "".join(t.text for t in self._tokens) + tail

    @property
    def done(self) -> bool:
        return self._done

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> bool:
        """Cancels the generation; returns whether the stream was still running."""
        if self._done:
            return False
        self._done = True
        self._cancelled = True
        self._call.cancel()
        return True

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> "AsyncGenerateStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            if not self._done:
                self._cancelled = True
                self._call.cancel()
        except Exception:  # noqa: BLE001 - loop already closed
            pass


class AsyncClient:
    """An asyncio client of a Strata gateway; the same options as `Client`.

    The channel is opened on first use, in the running event loop; close it with
    ``await client.close()`` or use ``async with AsyncClient(...) as client``.
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
        channel: Optional["grpc.aio.Channel"] = None,
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
        self._channel: Optional[grpc.aio.Channel] = channel
        self._stub_: Any = pb_grpc.StrataStub(channel) if channel is not None else None

    @property
    def channel(self) -> "grpc.aio.Channel":
        if self._channel is None:
            self._channel = aio_channel(self._conn)
        return self._channel

    @property
    def _stub(self) -> Any:
        if self._stub_ is None:
            self._stub_ = pb_grpc.StrataStub(self.channel)
        return self._stub_

    def _kwargs(self, timeout: Optional[float], metadata: Optional[MetadataLike]) -> Dict[str, Any]:
        return {
            "timeout": timeout if timeout is not None else self.timeout,
            "metadata": call_metadata(self._conn, metadata),
            "wait_for_ready": self.wait_for_ready,
        }

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
    ) -> AsyncGenerateStream:
        """As `Client.generate`; iterate the result with ``async for`` (no ``await`` needed)."""
        req = _convert.generate_request(
            prompt, token_ids, _convert.sampling_params(params, sampling), add_special_tokens
        )
        return AsyncGenerateStream(self._stub.Generate(req, **self._kwargs(timeout, metadata)))

    def chat(
        self,
        messages: Sequence[MessageLike],
        *,
        params: Optional[SamplingParams] = None,
        add_generation_prompt: Optional[bool] = None,
        timeout: Optional[float] = None,
        metadata: Optional[MetadataLike] = None,
        **sampling: "Unpack[SamplingKwargs]",
    ) -> AsyncGenerateStream:
        """As `Client.chat`; iterate the result with ``async for``."""
        req = _convert.chat_request(
            messages, _convert.sampling_params(params, sampling), add_generation_prompt
        )
        return AsyncGenerateStream(self._stub.Chat(req, **self._kwargs(timeout, metadata)))

    async def tokenize(
        self,
        text: str,
        *,
        add_special_tokens: bool = False,
        timeout: Optional[float] = None,
        metadata: Optional[MetadataLike] = None,
    ) -> Tokenization:
        req = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        try:
            resp = await self._stub.Tokenize(req, **self._kwargs(timeout, metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return _convert.tokenization_from_pb(resp)

    async def detokenize(
        self,
        ids: Sequence[int],
        *,
        include_special_tokens: bool = False,
        timeout: Optional[float] = None,
        metadata: Optional[MetadataLike] = None,
    ) -> str:
        req = pb.DetokenizeRequest(ids=list(ids), include_special_tokens=include_special_tokens)
        try:
            resp = await self._stub.Detokenize(req, **self._kwargs(timeout, metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return str(resp.text)

    async def model_info(
        self, *, timeout: Optional[float] = None, metadata: Optional[MetadataLike] = None
    ) -> ModelInfo:
        try:
            resp = await self._stub.ModelInfo(
                pb.ModelInfoRequest(), **self._kwargs(timeout, metadata)
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return _convert.model_info_from_pb(resp)

    async def close(self, grace: Optional[float] = None) -> None:
        """Closes the channel (when the client created it); running streams are cancelled."""
        if self._own_channel and self._channel is not None:
            await self._channel.close(grace)
            self._channel = None
            self._stub_ = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.address!r}, tls={self._conn.secure})"
