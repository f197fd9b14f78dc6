"""Integration tests of the global scaler: a real etcd, the ``local`` provider starting simulated engine agents
as real processes, the real queue service, load through the gRPC surfaces."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import grpc
import pytest

from chiron.v1 import engine_pb2, engine_pb2_grpc, queue_pb2, queue_pb2_grpc, scaler_pb2, scaler_pb2_grpc, types_pb2
from services.common.membership import MembershipWatcher
from services.global_scaler.local_provider import LocalProvider
from services.global_scaler.policy import PolicyConfig, RoleLimits
from services.global_scaler.providers import ProviderError
from services.global_scaler.server import ScalerService, serve
from services.queue.core import CapacityTracker
from services.queue.server import serve as serve_queue
from services.queue.store import QueueConfig
from tests.conftest import start_etcd

pytestmark = pytest.mark.timeout(240)
ENGINE_ARGS = ["--backend", "simulated", "--static-batch-size", "4"]


def serving(watcher: MembershipWatcher, role: str) -> list:
    return [m for m in watcher.snapshot().values() if m.role == role and m.state == "serving"]


def gen(rid: str, max_tokens: int) -> engine_pb2.GenerateRequest:
    return engine_pb2.GenerateRequest(request=types_pb2.InferenceRequest(
        request_id=rid, prompt_token_ids=list(range(1, 33)), max_tokens=max_tokens, ignore_eos=True))


async def stream(address: str, req) -> list[engine_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as ch:
        return [m async for m in engine_pb2_grpc.EngineStub(ch).Generate(req)]


@pytest.fixture
async def cluster(tmp_path):
    etcd = start_etcd(tmp_path / "etcd")
    watcher = MembershipWatcher(etcd.endpoint)
    await watcher.start()
    queue = await serve_queue(QueueConfig(db_path=str(tmp_path / "queue.db")), port=0,
                              capacity=CapacityTracker(prior_throughput_tokens_per_s=50.0))
    provider = LocalProvider(ENGINE_ARGS, etcd.endpoint, tmp_path / "engines", drain_timeout_s=60)
    yield etcd, watcher, queue, provider
    await provider.close()
    await queue.stop()
    await watcher.stop()
    etcd.stop()


async def test_instances_follow_interactive_and_batch_load_and_go_down_after_the_delay(cluster):
    etcd, watcher, queue, provider = cluster
    cfg = PolicyConfig(interval_s=0.3, scale_down_delay_s=3.0, model_load_time_s=5.0, default_instance_concurrency=4,
                       theta_min=0.0, theta_max=0.0,
                       limits={"interactive": RoleLimits(1, 3), "mixed": RoleLimits(0, 0), "batch": RoleLimits(0, 1)})
    service = ScalerService(cfg, watcher, provider, queue=f"127.0.0.1:{queue.port}")
    srv = await serve(service, port=0)
    try:
        # The minimum: one INTERACTIVE instance, registered in etcd and serving.
        await watcher.wait_for(lambda m: len([i for i in m.values() if i.role == "interactive"]) == 1, timeout_s=60)
        first = serving(watcher, "interactive")[0]

        # Interactive load: 12 long requests on an instance that runs 4 at a time → 12 in flight / 4 = 3 instances.
        streams = [asyncio.create_task(stream(first.address, gen(f"i{k}", 600))) for k in range(12)]
        await watcher.wait_for(lambda m: len([i for i in m.values() if i.role == "interactive"]) == 3, timeout_s=90)
        assert all(i.state == "serving" for i in serving(watcher, "interactive"))

        # Batch load: 20 requests with a 30 s TTFT SLO and no batch capacity → batch backpressure → one BATCH.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{queue.port}") as ch:
            qstub = queue_pb2_grpc.QueueStub(ch)
            for k in range(20):
                await qstub.Enqueue(queue_pb2.EnqueueRequest(request=types_pb2.InferenceRequest(
                    request_id=f"b{k}", model="llama-3-8b", prompt_token_ids=[1, 2, 3], max_tokens=200,
                    slo=types_pb2.SLO(ttft_ms=30_000))))
            await watcher.wait_for(lambda m: any(i.role == "batch" for i in m.values()), timeout_s=90)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as sch:
                d = (await scaler_pb2_grpc.GlobalScalerStub(sch).GetDecision(scaler_pb2.GetDecisionRequest())).decision
            batch = next(r for r in d.roles if r.role == "batch")
            assert batch.desired == 1 and d.inputs["queued_requests"] == 20
            assert not d.advisory and not d.errors
            for k in range(20):  # the batch work goes away (cancelled)
                await qstub.Cancel(queue_pb2.CancelRequest(request_id=f"b{k}"))

        # Every interactive request completes: nothing lost while the scaler works.
        results = await asyncio.gather(*streams)
        for msgs in results:
            assert msgs[-1].finish_reason == types_pb2.FINISH_REASON_LENGTH and msgs[-1].num_generated_tokens == 600

        # Load gone: after the 3 s delay window, back to the minimum (drained, deregistered).
        await watcher.wait_for(lambda m: [i.role for i in m.values()] == ["interactive"], timeout_s=90)
        assert serving(watcher, "interactive")[0].instance_id == first.instance_id  # the newest went first
    finally:
        await srv.stop()


async def test_a_draining_instance_finishes_its_requests_before_it_stops(cluster):
    etcd, watcher, queue, provider = cluster
    await provider.set_count("batch", 1)
    snap = await watcher.wait_for(lambda m: len(m) == 1, timeout_s=60)
    inst = next(iter(snap.values()))
    # A long request in flight, then scale to zero: the agent drains (refuses new work, finishes this one).
    running = asyncio.create_task(stream(inst.address, gen("long", 300)))
    async with grpc.aio.insecure_channel(inst.address) as ch:
        stub = engine_pb2_grpc.EngineStub(ch)

        async def started() -> bool:
            return (await stub.GetStats(engine_pb2.GetStatsRequest())).stats.num_running == 1
        while not await started():
            await asyncio.sleep(0.02)
    await provider.set_count("batch", 0)
    await watcher.wait_for(lambda m: all(i.state == "draining" for i in m.values()) or not m, timeout_s=30)
    with pytest.raises(grpc.aio.AioRpcError) as e:  # new work is refused while draining
        await stream(inst.address, gen("late", 5))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    msgs = await running
    assert msgs[-1].finish_reason == types_pb2.FINISH_REASON_LENGTH and msgs[-1].num_generated_tokens == 300
    await watcher.wait_for(lambda m: not m, timeout_s=60)  # deregistered once drained
    assert (await provider.counts("batch")).total == 0


async def test_advisory_mode_decides_but_never_scales(cluster):
    etcd, watcher, queue, provider = cluster
    await provider.set_count("interactive", 1)
    inst = next(iter((await watcher.wait_for(lambda m: len(m) == 1, timeout_s=60)).values()))
    cfg = PolicyConfig(interval_s=0.2, default_instance_concurrency=4, theta_min=0.0, theta_max=0.0,
                       limits={"interactive": RoleLimits(1, 5), "mixed": RoleLimits(0, 0), "batch": RoleLimits(0, 2)})
    service = ScalerService(cfg, watcher, None, queue=f"127.0.0.1:{queue.port}", advisory=True)
    srv = await serve(service, port=0)
    try:
        streams = [asyncio.create_task(stream(inst.address, gen(f"a{k}", 400))) for k in range(16)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            seen = []
            async for msg in scaler_pb2_grpc.GlobalScalerStub(ch).WatchDecisions(scaler_pb2.WatchDecisionsRequest()):
                d = msg.decision
                role = next(r for r in d.roles if r.role == "interactive")
                seen.append(role)
                if role.desired >= 4:
                    break
        assert d.advisory and not d.actions and role.current == 1 and "demand" in role.reason
        assert len(watcher.snapshot()) == 1 and (await provider.counts("interactive")).total == 1
        await asyncio.gather(*streams)
    finally:
        await srv.stop()


async def test_a_failing_start_is_retried_then_reported(cluster, tmp_path):
    etcd, watcher, queue, _ = cluster
    bad = LocalProvider(["--backend", "simulated", "--model", "no-such-model"], etcd.endpoint, tmp_path / "bad",
                        start_attempts=2, backoff_s=0.05)
    try:
        await bad.set_count("batch", 1)

        async def reported() -> bool:
            return bool(bad.errors)
        while not await reported():
            await asyncio.sleep(0.05)
        assert "failed to start 2 times" in bad.errors[0]
        with pytest.raises(ProviderError, match="no-such-model|failed to start"):
            await bad.set_count("batch", 1)
        # The scaler reports provider errors in its decisions instead of dropping them.
        cfg = PolicyConfig(interval_s=60, limits={"interactive": RoleLimits(1, 1), "mixed": RoleLimits(0, 0),
                                                  "batch": RoleLimits(0, 1)})
        service = ScalerService(dataclasses.replace(cfg), watcher, bad)
        while not bad.errors:
            await asyncio.sleep(0.05)
        d = await service.step()
        assert d.errors and any("failed to start" in e for e in d.errors)
        assert math.isfinite(d.theta)
    finally:
        await bad.close()
