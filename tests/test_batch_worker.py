"""Batch work on BATCH and MIXED engine agents, over real gRPC on loopback: a real queue service (SQLite store) and
real engine agents with the simulated backend, each leasing through its :class:`BatchWorker`."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest

from chiron.v1 import engine_pb2, engine_pb2_grpc, queue_pb2, queue_pb2_grpc, types_pb2
from services.engine.backend import SimulatedBackend
from services.engine.batch_rules import DRAINING, EVICTED_FOR_INTERACTIVE, eviction_need
from services.engine.batch_worker import BatchWorker
from services.engine.core import EngineConfig
from services.engine.local_autoscaler import LocalAutoscalerConfig
from services.engine.server import AgentConfig, EngineAgent, RunningServer, serve
from services.queue.server import serve as serve_queue
from services.queue.store import QueueConfig
from services.router.routing import INTERACTIVE_QUEUE
from tests.conftest import eventually

MODEL = "llama-3-8b"
BATCH = types_pb2.INSTANCE_ROLE_BATCH
MIXED = types_pb2.INSTANCE_ROLE_MIXED
DONE = queue_pb2.QUEUED_REQUEST_STATE_DONE
QUEUED = queue_pb2.QUEUED_REQUEST_STATE_QUEUED
LEASED = queue_pb2.QUEUED_REQUEST_STATE_LEASED


def batch_request(rid: str, max_tokens: int, prompt_len: int = 32) -> queue_pb2.EnqueueRequest:
    return queue_pb2.EnqueueRequest(request=types_pb2.InferenceRequest(
        request_id=rid, model=MODEL, prompt_token_ids=list(range(1, prompt_len + 1)), max_tokens=max_tokens,
        slo=types_pb2.SLO(ttft_ms=3_600_000)))


def agent_config(role: int, queue_port: int | None, batch: int, instance_id: str, **kw) -> AgentConfig:
    return AgentConfig(instance_id=instance_id, role=role, autoscale=False,
                       autoscaler=LocalAutoscalerConfig(itl_slo_ms=50, initial_batch_size=batch, control_interval_s=1.0),
                       queue_address=None if queue_port is None else f"127.0.0.1:{queue_port}",
                       queue_poll_interval_s=0.05, **kw)


async def start_engine(queue_port: int, role: int = BATCH, *, speedup: float = 50.0, batch: int = 8,
                       instance_id: str = "batch-engine", **kw) -> RunningServer:
    backend = SimulatedBackend(MODEL, EngineConfig(max_num_seqs=batch), speedup=speedup)
    return await serve(EngineAgent(backend, agent_config(role, queue_port, batch, instance_id, **kw)), port=0)


class RecordingStub:
    """Wraps the worker's queue stub: keeps every lease handed out and every Return sent."""

    def __init__(self, stub: queue_pb2_grpc.QueueStub) -> None:
        self._stub = stub
        self.leases: list[queue_pb2.LeasedRequest] = []
        self.returns: list[queue_pb2.ReturnRequest] = []

    async def Lease(self, request, **kw):
        resp = await self._stub.Lease(request, **kw)
        self.leases.extend(resp.leases)
        return resp

    async def Return(self, request, **kw):
        resp = await self._stub.Return(request, **kw)
        self.returns.append(request)
        return resp

    def __getattr__(self, name):
        return getattr(self._stub, name)


@pytest.fixture
async def queue(tmp_path):
    cfg = QueueConfig(db_path=str(tmp_path / "queue.db"), models=(MODEL,), lease_timeout_s=30.0)
    srv = await serve_queue(cfg, port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
    yield srv, queue_pb2_grpc.QueueStub(channel)
    await channel.close()
    await srv.stop()


async def get(stub, rid: str) -> queue_pb2.GetRequestResponse:
    return await stub.GetRequest(queue_pb2.GetRequestRequest(request_id=rid))


async def all_in_state(stub, rids, state) -> bool:
    for rid in rids:
        if (await get(stub, rid)).state != state:
            return False
    return True


async def test_batch_agent_serves_everything_in_the_queue(queue):
    qsrv, qstub = queue
    sizes = {f"b{i}": 20 + 7 * i for i in range(20)}
    for rid, n in sizes.items():
        await qstub.Enqueue(batch_request(rid, n))
    srv = await start_engine(qsrv.port, BATCH, batch=8, lease_batch=4)
    worker = srv.agent.batch_worker
    try:
        await eventually(lambda: all_in_state(qstub, sizes, DONE), timeout_s=15)
        for rid, n in sizes.items():
            info = await get(qstub, rid)
            assert len(info.output_token_ids) == n == info.num_generated_tokens and info.attempts == 0
        assert (worker.leased, worker.acked, worker.returned, worker.lost) == (20, 20, 0, 0)
        snap = srv.agent.backend.snapshot()
        assert snap.generated_tokens_total == sum(sizes.values()) and snap.num_running == 0
        stats = (await qstub.GetStats(queue_pb2.QueueGetStatsRequest())).stats
        assert stats.queued == 0 and stats.leased == 0
    finally:
        await srv.stop(grace_s=1.0)


async def test_renewals_keep_a_long_request_leased_past_its_timeout(queue):
    qsrv, qstub = queue
    # ~12.5 ms per token at speedup 2: ~1.9 s of serving under a 0.5 s lease.
    await qstub.Enqueue(batch_request("long", 300))
    srv = await start_engine(qsrv.port, BATCH, speedup=2.0, batch=4, lease_timeout_s=0.5)
    worker = srv.agent.batch_worker
    store = qsrv.service.store
    try:
        async def leased() -> bool:
            return (await get(qstub, "long")).state == LEASED
        await eventually(leased, timeout_s=5, interval_s=0.01)
        leased_at = time.monotonic()

        async def held_past_two_timeouts() -> bool:
            store.expire_leases()  # a sweep right now would take an expired lease back
            info = store.get("long")
            assert info.state == "LEASED" and info.attempts == 0, info
            return time.monotonic() - leased_at > 1.2
        await eventually(held_past_two_timeouts, timeout_s=5, interval_s=0.05)
        await eventually(lambda: all_in_state(qstub, ["long"], DONE), timeout_s=10)
        info = await get(qstub, "long")
        assert len(info.output_token_ids) == 300 and info.attempts == 0

        async def acked() -> bool:  # the queue has the ack before the worker has the Ack RPC's reply
            return worker.acked == 1
        await eventually(acked, timeout_s=5)
        assert worker.renewed >= 3 and worker.lost == 0 and worker.leased == 1
    finally:
        await srv.stop(grace_s=1.0)


async def test_mixed_agent_evicts_batch_work_for_an_interactive_request(queue):
    qsrv, qstub = queue
    srv = await start_engine(qsrv.port, MIXED, speedup=10.0, batch=4, instance_id="mixed-engine")
    agent, worker = srv.agent, srv.agent.batch_worker
    rec = worker._stub = RecordingStub(worker._stub)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
    engine = engine_pb2_grpc.EngineStub(channel)
    rids = [f"m{i}" for i in range(4)]
    try:
        for rid in rids:  # 800 tokens at ~1.25 ms each: ~1 s per request
            await qstub.Enqueue(batch_request(rid, 800))

        async def at_cap_with_progress() -> bool:
            snap = agent.backend.snapshot()
            return snap.num_running == 4 and all(len(j.tokens) >= 30 for j in worker._jobs.values())
        await eventually(at_cap_with_progress, timeout_s=5, interval_s=0.01)

        msgs = [m async for m in engine.Generate(engine_pb2.GenerateRequest(request=types_pb2.InferenceRequest(
            request_id="chat", prompt_token_ids=list(range(1, 65)), max_tokens=20,
            request_class=types_pb2.REQUEST_CLASS_INTERACTIVE)))]
        assert sum(len(m.token_ids) for m in msgs) == 20 and msgs[-1].finish_reason == types_pb2.FINISH_REASON_LENGTH
        assert worker.evicted == 1

        async def returned() -> bool:
            return len(rec.returns) == 1
        await eventually(returned, timeout_s=5)
        ret = rec.returns[0]
        progress = list(ret.generated_token_ids)
        assert ret.reason == EVICTED_FOR_INTERACTIVE and 30 <= len(progress) < 800

        await eventually(lambda: all_in_state(qstub, rids, DONE), timeout_s=15)
        again = [ls for ls in rec.leases if ls.request.request_id == ret.request_id]
        assert len(again) == 2 and again[1].attempts == 1
        assert list(again[1].request.resume_token_ids) == progress  # resumed, not restarted
        info = await get(qstub, ret.request_id)
        assert len(info.output_token_ids) == 800 and list(info.output_token_ids[:len(progress)]) == progress
        for rid in rids:
            assert len((await get(qstub, rid)).output_token_ids) == 800
        # Nothing was regenerated: 4 x 800 batch tokens plus the 20 interactive ones, and at most the one token of the
        # iteration in flight at the eviction (counted by the engine, never streamed).
        assert 4 * 800 + 20 <= agent.backend.snapshot().generated_tokens_total <= 4 * 800 + 20 + 1
        assert (worker.leased, worker.acked, worker.returned, worker.lost) == (5, 4, 1, 0)
        assert agent.interactive_waiting == 0
    finally:
        await channel.close()
        await srv.stop(grace_s=1.0)


def test_eviction_need_at_the_cap_or_behind_an_interactive_queue():
    assert eviction_need(1, 8, 8, 0) == 1  # at the cap
    assert eviction_need(3, 8, 6, 0) == 1  # only what the cap needs
    assert eviction_need(1, 16, 4, 2) <= 0  # room below the cap, no queue
    assert eviction_need(1, 16, 4, 2, interactive_waiting=INTERACTIVE_QUEUE - 1) <= 0  # a moment, not a queue
    assert eviction_need(2, 16, 4, 6, interactive_waiting=INTERACTIVE_QUEUE) == 2  # a queue binds below the cap


async def test_mixed_agent_evicts_batch_work_when_interactive_requests_queue_below_its_cap(queue):
    """Cap 16, four long batch requests running: the tied token budget (16 tokens per iteration) prefills the
    interactive prompts 12 tokens at a time, so six interactive requests sent together queue well below the cap.
    Each one that arrives behind a queue of four evicts a batch request (the cap alone never would), and the
    evicted work resumes from its progress."""
    qsrv, qstub = queue
    srv = await start_engine(qsrv.port, MIXED, speedup=10.0, batch=16, instance_id="mixed-queue")
    agent, worker = srv.agent, srv.agent.batch_worker
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
    engine = engine_pb2_grpc.EngineStub(channel)
    rids = [f"q{i}" for i in range(4)]
    try:
        for rid in rids:
            await qstub.Enqueue(batch_request(rid, 800))

        async def serving_batch() -> bool:
            return agent.backend.snapshot().num_running == 4 and all(len(j.tokens) >= 5 for j in worker._jobs.values())
        await eventually(serving_batch, timeout_s=5, interval_s=0.01)

        async def chat(i: int) -> int:
            msgs = [m async for m in engine.Generate(engine_pb2.GenerateRequest(request=types_pb2.InferenceRequest(
                request_id=f"chat{i}", prompt_token_ids=list(range(1, 1025)), max_tokens=5,
                request_class=types_pb2.REQUEST_CLASS_INTERACTIVE)))]
            return sum(len(m.token_ids) for m in msgs)
        assert await asyncio.gather(*(chat(i) for i in range(6))) == [5] * 6
        assert worker.evicted >= 1  # 4 batch + 6 interactive never reach the cap of 16
        assert agent.backend.snapshot().max_batch_size == 16
        await eventually(lambda: all_in_state(qstub, rids, DONE), timeout_s=20)
        for rid in rids:
            assert len((await get(qstub, rid)).output_token_ids) == 800  # resumed, nothing lost
    finally:
        await channel.close()
        await srv.stop(grace_s=1.0)


async def test_a_lost_lease_stops_the_work_and_is_dropped(queue):
    qsrv, qstub = queue
    await qstub.Enqueue(batch_request("doomed", 800))
    srv = await start_engine(qsrv.port, BATCH, speedup=10.0, batch=4, lease_timeout_s=0.3)
    worker, backend = srv.agent.batch_worker, srv.agent.backend
    try:
        async def running() -> bool:
            return backend.snapshot().num_running == 1
        await eventually(running, timeout_s=5, interval_s=0.01)
        assert (await qstub.Cancel(queue_pb2.CancelRequest(request_id="doomed"))).cancelled

        async def dropped() -> bool:  # the next renewal is refused: the engine stops the request
            return worker.lost == 1 and worker.active == 0 and backend.snapshot().num_running == 0
        await eventually(dropped, timeout_s=5)
        assert (await get(qstub, "doomed")).state == queue_pb2.QUEUED_REQUEST_STATE_CANCELLED
        assert (worker.acked, worker.returned) == (0, 0) and backend.snapshot().generated_tokens_total < 800
    finally:
        await srv.stop(grace_s=1.0)


async def test_a_batch_agent_does_not_make_room(queue):
    qsrv, _ = queue
    srv = await start_engine(qsrv.port, BATCH, batch=2)
    try:
        assert await srv.agent.batch_worker.make_room(1) == 0
        with pytest.raises(ValueError, match="BATCH or MIXED"):
            EngineAgent(SimulatedBackend(MODEL), agent_config(types_pb2.INSTANCE_ROLE_INTERACTIVE, qsrv.port, 4, "i"))
    finally:
        await srv.stop(grace_s=1.0)


async def test_drain_returns_running_batch_work_with_its_progress(queue):
    qsrv, qstub = queue
    rids = [f"d{i}" for i in range(6)]
    for rid in rids:
        await qstub.Enqueue(batch_request(rid, 800))
    srv = await start_engine(qsrv.port, BATCH, speedup=10.0, batch=8, instance_id="draining-engine")
    worker = srv.agent.batch_worker
    rec = worker._stub = RecordingStub(worker._stub)

    async def all_running() -> bool:
        return worker.active == 6 and all(len(j.tokens) >= 20 for j in worker._jobs.values())
    await eventually(all_running, timeout_s=5, interval_s=0.01)
    await srv.stop(grace_s=1.0)  # drains the worker first: nothing is left leased to a stopped engine
    first_run_tokens = srv.agent.backend.snapshot().generated_tokens_total
    assert worker.returned == 6 and worker.active == 0 and worker.acked == 0
    progress = {r.request_id: list(r.generated_token_ids) for r in rec.returns}
    assert sorted(progress) == rids and all(r.reason == DRAINING for r in rec.returns)
    for rid in rids:
        info = await get(qstub, rid)
        assert info.state == QUEUED and info.attempts == 1
        assert info.num_generated_tokens == len(progress[rid]) >= 20
    # Every streamed token came back (the engine also counts the iteration in flight at eviction: one per request).
    assert first_run_tokens - 6 <= sum(map(len, progress.values())) <= first_run_tokens

    # Another engine picks the work up where the first one stopped.
    srv2 = await start_engine(qsrv.port, BATCH, speedup=50.0, batch=8, instance_id="second-engine")
    try:
        await eventually(lambda: all_in_state(qstub, rids, DONE), timeout_s=15)
        for rid in rids:
            out = list((await get(qstub, rid)).output_token_ids)
            assert len(out) == 800 and out[:len(progress[rid])] == progress[rid]
        assert srv2.agent.backend.snapshot().generated_tokens_total == sum(800 - len(p) for p in progress.values())
    finally:
        await srv2.stop(grace_s=1.0)


async def test_an_unreachable_queue_is_retried_without_hurting_the_agent(tmp_path):
    with socket.socket() as s:  # a port nobody listens on (yet)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = SimulatedBackend(MODEL, EngineConfig(max_num_seqs=4), speedup=50.0)
    agent = EngineAgent(backend, agent_config(BATCH, None, 4, "lonely-engine"))
    worker = agent.attach_batch_worker(BatchWorker(agent, f"127.0.0.1:{port}", "lonely-engine", MODEL, "batch",
                                                   poll_interval_s=0.05, max_backoff_s=0.2, rpc_timeout_s=1.0))
    srv = await serve(agent, port=0)
    qsrv = None
    try:
        async def retried() -> bool:
            return worker.queue_errors >= 3
        await eventually(retried, timeout_s=10)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:  # the engine still serves
            msgs = [m async for m in engine_pb2_grpc.EngineStub(ch).Generate(engine_pb2.GenerateRequest(
                request=types_pb2.InferenceRequest(request_id="x", prompt_token_ids=[1, 2, 3], max_tokens=5)))]
        assert sum(len(m.token_ids) for m in msgs) == 5
        # The queue comes up: the worker recovers on its own.
        qsrv = await serve_queue(QueueConfig(db_path=str(tmp_path / "late.db")), port=port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            qstub = queue_pb2_grpc.QueueStub(ch)
            await qstub.Enqueue(batch_request("late", 30))
            await eventually(lambda: all_in_state(qstub, ["late"], DONE), timeout_s=10)

        async def acked() -> bool:  # the queue has the ack before the worker has the Ack RPC's reply
            return worker.acked == 1
        await eventually(acked, timeout_s=10)
    finally:
        await srv.stop(grace_s=1.0)
        if qsrv is not None:
            await qsrv.stop()


async def test_worker_arguments_are_checked():
    backend = SimulatedBackend(MODEL)
    with pytest.raises(ValueError, match="BATCH or MIXED"):
        BatchWorker(backend, "127.0.0.1:1", "e", MODEL, types_pb2.INSTANCE_ROLE_INTERACTIVE)
    with pytest.raises(ValueError, match="lease_batch"):
        BatchWorker(backend, "127.0.0.1:1", "e", MODEL, "batch", lease_batch=0)
    with pytest.raises(ValueError, match="lease_timeout_s"):
        BatchWorker(backend, "127.0.0.1:1", "e", MODEL, "mixed", lease_timeout_s=0)
    w = BatchWorker(backend, "127.0.0.1:1", "e", MODEL, "mixed")
    await w.drain()  # never started: nothing to do
    assert w.stats()["leased"] == 0
