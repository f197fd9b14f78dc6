"""``chiron bench router``: the latency the router adds to an interactive request.

A real cluster on loopback, every part its own process: etcd, the queue, one simulated engine agent
(``--speedup`` high and a static batch of 256, so the engine itself is never the bottleneck) registered in
etcd, and the router. An open-loop Poisson client sends short interactive requests (32-token prompt,
``max_tokens`` output tokens) at 50, 200 and 500 requests/s, alternately straight to the engine and through
the router, for ``duration_s`` each; TTFT is measured at the client (send → first token). The overhead is
the difference of the two TTFT distributions' percentiles: ``overhead_p50_ms`` = p50(router) − p50(direct),
``overhead_p99_ms`` likewise (both sides see the same engine, machine and client).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from chiron.v1 import engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc, types_pb2
from services.cluster import spawn_chiron
from services.common.etcd_server import EtcdServer
from services.common.security import auth_metadata, open_channel
from services.engine.demo import stop_process, wait_healthy, wait_port_file


async def _load(send, rate: float, duration_s: float, seed: int) -> list[float]:
    """Open-loop Poisson arrivals; returns client-side TTFTs [ms] of the completed requests."""
    rng = np.random.default_rng(seed)
    ttfts: list[float] = []
    tasks = []

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        first = await send(i)
        if first is not None:
            ttfts.append((first - t0) * 1e3)

    start = time.perf_counter()
    t = 0.0
    i = 0
    while t < duration_s:
        t += rng.exponential(1.0 / rate)
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
        i += 1
    await asyncio.gather(*tasks)
    return ttfts


async def start_router_stack(work: Path, etcd: EtcdServer, procs: list) -> tuple[int, int]:
    """Queue, one simulated engine (``--speedup 100``, static batch of 256: never the bottleneck) registered in
    ``etcd``, and a router over them, each a ``chiron`` process logging in ``work`` (appended to ``procs``), waited
    on until healthy. Returns ``(engine_port, router_port)``. Raises RuntimeError / TimeoutError (a part failed)."""
    q, qpf = spawn_chiron(work, "queue", ["queue", "--db", str(work / "q.db")])
    procs.append(q)
    e, epf = spawn_chiron(work, "engine", ["engine", "--etcd", etcd.endpoint, "--speedup", "100",
                                           "--static-batch-size", "256", "--instance-id", "bench-engine"])
    procs.append(e)
    qport = await wait_port_file(qpf, q)
    eport = await wait_port_file(epf, e)
    r, rpf = spawn_chiron(work, "router", ["router", "--etcd", etcd.endpoint, "--queue", f"127.0.0.1:{qport}"])
    procs.append(r)
    rport = await wait_port_file(rpf, r)
    for port, p in ((eport, e), (rport, r)):
        await wait_healthy(f"127.0.0.1:{port}", proc=p)
    return eport, rport


async def run_bench(rates=(50.0, 200.0, 500.0), duration_s: float = 10.0, max_tokens: int = 4, progress=None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="chiron-bench-router-"))
    etcd = EtcdServer(work / "etcd")
    etcd.start()
    procs = []
    try:
        eport, rport = await start_router_stack(work, etcd, procs)
        prompt = list(range(1, 33))
        async with open_channel(f"127.0.0.1:{eport}") as ech, open_channel(f"127.0.0.1:{rport}") as rch:
            estub, rstub = engine_pb2_grpc.EngineStub(ech), router_pb2_grpc.RouterStub(rch)

            def make(i: int, tag: str) -> types_pb2.InferenceRequest:
                return types_pb2.InferenceRequest(request_id=f"{tag}-{i}", model="llama-3-8b", prompt_token_ids=prompt,
                                                  max_tokens=max_tokens, ignore_eos=True, slo=types_pb2.SLO(ttft_ms=5000))

            async def direct(i: int, tag: str = "d"):
                first = None
                async for _ in estub.Generate(engine_pb2.GenerateRequest(request=make(i, tag))):
                    first = first or time.perf_counter()
                return first

            async def routed(i: int, tag: str = "r"):
                first = None
                async for _ in rstub.Generate(router_pb2.RouterGenerateRequest(request=make(i, tag)), metadata=auth_metadata()):
                    first = first or time.perf_counter()
                return first

            # Warm both paths (channels, the router's first stats).
            await _load(lambda i: direct(i, "wd"), 20, 1.0, 0)
            await _load(lambda i: routed(i, "wr"), 20, 1.0, 0)
            rows = []
            for k, rate in enumerate(rates):
                d = await _load(lambda i, k=k: direct(i, f"d{k}"), rate, duration_s, k)
                rt = await _load(lambda i, k=k: routed(i, f"r{k}"), rate, duration_s, k)
                rows.append({"rate_rps": rate,
                             "overhead_p50_ms": float(np.percentile(rt, 50) - np.percentile(d, 50)),
                             "overhead_p99_ms": float(np.percentile(rt, 99) - np.percentile(d, 99)),
                             "direct_ttft_p50_ms": float(np.percentile(d, 50)), "direct_ttft_p99_ms": float(np.percentile(d, 99)),
                             "router_ttft_p50_ms": float(np.percentile(rt, 50)), "router_ttft_p99_ms": float(np.percentile(rt, 99)),
                             "requests": len(rt)})
                if progress:
                    progress(f"{rate:g} req/s")
    finally:
        for p in reversed(procs):
            stop_process(p)
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {"results": rows, "config": {"duration_s": duration_s, "max_tokens": max_tokens, "prompt_tokens": 32,
                                        "engine": "simulated llama-3-8b, speedup 100, static batch 256"}}
