"""services/common/serving.py: the start order of start_server's hooks, health SERVING once it returns, the
stop order of RunningService, and every_interval's pacing (WatchStats)."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.serving import RunningService, every_interval, start_server


async def test_start_server_runs_the_hooks_in_order_and_marks_the_service_serving():
    calls = []

    async def before(health_servicer) -> None:
        calls.append(("before", health_servicer is not None))

    async def after() -> None:
        calls.append(("after", True))

    server, _health, port = await start_server(lambda s: calls.append(("add", True)), "test.Service", "127.0.0.1", 0,
                                               before_start=before, after_start=after)
    try:
        assert calls == [("add", True), ("before", True), ("after", True)] and port > 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="test.Service"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


async def test_running_service_stops_the_server_then_the_service():
    order = []

    class Server:
        async def stop(self, grace_s):
            order.append(("server", grace_s))

    class Service:
        async def stop(self):
            order.append(("service", None))

    await RunningService(Server(), Service(), 1).stop(2.5)
    assert order == [("server", 2.5), ("service", None)]


async def test_every_interval_yields_at_once_then_at_least_50_ms_apart():
    made = iter(range(10))
    stream = every_interval(lambda: next(made), 1)  # 1 ms asks for less than the 50-ms floor
    t0 = time.monotonic()
    assert await anext(stream) == 0
    assert time.monotonic() - t0 < 0.04
    assert await anext(stream) == 1
    assert time.monotonic() - t0 >= 0.049
    await stream.aclose()
