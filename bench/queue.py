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

Prompts are ``prompt_tokens`` random token ids; TTFT SLOs cycle over 50 values from 10 min to 24 h (many groups).

``--db postgresql://…`` (:func:`run_bench_pg`) measures the PostgreSQL store (``services/queue/pg_store.py``)
with the same keys (``enqueue_per_s_grpc`` etc.: ``chiron queue --db URL`` subprocess; ``rss_bytes_1m`` is the
queue process's memory with 1M queued in the database) and adds, under ``pg``:

* ``enqueue_per_s_single_1conn`` / ``enqueue_per_s_single_8conn``: durable single enqueues (one committed
  transaction each) on one connection, and on 8 connections at once (8 store instances, 8 processes: group commit);
* ``enqueue_many_per_s``: Batch API uploads (:meth:`PgQueueStore.enqueue_many`, ``upload_lines`` per call);
* ``lease_ack_per_s_2_replicas``: two processes, each its own store instance and connection (two replicas),
  leasing ``lease_batch`` at a time and acking each request in its own transaction, concurrently;
* ``estimator_refresh_ms_1m``: :meth:`QueueService.stats` with 1,000,000 queued, after the summary's deltas were
  folded (the maintenance task's ``compact``); ``estimator_refresh_ms_1m_first`` is the first call, folding them.

The bench owns the database it is given: it refuses one with requests in it, and empties the queue's tables
between its phases.
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


async def bench_grpc(n: int, prompt_tokens: int, concurrency: int, lease_batch: int, work: Path, db: str | None = None) -> dict:
    from services.cluster import spawn_chiron
    from services.common.security import open_channel
    from services.engine.demo import stop_process, wait_healthy, wait_port_file

    proc, port_file = spawn_chiron(work, "queue", ["queue", "--db", db or str(work / "grpc.db")])
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

    from services.queue.core import CapacityTracker
    from services.queue.estimator import WaitingTimeEstimator
    from services.queue.pg_store import open_store
    from services.queue.server import QueueService
    from services.queue.store import QueueConfig

    store = open_store(QueueConfig(db_path=db_path))
    batch = 10_000
    prompts = _prompts(batch, prompt_tokens, seed=2)
    for start in range(0, n, batch):
        store.enqueue_many([(f"m{start + j}", "llama-3-8b", prompts[j], 256, SLOS_S[(start + j) % len(SLOS_S)] * 1000)
                            for j in range(min(batch, n - start))])
    service = QueueService(store, WaitingTimeEstimator(), CapacityTracker(prior_throughput_tokens_per_s=5000.0))
    t = time.perf_counter()
    service.stats()  # PostgreSQL: the first call folds the deltas of the fill into the summary
    first_ms = (time.perf_counter() - t) * 1e3
    compact = getattr(store, "compact", None)
    if compact is not None:  # as the maintenance task does every second
        compact()
    for model, cap in service.capacities().items():
        service.estimator.prepare(model, cap)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        stats = service.stats()
        times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"rss_bytes_1m": psutil.Process().memory_info().rss, "estimator_refresh_ms_1m": float(np.median(times)),
                      "estimator_refresh_ms_1m_max": max(times), "estimator_refresh_ms_1m_first": first_ms,
                      "queued": stats.queued, "groups": len(stats.groups)}))
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


# ---- PostgreSQL ---------------------------------------------------------------------------------------------
_PG_TABLES = "requests, group_summary, group_deltas, served, served_seconds, served_first, files, batches, batch_items"


def _pg_reset(url: str) -> None:
    """Empty the queue's tables (created first if the database is new)."""
    import psycopg

    from services.queue.pg_store import check_database
    from services.queue.store import QueueConfig

    check_database(QueueConfig(db_path=url))
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f"TRUNCATE {_PG_TABLES}")


def _pg_single_worker(url: str, prefix: str, n: int, prompt_tokens: int, start, out) -> None:
    from services.queue.pg_store import PgQueueStore
    from services.queue.store import QueueConfig

    prompts = _prompts(n, prompt_tokens, seed=hash(prefix) % 1000).tolist()
    store = PgQueueStore(QueueConfig(db_path=url))
    start.wait()
    t0 = time.perf_counter()
    for i in range(n):
        store.enqueue(f"{prefix}{i}", "llama-3-8b", prompts[i], 256, SLOS_S[i % len(SLOS_S)] * 1000)
    out.put((t0, time.perf_counter()))
    store.close()


def _pg_lease_ack_worker(url: str, name: str, lease_batch: int, start, out) -> None:
    from services.queue.pg_store import PgQueueStore
    from services.queue.store import QueueConfig

    store = PgQueueStore(QueueConfig(db_path=url))
    start.wait()
    t0, n = time.perf_counter(), 0
    while leases := store.lease(name, lease_batch):
        for ls in leases:
            store.ack_request(ls.request_id, ls.lease_id, 200)
            n += 1
    out.put((t0, time.perf_counter(), n))
    store.close()


def _in_processes(target, args_list: list[tuple]) -> list[tuple]:
    """Run ``target(*args, start, out)`` in one process per ``args``, released together; their results."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(len(args_list)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, start, out)) for a in args_list]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return results


def _span_rate(results: list[tuple], total: int) -> float:
    return total / (max(r[1] for r in results) - min(r[0] for r in results))


def run_bench_pg(url: str, n_single: int = 20_000, n_batch: int = 200_000, n_lease: int = 20_000, n_grpc: int = 20_000,
                 n_rss: int = 1_000_000, prompt_tokens: int = 200, concurrency: int = 32, lease_batch: int = 16,
                 upload_lines: int = 1000, progress=None) -> dict:
    """The PostgreSQL store at ``url`` (a database of its own: see the module docstring). The SQLite report's keys,
    plus ``pg`` (the PostgreSQL store's own measurements) and ``extra``."""
    import psycopg

    from services.queue.pg_store import PgQueueStore, redact_url
    from services.queue.store import QueueConfig

    def step(what: str) -> None:
        if progress:
            progress(what)

    _pg_reset_checked(url)
    with psycopg.connect(url, autocommit=True) as c:
        settings = {k: c.execute(f"SHOW {k}").fetchone()[0] for k in ("fsync", "synchronous_commit", "server_version")}
    pg: dict = {}
    # durable single enqueues: one connection, then 8 at once
    one = _in_processes(_pg_single_worker, [(url, "s", n_single, prompt_tokens)])
    pg["enqueue_per_s_single_1conn"] = _span_rate(one, n_single)
    _pg_reset(url)
    per = n_single // 8
    eight = _in_processes(_pg_single_worker, [(url, f"c{k}_", per, prompt_tokens) for k in range(8)])
    pg["enqueue_per_s_single_8conn"] = _span_rate(eight, per * 8)
    step("single enqueues")
    # Batch API uploads: enqueue_many of upload_lines per call, one transaction each
    _pg_reset(url)
    store = PgQueueStore(QueueConfig(db_path=url))
    try:
        prompts = _prompts(upload_lines, prompt_tokens, seed=3)
        t0 = time.perf_counter()
        for start in range(0, n_batch, upload_lines):
            store.enqueue_many([(f"b{start + j}", "llama-3-8b", prompts[j], 256, SLOS_S[(start + j) % len(SLOS_S)] * 1000)
                                for j in range(min(upload_lines, n_batch - start))])
        pg["enqueue_many_per_s"] = n_batch / (time.perf_counter() - t0)
        step("Batch API uploads")
        # lease + ack through two replicas (processes) concurrently
        _pg_reset(url)
        for start in range(0, n_lease, upload_lines):
            store.enqueue_many([(f"l{start + j}", "llama-3-8b", prompts[j], 256, SLOS_S[(start + j) % len(SLOS_S)] * 1000)
                                for j in range(min(upload_lines, n_lease - start))])
        two = _in_processes(_pg_lease_ack_worker, [(url, "a", lease_batch), (url, "b", lease_batch)])
        acked = sum(r[2] for r in two)
        pg["lease_ack_per_s_2_replicas"] = _span_rate(two, acked)
        pg["lease_ack_per_replica"] = [r[2] for r in two]
        pg["lease_ack_all_acked"] = acked == n_lease and store.counts()["queued"] == 0 and store.counts()["leased"] == 0
        step("lease + ack, two replicas")
    finally:
        store.close()
    # in-process single enqueue (the SQLite report's key): same as one connection
    _pg_reset(url)
    work = Path(tempfile.mkdtemp(prefix="chiron-bench-queue-pg-"))
    try:
        grpc_res = asyncio.run(bench_grpc(n_grpc, prompt_tokens, concurrency, lease_batch, work, db=url))
    finally:
        for f in work.glob("*"):
            f.unlink()
        work.rmdir()
    step("gRPC enqueue and lease")
    _pg_reset(url)
    out = subprocess.run([sys.executable, "-c", f"from bench.queue import _rss_child; _rss_child({url!r}, {n_rss}, {prompt_tokens})"],
                         capture_output=True, text=True, check=True, env={**os.environ})
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    pg["estimator_refresh_ms_1m"] = rss["estimator_refresh_ms_1m"]
    step("1M queued")
    _pg_reset(url)
    pg["targets"] = {k: {"target": f"{op} {bound:g}", "met": bool(pg[k] >= bound if op == ">=" else pg[k] <= bound)}
                     for k, (op, bound) in PG_TARGETS.items()}
    return {"store": "postgresql", "enqueue_per_s_inprocess": pg["enqueue_per_s_single_1conn"],
            "enqueue_per_s_grpc": grpc_res["enqueue_per_s_grpc"], "lease_per_s_grpc": grpc_res["lease_per_s_grpc"],
            "enqueue_p99_ms_grpc": grpc_res["enqueue_p99_ms_grpc"], "rss_bytes_1m": rss["rss_bytes_1m"],
            "estimator_refresh_ms_1m": rss["estimator_refresh_ms_1m"], "pg": pg,
            "extra": {"enqueue_p50_ms_grpc": grpc_res["enqueue_p50_ms_grpc"],
                      "estimator_refresh_ms_1m_max": rss["estimator_refresh_ms_1m_max"],
                      "estimator_refresh_ms_1m_first": rss["estimator_refresh_ms_1m_first"], "groups_1m": rss["groups"],
                      "queued_1m": rss["queued"], "leased_grpc": grpc_res["leased"]},
            "config": {"db": redact_url(url), "n_single": n_single, "n_batch": n_batch, "n_lease": n_lease, "n_grpc": n_grpc,
                       "n_rss": n_rss, "prompt_tokens": prompt_tokens, "concurrency": concurrency, "lease_batch": lease_batch,
                       "upload_lines": upload_lines, "durability": f"PostgreSQL fsync={settings['fsync']}, "
                       f"synchronous_commit={settings['synchronous_commit']}", "server_version": settings["server_version"]}}


def _pg_reset_checked(url: str) -> None:
    """:func:`_pg_reset`, refusing a database that holds requests (the bench empties what it is given)."""
    import psycopg

    from services.queue.pg_store import check_database
    from services.queue.store import QueueConfig

    check_database(QueueConfig(db_path=url))
    with psycopg.connect(url, autocommit=True) as c:
        if c.execute("SELECT EXISTS (SELECT 1 FROM requests)").fetchone()[0]:
            raise ValueError("the bench database holds queue requests; give the bench a database of its own (createdb)")
    _pg_reset(url)


TARGETS = {"enqueue_per_s_inprocess": (">=", 20_000), "rss_bytes_1m": ("<=", 1.5e9), "estimator_refresh_ms_1m": ("<=", 50.0)}
PG_TARGETS = {"enqueue_per_s_single_8conn": (">=", 2_000), "enqueue_many_per_s": (">=", 20_000),
              "lease_ack_per_s_2_replicas": (">=", 2_000), "estimator_refresh_ms_1m": ("<=", 50.0)}
"""Issue 29's targets for the PostgreSQL store (durable single enqueues, Batch API uploads, lease+ack over two
replicas, estimator refresh at 1M queued)."""
