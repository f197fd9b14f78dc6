"""Shared fixtures: real gRPC servers on loopback, polled for readiness (never fixed sleeps)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import pytest

from services.common.etcd_server import EtcdNotFound, EtcdServer


async def eventually(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 20.0, interval_s: float = 0.02) -> None:
    """Poll ``predicate`` until it returns True; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout_s} s")
        await asyncio.sleep(interval_s)


def start_etcd(tmp_path) -> EtcdServer:
    """A running real etcd (``services.common.etcd_server``). No etcd binary: skip the test, or fail it in CI
    (``CI=true``), where ``.ci/run`` installs Debian's etcd-server."""
    try:
        server = EtcdServer(tmp_path)
    except EtcdNotFound as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    server.start()
    return server
