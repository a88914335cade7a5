"""gRPC failures as Python exceptions that keep the status code and the server's message."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Type, Union

import grpc

__all__ = [
    "StrataError",
    "Cancelled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
    "ProtocolError",
]

Metadata = Tuple[Tuple[str, Union[str, bytes]], ...]


class StrataError(Exception):
    """A call to the Strata service failed.

    `code` is the gRPC status (`grpc.StatusCode`), `details` the server's message (for
    INVALID_ARGUMENT it names the field, e.g. "parameters.temperature: ..."). Catch a subclass
    (`InvalidArgument`, `Unavailable`, ...) to handle one status.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        trailing_metadata: Optional[Sequence[Tuple[str, Union[str, bytes]]]] = None,
        debug_error_string: Optional[str] = None,
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing_metadata: Metadata = tuple(trailing_metadata or ())
        self.debug_error_string = debug_error_string

    @property
    def status(self) -> str:
        """The status name, e.g. "INVALID_ARGUMENT"."""
        return str(self.code.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, details={self.details!r})"


class Cancelled(StrataError):
    code = grpc.StatusCode.CANCELLED


class Unknown(StrataError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(StrataError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(StrataError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(StrataError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StrataError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(StrataError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(StrataError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(StrataError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(StrataError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(StrataError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(StrataError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(StrataError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(StrataError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(StrataError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(StrataError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ProtocolError(StrataError):
    """The server broke the API's contract (e.g. a stream ended without its Finished event)."""

    code = grpc.StatusCode.UNKNOWN


_BY_CODE: Dict[grpc.StatusCode, Type[StrataError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_for(code: grpc.StatusCode, details: str, **kwargs: object) -> StrataError:
    """The StrataError subclass for `code`."""
    cls = _BY_CODE.get(code, StrataError)
    return cls(code, details, **kwargs)  # type: ignore[arg-type]


def from_rpc_error(e: grpc.RpcError) -> StrataError:
    """Converts a `grpc.RpcError` (sync or `grpc.aio`) to the matching StrataError."""
    code_fn = getattr(e, "code", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_fn = getattr(e, "details", None)
    details = (details_fn() if callable(details_fn) else None) or ""
    trailing_fn = getattr(e, "trailing_metadata", None)
    try:
        trailing = trailing_fn() if callable(trailing_fn) else None
    except Exception:  # noqa: BLE001 - best effort
        trailing = None
    debug_fn = getattr(e, "debug_error_string", None)
    try:
        debug = debug_fn() if callable(debug_fn) else None
    except Exception:  # noqa: BLE001 - best effort
        debug = None
    return error_for(
        code,
        details,
        trailing_metadata=tuple(trailing or ()),
        debug_error_string=debug,
    )
