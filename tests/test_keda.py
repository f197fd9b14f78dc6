"""The scaler's KEDA external-scaler service (services/global_scaler/keda.py) over a real port with a real gRPC
client, as KEDA calls it: per role, GetMetricSpec + GetMetrics + IsActive give the replica count KEDA and the HPA
set (0 while inactive, else ceil(metric value / target size)), which must equal the scaler's desired count.

The policy's inputs are driven so the desired counts are known: no engine registered (a stand-in membership),
per-role minimums (INTERACTIVE 2, MIXED 1, BATCH 0), and batch requests in a real queue service (queued requests
and no batch capacity → one BATCH instance; an empty queue → none).
"""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chiron.keda import externalscaler_pb2 as pb
from chiron.keda import externalscaler_pb2_grpc as pb_grpc
from chiron.v1 import queue_pb2, queue_pb2_grpc, scaler_pb2, scaler_pb2_grpc, types_pb2
from services.global_scaler import keda
from services.global_scaler.keda import KedaProvider
from services.global_scaler.policy import PolicyConfig, RoleLimits
from services.global_scaler.server import ScalerService, serve
from services.queue.core import CapacityTracker
from services.queue.server import serve as serve_queue
from services.queue.store import QueueConfig

pytestmark = pytest.mark.timeout(60)

LIMITS = {"interactive": RoleLimits(2, 4), "mixed": RoleLimits(1, 2), "batch": RoleLimits(0, 3)}


class Members:
    """Stands in for the scaler's etcd watcher: ``snapshot()`` of instance records."""

    def __init__(self) -> None:
        self.members: dict[str, SimpleNamespace] = {}

    def add(self, instance_id: str, role: str, state: str = "serving") -> None:
        self.members[instance_id] = SimpleNamespace(instance_id=instance_id, role=role, state=state,
                                                    address="127.0.0.1:1")

    def snapshot(self) -> dict:
        return dict(self.members)


def ref(role: str | None) -> pb.ScaledObjectRef:
    """What KEDA sends for a ScaledObject of deploy/kubernetes/scaledobjects.yaml: its trigger metadata."""
    meta = {"scalerAddress": "chiron-scaler:50071"}
    if role is not None:
        meta["role"] = role
    return pb.ScaledObjectRef(name=f"chiron-engine-{role}", namespace="chiron", scalerMetadata=meta)


async def keda_replicas(stub: pb_grpc.ExternalScalerStub, role: str) -> int:
    """The replica count KEDA + HPA compute for the role's Deployment (minReplicaCount 0, no max reached): the spec's
    one metric, its value as an AverageValue external metric, and activation."""
    spec = await stub.GetMetricSpec(ref(role))
    assert len(spec.metricSpecs) == 1
    ms = spec.metricSpecs[0]
    assert ms.metricName == f"chiron-{role}-desired" and ms.targetSizeFloat == ms.targetSize == 1
    values = (await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(role), metricName=ms.metricName))).metricValues
    assert len(values) == 1 and values[0].metricName == ms.metricName
    assert values[0].metricValue == values[0].metricValueFloat
    active = (await stub.IsActive(ref(role))).result
    return math.ceil(values[0].metricValueFloat / ms.targetSizeFloat) if active else 0


async def enqueue(address: str, n: int) -> list[str]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = queue_pb2_grpc.QueueStub(ch)
        for k in range(n):
            await stub.Enqueue(queue_pb2.EnqueueRequest(request=types_pb2.InferenceRequest(
                request_id=f"b{k}", model="llama-3-8b", prompt_token_ids=[1, 2, 3], max_tokens=200,
                slo=types_pb2.SLO(ttft_ms=30_000))))
    return [f"b{k}" for k in range(n)]


async def cancel(address: str, ids: list[str]) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = queue_pb2_grpc.QueueStub(ch)
        for rid in ids:
            assert (await stub.Cancel(queue_pb2.CancelRequest(request_id=rid))).cancelled


@pytest.fixture
async def queue(tmp_path):
    q = await serve_queue(QueueConfig(db_path=str(tmp_path / "queue.db")), port=0,
                          capacity=CapacityTracker(prior_throughput_tokens_per_s=50.0))
    yield f"127.0.0.1:{q.port}"
    await q.stop()


async def test_keda_replicas_follow_the_desired_counts_and_batch_scales_from_and_to_zero(queue):
    members = Members()
    provider = KedaProvider(members)
    # A long interval: the loop decides once at start; the test then steps the scaler itself.
    cfg = PolicyConfig(interval_s=3600, scale_down_delay_s=0.0, model_load_time_s=5.0, limits=LIMITS)
    service = ScalerService(cfg, members, provider, queue=queue)
    srv = await serve(service, port=0)
    pushed: asyncio.Queue[bool] = asyncio.Queue()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.ExternalScalerStub(ch)

            async def watch_batch() -> None:
                async for msg in stub.StreamIsActive(ref("batch")):
                    pushed.put_nowait(msg.result)
            watcher = asyncio.create_task(watch_batch())

            # The served KEDA service is healthy on the scaler's port (the manifests' readiness probe asks it).
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=keda.SERVICE_NAME))
            assert health.status == health_pb2.HealthCheckResponse.SERVING

            # First decision: the minimums, nothing queued.
            await service.wait_decision()
            assert {r: await keda_replicas(stub, r) for r in ("interactive", "mixed", "batch")} == \
                {"interactive": 2, "mixed": 1, "batch": 0}
            explained = (await scaler_pb2_grpc.GlobalScalerStub(ch).GetDecision(scaler_pb2.GetDecisionRequest())).decision
            assert {r.role: r.desired for r in explained.roles} == {"interactive": 2, "mixed": 1, "batch": 0}
            assert await asyncio.wait_for(pushed.get(), 5) is False
            # The provider launched nothing: it records the counts, and sees none of those pods registered yet.
            assert provider.desired == {"interactive": 2, "mixed": 1}  # BATCH: already at 0, never asked
            assert (await provider.counts("interactive")).pending == 2

            # Batch requests queued and no batch capacity: one BATCH instance, pushed as active.
            ids = await enqueue(queue, 10)
            d = await service.step()
            assert {r.role: r.desired for r in d.roles}["batch"] == 1
            assert await keda_replicas(stub, "batch") == 1
            assert await asyncio.wait_for(pushed.get(), 5) is True
            assert (await provider.counts("batch")).pending == 1
            assert await keda_replicas(stub, "interactive") == 2 and await keda_replicas(stub, "mixed") == 1

            # The queue empties (no delay window in this config): back to zero BATCH pods, pushed as inactive.
            await cancel(queue, ids)
            await service.step()
            assert await keda_replicas(stub, "batch") == 0
            assert await asyncio.wait_for(pushed.get(), 5) is False

            # A step that changes nothing for BATCH pushes nothing.
            await service.step()
            await asyncio.sleep(0.2)
            assert pushed.empty()
            watcher.cancel()
    finally:
        await srv.stop()


async def test_unknown_role_is_invalid_and_no_decision_is_unavailable():
    members = Members()
    service = ScalerService(PolicyConfig(limits=LIMITS), members, KedaProvider(members))
    server = grpc.aio.server()
    keda.add_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.ExternalScalerStub(ch)
            for bad in ("gpu", None):
                for call in (stub.IsActive(ref(bad)), stub.GetMetricSpec(ref(bad)),
                             stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(bad)))):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "interactive, mixed, batch" in e.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in stub.StreamIsActive(ref(bad)):
                        pass
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            # The spec needs no decision; the metric and activity do.
            assert (await stub.GetMetricSpec(ref("batch"))).metricSpecs[0].metricName == "chiron-batch-desired"
            spec_stream = stub.StreamMetricSpec(ref("batch"))
            first = await spec_stream.read()
            assert first.metricSpecs[0].metricName == "chiron-batch-desired"
            spec_stream.cancel()
            for call in (stub.IsActive(ref("batch")),
                         stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref("batch"), metricName="chiron-batch-desired"))):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "no decision" in e.value.details()

            # Once a decision exists: a role's metric under another name is refused, roles are case-insensitive,
            # and a stream opened before the decision gets it when it comes.
            early = stub.StreamIsActive(ref("interactive"))
            read = asyncio.create_task(early.read())
            await asyncio.sleep(0.1)
            await service.step()
            assert (await asyncio.wait_for(read, 5)).result is True
            early.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref("batch"), metricName="chiron-mixed-desired"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chiron-batch-desired" in e.value.details()
            assert (await stub.IsActive(ref("Interactive"))).result is True
    finally:
        await server.stop(0)
        await service.stop()


async def test_keda_provider_records_counts_and_sees_registered_instances():
    members = Members()
    provider = KedaProvider(members)
    assert (await provider.counts("batch")).total == 0
    await provider.set_count("batch", 3, "backlog")
    members.add("b1", "batch")
    members.add("b2", "batch", state="draining")  # draining: not serving, not counted
    members.add("i1", "interactive")
    c = await provider.counts("batch")
    assert (c.running, c.pending) == (1, 2)
    await provider.set_count("batch", 0)
    c = await provider.counts("batch")
    assert (c.running, c.pending) == (1, 0)  # still running until its pod stops; nothing pending
    assert (await provider.counts("interactive")).running == 1
    for bad in (lambda: provider.set_count("gpu", 1), lambda: provider.set_count("batch", -1),
                lambda: provider.counts("gpu")):
        with pytest.raises(ValueError):
            await bad()
