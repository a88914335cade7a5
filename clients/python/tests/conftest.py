"""Fixtures: a live `strata serve` to talk to.

The server is `$STRATA_ADDR` (host:port) when set. Otherwise, when `$STRATA_BIN` names the
`strata` binary, one is started for the session (`strata serve --topology none`). Otherwise the
tests that need a server are skipped, or fail when `$STRATA_REQUIRE_SERVER` is set (CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from typing import Callable, Iterator

import pytest

from strata_client import Client, ModelInfo


def _start_server(binary: str) -> "tuple[subprocess.Popen[str], str, object]":
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [binary, "serve", "--topology", "none", "--threads", "1", "--listen", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    found: "list[str]" = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if isinstance(v, dict) and v.get("event") == "ready":
                found.append(str(v["listen"]))
                break
        for _ in proc.stdout:  # keep draining
            pass

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 300
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            raise RuntimeError(f"strata serve did not become ready:\n{log.read()}")
        time.sleep(0.1)
    return proc, found[0], log


@pytest.fixture(scope="session")
def addr() -> Iterator[str]:
    env = os.environ.get("STRATA_ADDR")
    if env:
        yield env
        return
    binary = os.environ.get("STRATA_BIN")
    if binary:
        proc, address, log = _start_server(binary)
        try:
            yield address
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()  # type: ignore[attr-defined]
        return
    message = "no server: set STRATA_ADDR=host:port of a running `strata serve` (or STRATA_BIN)"
    if os.environ.get("STRATA_REQUIRE_SERVER"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def client(addr: str) -> Iterator[Client]:
    # A deadline on every call: a hung stream fails the test instead of the whole run.
    with Client(addr, timeout=120) as c:
        yield c


def wait_idle(client: Client, within: float = 15.0) -> ModelInfo:
    """Polls ModelInfo until no sequence runs or waits and no KV cache is reserved."""
    deadline = time.monotonic() + within
    info = client.model_info()
    while (info.running, info.waiting, info.kv_cache_reserved_tokens) != (0, 0, 0):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the server is not idle after {within} s: running={info.running} "
                f"waiting={info.waiting} kv_reserved={info.kv_cache_reserved_tokens}"
            )
        time.sleep(0.05)
        info = client.model_info()
    return info


@pytest.fixture
def idle(client: Client) -> "Callable[..., ModelInfo]":
    """`idle()` waits until the server runs nothing (see wait_idle) and returns its ModelInfo."""
    return lambda within=15.0: wait_idle(client, within)
