"""Integration tests of the engine agent over real gRPC on loopback (simulated A100 backend)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chiron.v1 import engine_pb2, engine_pb2_grpc, types_pb2
from services.common.metrics import engine_families
from services.engine.backend import SimulatedBackend, StepStats
from services.engine.core import EngineConfig
from services.engine.local_autoscaler import LocalAutoscalerConfig
from services.engine.server import AgentConfig, EngineAgent, serve
from tests.conftest import eventually

REPO = Path(__file__).resolve().parents[1]


SPEEDUP = 20.0  # the test engines' clock runs this many times the wall clock


async def start_agent(speedup: float = SPEEDUP, autoscale: bool = False, batch: int = 64, itl_slo_ms: float = 50.0,
                      **engine_kw):
    backend = SimulatedBackend("llama-3-8b", EngineConfig(max_num_seqs=batch, **engine_kw), speedup=speedup)
    cfg = AgentConfig(instance_id="test-engine", autoscale=autoscale,
                      autoscaler=LocalAutoscalerConfig(itl_slo_ms=itl_slo_ms, initial_batch_size=min(batch, 1024),
                                                       control_interval_s=1.0))
    srv = await serve(EngineAgent(backend, cfg), port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
    return srv, channel, engine_pb2_grpc.EngineStub(channel)


def make_request(rid: str, prompt_len: int = 64, max_tokens: int = 20, **kw) -> engine_pb2.GenerateRequest:
    return engine_pb2.GenerateRequest(request=types_pb2.InferenceRequest(
        request_id=rid, prompt_token_ids=list(range(1, prompt_len + 1)), max_tokens=max_tokens, **kw))


async def collect(stub, req) -> list[engine_pb2.GenerateResponse]:
    return [r async for r in stub.Generate(req)]


@pytest.fixture
async def agent():
    srv, channel, stub = await start_agent()
    yield srv, stub
    await channel.close()
    await srv.stop(grace_s=1.0)


async def test_concurrent_streaming_with_ttft_and_itl(agent):
    _, stub = agent
    t0 = time.time()
    results = await asyncio.gather(*(collect(stub, make_request(f"r{i}", 32 + i, 10 + i)) for i in range(8)))
    t1 = time.time()
    for i, msgs in enumerate(results):
        tokens = [t for m in msgs for t in m.token_ids]
        assert len(tokens) == 10 + i
        assert msgs[-1].finish_reason == types_pb2.FINISH_REASON_LENGTH
        assert msgs[-1].num_generated_tokens == 10 + i
        token_msgs = [m for m in msgs if m.token_ids]
        assert token_msgs[0].ttft_ms > 0 and token_msgs[0].itl_ms == 0
        assert all(m.itl_ms > 0 for m in token_msgs[1:])
        # Continuous batching: 8 concurrent decodes on an A100 model take ~12-20 ms per token. No token comes faster
        # than the model allows; the typical one (median) within 200 ms. A bound on every token would test the host:
        # this engine runs 20x the wall clock, so a 10-ms scheduling stall of a loaded machine reads as 200 ms.
        itls = sorted(m.itl_ms for m in token_msgs[1:])
        assert itls[0] > 5 and itls[len(itls) // 2] < 200
        # emitted_time is the wall clock of the engine step that made the chunk: inside the call, in order, and
        # consecutive chunks are their itl_ms apart (engine-clock ms; this engine runs 20x the wall clock).
        emitted = [m.emitted_time.ToNanoseconds() / 1e9 for m in msgs]
        assert t0 <= emitted[0] and emitted[-1] <= t1 and emitted == sorted(emitted)
        for a, b in zip(token_msgs, token_msgs[1:], strict=False):
            gap_ms = (b.emitted_time.ToNanoseconds() - a.emitted_time.ToNanoseconds()) / 1e6 * SPEEDUP
            assert gap_ms == pytest.approx(b.itl_ms * len(b.token_ids), abs=0.01)


async def test_stream_interval_coalesces_tokens_into_fewer_messages(agent):
    _, stub = agent
    every, coalesced, whole = await asyncio.gather(
        collect(stub, make_request("si-1", 32, 23)), collect(stub, make_request("si-5", 32, 23, stream_interval=5)),
        collect(stub, make_request("si-all", 32, 23, stream_interval=23)))
    sizes = [len(m.token_ids) for m in coalesced if m.token_ids]
    # The first token at once, then chunks of at least 5, the rest with the finish; nothing lost or repeated.
    assert sizes[0] == 1 and all(n >= 5 for n in sizes[1:-1]) and sum(sizes) == 23
    assert len(sizes) < len([m for m in every if m.token_ids]) == 23
    assert [len(m.token_ids) for m in whole if m.token_ids] == [1, 22]
    assert whole[-1].finish_reason == types_pb2.FINISH_REASON_LENGTH and whole[-1].num_generated_tokens == 23
    # itl_ms stays per token: a chunk's time since the previous chunk over its token count.
    per_token = [m.itl_ms for m in coalesced[1:] if m.token_ids]
    assert all(5 < x < 200 for x in per_token)


async def test_stats_and_watch(agent):
    _, stub = agent
    await collect(stub, make_request("warm", 128, 30))
    stats = (await stub.GetStats(engine_pb2.GetStatsRequest())).stats
    assert stats.instance_id == "test-engine" and stats.backend == "simulated" and stats.model == "llama-3-8b"
    assert stats.max_batch_size == 64
    assert stats.generated_tokens_total == 30 and stats.finished_requests_total == 1
    assert stats.interactive_prompt_tokens_mean == 128  # the one interactive prompt of the window (the scaler's P̄)
    assert stats.itl_p50_ms > 0 and stats.itl_p95_ms >= stats.itl_p50_ms
    assert 350_000 < stats.kv_cache_capacity_tokens < 450_000
    stream = stub.WatchStats(engine_pb2.WatchStatsRequest(interval_ms=50))
    seen = []
    async for r in stream:
        seen.append(r.stats)
        if len(seen) == 3:
            break
    stream.cancel()
    assert len(seen) == 3 and all(s.instance_id == "test-engine" for s in seen)


async def test_evict_returns_progress_and_resume_keeps_tokens(agent):
    srv, stub = agent
    call = stub.Generate(make_request("long", 256, 400))
    got: list[int] = []

    async def consume():
        async for m in call:
            got.extend(m.token_ids)
            if m.finish_reason:
                return m.finish_reason

    consumer = asyncio.create_task(consume())

    async def some_tokens():
        return len(got) >= 20

    await eventually(some_tokens)
    progress = (await stub.Evict(engine_pb2.EvictRequest(request_id="long"))).progress
    reason = await consumer
    assert reason == types_pb2.FINISH_REASON_EVICTED
    assert list(progress.generated_token_ids) == got
    assert progress.num_prompt_tokens == 256 and 20 <= len(got) < 400
    assert progress.kv_offloaded_tokens >= 256 and progress.kv_offload_ms > 0
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Evict(engine_pb2.EvictRequest(request_id="long"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    # Resume on another engine instance: only the remaining tokens are generated, the old ones are kept.
    srv2, ch2, stub2 = await start_agent()
    try:
        msgs = await collect(stub2, make_request("long", 256, 400, resume_token_ids=progress.generated_token_ids))
        new = [t for m in msgs for t in m.token_ids]
        assert len(got) + len(new) == 400
        assert msgs[-1].num_generated_tokens == 400
    finally:
        await ch2.close()
        await srv2.stop(grace_s=1.0)


async def test_client_cancel_aborts_and_frees_the_slot(agent):
    srv, stub = agent
    call = stub.Generate(make_request("cancel-me", 64, 2000))
    async for m in call:
        if m.token_ids:
            break
    assert srv.agent.backend.snapshot().num_running == 1
    call.cancel()

    async def freed():
        snap = srv.agent.backend.snapshot()
        return snap.num_running == 0 and snap.kv_cache_usage == 0.0

    await eventually(freed)


@pytest.mark.parametrize("kw, fragment", [
    ({"prompt_len": 0}, "prompt is empty"),
    ({"max_tokens": 0}, "max_tokens must be > 0"),
    ({"prompt_len": 8000, "max_tokens": 500}, "exceeds the model's context"),
    ({"request_class": 7}, "unknown request_class"),
    ({"slo": types_pb2.SLO(ttft_ms=-5)}, "SLO bounds must be >= 0"),
    ({"slo": types_pb2.SLO(itl_ms=-1)}, "SLO bounds must be >= 0"),
    ({"model": "gpt-9"}, "is not served here"),
])
async def test_invalid_requests_are_rejected_and_serving_continues(agent, kw, fragment):
    _, stub = agent
    prompt_len = kw.pop("prompt_len", 16)
    max_tokens = kw.pop("max_tokens", 5)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await collect(stub, make_request("bad", prompt_len, max_tokens, **kw))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in e.value.details()
    ok = await collect(stub, make_request("good", 16, 5))
    assert sum(len(m.token_ids) for m in ok) == 5


async def test_request_that_can_never_fit_the_kv_cache_is_resource_exhausted():
    srv, channel, stub = await start_agent(kv_capacity_tokens=2048)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(stub, make_request("huge", 3000, 100))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "can never be scheduled" in e.value.details()
        ok = await collect(stub, make_request("small", 100, 10))
        assert sum(len(m.token_ids) for m in ok) == 10
    finally:
        await channel.close()
        await srv.stop(grace_s=1.0)


async def test_local_autoscaler_grows_batch_under_saturating_load():
    # The engine runs on the wall clock, so a host busy elsewhere (a loaded CI box) delays its steps, and the delay
    # shows in engine time multiplied by the speed-up: at 10× and a 50 ms SLO, 15 ms of lost CPU per step read as
    # 150 ms ITLs and halved the batch instead of growing it. 2× and a 200 ms SLO keep this test about growth.
    srv, channel, stub = await start_agent(speedup=2.0, autoscale=True, batch=4, itl_slo_ms=200.0)
    try:
        calls = [asyncio.create_task(collect(stub, make_request(f"s{i}", 64, 300))) for i in range(64)]

        async def grown():
            return srv.agent.backend.snapshot().max_batch_size > 16

        await eventually(grown, timeout_s=30)
        d = srv.agent.last_decision
        assert d is not None and d.latency_backpressure < 1.0
        for c in calls:
            c.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await channel.close()
        await srv.stop(grace_s=1.0)


async def test_a_late_control_step_is_counted_and_logged(caplog):
    backend = SimulatedBackend("llama-3-8b", EngineConfig(max_num_seqs=8), speedup=20.0)
    agent = EngineAgent(backend, AgentConfig(instance_id="late", autoscale=False,
                                             autoscaler=LocalAutoscalerConfig(initial_batch_size=8)))
    await backend.start()
    try:
        await agent.control_step()
        await agent.control_step()  # right after the first: on time
        assert agent.late_control_steps == 0
        agent._ctl_last_s -= 5.0 * backend.speedup  # as if the event loop had stalled for 5 s (interval: 0.05 s of wall time)
        with caplog.at_level("WARNING", logger="chiron.engine"):
            await agent.control_step()
        assert agent.late_control_steps == 1
        assert "since the previous control step" in caplog.text and "stayed at 8" in caplog.text
        assert agent.stats().late_control_steps_total == 1
        families = {f.name: f for f in engine_families(agent.stats())}
        assert families["chiron_engine_late_control_steps"].samples[0].value == 1
    finally:
        await backend.stop()


async def test_the_local_autoscaler_tells_decode_only_steps_from_prefill_steps():
    """Two steps of one interval: a decode-only one at 20 ms and a prefill one at 90 ms (mean ITL 72.5 ms, over
    the 50-ms SLO). With the decode-only step seen the cap is pinned (prefill-bound); with both steps prefilling
    nothing tells the two apart and it halves."""
    for prefill_tokens, action in ((0, "pin"), (512, "halve")):
        backend = SimulatedBackend("llama-3-8b", EngineConfig(max_num_seqs=8), speedup=20.0)
        agent = EngineAgent(backend, AgentConfig(instance_id="pf", autoscale=False, autoscaler=LocalAutoscalerConfig(
            itl_slo_ms=50.0, initial_batch_size=8, young_target_fraction=1.0)))
        await backend.start()
        try:
            await agent.control_step()  # opens the interval
            now = backend.now()
            agent._on_step(StepStats(now, 4, 0, 0.0, 4, 0, 0, ((20.0, 4),), (), True, num_prefill_tokens=prefill_tokens))
            agent._on_step(StepStats(now, 4, 0, 0.0, 12, 0, 0, ((90.0, 12),), (), True, num_prefill_tokens=512))
            d = await agent.control_step()
            assert d.action == action, d.reason
        finally:
            await backend.stop()


async def test_health_and_reflection(agent):
    srv, _ = agent
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="chiron.v1.Engine"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = [r async for r in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
        names = {s.name for s in responses[0].list_services_response.service}
        assert "chiron.v1.Engine" in names


async def test_draining_refuses_new_requests():
    srv, channel, stub = await start_agent()
    try:
        srv.agent.draining = True
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(stub, make_request("late", 16, 5))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
        await srv.stop(grace_s=1.0)


async def test_engine_subprocess_serves_and_drains_on_sigterm(tmp_path):
    from services.engine.demo import stop_process, wait_healthy, wait_port_file

    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "engine", "--port", "0", "--port-file",
                             str(port_file), "--speedup", "20"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        port = await wait_port_file(port_file, proc)
        await wait_healthy(f"127.0.0.1:{port}", proc=proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            msgs = await collect(engine_pb2_grpc.EngineStub(ch), make_request("sub", 32, 8))
        assert sum(len(m.token_ids) for m in msgs) == 8
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = stop_process(proc)
    assert rc == 0


def test_generated_stubs_are_current():
    out = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_demo_replays_the_azure_trace_end_to_end(tmp_path):
    """The README's main job, shortened: real agent subprocess, real trace, report with no lost request."""
    report_path = tmp_path / "demo.json"
    out = subprocess.run([sys.executable, "-m", "services.cli", "demo-engine", "--duration-s", "20", "--speedup", "5",
                          "--json", str(report_path)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import json

    report = json.loads(report_path.read_text())
    assert report["requests"] > 15 and report["completed"] == report["requests"]
    assert report["lost_requests"] == 0 and report["errors"] == 0
    assert report["timeline"] and report["max_batch_size_initial"] == 16
    assert 0.0 <= report["itl_slo_attainment"] <= 1.0 and report["throughput_tokens_per_s"] > 0
    assert "Local autoscaler over time" in out.stdout


async def test_a_request_resent_under_the_same_id_gets_only_its_own_tokens():
    # A gateway that loses its router resends the request, same id, through another router, which may pick the
    # same engine: the first copy is cancelled while an iteration that included it runs, and the second copy is
    # added before that iteration ends. The iteration's token belongs to the first copy, never to the second.
    from services.engine.backend import BackendRequest

    backend = SimulatedBackend("llama-3-8b", EngineConfig(max_num_seqs=8), speedup=1.0)
    await backend.start()
    try:
        first = backend.generate(BackendRequest("same-id", tuple(range(3, 67)), 50))
        await first.__anext__()  # its first token: it is decoding, in every iteration from now on
        await asyncio.sleep(0.005)  # inside the next iteration (each takes ~10 ms at speedup 1)
        await first.aclose()  # cancelled mid-iteration
        outs = [out async for out in backend.generate(BackendRequest("same-id", tuple(range(3, 67)), 5))]
        assert sum(len(o.token_ids) for o in outs) == 5, [(o.token_ids, o.num_generated) for o in outs]
        assert [o.num_generated for o in outs if o.token_ids] == [1, 2, 3, 4, 5]
    finally:
        await backend.stop()
