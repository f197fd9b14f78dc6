"""Tracing across real processes: router, queue and engine agent (``chiron <service>`` subprocesses, a real etcd)
export their spans over OTLP/gRPC to a small in-process receiver, and one trace links the router's span of a
request to the engine's (Generate) or the queue's (Submit → Enqueue) through the ``traceparent`` metadata."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from chiron.v1 import engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc, types_pb2
from services.engine.demo import stop_process, wait_healthy, wait_port_file
from tests.conftest import eventually, start_etcd

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[1]
MODEL = "llama-3-8b"
SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    end_ns: int  # end time, Unix ns


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on 127.0.0.1 (a thread-pool server, so it keeps receiving while the test's event
    loop waits on a process): what Jaeger or a collector would be."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[Span] = []
        self.exports = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context):  # noqa: N802 (gRPC name)
        got = []
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                got += [Span(service, s.name, s.kind, s.trace_id, s.span_id, s.parent_span_id, s.end_time_unix_nano) for s in ss.spans]
        with self._lock:
            self._spans += got
            self.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, service: str | None = None, name: str | None = None, kind: int | None = None) -> list[Span]:
        with self._lock:
            return [s for s in self._spans if (service is None or s.service == service) and (name is None or s.name == name)
                    and (kind is None or s.kind == kind)]

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def otel_env(receiver: Receiver | None, **extra: str) -> dict[str, str]:
    """This process's environment without OTEL_* variables, plus an OTLP exporter aimed at ``receiver``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONUNBUFFERED"] = "1"
    if receiver is not None:
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_BSP_SCHEDULE_DELAY": "50"}
    return env | extra


class Procs:
    """``chiron <service>`` subprocesses on free ports, logs in a directory, stopped (SIGTERM) at the end."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir, self.env = log_dir, env
        self.procs: list[tuple[str, subprocess.Popen]] = []

    async def start(self, service: str, *args: str) -> int:
        fd, name = tempfile.mkstemp(prefix=f"chiron-{service}-port-", dir=self.log_dir)
        os.close(fd)
        port_file = Path(name)
        log = (self.log_dir / f"{service}.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", service, "--port", "0", "--port-file", str(port_file),
                                 *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.procs.append((service, proc))
        port = await wait_port_file(port_file, proc)
        await wait_healthy(f"127.0.0.1:{port}", proc=proc)
        return port

    def stop(self) -> dict[str, int]:
        return {service: stop_process(proc) for service, proc in reversed(self.procs)}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))


def req(rid: str, max_tokens: int = 8, **slo) -> types_pb2.InferenceRequest:
    return types_pb2.InferenceRequest(request_id=rid, model=MODEL, prompt_token_ids=list(range(1, 33)),
                                      max_tokens=max_tokens, slo=types_pb2.SLO(**slo))


def chain(receiver: Receiver, leaf: Span) -> list[Span]:
    """``leaf`` and its ancestors as far as the receiver has them, leaf first."""
    by_id = {(s.trace_id, s.span_id): s for s in receiver.spans()}
    out = [leaf]
    while out[-1].parent_span_id and (out[-1].trace_id, out[-1].parent_span_id) in by_id:
        out.append(by_id[(out[-1].trace_id, out[-1].parent_span_id)])
    return out


async def test_one_trace_spans_router_engine_and_queue(tmp_path, receiver):
    etcd = start_etcd(tmp_path / "etcd")
    procs = Procs(tmp_path, otel_env(receiver))
    try:
        queue_port = await procs.start("queue", "--db", str(tmp_path / "q.db"))
        await procs.start("engine", "--etcd", etcd.endpoint, "--speedup", "20", "--instance-id", "eng-1")
        router_port = await procs.start("router", "--etcd", etcd.endpoint, "--queue", f"127.0.0.1:{queue_port}",
                                        "--stats-interval-s", "0.1")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router_port}") as ch:
            stub = router_pb2_grpc.RouterStub(ch)

            async def generated() -> bool:  # UNAVAILABLE until the router has seen the engine in etcd
                try:
                    msgs = [m async for m in stub.Generate(router_pb2.RouterGenerateRequest(request=req("gen-1")), timeout=10)]
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                    return False
                assert msgs[0].instance_id == "eng-1" and msgs[-1].chunk.num_generated_tokens == 8
                return True
            await eventually(generated, timeout_s=30, interval_s=0.1)
            sub = await stub.Submit(router_pb2.SubmitRequest(request=req("job-1", slo_class="batch")))
            assert sub.request_id == "job-1"

        # Generate: router SERVER → router CLIENT (Engine/Generate) → engine SERVER, one trace.
        async def generate_traced() -> bool:
            engine = receiver.spans("chiron-engine", "/chiron.v1.Engine/Generate", SERVER)
            return bool(engine) and len(chain(receiver, engine[0])) == 3
        await eventually(generate_traced, timeout_s=30, interval_s=0.05)
        [engine] = receiver.spans("chiron-engine", "/chiron.v1.Engine/Generate", SERVER)
        _, client, server = chain(receiver, engine)
        assert (client.service, client.name, client.kind) == ("chiron-router", "/chiron.v1.Engine/Generate", CLIENT)
        assert (server.service, server.name, server.kind) == ("chiron-router", "/chiron.v1.Router/Generate", SERVER)
        assert engine.trace_id == client.trace_id == server.trace_id and len(engine.trace_id) == 16
        assert not server.parent_span_id  # the test's client is not traced: the trace starts at the router
        # The engine call's span ends with the call, inside the request's span (not when its stream is freed).
        assert client.end_ns <= server.end_ns

        # Submit: router SERVER → router CLIENT (Queue/Enqueue) → queue SERVER.
        async def submit_traced() -> bool:
            enq = receiver.spans("chiron-queue", "/chiron.v1.Queue/Enqueue", SERVER)
            return bool(enq) and len(chain(receiver, enq[0])) == 3
        await eventually(submit_traced, timeout_s=30, interval_s=0.05)
        [enqueue] = receiver.spans("chiron-queue", "/chiron.v1.Queue/Enqueue", SERVER)
        _, client, server = chain(receiver, enqueue)
        assert (client.service, client.name, client.kind) == ("chiron-router", "/chiron.v1.Queue/Enqueue", CLIENT)
        assert (server.service, server.name, server.kind) == ("chiron-router", "/chiron.v1.Router/Submit", SERVER)
        assert enqueue.trace_id == server.trace_id != engine.trace_id

        # Membership (etcd), health checks and reflection are not traced; the router's stats polling is.
        names = {s.name for s in receiver.spans()}
        assert not [n for n in names if n.startswith(("/etcdserverpb.", "/grpc.health.", "/grpc.reflection."))], names
        assert "/chiron.v1.Engine/GetStats" in names
    except BaseException:
        print(procs.logs())
        raise
    finally:
        codes = procs.stop()
        etcd.stop()
    assert codes == {"router": 0, "engine": 0, "queue": 0}, procs.logs()


@pytest.mark.parametrize("off", [{"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}])
async def test_switched_off_by_the_environment_nothing_is_exported(tmp_path, receiver, off):
    """An endpoint is configured, but the environment turns tracing off: a served request and a clean exit (which
    flushes whatever was buffered) send the receiver nothing."""
    procs = Procs(tmp_path, otel_env(receiver, **off))
    try:
        port = await procs.start("engine", "--speedup", "20")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            msgs = [m async for m in engine_pb2_grpc.EngineStub(ch).Generate(engine_pb2.GenerateRequest(request=req("r1")))]
        assert sum(len(m.token_ids) for m in msgs) == 8
    finally:
        codes = procs.stop()
    assert codes == {"engine": 0}, procs.logs()
    assert receiver.exports == 0 and receiver.spans() == []


def test_setup_tracing_is_off_without_configuration(monkeypatch):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from services.common.tracing import setup_tracing

    for k in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(k)
    server_fn, channel_fn = grpc.aio.server, grpc.aio.insecure_channel
    assert setup_tracing("chiron-test") is False
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    assert setup_tracing("chiron-test") is False
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert setup_tracing("chiron-test") is False
    # Nothing installed: gRPC is not patched and no SDK provider collects spans.
    assert (grpc.aio.server, grpc.aio.insecure_channel) == (server_fn, channel_fn)
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)


def test_an_unknown_exporter_is_an_error(monkeypatch):
    from services.common.tracing import setup_tracing

    for k in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="zipkin"):
        setup_tracing("chiron-test")
