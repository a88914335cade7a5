"""Client behaviour that needs no Strata server: an in-process gRPC server stands in for it.

Checks what the live server cannot show yet: the API key and metadata on the wire, TLS, every
status mapped to its exception, and a stream that breaks the API's contract.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from concurrent import futures
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

import grpc
import pytest

import strata_client
from strata_client import (
    AsyncClient,
    Client,
    ProtocolError,
    ResourceExhausted,
    SamplingParams,
    StrataError,
    Unauthenticated,
)
from strata_client._convert import sampling_to_pb
from strata_client._pb import pb, pb_grpc
from strata_client.errors import error_for


class FakeStrata(pb_grpc.StrataServicer):  # type: ignore[misc]
    """ModelInfo echoes the `authorization` and `x-extra` metadata in `model` / `architecture`;
    Generate fails with the status named by the prompt, or (prompt "truncated") sends one token
    and ends without a Finished event; Tokenize demands an API key."""

    def ModelInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        md = dict(context.invocation_metadata())
        return pb.ModelInfoResponse(
            model=md.get("authorization", ""), architecture=md.get("x-extra", "")
        )

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if request.prompt == "truncated":
            yield pb.GenerateResponse(token=pb.Token(id=1, text="a", index=0))
            return
        code = grpc.StatusCode[request.prompt]
        context.abort(code, f"fake {code.name}")

    def Tokenize(self, request: Any, context: grpc.ServicerContext) -> Any:
        if dict(context.invocation_metadata()).get("authorization") != "Bearer sekrit":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
        return pb.TokenizeResponse(ids=[1, 2], tokens=["a", "b"])


def _serve(credentials: Optional[grpc.ServerCredentials] = None) -> Tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_StrataServicer_to_server(FakeStrata(), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


@pytest.fixture
def fake() -> Iterator[int]:
    server, port = _serve()
    yield port
    server.stop(None)


def test_api_key_and_metadata_travel_with_every_call(fake: int) -> None:
    with Client(f"127.0.0.1:{fake}", api_key="sekrit", metadata=[("X-Extra", "1")]) as c:
        info = c.model_info()
        assert info.model == "Bearer sekrit"
        assert info.architecture == "1"
        # A call's metadata replaces the client's of the same name.
        assert c.model_info(metadata=[("x-extra", "2")]).architecture == "2"
        assert c.tokenize("ab").ids == (1, 2)
    with Client(f"http://127.0.0.1:{fake}") as c:
        assert c.model_info().model == ""
        with pytest.raises(Unauthenticated) as unauthenticated:
            c.tokenize("ab")
        assert unauthenticated.value.details == "missing or wrong API key"

    async def main() -> None:
        async with AsyncClient(f"127.0.0.1:{fake}", api_key="sekrit") as ac:
            assert (await ac.model_info()).model == "Bearer sekrit"
            assert (await ac.tokenize("ab")).tokens == ("a", "b")

    asyncio.run(main())


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK])
def test_every_status_maps_to_its_exception(fake: int, code: grpc.StatusCode) -> None:
    with Client(f"127.0.0.1:{fake}") as c:
        with pytest.raises(StrataError) as info:
            c.generate(code.name).collect()
    e = info.value
    assert e.code == code
    assert type(e) is type(error_for(code, ""))
    assert type(e).__name__ != "StrataError"
    assert e.details == f"fake {code.name}"


def test_async_stream_error(fake: int) -> None:
    async def main() -> None:
        async with AsyncClient(f"127.0.0.1:{fake}") as ac:
            with pytest.raises(ResourceExhausted) as info:
                async for _ in ac.generate("RESOURCE_EXHAUSTED"):
                    pass
            assert info.value.details == "fake RESOURCE_EXHAUSTED"

    asyncio.run(main())


def test_a_stream_without_finished_is_a_protocol_error(fake: int) -> None:
    with Client(f"127.0.0.1:{fake}") as c:
        stream = c.generate("truncated")
        assert next(stream).text == "a"
        with pytest.raises(ProtocolError):
            next(stream)


def test_tls_with_a_private_root(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=strata.test",
         "-addext", "subjectAltName=DNS:strata.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server, port = _serve(creds)
    try:
        # root_certificates as a path; the name the certificate carries checked.
        with Client(
            f"127.0.0.1:{port}",
            root_certificates=str(cert),
            tls_server_name="strata.test",
            api_key="sekrit",
        ) as c:
            assert c.model_info().model == "Bearer sekrit"
        # Plaintext to a TLS port fails as UNAVAILABLE.
        with Client(f"127.0.0.1:{port}", timeout=5) as c:
            with pytest.raises(StrataError) as info:
                c.model_info()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_addresses_and_options() -> None:
    assert Client("https://example.com:443")._conn.secure
    assert not Client("http://example.com:80/")._conn.secure
    assert Client("grpc://h:1").address == "h:1"
    assert Client("h:1", tls=True)._conn.secure
    with pytest.raises(ValueError):
        Client("h:1", tls=False, root_certificates=b"-----BEGIN CERTIFICATE-----")
    with pytest.raises(ValueError):
        Client("ftp://h:1")
    with pytest.raises(ValueError):
        Client("h:1", private_key=b"k")


def test_sampling_params_to_proto() -> None:
    msg = sampling_to_pb(SamplingParams(max_tokens=5, temperature=0.0, stop=["a", "b"], seed=7))
    assert msg.HasField("temperature") and msg.temperature == 0.0
    assert msg.HasField("max_tokens") and not msg.HasField("top_p")
    assert [s.text for s in msg.stop] == ["a", "b"] and msg.seed == 7
    assert not sampling_to_pb(SamplingParams()).HasField("temperature")
    assert sampling_to_pb(SamplingParams(stop="x")).stop[0].text == "x"
    assert SamplingParams(max_tokens=3).merged({"temperature": 0}).max_tokens == 3
    with pytest.raises(TypeError):
        SamplingParams().merged({"nope": 1})


def test_public_api() -> None:
    for name in strata_client.__all__:
        assert hasattr(strata_client, name), name
