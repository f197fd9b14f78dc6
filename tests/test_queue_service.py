"""Integration tests of the ``chiron.v1.Queue`` service over real gRPC on loopback, and a kill -9 crash test
of the ``chiron queue`` process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from chiron.v1 import queue_pb2, queue_pb2_grpc, types_pb2
from services.engine.demo import wait_healthy, wait_port_file
from services.queue.core import CapacityTracker
from services.queue.server import serve
from services.queue.store import QueueConfig
from tests.conftest import eventually


def req(rid: str, ttft_s: float = 600.0, model: str = "llama-3-8b", prompt_len: int = 8, max_tokens: int = 100,
        **kw) -> queue_pb2.EnqueueRequest:
    return queue_pb2.EnqueueRequest(request=types_pb2.InferenceRequest(
        request_id=rid, model=model, prompt_token_ids=list(range(1, prompt_len + 1)), max_tokens=max_tokens,
        slo=types_pb2.SLO(ttft_ms=int(ttft_s * 1000)), **kw))


@pytest.fixture
async def queue(tmp_path):
    cfg = QueueConfig(db_path=str(tmp_path / "queue.db"), models=("llama-3-8b", "llama-2-70b"), capacity=50,
                      group_granularity_s=60.0, lease_timeout_s=30.0, max_ttft_slo_ms=24 * 3600 * 1000)
    srv = await serve(cfg, port=0, capacity=CapacityTracker(prior_throughput_tokens_per_s=1000.0))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
    yield srv, queue_pb2_grpc.QueueStub(channel)
    await channel.close()
    await srv.stop()


async def test_groups_are_served_earliest_deadline_first_and_fifo_inside(queue):
    _, stub = queue
    # Two groups of one model: TTFT SLOs of 1 h and 10 min (different deadline buckets).
    late = [await stub.Enqueue(req(f"late{i}", ttft_s=3600)) for i in range(3)]
    early = [await stub.Enqueue(req(f"early{i}", ttft_s=600)) for i in range(3)]
    assert len({r.group_id for r in late}) == 1 and len({r.group_id for r in early}) == 1
    assert late[0].group_id != early[0].group_id
    leased = (await stub.Lease(queue_pb2.LeaseRequest(worker_id="w1", max_requests=4))).leases
    assert [ls.request.request_id for ls in leased] == ["early0", "early1", "early2", "late0"]
    assert all(ls.request.request_class == types_pb2.REQUEST_CLASS_BATCH for ls in leased)
    assert leased[0].request.prompt_token_ids == list(range(1, 9)) and leased[0].request.max_tokens == 100
    pos = await stub.GetRequest(queue_pb2.GetRequestRequest(request_id="late2"))
    assert pos.state == queue_pb2.QUEUED_REQUEST_STATE_QUEUED and pos.position == 1
    assert 0 < pos.estimated_wait_mean_s <= pos.estimated_wait_p95_s < float("inf")


async def test_lease_ack_and_stats(queue):
    _, stub = queue
    for i in range(5):
        await stub.Enqueue(req(f"r{i}"))
    stats = (await stub.GetStats(queue_pb2.QueueGetStatsRequest())).stats
    assert stats.queued == 5 and stats.leased == 0 and len(stats.groups) == 1
    g = stats.groups[0]
    assert g.size == 5 and g.model == "llama-3-8b" and g.estimated_wait_p95_s >= g.estimated_wait_mean_s > 0
    assert g.slack_s > 0 and not g.projected_slo_violation
    leases = (await stub.Lease(queue_pb2.LeaseRequest(worker_id="w", max_requests=2))).leases
    await stub.Ack(queue_pb2.AckRequest(request_id=leases[0].request.request_id, lease_id=leases[0].lease_id,
                                        output_tokens=80))
    done = await stub.GetRequest(queue_pb2.GetRequestRequest(request_id=leases[0].request.request_id))
    assert done.state == queue_pb2.QUEUED_REQUEST_STATE_DONE and done.position == -1
    stats = (await stub.GetStats(queue_pb2.QueueGetStatsRequest())).stats
    assert stats.queued == 3 and stats.leased == 1
    assert stats.capacity[0].model == "llama-3-8b" and stats.capacity[0].throughput_tokens_per_s > 0
    # A second ack of another lease id is refused: nothing completes twice.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Ack(queue_pb2.AckRequest(request_id=leases[0].request.request_id, lease_id="not-the-lease",
                                            output_tokens=80))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_group_with_every_request_leased_is_still_listed(queue):
    """Nothing waits, but work is in service: the scaler must see the group (and keep its BATCH instances)."""
    _, stub = queue
    for i in range(3):
        await stub.Enqueue(req(f"r{i}"))
    await stub.Lease(queue_pb2.LeaseRequest(worker_id="w", max_requests=3))
    stats = (await stub.GetStats(queue_pb2.QueueGetStatsRequest())).stats
    assert stats.queued == 0 and stats.leased == 3 and len(stats.groups) == 1
    g = stats.groups[0]
    assert g.size == 0 and g.leased == 3 and g.slack_s > 0 and not g.projected_slo_violation


async def test_return_resumes_with_progress_at_its_place(queue):
    _, stub = queue
    for i in range(3):
        await stub.Enqueue(req(f"r{i}"))
    first = (await stub.Lease(queue_pb2.LeaseRequest(worker_id="mixed-1", max_requests=1))).leases[0]
    assert first.request.request_id == "r0" and first.attempts == 0
    await stub.Return(queue_pb2.ReturnRequest(request_id="r0", lease_id=first.lease_id,
                                              generated_token_ids=[5, 6, 7], reason="evicted for interactive load"))
    again = (await stub.Lease(queue_pb2.LeaseRequest(worker_id="batch-1", max_requests=1))).leases[0]
    assert again.request.request_id == "r0"  # back at the head of its group
    assert list(again.request.resume_token_ids) == [5, 6, 7] and again.attempts == 1
    # The old lease is dead.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Ack(queue_pb2.AckRequest(request_id="r0", lease_id=first.lease_id, output_tokens=10))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_expired_lease_returns_the_request(queue):
    _, stub = queue
    await stub.Enqueue(req("short"))
    ls = (await stub.Lease(queue_pb2.LeaseRequest(worker_id="dies", max_requests=1, lease_timeout_ms=200))).leases
    assert len(ls) == 1
    assert not (await stub.Lease(queue_pb2.LeaseRequest(worker_id="other", max_requests=1))).leases

    async def back() -> bool:
        got = (await stub.Lease(queue_pb2.LeaseRequest(worker_id="other", max_requests=1))).leases
        return bool(got) and got[0].request.request_id == "short" and got[0].attempts == 1
    await eventually(back, timeout_s=10)


async def test_renew_keeps_a_lease_past_its_timeout(queue):
    srv, stub = queue
    await stub.Enqueue(req("long"))
    ls = (await stub.Lease(queue_pb2.LeaseRequest(worker_id="w", max_requests=1, lease_timeout_ms=300))).leases[0]
    first_expiry = ls.lease_expiry.ToNanoseconds() / 1e9
    renewed = await stub.Renew(queue_pb2.RenewRequest(request_id="long", lease_id=ls.lease_id, lease_timeout_ms=30_000))
    assert renewed.lease_expiry.ToNanoseconds() / 1e9 >= first_expiry + 29

    async def past_first_expiry() -> bool:
        return time.time() > first_expiry + 0.2
    await eventually(past_first_expiry, timeout_s=5)
    srv.service.store.expire_leases()  # a sweep now finds nothing to take back
    assert not (await stub.Lease(queue_pb2.LeaseRequest(worker_id="other", max_requests=1))).leases
    info = await stub.GetRequest(queue_pb2.GetRequestRequest(request_id="long"))
    assert info.state == queue_pb2.QUEUED_REQUEST_STATE_LEASED and info.attempts == 0
    # 0 = the queue's default timeout (30 s in this fixture).
    default = await stub.Renew(queue_pb2.RenewRequest(request_id="long", lease_id=ls.lease_id))
    assert 25 < default.lease_expiry.ToNanoseconds() / 1e9 - time.time() <= 30
    for rid, lease_id, code in [("long", "not-the-lease", grpc.StatusCode.FAILED_PRECONDITION),
                                ("never-enqueued", ls.lease_id, grpc.StatusCode.NOT_FOUND)]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Renew(queue_pb2.RenewRequest(request_id=rid, lease_id=lease_id))
        assert e.value.code() == code
    await stub.Ack(queue_pb2.AckRequest(request_id="long", lease_id=ls.lease_id, output_tokens=100))
    with pytest.raises(grpc.aio.AioRpcError) as e:  # a finished request's lease is not renewable
        await stub.Renew(queue_pb2.RenewRequest(request_id="long", lease_id=ls.lease_id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_cancel(queue):
    _, stub = queue
    await stub.Enqueue(req("c"))
    assert (await stub.Cancel(queue_pb2.CancelRequest(request_id="c"))).cancelled
    info = await stub.GetRequest(queue_pb2.GetRequestRequest(request_id="c"))
    assert info.state == queue_pb2.QUEUED_REQUEST_STATE_CANCELLED
    assert not (await stub.Lease(queue_pb2.LeaseRequest(worker_id="w", max_requests=5))).leases
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Cancel(queue_pb2.CancelRequest(request_id="never-enqueued"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("kw", "fragment"), [
    ({"model": "gpt-unknown"}, "model"),
    ({"ttft_s": 0}, "ttft"),
    ({"ttft_s": 30 * 24 * 3600}, "ttft"),
    ({"prompt_len": 0}, "prompt"),
    ({"prompt_len": 40_000}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
])
async def test_bad_input_is_invalid_argument(queue, kw, fragment):
    _, stub = queue
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Enqueue(req("bad", **kw))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in e.value.details().lower()
    assert (await stub.GetStats(queue_pb2.QueueGetStatsRequest())).stats.queued == 0


async def test_duplicate_ids_and_capacity(queue):
    _, stub = queue
    a = await stub.Enqueue(req("dup"))
    assert (await stub.Enqueue(req("dup"))).group_id == a.group_id  # same content: idempotent retry
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Enqueue(req("dup", max_tokens=7))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for i in range(49):  # capacity 50
        await stub.Enqueue(req(f"fill{i}"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Enqueue(req("one-too-many"))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetRequest(queue_pb2.GetRequestRequest(request_id="one-too-many"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND  # nothing partial was stored
    assert (await stub.GetStats(queue_pb2.QueueGetStatsRequest())).stats.queued == 50


# ---- crash test: kill -9 in the middle of enqueues and leases --------------------------------------


def _start_queue(db: Path, log: Path) -> tuple[subprocess.Popen, Path]:
    port_file = Path(tempfile.mkstemp(prefix="chiron-queue-port-")[1])
    port_file.write_text("")
    cmd = [sys.executable, "-m", "services.cli", "queue", "--port", "0", "--port-file", str(port_file),
           "--db", str(db), "--lease-timeout-s", "1"]
    proc = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, port_file


async def test_kill_9_loses_no_acknowledged_enqueue_and_leases_come_back(tmp_path):
    db, log = tmp_path / "crash.db", tmp_path / "queue.log"
    proc, port_file = _start_queue(db, log)
    acked: list[str] = []
    leased: dict[str, str] = {}
    try:
        port = await wait_port_file(port_file, proc)
        await wait_healthy(f"127.0.0.1:{port}", proc=proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = queue_pb2_grpc.QueueStub(ch)

            async def enqueuer(k: int) -> None:
                i = 0
                while True:
                    rid = f"e{k}-{i}"
                    try:
                        await stub.Enqueue(req(rid, ttft_s=600 + 60 * (i % 5)), timeout=5)
                    except grpc.aio.AioRpcError:
                        return  # the server died: this one was never acknowledged
                    acked.append(rid)
                    i += 1

            async def leaser() -> None:
                while True:
                    try:
                        got = (await stub.Lease(queue_pb2.LeaseRequest(worker_id="w", max_requests=3), timeout=5)).leases
                    except grpc.aio.AioRpcError:
                        return
                    for ls in got:
                        leased[ls.request.request_id] = ls.lease_id
                    await asyncio.sleep(0)

            tasks = [asyncio.create_task(enqueuer(k)) for k in range(4)] + [asyncio.create_task(leaser())]

            async def enough() -> bool:
                return len(acked) >= 300 and len(leased) >= 30
            await eventually(enough, timeout_s=60)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            await asyncio.gather(*tasks)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    proc, port_file = _start_queue(db, log)
    try:
        port = await wait_port_file(port_file, proc)
        await wait_healthy(f"127.0.0.1:{port}", proc=proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = queue_pb2_grpc.QueueStub(ch)
            states = {}
            for rid in acked:  # every acknowledged Enqueue is there
                info = await stub.GetRequest(queue_pb2.GetRequestRequest(request_id=rid))
                states[rid] = info.state
            stats = (await stub.GetStats(queue_pb2.QueueGetStatsRequest())).stats
            # ... exactly once: the store holds no more requests than were acknowledged (+ at most the
            # in-flight ones whose reply the kill swallowed).
            assert len(acked) <= stats.queued + stats.leased <= len(acked) + 4
            # Leased-but-unacked requests come back after their 1 s lease timeout and can be leased again.
            relased: set[str] = set()

            async def all_back() -> bool:
                got = (await stub.Lease(queue_pb2.LeaseRequest(worker_id="after", max_requests=500))).leases
                relased.update(ls.request.request_id for ls in got)
                return set(leased) <= relased
            await eventually(all_back, timeout_s=30, interval_s=0.2)
            assert all(s in (queue_pb2.QUEUED_REQUEST_STATE_QUEUED, queue_pb2.QUEUED_REQUEST_STATE_LEASED)
                       for s in states.values())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_watch_stats_flags_a_projected_slo_violation(tmp_path):
    # 10 tokens/s of batch capacity cannot start 30 requests within a 2-minute TTFT SLO.
    cfg = QueueConfig(db_path=str(tmp_path / "q.db"), group_granularity_s=60.0)
    srv = await serve(cfg, port=0, capacity=CapacityTracker(prior_throughput_tokens_per_s=10.0))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = queue_pb2_grpc.QueueStub(ch)
            for i in range(30):
                await stub.Enqueue(req(f"v{i}", ttft_s=120))
            stream = stub.WatchStats(queue_pb2.QueueWatchStatsRequest(interval_ms=50))
            seen = []
            async for msg in stream:
                seen.append(msg.stats)
                if len(seen) == 2:
                    break
            stream.cancel()
            g = seen[-1].groups[0]
            assert g.size == 30 and g.projected_slo_violation and g.slack_s < 0
            assert g.estimated_wait_p95_s > 120
            assert seen[-1].capacity[0].throughput_tokens_per_s == 10.0
            head = await stub.GetRequest(queue_pb2.GetRequestRequest(request_id="v0"))
            tail = await stub.GetRequest(queue_pb2.GetRequestRequest(request_id="v29"))
            assert head.position == 0 and tail.position == 29
            assert head.estimated_wait_p95_s < tail.estimated_wait_mean_s
    finally:
        await srv.stop()
