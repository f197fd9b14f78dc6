"""Shared fixtures: real gRPC servers on loopback, polled for readiness (never fixed sleeps)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest


async def eventually(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 20.0, interval_s: float = 0.02) -> None:
    """Poll ``predicate`` until it returns True; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout_s} s")
        await asyncio.sleep(interval_s)
