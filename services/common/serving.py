"""What every gRPC service's ``serve()`` shares: start the server (health checking and reflection on), the
started server with its service (:class:`RunningService`), and the periodic ``WatchStats`` stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health

from services.common.grpc_util import create_server, mark_serving, settle_heap

T = TypeVar("T")


async def start_server(add_servicers: Callable[[grpc.aio.Server], None], service_name: str, host: str, port: int, *,
                       client_facing: bool = False,
                       before_start: Callable[[health.aio.HealthServicer], Awaitable[None]] | None = None,
                       after_start: Callable[[], Awaitable[None]] | None = None,
                       ) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Bind a server with ``add_servicers(server)`` (:func:`~services.common.grpc_util.create_server`: health
    checking, reflection, TLS and bearer tokens as configured), await ``before_start(health_servicer)``, start it,
    await ``after_start()``, settle the heap and mark it SERVING. ``port`` 0 picks a free port. Returns
    ``(server, health_servicer, bound_port)``; raises what create_server raises (OSError: cannot bind)."""
    server, health_servicer, bound = create_server(add_servicers, service_name, host, port, client_facing=client_facing)
    if before_start is not None:
        await before_start(health_servicer)
    await server.start()
    if after_start is not None:
        await after_start()
    settle_heap()
    await mark_serving(health_servicer, service_name)
    return server, health_servicer, bound


@dataclass
class RunningService:
    """A started server and the service behind it (anything with ``async stop()``); ``port``: the bound port."""

    server: grpc.aio.Server
    service: Any
    port: int

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop the server (in-flight calls get ``grace_s`` [s]), then the service."""
        await self.server.stop(grace_s)
        await self.service.stop()


async def every_interval(make: Callable[[], T], interval_ms: int) -> AsyncIterator[T]:
    """A ``WatchStats`` stream: ``make()`` now and then every ``interval_ms`` [ms] (0: 1000; at least 50), until
    the call ends."""
    interval_s = max(interval_ms or 1000, 50) / 1e3
    while True:
        yield make()
        await asyncio.sleep(interval_s)
