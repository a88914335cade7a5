"""Connection settings shared by Client and AsyncClient: address, TLS, API key, metadata."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import grpc

from ._version import __version__

#: PEM data (bytes, or text starting with "-----BEGIN"), or the path of a PEM file.
Pem = Union[bytes, str, "os.PathLike[str]"]
MetadataLike = Sequence[Tuple[str, Union[str, bytes]]]

DEFAULT_ADDRESS = "127.0.0.1:50051"

_SCHEMES = {"http": False, "grpc": False, "https": True, "grpcs": True}


def _read_pem(value: Optional[Pem]) -> Optional[bytes]:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    with open(os.fspath(value), "rb") as f:
        return f.read()


@dataclass(frozen=True)
class Connection:
    target: str
    credentials: Optional[grpc.ChannelCredentials]
    options: Tuple[Tuple[str, Any], ...]
    metadata: Tuple[Tuple[str, Union[str, bytes]], ...]

    @property
    def secure(self) -> bool:
        return self.credentials is not None


def connection(
    address: str,
    *,
    tls: Optional[bool],
    root_certificates: Optional[Pem],
    private_key: Optional[Pem],
    certificate_chain: Optional[Pem],
    tls_server_name: Optional[str],
    api_key: Optional[str],
    metadata: MetadataLike,
    options: Sequence[Tuple[str, Any]],
) -> Connection:
    """Resolves the constructor arguments of a client.

    `address` is `host:port`, optionally with a scheme: `http://`/`grpc://` (plaintext) or
    `https://`/`grpcs://` (TLS). TLS is on when `tls=True`, when the scheme says so or when any
    certificate is given; `tls=False` forces plaintext.
    """
    target = address.strip()
    scheme_tls: Optional[bool] = None
    if "://" in target:
        scheme, target = target.split("://", 1)
        if scheme.lower() not in _SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme!r} in {address!r} (use host:port, http:// or https://)"
            )
        scheme_tls = _SCHEMES[scheme.lower()]
    target = target.rstrip("/")
    if not target:
        raise ValueError(f"no host:port in address {address!r}")
    certs = (root_certificates, private_key, certificate_chain)
    if tls is None:
        tls = bool(scheme_tls) or any(c is not None for c in certs)
    elif not tls and any(c is not None for c in certs):
        raise ValueError("certificates were given with tls=False")
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("a client certificate needs both private_key and certificate_chain")

    credentials = None
    opts = [("grpc.primary_user_agent", f"strata-client-python/{__version__}")]
    if tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read_pem(root_certificates),
            private_key=_read_pem(private_key),
            certificate_chain=_read_pem(certificate_chain),
        )
        if tls_server_name:
            opts.append(("grpc.ssl_target_name_override", tls_server_name))
    opts.extend(options)

    md = [(k.lower(), v) for k, v in metadata]
    if api_key is not None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        md = [(k, v) for k, v in md if k != "authorization"]
        md.append(("authorization", f"Bearer {api_key}"))
    return Connection(target, credentials, tuple(opts), tuple(md))


def sync_channel(conn: Connection) -> grpc.Channel:
    if conn.credentials is not None:
        return grpc.secure_channel(conn.target, conn.credentials, options=conn.options)
    return grpc.insecure_channel(conn.target, options=conn.options)


def aio_channel(conn: Connection) -> "grpc.aio.Channel":
    if conn.credentials is not None:
        return grpc.aio.secure_channel(conn.target, conn.credentials, options=conn.options)
    return grpc.aio.insecure_channel(conn.target, options=conn.options)


def call_metadata(
    conn: Connection, extra: Optional[MetadataLike]
) -> Optional[Tuple[Tuple[str, Union[str, bytes]], ...]]:
    """The client's metadata, then the call's (a key the call gives replaces the client's)."""
    call = tuple((k.lower(), v) for k, v in (extra or ()))
    keys = {k for k, _ in call}
    md = tuple((k, v) for k, v in conn.metadata if k not in keys) + call
    return md or None
