"""``chiron up`` heals itself: a whole cluster of real processes (services.cluster.start_cluster: etcd, queue,
router, gateway, scaler with the local provider and simulated engines); a part SIGKILLed is restarted on the
same port and requests through the gateway succeed again; no engine process outlives the cluster."""

from __future__ import annotations

import os
import signal
import time

import grpc
import httpx
import pytest

from chiron.v1 import router_pb2, router_pb2_grpc, types_pb2
from services.cluster import ClusterConfig, _engine_processes, start_cluster
from services.common.etcd_server import EtcdNotFound
from services.common.failover import FailoverChannel
from tests.conftest import eventually

MODEL = "llama-3-8b"
BODY = {"model": MODEL, "prompt": "Hello there", "max_tokens": 4}


async def start(tmp_path, **kw):
    cfg = ClusterConfig(engine_args="--backend simulated --speedup 20",
                        scaler_args="--interactive 1:1 --mixed 0:0 --batch 0:0 --interval-s 0.5 --scale-down-delay-s 60",
                        work_dir=str(tmp_path / "cluster"), ready_timeout_s=60.0, **kw)
    messages: list[str] = []
    try:
        cluster = await start_cluster(cfg, on_progress=messages.append)
    except EtcdNotFound as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    return cluster, messages


def kill(cluster, name: str) -> int:
    proc = cluster.procs[name]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return proc.pid


async def served(client: httpx.AsyncClient, url: str) -> bool:
    """One completion through the gateway succeeds."""
    try:
        r = await client.post(f"{url}/v1/completions", json=BODY)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


async def restarted(cluster, name: str, old_pid: int) -> bool:
    p = cluster.procs[name]
    return p.pid != old_pid and p.poll() is None and cluster.restarts.get(name, 0) >= 1


@pytest.mark.timeout(120)
async def test_a_killed_router_queue_or_gateway_comes_back_on_its_port(tmp_path):
    cluster, messages = await start(tmp_path)
    try:
        ports = dict(cluster.ports)
        url = cluster.gateway_url
        async with httpx.AsyncClient(timeout=10.0) as client:
            await eventually(lambda: served(client, url), timeout_s=30, interval_s=0.1)

            for name in ("router", "queue", "gateway"):
                pid = kill(cluster, name)
                assert name not in cluster.live()
                await eventually(lambda name=name, pid=pid: restarted(cluster, name, pid), timeout_s=20, interval_s=0.05)
                t0 = time.monotonic()
                await eventually(lambda: served(client, url), timeout_s=15, interval_s=0.05)
                print(f"{name}: served again {time.monotonic() - t0:.2f} s after its restart")
                assert cluster.ports == ports and cluster.gateway_url == url  # the same addresses
                assert any(m.startswith(f"{name} restarted and serving on") for m in messages)

            # The queue came back on its port: a batch request through the router is stored and read back.
            async with FailoverChannel(cluster.endpoint("router")) as ch:
                stub = router_pb2_grpc.RouterStub(ch)

                async def submitted() -> bool:
                    req = types_pb2.InferenceRequest(request_id="after-restart", model=MODEL, prompt_token_ids=[1, 2, 3],
                                                     max_tokens=2, request_class=types_pb2.REQUEST_CLASS_BATCH,
                                                     slo=types_pb2.SLO(ttft_ms=600_000))
                    try:
                        await stub.Submit(router_pb2.SubmitRequest(request=req), timeout=5)
                    except grpc.aio.AioRpcError as e:
                        return e.code() == grpc.StatusCode.ALREADY_EXISTS
                    return True

                await eventually(submitted, timeout_s=15, interval_s=0.1)
                res = await stub.GetResult(router_pb2.GetResultRequest(request_id="after-restart"), timeout=5)
                assert res.result.request_id == "after-restart"
        assert cluster.live() == ["gateway", "scaler", "router", "queue", "etcd"]
    finally:
        await cluster.stop(grace_s=10)
    assert cluster.live() == []
    assert _engine_processes(cluster.work / "engines") == {}


@pytest.mark.timeout(120)
async def test_a_killed_scaler_is_restarted_and_no_engine_outlives_the_cluster(tmp_path):
    cluster, messages = await start(tmp_path)
    try:
        first = _engine_processes(cluster.work / "engines")
        assert len(first) == 1  # the interactive minimum
        pid = kill(cluster, "scaler")
        assert "scaler" not in cluster.live()
        await eventually(lambda: restarted(cluster, "scaler", pid), timeout_s=30, interval_s=0.05)

        # The restarted scaler starts an engine of its own; the dead scaler's one then drains and exits.
        async def replaced() -> bool:
            now = _engine_processes(cluster.work / "engines")
            return bool(now) and not (set(now) & set(first))

        await eventually(replaced, timeout_s=60, interval_s=0.1)
        async with httpx.AsyncClient(timeout=10.0) as client:
            await eventually(lambda: served(client, cluster.gateway_url), timeout_s=20, interval_s=0.1)
    finally:
        await cluster.stop(grace_s=10)
    assert _engine_processes(cluster.work / "engines") == {}


@pytest.mark.timeout(60)
async def test_stop_kills_engines_a_dead_scaler_left_behind(tmp_path):
    cluster, _ = await start(tmp_path)
    try:
        await cluster.stop_supervision()
        engines = _engine_processes(cluster.work / "engines")
        assert engines
        kill(cluster, "scaler")  # its engines are orphans now (own sessions, parent gone)
        assert cluster.live() == ["gateway", "router", "queue", "etcd"]
    finally:
        await cluster.stop(grace_s=10)
    assert _engine_processes(cluster.work / "engines") == {}
