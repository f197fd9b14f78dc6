"""Replay a slice of an Azure trace against one engine agent over gRPC and report the local autoscaler.

Used by ``chiron demo``: the agent runs as a real subprocess (``chiron engine``), requests are sent at the
trace's own arrival times (divided by ``speedup``, which also speeds up the simulated engine's clock so that
latencies stay in engine time), and the agent's ``WatchStats`` stream records the max batch size the local
autoscaler chose over time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chiron.v1 import engine_pb2, engine_pb2_grpc, types_pb2
from services.common.security import open_channel
from services.common.traces import Trace


@dataclass
class RequestRecord:
    request_id: str
    prompt_tokens: int
    output_tokens: int
    ttft_ms: float = float("nan")
    itl_ms: list[float] = field(default_factory=list)
    generated: int = 0
    error: str = ""


async def wait_healthy(target: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll the standard gRPC health check until SERVING. Raises TimeoutError / RuntimeError (process died)."""
    deadline = time.monotonic() + timeout_s
    async with open_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"engine agent exited with status {proc.returncode} before becoming healthy")
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} not healthy after {timeout_s:.0f} s")
            await asyncio.sleep(0.1)


async def wait_port_file(path: Path, proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """Wait until the agent writes its bound port to ``path`` (readiness, not a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if path.exists() and path.read_text().strip():
            return int(path.read_text().strip())
        if proc.poll() is not None:
            raise RuntimeError(f"engine agent exited with status {proc.returncode} during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError("engine agent did not report its port")
        await asyncio.sleep(0.05)


def start_engine_process(extra_args: list[str], log_path: Path) -> tuple[subprocess.Popen, Path]:
    """Start ``chiron engine`` as a subprocess on a free port; returns the process and its port file."""
    port_file = Path(tempfile.mkstemp(prefix="chiron-engine-port-")[1])
    port_file.write_text("")
    cmd = [sys.executable, "-m", "services.cli", "engine", "--port", "0", "--port-file", str(port_file), *extra_args]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, port_file


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> int:
    """SIGTERM (the agent drains), then SIGKILL if it does not exit in ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


async def _one(stub, rec: RequestRecord, vocab: int, itl_slo_ms: int) -> None:
    rng = np.random.default_rng(zlib.crc32(rec.request_id.encode()))  # same prompt every run
    req = types_pb2.InferenceRequest(
        request_id=rec.request_id, prompt_token_ids=rng.integers(0, vocab, rec.prompt_tokens).tolist(),
        max_tokens=rec.output_tokens, ignore_eos=True, request_class=types_pb2.REQUEST_CLASS_INTERACTIVE,
        slo=types_pb2.SLO(itl_ms=itl_slo_ms))
    try:
        async for resp in stub.Generate(engine_pb2.GenerateRequest(request=req)):
            if resp.token_ids:
                if rec.generated == 0:
                    rec.ttft_ms = resp.ttft_ms
                else:
                    rec.itl_ms.append(resp.itl_ms)
                rec.generated += len(resp.token_ids)
    except grpc.aio.AioRpcError as e:
        rec.error = f"{e.code().name}: {e.details()}"


async def replay(target: str, trace: Trace, speedup: float, itl_slo_ms: int, vocab: int = 128256,
                 stats_interval_s: float = 1.0, on_progress=None) -> tuple[list[RequestRecord], list[dict]]:
    """Send every request of ``trace`` at ``arrival / speedup`` and watch the agent's stats meanwhile."""
    records = [RequestRecord(f"demo-{i}", int(p), int(o))
               for i, (p, o) in enumerate(zip(trace.prompt_tokens, trace.output_tokens, strict=True))]
    timeline: list[dict] = []
    async with open_channel(target) as ch:
        stub = engine_pb2_grpc.EngineStub(ch)

        async def watch() -> None:
            t0 = time.monotonic()
            async for r in stub.WatchStats(engine_pb2.WatchStatsRequest(interval_ms=int(stats_interval_s * 1e3))):
                s = r.stats
                timeline.append({"t_s": (time.monotonic() - t0) * speedup, "max_batch_size": s.max_batch_size,
                                 "running": s.num_running, "waiting": s.num_waiting, "itl_p95_ms": s.itl_p95_ms,
                                 "throughput_tokens_per_s": s.throughput_tokens_per_s,
                                 "kv_cache_usage": s.kv_cache_usage, "latency_backpressure": s.latency_backpressure})

        watcher = asyncio.create_task(watch())
        start = time.monotonic()
        tasks = []
        for rec, arrival in zip(records, trace.arrival_s, strict=True):
            delay = start + arrival / speedup - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_one(stub, rec, vocab, itl_slo_ms))
            if on_progress:
                task.add_done_callback(lambda _t: on_progress())
            tasks.append(task)
        await asyncio.gather(*tasks)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await watcher
    return records, timeline


def summarize(records: list[RequestRecord], timeline: list[dict], itl_slo_ms: float, wall_s: float,
              trace_name: str) -> dict:
    """Report of a replay: latency percentiles, ITL SLO attainment, throughput, batch-size trajectory."""
    ok = [r for r in records if not r.error]
    ttft = np.array([r.ttft_ms for r in ok if not np.isnan(r.ttft_ms)])
    itl = np.concatenate([np.array(r.itl_ms) for r in ok if r.itl_ms]) if any(r.itl_ms for r in ok) else np.array([])
    tokens = sum(r.generated for r in ok)
    sim_s = timeline[-1]["t_s"] if timeline else wall_s

    def pct(a: np.ndarray, q: float) -> float:
        return float(np.percentile(a, q)) if a.size else float("nan")

    sizes = [p["max_batch_size"] for p in timeline]
    return {
        "trace": trace_name, "requests": len(records), "completed": len(ok),
        "errors": len(records) - len(ok), "lost_requests": sum(1 for r in ok if r.generated != r.output_tokens),
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50), "itl_p95_ms": pct(itl, 95), "itl_p99_ms": pct(itl, 99),
        "itl_slo_ms": itl_slo_ms, "itl_slo_attainment": float((itl <= itl_slo_ms).mean()) if itl.size else float("nan"),
        "throughput_tokens_per_s": tokens / sim_s if sim_s > 0 else 0.0,
        "max_batch_size_initial": sizes[0] if sizes else None, "max_batch_size_final": sizes[-1] if sizes else None,
        "max_batch_size_max": max(sizes) if sizes else None,
        "wall_seconds": wall_s, "timeline": timeline,
    }
