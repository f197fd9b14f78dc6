"""Several routers: every client takes a list of addresses and fails over (services.common.failover, the gateway's
RouterMux, chiron replay, the Node example). Real servers on loopback: etcd, simulated engines registered there,
the queue and routers; "down" addresses are ports nobody listens on."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import httpx
import numpy as np
import pytest
import pytest_asyncio

from chiron.v1 import router_pb2, router_pb2_grpc, types_pb2
from services.common.failover import FailoverChannel, parse_addresses, with_reconnect_options
from services.common.grpc_util import ChannelPool
from services.common.membership import MembershipWatcher
from services.common.security import SecuritySettings
from services.common.traces import Trace
from services.gateway.app import GatewayConfig, GatewayServer
from services.gateway.router_mux import RouterMux
from services.queue.server import serve as serve_queue
from services.queue.store import QueueConfig
from services.replay import ReplayConfig, replay
from services.router.routing import RouterConfig
from services.router.server import RouterService
from services.router.server import serve as serve_router
from tests.conftest import start_etcd, start_sim_engine

pytestmark = pytest.mark.timeout(90)
MODEL = "llama-3-8b"


def free_port() -> int:
    """A port nobody listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Parts:
    def __init__(self, etcd, watcher, queue, engines) -> None:
        self.etcd, self.watcher, self.queue, self.engines = etcd, watcher, queue, engines
        self.routers: list = []

    async def router(self, port: int = 0):
        r = await serve_router(RouterService(RouterConfig(), self.watcher, f"127.0.0.1:{self.queue.port}",
                                             stats_interval_s=0.1), port=port)
        self.routers.append(r)
        return r


@pytest_asyncio.fixture
async def parts(tmp_path):
    etcd = start_etcd(tmp_path / "etcd")
    queue = await serve_queue(QueueConfig(db_path=str(tmp_path / "q.db")), port=0)
    engines = [await start_sim_engine("inter-1", "interactive", cap=8, speedup=20.0, etcd=etcd.endpoint),
               await start_sim_engine("batch-1", "batch", cap=8, speedup=50.0, etcd=etcd.endpoint,
                                      queue_address=f"127.0.0.1:{queue.port}")]
    watcher = MembershipWatcher(etcd.endpoint)
    await watcher.start()
    await watcher.wait_for(lambda m: len(m) == 2, timeout_s=60)  # generous: a loaded CI host registers slowly
    p = Parts(etcd, watcher, queue, engines)
    yield p
    for r in p.routers:
        await r.stop(0.5)
    await watcher.stop()
    for srv, reg in engines:
        await reg.close()
        await srv.stop(grace_s=1.0)
    await queue.stop()
    etcd.stop()


def request(rid: str, max_tokens: int = 8) -> types_pb2.InferenceRequest:
    return types_pb2.InferenceRequest(request_id=rid, model=MODEL, prompt_token_ids=list(range(1, 17)),
                                      max_tokens=max_tokens, ignore_eos=True)


def test_addresses_are_a_comma_separated_list():
    assert parse_addresses(" a:1, b:2 ,,") == ["a:1", "b:2"]
    assert parse_addresses(["a:1,b:2", "c:3"]) == ["a:1", "b:2", "c:3"]
    with pytest.raises(ValueError):
        parse_addresses(" , ")
    opts = dict(with_reconnect_options([("grpc.max_reconnect_backoff_ms", 500)]))
    assert opts["grpc.max_reconnect_backoff_ms"] == 500 and opts["grpc.initial_reconnect_backoff_ms"] <= 1000


async def test_unary_and_streaming_calls_go_on_to_the_next_router(parts):
    live = await parts.router()
    async with FailoverChannel(f"127.0.0.1:{free_port()},127.0.0.1:{live.port}") as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        models = await stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
        assert MODEL in [m.model for m in models.models]
        assert ch.preferred == 1  # the address that answered is tried first from now on
        tokens = []
        async for msg in stub.Generate(router_pb2.RouterGenerateRequest(request=request("g-1", 12)), timeout=20):
            tokens += msg.chunk.token_ids
        assert len(tokens) == 12
        sub = await stub.Submit(router_pb2.SubmitRequest(request=request("b-1")), timeout=10)
        assert sub.request_id == "b-1"
    assert live.service.accepted == 1 and live.service.submitted == 1


async def test_every_address_down_fails_unavailable_after_trying_each(parts):
    async with FailoverChannel([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await router_pb2_grpc.RouterStub(ch).ListModels(router_pb2.ListModelsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_gateway_serves_through_the_second_router_when_the_first_is_down(parts):
    live = await parts.router()
    gw = GatewayServer(GatewayConfig(router=f"127.0.0.1:{free_port()},127.0.0.1:{live.port}", port=0),
                       security=SecuritySettings(auth_tokens=[]))
    await gw.start()
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hello there", "max_tokens": 5})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 5
            chunks = []
            async with client.stream("POST", "/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                    "stream": True}) as s:
                assert s.status_code == 200
                chunks = [line async for line in s.aiter_lines() if line.startswith("data: ")]
            assert chunks[-1] == "data: [DONE]"
            health = await client.get("/health")
            assert health.status_code == 200, health.text
            assert (await client.get("/v1/models")).status_code == 200
    finally:
        await gw.stop()
    assert live.service.accepted == 2


async def test_a_request_with_tokens_is_never_repeated_on_another_router(parts):
    """The stream of the router serving a request breaks after its first tokens: the request ends with the error
    (no duplicate tokens from a second router); the next request goes to the other router."""
    first, second = await parts.router(), await parts.router()
    channels = [FailoverChannel(f"127.0.0.1:{r.port}") for r in (first, second)]
    mux = RouterMux([router_pb2_grpc.RouterStub(c.channels[0]) for c in channels])
    try:
        call = mux.generate(request("long", 2000), timeout_s=60)
        first_msg = await call.read()
        assert first_msg is not grpc.aio.EOF
        await first.server.stop(0)  # the router goes away mid-stream
        with pytest.raises(grpc.aio.AioRpcError) as e:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert second.service.accepted == 0  # not repeated there
        n = 0
        call = mux.generate(request("after", 4), timeout_s=30)
        while (m := await call.read()) is not grpc.aio.EOF:
            n += len(m.chunk.token_ids)
        assert n == 4 and second.service.accepted == 1
    finally:
        await mux.close()
        for c in channels:
            await c.close()


async def test_a_request_not_yet_answered_fails_over_within_the_mux(parts):
    """Router 0 is down: the mux's first request goes there, fails UNAVAILABLE before any token and is sent to
    router 1; later requests go straight to router 1."""
    live = await parts.router()
    ch = FailoverChannel(f"127.0.0.1:{free_port()},127.0.0.1:{live.port}")
    mux = RouterMux([router_pb2_grpc.RouterStub(c) for c in ch.channels])
    try:
        for k in range(3):
            call = mux.generate(request(f"m-{k}", 3), timeout_s=30)
            n = 0
            while (m := await call.read()) is not grpc.aio.EOF:
                n += len(m.chunk.token_ids)
            assert n == 3
        assert live.service.accepted == 3
    finally:
        await mux.close()
        await ch.close()


@pytest.mark.parametrize("kind", ["failover", "pool"])
async def test_a_channel_reconnects_within_a_second_once_its_router_is_back(parts, kind):
    """Both the clients' FailoverChannel and the services' ChannelPool (router -> queue and engines, scaler)."""
    port = free_port()
    router = await parts.router(port)
    pool = ChannelPool()
    async with FailoverChannel(f"127.0.0.1:{port}") as ch:
        stub = router_pb2_grpc.RouterStub(ch if kind == "failover" else pool.get(f"127.0.0.1:{port}"))
        await stub.ListModels(router_pb2.ListModelsRequest(), timeout=10)
        await router.stop(0)
        parts.routers.remove(router)
        # Down for 6 s of failing calls: with gRPC's default backoff (1 s growing x1.6, jitter 20 %) the next
        # attempt would be about 9 s after the first failure, some 3 s after the router is back.
        down_until = time.monotonic() + 6.0
        while time.monotonic() < down_until:
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ListModels(router_pb2.ListModelsRequest(), timeout=1)
            await _pause()
        await parts.router(port)
        back = time.monotonic()
        while True:
            try:
                await stub.ListModels(router_pb2.ListModelsRequest(), timeout=1)
                break
            except grpc.aio.AioRpcError:
                assert time.monotonic() - back < 3.0, "the channel did not reconnect"
                await _pause()
        assert time.monotonic() - back < 1.6
    await pool.close()


async def _pause() -> None:
    await asyncio.sleep(0.05)  # between polls


async def test_replay_with_two_router_addresses(parts):
    live = await parts.router()
    n = 6
    trace = Trace("t", np.linspace(0.0, 1.0, n), np.full(n, 16), np.full(n, 4))
    cfg = ReplayConfig(speedup=4.0, batch_rate_per_s=0.0, drain_timeout_s=10.0)
    report = await replay(f"127.0.0.1:{free_port()},127.0.0.1:{live.port}", None, None, trace,
                          np.array([[16, 4]]), cfg)
    assert report["interactive"]["count"] == n and report["interactive"]["accepted"] == n
    assert report["lost_requests"] == 0
    assert live.service.accepted == n


async def test_the_node_client_fails_over_to_the_second_router(parts):
    from tests.test_node_client import node_or_skip, run_client, summary

    node = node_or_skip()
    live = await parts.router()
    rc, stdout, stderr = await run_client(node, f"127.0.0.1:{free_port()},127.0.0.1:{live.port}", "--model", MODEL,
                                          "--max-tokens", "8", "--timeout-ms", "20000")
    assert rc == 0, stderr
    out = summary(stdout)
    assert out["generate_tokens"] == 8 and out["submitted"].startswith("node-batch-")
    assert "trying the next router" in stdout
    assert live.service.accepted == 1 and live.service.submitted == 1


def test_nomad_runs_two_routers_and_gateways_on_distinct_nodes_and_gateways_list_every_router():
    import re
    from pathlib import Path

    from services.deploy.gotemplate import Context, render
    from services.deploy.jobspec import render_job_file

    nomad = Path(__file__).resolve().parents[1] / "deploy" / "nomad"
    for name, group in (("router", "router"), ("gateway", "gateway")):
        path = nomad / f"chiron-{name}.nomad.hcl"
        job = render_job_file(path)[0]
        assert job.groups[group].count >= 2
        assert re.search(r'constraint\s*\{\s*operator\s*=\s*"distinct_hosts"\s*value\s*=\s*"true"', path.read_text())
    gateway = render_job_file(nomad / "chiron-gateway.nomad.hcl")[0].groups["gateway"].tasks[0]
    template = next(t for t in gateway.templates if "chiron-router" in t.data)
    routers = [{"Address": "10.0.0.1", "Port": 50050}, {"Address": "10.0.0.2", "Port": 50050}]
    rendered = render(template.data, Context(env={}, service=lambda _name: routers))
    assert rendered.strip() == "CHIRON_ROUTER_ADDRESS=10.0.0.1:50050,10.0.0.2:50050"
    assert "${CHIRON_ROUTER_ADDRESS}" in gateway.args


async def test_a_router_given_two_queue_replicas_submits_through_the_live_one(parts):
    """``chiron router --queue dead,live``: batch submission, results and health go to the replica that answers."""
    svc = RouterService(RouterConfig(), parts.watcher, f"127.0.0.1:{free_port()},127.0.0.1:{parts.queue.port}",
                        stats_interval_s=0.1)
    r = await serve_router(svc, port=0)
    parts.routers.append(r)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.port}") as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        req = request("q-failover", max_tokens=4)
        req.slo.CopyFrom(types_pb2.SLO(slo_class="batch"))
        await stub.Submit(router_pb2.SubmitRequest(request=req), timeout=10)
        got = await stub.GetResult(router_pb2.GetResultRequest(request_id="q-failover"), timeout=10)
        assert got.result.request_id == "q-failover"
    await svc.check_dependencies()
    assert svc.dependencies["chiron.dependency.queue"] is True
