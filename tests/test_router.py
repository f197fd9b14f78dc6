"""The router over real gRPC: a real etcd for membership, simulated engine agents served on loopback and
registered there, the real queue service."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chiron.v1 import queue_pb2, router_pb2, router_pb2_grpc, types_pb2
from services.common.membership import MembershipWatcher
from services.gateway.router_mux import RouterMux
from services.queue.server import serve as serve_queue
from services.queue.store import QueueConfig
from services.router.routing import (
    EngineStatsView,
    InstanceLoad,
    Rejected,
    RouterConfig,
    choose_instance,
    classify,
    instance_load,
)
from services.router.server import RouterService
from services.router.server import serve as serve_router
from tests.conftest import eventually, start_etcd, start_sim_engine

pytestmark = pytest.mark.timeout(120)
MODEL = "llama-3-8b"




@pytest.fixture
async def cluster(tmp_path):
    etcd = start_etcd(tmp_path / "etcd")
    engines = [await start_sim_engine("inter-1", "interactive", cap=2, speedup=20.0, etcd=etcd.endpoint),
               await start_sim_engine("mixed-1", "mixed", cap=8, speedup=20.0, etcd=etcd.endpoint)]
    watcher = MembershipWatcher(etcd.endpoint)
    await watcher.start()
    await watcher.wait_for(lambda m: len(m) == 2, timeout_s=20)
    queue = await serve_queue(QueueConfig(db_path=str(tmp_path / "q.db")), port=0)
    router = await serve_router(RouterService(RouterConfig(), watcher, f"127.0.0.1:{queue.port}", stats_interval_s=0.1), port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    yield router_pb2_grpc.RouterStub(channel), router
    await channel.close()
    await router.stop()
    await queue.stop()
    await watcher.stop()
    for srv, reg in engines:
        await reg.close()
        await srv.stop(grace_s=1.0)
    etcd.stop()


def req(rid: str, max_tokens: int = 30, **slo) -> types_pb2.InferenceRequest:
    return types_pb2.InferenceRequest(request_id=rid, model=MODEL, prompt_token_ids=list(range(1, 65)),
                                      max_tokens=max_tokens, slo=types_pb2.SLO(**slo))


async def generate(stub, r) -> tuple[str, list]:
    msgs = [m async for m in stub.Generate(router_pb2.RouterGenerateRequest(request=r))]
    return msgs[0].instance_id, [m.chunk for m in msgs]


async def test_interactive_requests_fill_interactive_then_overflow_to_mixed(cluster):
    stub, router = cluster
    # Long enough (800 tokens) that all six are in flight together even on a loaded CI machine.
    results = await asyncio.gather(*(generate(stub, req(f"r{i}", 800, ttft_ms=5000)) for i in range(6)))
    where = [iid for iid, _ in results]
    assert where.count("inter-1") == 2 and where.count("mixed-1") == 4  # 2 slots on the interactive one
    for _, chunks in results:
        assert chunks[-1].finish_reason == types_pb2.FINISH_REASON_LENGTH and chunks[-1].num_generated_tokens == 800
    assert router.service.accepted == 6


async def test_batch_requests_go_through_the_queue(cluster):
    stub, _ = cluster
    with pytest.raises(grpc.aio.AioRpcError) as e:  # a batch SLO on the streaming path
        await generate(stub, req("slow", ttft_ms=3_600_000))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "Submit" in e.value.details()
    sub = await stub.Submit(router_pb2.SubmitRequest(request=req("job-1", slo_class="batch")))
    assert sub.request_id == "job-1" and sub.group_id.startswith(MODEL)
    res = (await stub.GetResult(router_pb2.GetResultRequest(request_id="job-1"))).result
    assert res.state == queue_pb2.QUEUED_REQUEST_STATE_QUEUED and res.position == 0
    stream = stub.StreamResult(router_pb2.StreamResultRequest(request_id="job-1"))
    first = await stream.read()
    assert first.result.state == queue_pb2.QUEUED_REQUEST_STATE_QUEUED
    assert (await stub.Cancel(router_pb2.RouterCancelRequest(request_id="job-1"))).cancelled
    last = first
    while (msg := await stream.read()) is not grpc.aio.EOF:
        last = msg
    assert last.result.state == queue_pb2.QUEUED_REQUEST_STATE_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetResult(router_pb2.GetResultRequest(request_id="never"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def read_all(call) -> list[router_pb2.RouterGenerateResponse]:
    out = []
    while (m := await call.read()) is not grpc.aio.EOF:
        out.append(m)
    return out


async def test_generate_many_serves_concurrent_requests_on_one_stream_each_with_its_tokens_and_status(cluster):
    stub, router = cluster
    mux = RouterMux(stub)
    try:
        # The same six requests as through Generate, plus refusals: each ends with its own status.
        calls = [mux.generate(req(f"m{i}", 800, ttft_ms=5000)) for i in range(6)]
        batch = mux.generate(req("slow", ttft_ms=3_600_000))
        empty = mux.generate(types_pb2.InferenceRequest(model=MODEL, max_tokens=5))
        results = await asyncio.gather(*(read_all(c) for c in calls))
        assert len(mux._streams) == 1  # all of them on one GenerateMany stream
        where = [msgs[0].instance_id for msgs in results]
        assert where.count("inter-1") == 2 and where.count("mixed-1") == 4
        for msgs in results:
            assert sum(len(m.chunk.token_ids) for m in msgs) == 800
            assert msgs[-1].chunk.finish_reason == types_pb2.FINISH_REASON_LENGTH
            assert all(not m.instance_id for m in msgs[1:])
        for call, code, fragment in ((batch, grpc.StatusCode.FAILED_PRECONDITION, "Submit"),
                                     (empty, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.read()
            assert e.value.code() == code and fragment in e.value.details()
        assert router.service.accepted == 6
        # Finished requests leave nothing behind at the router.
        assert sum(router.service._inflight.values()) == 0
    finally:
        await mux.close()


async def test_generate_many_cancel_deadline_and_a_closed_stream_free_the_engine_slots(cluster):
    stub, router = cluster
    inflight = router.service._inflight

    async def freed() -> bool:
        return sum(inflight.values()) == 0

    def cancelled() -> float:  # requests the router stopped before their end
        return router.service.metrics.registry.get_sample_value(
            "chiron_requests_total", {"class": "interactive", "outcome": "cancelled"}) or 0.0

    async def one_more_cancelled() -> bool:
        return cancelled() == before + 1

    mux = RouterMux(stub)
    # Cancel: the router stops the request (its engine slot frees); the stream serves the next one.
    call = mux.generate(req("long", 1000, ttft_ms=5000))
    assert (await call.read()).instance_id
    assert call.cancel() and not call.cancel()
    before = cancelled()
    with pytest.raises(asyncio.CancelledError):
        await call.read()
    await eventually(one_more_cancelled)
    await eventually(freed)
    assert sum(len(m.chunk.token_ids) for m in await read_all(mux.generate(req("next", 5)))) == 5
    # Deadline: enforced here and passed on to the router.
    late = mux.generate(req("late", 1000, ttft_ms=5000), timeout_s=0.3)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await read_all(late)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(freed)
    # The stream closed under a running request: the request ends CANCELLED here and is stopped at the router.
    running = mux.generate(req("orphan", 1000, ttft_ms=5000))
    assert (await running.read()).instance_id
    before = cancelled()
    await mux.close()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await read_all(running)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    await eventually(one_more_cancelled)
    await eventually(freed)


async def test_generate_many_refuses_a_stream_id_already_running(cluster):
    stub, _ = cluster
    outgoing: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (m := await outgoing.get()) is not None:
            yield m

    call = stub.GenerateMany(requests())
    start = router_pb2.GenerateManyRequest(stream_id=7, generate=router_pb2.RouterGenerateRequest(request=req("a", 200, ttft_ms=5000)))
    outgoing.put_nowait(start)
    outgoing.put_nowait(start)
    refused = None
    tokens = 0
    while True:
        m = await call.read()
        assert m.stream_id == 7
        if m.end and m.code:
            refused = m
        else:
            tokens += len(m.response.chunk.token_ids)
        if m.end and not m.code:
            break
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "already running" in refused.message
    assert tokens == 200  # the first request with that id was not disturbed
    outgoing.put_nowait(None)  # half-close: the stream ends once nothing runs
    assert await call.read() is grpc.aio.EOF


@pytest.mark.parametrize(("r", "code", "fragment"), [
    (types_pb2.InferenceRequest(model=MODEL, max_tokens=5), "INVALID_ARGUMENT", "prompt is empty"),
    (types_pb2.InferenceRequest(model=MODEL, prompt_token_ids=[1], max_tokens=0), "INVALID_ARGUMENT", "max_tokens"),
    (types_pb2.InferenceRequest(prompt_token_ids=[1], max_tokens=5), "INVALID_ARGUMENT", "model is required"),
    (types_pb2.InferenceRequest(model=MODEL, prompt_token_ids=[1], max_tokens=5, slo=types_pb2.SLO(slo_class="gold")),
     "INVALID_ARGUMENT", "unknown SLO class"),
    (types_pb2.InferenceRequest(model=MODEL, prompt_token_ids=[1], max_tokens=5, slo=types_pb2.SLO(ttft_ms=-1)),
     "INVALID_ARGUMENT", "SLO bounds"),
    (types_pb2.InferenceRequest(model="other", prompt_token_ids=[1], max_tokens=5), "UNAVAILABLE", "no interactive"),
    (types_pb2.InferenceRequest(model=MODEL, prompt_token_ids=[1], max_tokens=99_999), "INVALID_ARGUMENT", "context"),
])
async def test_bad_input_gets_a_status_and_a_message(cluster, r, code, fragment):
    stub, _ = cluster
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await generate(stub, r)
    assert e.value.code() == getattr(grpc.StatusCode, code)
    assert fragment in e.value.details()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.builds(types_pb2.InferenceRequest,
                 request_id=st.text(max_size=20), model=st.sampled_from([MODEL, "", "x" * 300]),
                 prompt_token_ids=st.lists(st.integers(-5, 200_000), max_size=40),
                 max_tokens=st.integers(0, 2**32 - 1),
                 slo=st.builds(types_pb2.SLO, ttft_ms=st.integers(-(2**40), 2**40), itl_ms=st.integers(-(2**31), 2**31 - 1),
                               slo_class=st.sampled_from(["", "chat", "nope"])),
                 request_class=st.integers(0, 7)))
async def test_malformed_requests_get_a_status_and_the_router_keeps_serving(cluster, r):
    stub, _ = cluster
    try:
        await asyncio.wait_for(generate(stub, r), timeout=30)
    except grpc.aio.AioRpcError as e:
        assert e.code() != grpc.StatusCode.UNKNOWN, e.details()  # every refusal is a deliberate status
    _, chunks = await generate(stub, req("ok", 3))
    assert chunks[-1].num_generated_tokens == 3


def test_classification_and_admission_are_pure():
    cfg = RouterConfig()
    assert classify(cfg, slo_class="", ttft_ms=0, itl_ms=0, request_class=0).request_class == "interactive"
    assert classify(cfg, slo_class="", ttft_ms=120_000, itl_ms=0, request_class=0).request_class == "batch"
    assert classify(cfg, slo_class="chat", ttft_ms=0, itl_ms=0, request_class=0).ttft_ms == 2000
    assert classify(cfg, slo_class="", ttft_ms=120_000, itl_ms=0, request_class=1).request_class == "interactive"
    full = [InstanceLoad("a", "interactive", "x", MODEL, 4, 4, 40, ttft_p50_ms=500.0)]
    with pytest.raises(Rejected) as e:
        choose_instance(full, MODEL, 2000)  # 40 waiting at 4 per batch: ~5.5 s projected
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert choose_instance(full, MODEL, 10_000).instance_id == "a"  # a relaxed SLO still fits


def test_a_mixed_instance_without_batch_work_shares_interactive_load_and_one_lending_is_kept_for_a_queue():
    # A MIXED instance without batch work lends nothing: it is as good as an INTERACTIVE one, and the less loaded
    # of the two takes the request (idle "m" over "i" with 100 running, and over "i" where 6 interactive requests
    # queue). One busy with batch work is used only when no INTERACTIVE instance has room, even one with a queue
    # (not bound: fewer than a quarter of its 100 running), so its idle capacity stays lent to the batch queue.
    inter = InstanceLoad("i", "interactive", "x", MODEL, 800, 100, 0)
    queued = InstanceLoad("i", "interactive", "x", MODEL, 800, 100, 6)
    idle_mixed = InstanceLoad("m", "mixed", "y", MODEL, 16, 0, 0)
    lending = InstanceLoad("m", "mixed", "y", MODEL, 800, 40, 0, batch_requests=40)
    assert queued.room > 0 and queued.queued and not inter.queued
    assert choose_instance([inter, idle_mixed], MODEL, 10_000).instance_id == "m"
    assert choose_instance([queued, idle_mixed], MODEL, 10_000).instance_id == "m"
    assert choose_instance([inter, lending], MODEL, 10_000).instance_id == "i"
    assert choose_instance([queued, lending], MODEL, 10_000).instance_id == "i"
    # A MIXED instance's batch requests in its waiting list are not an interactive queue.
    busy_lending = InstanceLoad("m", "mixed", "y", MODEL, 800, 40, 8, batch_requests=48)
    assert not busy_lending.queued
    assert choose_instance([busy_lending], MODEL, 10_000).instance_id == "m"


def test_within_a_tier_the_fewest_waiting_requests_win_over_the_most_room():
    # Two INTERACTIVE instances without a queue (fewer than 4 waiting): one with a cap of 400 and 3 prompts waiting
    # for their prefills, one with a cap of 64 and none. The new request starts at once on the second, where the
    # most-room rule would put it behind three prefills on the first.
    big = InstanceLoad("big", "interactive", "x", MODEL, 400, 30, 3)
    small = InstanceLoad("small", "interactive", "y", MODEL, 64, 30, 0)
    assert big.room > small.room and not big.queued
    assert choose_instance([big, small], MODEL, 2_000).instance_id == "small"
    # Requests this router sent since the last stats count as waiting: four sent to "small" make it the busier one.
    sent = InstanceLoad("small", "interactive", "y", MODEL, 64, 30, 0, pending=4)
    assert choose_instance([big, sent], MODEL, 2_000).instance_id == "big"
    # Equal queues and running counts: the most room wins.
    assert choose_instance([InstanceLoad("big", "interactive", "x", MODEL, 400, 30, 0), small], MODEL,
                           2_000).instance_id == "big"
    # Equal queues: the fewer running win over the most room (each request beside it lengthens its ITL).
    light = InstanceLoad("light", "interactive", "y", MODEL, 64, 10, 0)
    assert choose_instance([InstanceLoad("big", "interactive", "x", MODEL, 400, 30, 0), light], MODEL,
                           2_000).instance_id == "light"


async def test_an_instance_that_registered_after_the_last_stats_refresh_is_used_at_once(tmp_path):
    """Start-up race: the cluster reports an instance serving (etcd) before the router's next stats refresh; the
    first request must not be refused for want of stats."""
    etcd = start_etcd(tmp_path / "etcd")
    watcher = MembershipWatcher(etcd.endpoint)
    await watcher.start()
    queue = await serve_queue(QueueConfig(db_path=str(tmp_path / "q.db")), port=0)
    router = await serve_router(RouterService(RouterConfig(), watcher, f"127.0.0.1:{queue.port}", stats_interval_s=3600),
                                port=0)
    srv, reg = await start_sim_engine("late-1", "interactive", cap=4, speedup=20.0, etcd=etcd.endpoint)
    try:
        await watcher.wait_for(lambda m: "late-1" in m, timeout_s=20)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as ch:
            instance, chunks = await generate(router_pb2_grpc.RouterStub(ch), req("first", ttft_ms=10_000, itl_ms=1_000))
        assert instance == "late-1" and sum(len(c.token_ids) for c in chunks) == 30
    finally:
        await router.stop()
        await queue.stop()
        await reg.close()
        await srv.stop(grace_s=1.0)
        await watcher.stop()
        etcd.stop()


def test_instance_load_builder_reads_engine_stats_fields():
    stats = EngineStatsView(max_batch_size=32, num_running=5, num_waiting=1, num_batch_requests=2, ttft_p50_ms=80.0)
    assert instance_load("m0", "mixed", "h:1", "llama-3-8b", stats) == InstanceLoad(
        "m0", "mixed", "h:1", "llama-3-8b", 32, 5, 1, 80.0, batch_requests=2)
