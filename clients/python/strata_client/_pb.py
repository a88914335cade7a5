"""The gRPC stubs, generated from proto/strata/v1/strata.proto when the package is built."""

from __future__ import annotations

import importlib
from typing import Any

try:
    # Imported by name, typed Any: type checkers need not read the generated code.
    pb: Any = importlib.import_module(f"{__package__}._proto.strata.v1.strata_pb2")
    pb_grpc: Any = importlib.import_module(f"{__package__}._proto.strata.v1.strata_pb2_grpc")
except ImportError as e:  # pragma: no cover - depends on how the package was obtained
    if "_proto" not in str(e):
        raise
    import os

    raise ImportError(
        "strata_client's gRPC stubs are missing: they are generated when the package is built. "
        f"This strata_client was imported from {os.path.dirname(__file__)}; install it with "
        "`pip install ./clients/python` (from the Strata repository) and make sure the source "
        "directory clients/python is not on sys.path (e.g. run `python -m pytest` from the "
        "repository root, not from clients/python)."
    ) from e

__all__ = ["pb", "pb_grpc"]
