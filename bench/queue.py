"""``chiron bench queue``: throughput, latency and memory of the durable global queue.

* ``enqueue_per_s_inprocess``: :meth:`QueueStore.enqueue`, one request per call (one committed SQLite WAL
  transaction each), in this process.
* ``enqueue_per_s_grpc`` / ``enqueue_p99_ms_grpc``: ``Enqueue`` over gRPC on loopback to a ``chiron queue``
  subprocess, ``concurrency`` calls in flight; p99 of the per-call latency in that run.
* ``lease_per_s_grpc``: requests leased per second over gRPC (``Lease`` of ``lease_batch`` requests per
  call, ``concurrency`` workers) from the same subprocess.
* ``rss_bytes_1m`` / ``estimator_refresh_ms_1m``: a fresh process fills a store with 1,000,000 queued
  requests (``enqueue_many`` in batches) spread over request groups, then reports its resident memory and
  the time of one full statistics refresh (:meth:`QueueService.stats`: every group's aggregates plus the
  waiting-time estimator, its tables prepared beforehand as the service's maintenance task does).

Prompts are ``prompt_tokens`` random token ids; TTFT SLOs cycle over 50 values from 10 min to 24 h so requests
fall in many groups (one per SLO and deadline bucket).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from chiron.v1 import queue_pb2, queue_pb2_grpc, types_pb2

SLOS_S = tuple(600 + 1750 * k for k in range(50))  # 10 min … ~24 h: 50 TTFT SLOs, so 1M requests span many groups


def _prompts(n: int, prompt_tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 32000, size=(n, prompt_tokens), dtype=np.int32)


def bench_inprocess(n: int, prompt_tokens: int, work: Path) -> float:
    from services.queue.store import QueueConfig, QueueStore

    prompts = _prompts(n, prompt_tokens)
    store = QueueStore(QueueConfig(db_path=str(work / "inproc.db")))
    try:
        t0 = time.perf_counter()
        for i in range(n):
            store.enqueue(f"r{i}", "llama-3-8b", prompts[i], 256, SLOS_S[i % len(SLOS_S)] * 1000)
        return n / (time.perf_counter() - t0)
    finally:
        store.close()


async def bench_grpc(n: int, prompt_tokens: int, concurrency: int, lease_batch: int, work: Path) -> dict:
    from services.cluster import spawn_chiron
    from services.common.security import open_channel
    from services.engine.demo import stop_process, wait_healthy, wait_port_file

    proc, port_file = spawn_chiron(work, "queue", ["queue", "--db", str(work / "grpc.db")])
    prompts = _prompts(n, prompt_tokens, seed=1).tolist()
    try:
        port = await wait_port_file(port_file, proc)
        await wait_healthy(f"127.0.0.1:{port}", proc=proc)
        async with open_channel(f"127.0.0.1:{port}") as ch:
            stub = queue_pb2_grpc.QueueStub(ch)
            latencies: list[float] = []
            next_i = iter(range(n))

            async def enqueuer() -> None:
                for i in next_i:
                    r = queue_pb2.EnqueueRequest(request=types_pb2.InferenceRequest(
                        request_id=f"g{i}", model="llama-3-8b", prompt_token_ids=prompts[i], max_tokens=256,
                        slo=types_pb2.SLO(ttft_ms=SLOS_S[i % len(SLOS_S)] * 1000)))
                    t = time.perf_counter()
                    await stub.Enqueue(r)
                    latencies.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            await asyncio.gather(*(enqueuer() for _ in range(concurrency)))
            enq_s = time.perf_counter() - t0
            leased = 0

            async def leaser() -> None:
                nonlocal leased
                while True:
                    got = (await stub.Lease(queue_pb2.LeaseRequest(worker_id="bench", max_requests=lease_batch))).leases
                    if not got:
                        return
                    leased += len(got)

            t0 = time.perf_counter()
            await asyncio.gather(*(leaser() for _ in range(max(1, concurrency // 8))))
            lease_s = time.perf_counter() - t0
    finally:
        stop_process(proc)
    return {"enqueue_per_s_grpc": n / enq_s, "enqueue_p99_ms_grpc": float(np.percentile(latencies, 99) * 1e3),
            "enqueue_p50_ms_grpc": float(np.percentile(latencies, 50) * 1e3), "lease_per_s_grpc": leased / lease_s,
            "leased": leased}


def _rss_child(db_path: str, n: int, prompt_tokens: int) -> None:
    """Run in a fresh process: fill a store with ``n`` queued requests; print RSS and refresh time as JSON."""
    import psutil

    from services.queue.estimator import WaitingTimeEstimator
    from services.queue.server import CapacityTracker, QueueService
    from services.queue.store import QueueConfig, QueueStore

    store = QueueStore(QueueConfig(db_path=db_path))
    batch = 10_000
    prompts = _prompts(batch, prompt_tokens, seed=2)
    for start in range(0, n, batch):
        store.enqueue_many([(f"m{start + j}", "llama-3-8b", prompts[j], 256, SLOS_S[(start + j) % len(SLOS_S)] * 1000)
                            for j in range(min(batch, n - start))])
    service = QueueService(store, WaitingTimeEstimator(), CapacityTracker(prior_throughput_tokens_per_s=5000.0))
    for model, cap in service.capacities().items():
        service.estimator.prepare(model, cap)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        stats = service.stats()
        times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"rss_bytes_1m": psutil.Process().memory_info().rss, "estimator_refresh_ms_1m": float(np.median(times)),
                      "estimator_refresh_ms_1m_max": max(times), "queued": stats.queued, "groups": len(stats.groups)}))
    store.close()


def run_bench(n_inprocess: int = 50_000, n_grpc: int = 20_000, n_rss: int = 1_000_000, prompt_tokens: int = 200,
              concurrency: int = 32, lease_batch: int = 16, progress=None) -> dict:
    """Returns the JSON report: the six keys of the issue plus details under ``config`` and ``extra``."""
    work = Path(tempfile.mkdtemp(prefix="chiron-bench-queue-"))
    try:
        inproc = bench_inprocess(n_inprocess, prompt_tokens, work)
        if progress:
            progress("in-process enqueue")
        grpc_res = asyncio.run(bench_grpc(n_grpc, prompt_tokens, concurrency, lease_batch, work))
        if progress:
            progress("gRPC enqueue and lease")
        out = subprocess.run([sys.executable, "-c", f"from bench.queue import _rss_child; "
                              f"_rss_child({str(work / 'rss.db')!r}, {n_rss}, {prompt_tokens})"],
                             capture_output=True, text=True, check=True, env={**os.environ})
        rss = json.loads(out.stdout.strip().splitlines()[-1])
        if progress:
            progress("1M queued")
    finally:
        for f in work.glob("*"):
            f.unlink()
        work.rmdir()
    return {"enqueue_per_s_inprocess": inproc, "enqueue_per_s_grpc": grpc_res["enqueue_per_s_grpc"],
            "lease_per_s_grpc": grpc_res["lease_per_s_grpc"], "enqueue_p99_ms_grpc": grpc_res["enqueue_p99_ms_grpc"],
            "rss_bytes_1m": rss["rss_bytes_1m"], "estimator_refresh_ms_1m": rss["estimator_refresh_ms_1m"],
            "extra": {"enqueue_p50_ms_grpc": grpc_res["enqueue_p50_ms_grpc"],
                      "estimator_refresh_ms_1m_max": rss["estimator_refresh_ms_1m_max"], "groups_1m": rss["groups"],
                      "queued_1m": rss["queued"], "leased_grpc": grpc_res["leased"]},
            "config": {"n_inprocess": n_inprocess, "n_grpc": n_grpc, "n_rss": n_rss, "prompt_tokens": prompt_tokens,
                       "concurrency": concurrency, "lease_batch": lease_batch, "durability": "SQLite WAL, synchronous=NORMAL"}}


TARGETS = {"enqueue_per_s_inprocess": (">=", 20_000), "rss_bytes_1m": ("<=", 1.5e9), "estimator_refresh_ms_1m": ("<=", 50.0)}
