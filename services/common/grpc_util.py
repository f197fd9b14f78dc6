"""What every Chiron gRPC service shares: a server with health checking and reflection, timestamps, and a
cache of client channels. Both follow the process's security settings (TLS, mutual TLS, bearer tokens on the
client-facing service: see :mod:`services.common.security`)."""

from __future__ import annotations

import asyncio
import gc
import math
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.failover import with_reconnect_options
from services.common.security import BearerAuthInterceptor, add_port, open_channel, security_settings

T = TypeVar("T")


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on uvloop where it is installed (``uvicorn[standard]`` brings it), else on
    asyncio's default loop; ``CHIRON_EVENT_LOOP=asyncio`` forces the default loop."""
    factory = None
    if os.environ.get("CHIRON_EVENT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
            factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def status_code(name: str) -> grpc.StatusCode:
    """The gRPC status named ``name`` (``"UNAVAILABLE"``, ...), as the services' refusals name it
    (``RequestRejected.code``, ``Rejected.code``, ``QueueError.code``); INVALID_ARGUMENT for a name that is none."""
    return grpc.StatusCode.__members__.get(name, grpc.StatusCode.INVALID_ARGUMENT)


def timestamp(seconds_since_epoch: float) -> Timestamp:
    """A protobuf Timestamp of ``seconds_since_epoch`` [s]; unset (zero) for NaN or infinity."""
    t = Timestamp()
    if math.isfinite(seconds_since_epoch):
        t.FromNanoseconds(int(seconds_since_epoch * 1e9))
    return t


# Batch API uploads and result sets travel as single messages (files up to the queue's --max-file-bytes, 64 MiB by
# default): every server and pooled channel accepts messages this large instead of gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 80 * 2**20
MESSAGE_OPTIONS = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES))


def create_server(add_servicer: Callable[[grpc.aio.Server], None], service_name: str, host: str,
                  port: int, *, client_facing: bool = False) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A bound, not yet started grpc.aio server with the service (``add_servicer(server)``), the standard health
    service (NOT_SERVING until :func:`mark_serving`) and reflection. ``port`` 0 picks a free port. The port
    serves TLS (mutual TLS with a CA) when the process's security settings (from the environment) have a
    certificate; ``client_facing`` servers also require a bearer token on every service but health checking and
    reflection when tokens are configured. Returns ``(server, health_servicer, bound_port)``. Raises OSError
    when the address cannot be bound or a PEM file cannot be read, ValueError for a CA without a certificate."""
    s = security_settings()
    server = grpc.aio.server(options=MESSAGE_OPTIONS,
                             interceptors=[BearerAuthInterceptor(s)] if client_facing and s.auth_enabled else None)
    add_servicer(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = add_port(server, f"{host}:{port}", s)
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return server, health_servicer, bound


def settle_heap() -> None:
    """Call once a service has started, before it serves: what start-up allocated (modules, protobuf
    descriptors, the web framework) is collected once and frozen out of later garbage collections. Without it
    a full collection walks that whole heap on the request path: ``chiron bench gateway`` saw 50–70 ms pauses
    in the gateway, engine and queue, every one a burst of slow TTFTs (its p99). Objects frozen here are still
    freed by reference counting.

    The collection thresholds stay at Python's defaults (700, 10, 10): short, frequent young-generation
    collections. A young generation of 50,000 objects (tried to collect less often) made each collection a
    pause of a few milliseconds on every service's request path: at 200 requests/s on this 2-core machine
    the gateway bench's p99 overhead was 13.9–27.4 ms with it and 2.7–4.0 ms without, the direct path's
    TTFT p99 23–28 ms against 14 ms."""
    gc.collect()
    gc.freeze()


async def mark_serving(health_servicer: health.aio.HealthServicer, service_name: str) -> None:
    """Health SERVING for the server as a whole ("") and for ``service_name``."""
    for name in ("", service_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


class ChannelPool:
    """One grpc.aio channel per address, created on first use (TLS when the process's security settings say so:
    :func:`~services.common.security.open_channel`; reconnecting at least once a second after its server went
    away: :data:`~services.common.failover.RECONNECT_OPTIONS`); :meth:`close` closes them all."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            # Reconnect within a second of a server's return (gRPC's default backoff grows to two minutes).
            ch = self._channels[address] = open_channel(address, options=with_reconnect_options(MESSAGE_OPTIONS))
        return ch

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
