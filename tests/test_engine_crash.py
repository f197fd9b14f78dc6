"""Engine crashes are invisible to interactive clients, over real processes: a real etcd, the
queue in this process, and a router and simulated engine agents as ``chiron`` subprocesses. An engine is SIGKILLed
while it serves requests (at a condition, never a fixed sleep): every request finishes on the other engine with
exactly ``max_tokens`` tokens, token indices (``num_generated_tokens``) continuing without a gap or a repeat, and no
error; a request the dead engine had not started yet starts on the other one; with no other engine the client
gets UNAVAILABLE naming the dead one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from chiron.v1 import engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc, types_pb2
from services.engine.demo import stop_process, wait_port_file
from services.queue.server import serve as serve_queue
from services.queue.store import QueueConfig
from services.router.server import engine_failed
from tests.conftest import eventually, start_etcd

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
MODEL = "llama-3-8b"


class Procs:
    """``chiron`` subprocesses on free ports (logs in ``tmp``); :meth:`close` stops those still running."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    async def start(self, name: str, *args: str) -> int:
        port_file = self.tmp / f"{name}.port"
        log = (self.tmp / f"{name}.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args, "--port", "0", "--port-file",
                                 str(port_file)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs[name] = proc
        self.ports[name] = await wait_port_file(port_file, proc)
        return self.ports[name]

    async def engine(self, iid: str, etcd: str, *, cap: int = 8) -> int:
        """A simulated interactive engine at real A100 speed (about 10 ms a token), registered in ``etcd``."""
        return await self.start(iid, "engine", "--instance-id", iid, "--role", "interactive", "--etcd", etcd,
                                "--static-batch-size", str(cap), "--speedup", "1")

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def close(self) -> None:
        for proc in self.procs.values():
            stop_process(proc, timeout_s=10)


@pytest.fixture
async def world(tmp_path):
    etcd = start_etcd(tmp_path / "etcd")
    queue = await serve_queue(QueueConfig(db_path=str(tmp_path / "q.db")), port=0)
    procs = Procs(tmp_path)
    try:
        yield etcd.endpoint, f"127.0.0.1:{queue.port}", procs
    finally:
        procs.close()
        await queue.stop()
        etcd.stop()


async def start_router(procs: Procs, etcd: str, queue: str) -> router_pb2_grpc.RouterStub:
    port = await procs.start("router", "router", "--etcd", etcd, "--queue", queue, "--stats-interval-s", "0.1")
    return router_pb2_grpc.RouterStub(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))


async def wait_instances(router: router_pb2_grpc.RouterStub, n: int) -> None:
    async def seen() -> bool:
        models = (await router.ListModels(router_pb2.ListModelsRequest())).models
        return sum(m.interactive_instances for m in models) == n
    await eventually(seen)


@dataclass
class Stream:
    """One client stream as the client saw it: its messages, or how it failed."""

    request_id: str
    max_tokens: int
    chunks: list[engine_pb2.GenerateResponse] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)  # instance_id of every message that names one, in order
    moves: list[int] = field(default_factory=list)  # index in chunks of each of those messages
    error: grpc.aio.AioRpcError | None = None

    @property
    def tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    def resumed_after(self) -> int:
        """Tokens the client had when the request moved to its second instance (asserting that the move's first
        chunk carries no second TTFT but the gap the client saw as ITL)."""
        first = self.chunks[self.moves[1]]
        assert first.ttft_ms == 0 and first.itl_ms > 0 and first.token_ids
        return first.num_generated_tokens - len(first.token_ids)

    def check_complete(self) -> None:
        """Exactly ``max_tokens`` tokens, indices continuing chunk to chunk, one finish (LENGTH) at the end."""
        assert self.error is None, f"{self.request_id}: {self.error.code()} {self.error.details()}"
        count = 0
        for c in self.chunks:
            count += len(c.token_ids)
            assert c.num_generated_tokens == count, f"{self.request_id}: index {c.num_generated_tokens} after {count}"
        assert count == self.max_tokens
        assert [c.finish_reason for c in self.chunks if c.finish_reason] == [types_pb2.FINISH_REASON_LENGTH]
        assert self.chunks[-1].finish_reason == types_pb2.FINISH_REASON_LENGTH
        assert all(c.request_id == self.request_id for c in self.chunks)


async def run_stream(router: router_pb2_grpc.RouterStub, s: Stream, prompt_len: int = 64) -> None:
    r = types_pb2.InferenceRequest(request_id=s.request_id, model=MODEL, prompt_token_ids=list(range(1, prompt_len + 1)),
                                   max_tokens=s.max_tokens, ignore_eos=True)
    try:
        async for m in router.Generate(router_pb2.RouterGenerateRequest(request=r), timeout=60):
            if m.instance_id:
                s.instances.append(m.instance_id)
                s.moves.append(len(s.chunks))
            s.chunks.append(m.chunk)
    except grpc.aio.AioRpcError as e:
        s.error = e


async def test_streams_cut_by_a_killed_engine_resume_on_the_other_without_a_gap_or_a_repeat(world):
    etcd, queue, procs = world
    await procs.engine("engine-a", etcd)
    await procs.engine("engine-b", etcd)
    router = await start_router(procs, etcd, queue)
    await wait_instances(router, 2)
    streams = [Stream(f"req-{i}", 300) for i in range(6)]
    tasks = [asyncio.ensure_future(run_stream(router, s)) for s in streams]

    async def all_streaming() -> bool:
        return all(s.tokens >= 10 for s in streams)
    await eventually(all_streaming)
    victim = max(("engine-a", "engine-b"), key=lambda iid: sum(s.instances[:1] == [iid] for s in streams))
    survivor = "engine-b" if victim == "engine-a" else "engine-a"
    cut = [s for s in streams if s.instances[0] == victim]
    before = {s.request_id: s.tokens for s in cut}
    procs.kill(victim)
    await asyncio.gather(*tasks)

    for s in streams:
        s.check_complete()
    for s in cut:  # resumed on the survivor after what the client had (at least what it had at the kill)
        assert s.instances == [victim, survivor], s.instances
        assert s.resumed_after() >= before[s.request_id]
    for s in streams:
        if s not in cut:
            assert s.instances == [survivor]
    assert all(s.chunks[0].ttft_ms > 0 for s in streams)
    assert sum(c.ttft_ms > 0 for s in streams for c in s.chunks) == len(streams)  # one TTFT per request


async def test_a_request_the_killed_engine_had_not_started_starts_on_the_other(world):
    etcd, queue, procs = world
    port_a = await procs.engine("engine-a", etcd, cap=1)  # one at a time: a second request waits there
    router = await start_router(procs, etcd, queue)
    await wait_instances(router, 1)
    running, waiting = Stream("long", 400), Stream("waiting", 50)
    tasks = [asyncio.ensure_future(run_stream(router, running))]

    async def started() -> bool:
        return running.tokens >= 1
    await eventually(started)
    tasks.append(asyncio.ensure_future(run_stream(router, waiting)))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port_a}") as ch:
        async def queued_on_a() -> bool:
            return (await engine_pb2_grpc.EngineStub(ch).GetStats(engine_pb2.GetStatsRequest())).stats.num_waiting >= 1
        await eventually(queued_on_a)
    port_b = await procs.engine("engine-b", etcd)
    await wait_instances(router, 2)
    assert waiting.tokens == 0 and running.tokens < running.max_tokens
    procs.kill("engine-a")
    await asyncio.gather(*tasks)

    running.check_complete()
    waiting.check_complete()
    assert running.instances == ["engine-a", "engine-b"]
    assert waiting.instances == ["engine-b"]  # the client never saw engine-a: sent again, same id
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as ch:
        stats = (await engine_pb2_grpc.EngineStub(ch).GetStats(engine_pb2.GetStatsRequest())).stats
    # engine-b served each once: the waiting request whole, the long one only past what the client had.
    assert stats.finished_requests_total == 2
    assert stats.generated_tokens_total == waiting.max_tokens + running.max_tokens - running.resumed_after()


async def test_with_no_other_engine_the_client_gets_unavailable_naming_the_dead_one(world):
    etcd, queue, procs = world
    await procs.engine("engine-a", etcd)
    router = await start_router(procs, etcd, queue)
    await wait_instances(router, 1)
    s = Stream("alone", 300)
    task = asyncio.ensure_future(run_stream(router, s))

    async def streaming() -> bool:
        return s.tokens >= 5
    await eventually(streaming)
    procs.kill("engine-a")
    await task
    assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "engine engine-a failed" in s.error.details() and "no other instance" in s.error.details()
    count = 0
    for c in s.chunks:  # what it got before the error is still without a gap or a repeat
        count += len(c.token_ids)
        assert c.num_generated_tokens == count


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize("code, details, failed", [
    (grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)", True),  # what a SIGKILLed engine gives
    (grpc.StatusCode.UNAVAILABLE, "engine is draining; send the request elsewhere", True),
    (grpc.StatusCode.CANCELLED, "Cancelled on the server side", True),
    (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", True),
    (grpc.StatusCode.UNKNOWN, "Connection reset by peer", True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", False),  # the client's deadline: its own end
    (grpc.StatusCode.INTERNAL, "engine bug", False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "prompt can never fit the KV cache", False),
    (grpc.StatusCode.INVALID_ARGUMENT, "bad", False),
])
def test_which_engine_call_errors_mean_the_engine_died(code, details, failed):
    assert engine_failed(_error(code, details)) is failed


async def test_generate_many_streams_cut_by_a_killed_engine_resume_too(world):
    """The gateway's path: several requests on one GenerateMany stream, their engine killed under them."""
    etcd, queue, procs = world
    await procs.engine("engine-a", etcd)
    router = await start_router(procs, etcd, queue)
    await wait_instances(router, 1)
    streams = {sid: Stream(f"many-{sid}", 300) for sid in range(4)}
    requests: asyncio.Queue = asyncio.Queue()
    for sid, s in streams.items():
        requests.put_nowait(router_pb2.GenerateManyRequest(stream_id=sid, timeout_s=60, generate=router_pb2.RouterGenerateRequest(
            request=types_pb2.InferenceRequest(request_id=s.request_id, model=MODEL, prompt_token_ids=list(range(1, 65)),
                                               max_tokens=s.max_tokens, ignore_eos=True))))

    async def outgoing():
        while (m := await requests.get()) is not None:
            yield m

    ends: dict[int, router_pb2.GenerateManyResponse] = {}

    async def read() -> None:
        async for m in router.GenerateMany(outgoing()):
            s = streams[m.stream_id]
            if m.HasField("response"):
                if m.response.instance_id:
                    s.instances.append(m.response.instance_id)
                    s.moves.append(len(s.chunks))
                s.chunks.append(m.response.chunk)
            if m.end:
                ends[m.stream_id] = m
                if len(ends) == len(streams):
                    requests.put_nowait(None)
    reader = asyncio.ensure_future(read())

    async def all_streaming() -> bool:
        return all(s.tokens >= 10 for s in streams.values())
    await eventually(all_streaming)
    await procs.engine("engine-b", etcd)
    await wait_instances(router, 2)
    procs.kill("engine-a")
    await asyncio.wait_for(reader, 60)
    for sid, s in streams.items():
        assert ends[sid].code == grpc.StatusCode.OK.value[0], ends[sid].message
        s.check_complete()
        assert s.instances == ["engine-a", "engine-b"]
        s.resumed_after()


_BATCH_ENGINE = """
import asyncio, sys
from pathlib import Path
from chiron.v1 import types_pb2
from services.engine.backend import SimulatedBackend
from services.engine.core import EngineConfig
from services.engine.local_autoscaler import LocalAutoscalerConfig
from services.engine.server import AgentConfig, EngineAgent, serve

async def main():
    agent = EngineAgent(SimulatedBackend("llama-3-8b", EngineConfig(max_num_seqs=8)), AgentConfig(
        instance_id="batch-a", role=types_pb2.INSTANCE_ROLE_BATCH, autoscale=False, queue_address=sys.argv[1],
        lease_timeout_s=1.0, queue_poll_interval_s=0.05, autoscaler=LocalAutoscalerConfig(initial_batch_size=8)))
    srv = await serve(agent, port=0)
    Path(sys.argv[2]).write_text(str(srv.port))
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_batch_work_on_a_killed_engine_returns_to_the_queue_when_its_lease_lapses(world, tmp_path):
    """Part 3 of the issue, as it was: nothing new in the router; the queue's lease does it."""
    from chiron.v1 import queue_pb2, queue_pb2_grpc
    from tests.conftest import start_sim_engine

    etcd, queue, procs = world
    port_file = tmp_path / "batch-a.port"
    proc = subprocess.Popen([sys.executable, "-c", _BATCH_ENGINE, queue, str(port_file)], cwd=REPO,
                            stdout=(tmp_path / "batch-a.log").open("w"), stderr=subprocess.STDOUT)
    procs.procs["batch-a"] = proc
    await wait_port_file(port_file, proc)
    async with grpc.aio.insecure_channel(queue) as ch:
        stub = queue_pb2_grpc.QueueStub(ch)
        await stub.Enqueue(queue_pb2.EnqueueRequest(request=types_pb2.InferenceRequest(
            request_id="batch-1", model=MODEL, prompt_token_ids=list(range(1, 65)), max_tokens=3000, ignore_eos=True,
            request_class=types_pb2.REQUEST_CLASS_BATCH, slo=types_pb2.SLO(ttft_ms=3_600_000))))

        async def state() -> queue_pb2.GetRequestResponse:
            return await stub.GetRequest(queue_pb2.GetRequestRequest(request_id="batch-1"))

        async def leased() -> bool:
            return (await state()).state == queue_pb2.QUEUED_REQUEST_STATE_LEASED
        await eventually(leased)
        procs.kill("batch-a")

        async def back() -> bool:  # within the 1 s lease (and the queue's expiry sweep)
            return (await state()).state == queue_pb2.QUEUED_REQUEST_STATE_QUEUED
        await eventually(back, timeout_s=15)
        server, _ = await start_sim_engine("batch-b", "batch", queue_address=queue, speedup=50.0)
        try:
            async def done() -> bool:
                return (await state()).state == queue_pb2.QUEUED_REQUEST_STATE_DONE
            await eventually(done, timeout_s=60)
            final = await state()
            assert final.attempts >= 1 and len(final.output_token_ids) == 3000
        finally:
            await server.stop(grace_s=1.0)


class _CrashingEngine(engine_pb2_grpc.EngineServicer):
    """An in-process stand-in engine that streams ``tokens`` tokens of every request (after its resume tokens,
    indices continuing) and then fails as a killed engine does (UNAVAILABLE), or with ``stall`` waits forever
    before its first token. ``calls``: the requests it got."""

    def __init__(self, iid: str, tokens: int = 5, stall: bool = False) -> None:
        self.iid, self.tokens, self.stall = iid, tokens, stall
        self.calls: list[types_pb2.InferenceRequest] = []
        self.cancelled = asyncio.Event()

    async def Generate(self, request, context):
        r = request.request
        self.calls.append(r)
        if self.stall:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        n = len(r.resume_token_ids)
        for i in range(self.tokens):
            yield engine_pb2.GenerateResponse(request_id=r.request_id, token_ids=[100 + n + i],
                                              num_generated_tokens=n + i + 1, ttft_ms=5.0 if i == 0 else 0.0,
                                              itl_ms=0.0 if i == 0 else 1.0)
            await asyncio.sleep(0.001)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)")

    async def GetStats(self, request, context):
        return engine_pb2.GetStatsResponse(stats=types_pb2.EngineStats(instance_id=self.iid, max_batch_size=8))


@pytest.fixture
async def stand_ins():
    """A router in this process over three crashing stand-in engines (membership from a dict)."""
    from services.common.membership import InstanceInfo
    from services.router.routing import RouterConfig
    from services.router.server import RouterService
    from services.router.server import serve as serve_router

    engines, servers, members = {}, [], {}
    for iid in ("e1", "e2", "e3"):
        engines[iid] = eng = _CrashingEngine(iid)
        server = grpc.aio.server()
        engine_pb2_grpc.add_EngineServicer_to_server(eng, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        members[iid] = InstanceInfo(instance_id=iid, role="interactive", model=MODEL, address=f"127.0.0.1:{port}")

    class Members:
        def snapshot(self):
            return dict(members)

    router = await serve_router(RouterService(RouterConfig(), Members(), "127.0.0.1:1", stats_interval_s=60), port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    yield router_pb2_grpc.RouterStub(channel), router.service, engines
    await channel.close()
    await router.stop(grace_s=0)
    for server in servers:
        await server.stop(0)


async def test_a_request_moves_at_most_max_failovers_times_then_gets_unavailable(stand_ins):
    router, service, engines = stand_ins
    s = Stream("unlucky", 100)
    await run_stream(router, s)
    assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "3 engines failed under it" in s.error.details() and "retry later" in s.error.details()
    assert service.max_failovers == 2 and service.failovers == 2 and service.resumed == 2
    # Each engine got the request once, with the same id and the tokens the client had so far.
    got = sorted((c for e in engines.values() for c in e.calls), key=lambda c: len(c.resume_token_ids))
    assert [len(c.resume_token_ids) for c in got] == [0, 5, 10]
    assert {c.request_id for c in got} == {"unlucky"} and {c.max_tokens for c in got} == {100}
    assert list(got[2].resume_token_ids) == [t for c in s.chunks for t in c.token_ids][:10]
    assert [c.num_generated_tokens for c in s.chunks] == list(range(1, 16))  # no gap, no repeat
    assert sum(service._inflight.values()) == 0


@pytest.mark.parametrize("how", ["deadline", "cancel"])
async def test_the_clients_deadline_and_cancel_are_not_taken_for_a_dead_engine(stand_ins, how):
    router, service, engines = stand_ins
    for e in engines.values():
        e.stall = True
    r = types_pb2.InferenceRequest(request_id=how, model=MODEL, prompt_token_ids=[1, 2, 3], max_tokens=10)
    call = router.Generate(router_pb2.RouterGenerateRequest(request=r), timeout=0.5 if how == "deadline" else None)
    if how == "cancel":
        async def sent() -> bool:
            return any(e.calls for e in engines.values())
        await eventually(sent)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call.read()
    else:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call.read()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    engine = next(e for e in engines.values() if e.calls)
    await asyncio.wait_for(engine.cancelled.wait(), 10)  # the engine call ended with the client's
    assert sum(len(e.calls) for e in engines.values()) == 1 and service.failovers == 0
