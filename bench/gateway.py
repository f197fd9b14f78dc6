"""``chiron bench gateway``: the latency the OpenAI-compatible HTTP gateway adds over calling the router's gRPC.

A real cluster on loopback, every part its own process: etcd, the queue, one simulated engine agent
(``--speedup 100``, a static batch of 256: never the bottleneck), the router and the gateway
(``gateway_workers`` worker processes, 1 by default). At each rate (50 and 200 requests/s by default) an
open-loop Poisson client sends requests for ``duration_s``, alternately along the two paths (both run side by
side under the same load, each at half the rate): a streaming ``POST /v1/completions`` to the gateway (aiohttp,
or httpx; HTTP/1.1 keep-alive), or the same request straight to ``Router.Generate``. Same prompt, ``max_tokens``
and SLOs. TTFT is measured at the client: send → first streamed token.

* ``overhead_p50_ms`` / ``overhead_p99_ms``: p50 / p99 of the gateway path's TTFT minus the direct path's;
  ``overhead_p50_ci95_ms`` / ``overhead_p99_ci95_ms``: 95% intervals from a block bootstrap over 1-s windows of
  send time (:func:`overhead_interval`); a p99 of 3,000 requests rests on its 30 slowest, which come in bursts.
* ``gateway_internal_p50_ms`` / ``_p99_ms``: the gateway's own time per streamed request, from its
  ``chiron_gateway_overhead_seconds`` histogram (interpolated within buckets).
* ``cpu_ms_per_request`` per part, from ``/proc`` (the gateway's summed over its workers).

On a 2-core machine everything shares two cores, so the tails are set by scheduling. The bench process freezes
its start-up heap like the services do (:func:`services.common.grpc_util.settle_heap`). Why the gateway uses one
``Router.GenerateMany`` stream and one worker: ``docs/decisions/0013-gateway-router-stream.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc
import httpx
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.router import start_router_stack
from chiron.v1 import router_pb2, router_pb2_grpc, types_pb2
from services.cluster import spawn_chiron, wait_http_ready
from services.common.etcd_server import EtcdServer
from services.common.grpc_util import settle_heap
from services.engine.demo import stop_process, wait_port_file
from services.gateway.tokenizer import SimpleTokenizer

MODEL = "llama-3-8b"


def _cpu_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (psutil; idle and I/O wait count as not busy)."""
    t = psutil.cpu_times()
    total = sum(t)
    return total - t.idle - getattr(t, "iowait", 0.0), total


def _proc_cpu_s(pid: int | None, children: bool = False) -> float | None:
    """User + system CPU seconds a process (``None``: this one) has used, with its children's (a gateway's
    workers) when ``children``; from ``/proc`` through psutil; None where there is none."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)] if children else [proc]
        return sum(t.user + t.system for t in (p.cpu_times() for p in procs))
    except (psutil.Error, ValueError):
        return None


async def _overhead_buckets(http: httpx.AsyncClient) -> dict[float, float]:
    """The gateway's ``chiron_gateway_overhead_seconds`` histogram for /v1/completions: {upper bound [s]: count}."""
    text = (await http.get("/metrics")).text
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "chiron_gateway_overhead_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket") and sample.labels.get("endpoint") == "/v1/completions":
                    out[float(sample.labels["le"])] = sample.value
    return out


def _bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Quantile ``q`` [ms] of the observations between two cumulative histogram reads, interpolated linearly in
    its bucket (as PromQL's histogram_quantile does); NaN without observations."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return math.nan
    rank, lo, below = q * total, 0.0, 0.0
    for b, c in zip(bounds, counts, strict=True):
        if c >= rank:
            if math.isinf(b):
                return lo * 1e3
            return (lo + (b - lo) * (rank - below) / max(c - below, 1e-12)) * 1e3
        lo, below = b, c
    return lo * 1e3


def overhead_interval(gateway: np.ndarray, direct: np.ndarray, q: float, block_s: float = 1.0, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """95% interval [ms] of ``percentile_q(gateway TTFT) − percentile_q(direct TTFT)`` by a block bootstrap.

    ``gateway``, ``direct``: arrays of shape (n, 2), each row (send time [s from the start], TTFT [ms]); ``q`` in
    [0, 100]. Resamples ``block_s``-long windows of send time with replacement, both paths' requests of a window
    together: requests within a burst are slow together (one burst of about 100 ms moves a p99 by milliseconds),
    so resampling requests one by one would understate the spread. Raises ValueError for empty input.
    """
    if len(gateway) == 0 or len(direct) == 0:
        raise ValueError("both paths need requests")
    n_blocks = int(max(gateway[:, 0].max(), direct[:, 0].max()) // block_s) + 1

    def split(a: np.ndarray) -> list[np.ndarray]:
        idx = (a[:, 0] // block_s).astype(int)
        return [a[idx == b, 1] for b in range(n_blocks)]

    g_blocks, d_blocks = split(gateway), split(direct)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        pick = rng.integers(0, n_blocks, n_blocks)
        g = np.concatenate([g_blocks[b] for b in pick])
        d = np.concatenate([d_blocks[b] for b in pick])
        if g.size and d.size:
            diffs.append(np.percentile(g, q) - np.percentile(d, q))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


async def _run_rate(paths: dict, rate: float, duration_s: float, seed: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Open-loop Poisson arrivals at ``rate`` [requests/s] in total, sent alternately along each path. Returns, by
    path, the requests that completed as an array of shape (n, 2) — send time [s from the start], client-side
    TTFT [ms] — and the number that failed."""
    rng = np.random.default_rng(seed)
    names = list(paths)
    times = np.cumsum(rng.exponential(1.0 / rate, int(rate * duration_s * 2) + 10))
    events = [(t, names[i % len(names)]) for i, t in enumerate(times) if t < duration_s]
    ttfts: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    errors = dict.fromkeys(paths, 0)
    tasks = []

    async def one(name: str, i: int, t: float) -> None:
        t0 = time.perf_counter()
        try:
            first = await paths[name](i)
        except (grpc.aio.AioRpcError, httpx.HTTPError, aiohttp.ClientError, RuntimeError):
            errors[name] += 1
            return
        ttfts[name].append((t, (first - t0) * 1e3))

    start = time.perf_counter()
    for i, (t, name) in enumerate(events):
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(name, i, t)))
    await asyncio.gather(*tasks)
    return {name: np.array(v, dtype=float).reshape(-1, 2) for name, v in ttfts.items()}, errors


async def run_bench(rates=(50.0, 200.0), duration_s: float = 30.0, max_tokens: int = 4, prompt_words: int = 32,
                    progress=None, http_client: str = "aiohttp", gateway_workers: int = 1) -> dict:
    """Start the parts, measure every rate, stop everything. Returns ``{"results": [{"rate_rps",
    "overhead_p50_ms", "overhead_p99_ms", ...}], "config": {...}}``. Raises RuntimeError / TimeoutError when a
    part fails to start (its log is in the message), EtcdNotFound without an etcd binary."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a log line per request would load the client side
    work = Path(tempfile.mkdtemp(prefix="chiron-bench-gateway-"))
    etcd = EtcdServer(work / "etcd")
    etcd.start()
    procs = []
    try:
        _, rport = await start_router_stack(work, etcd, procs)
        g, gpf = spawn_chiron(work, "gateway", ["gateway", "--router", f"127.0.0.1:{rport}",
                                                "--workers", str(gateway_workers)])
        procs.append(g)
        gport = await wait_port_file(gpf, g)
        gateway_url = f"http://127.0.0.1:{gport}"
        await wait_http_ready(gateway_url, proc=g)

        prompt = " ".join(["hello"] * prompt_words)
        ids = SimpleTokenizer().encode(prompt)
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=2000)
        body_bytes = json.dumps(body).encode()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rport}") as rch, \
                httpx.AsyncClient(base_url=gateway_url, limits=limits, timeout=60.0) as http, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                      timeout=aiohttp.ClientTimeout(total=60.0)) as aio:
            rstub = router_pb2_grpc.RouterStub(rch)

            async def direct(_i: int) -> float:
                first = None
                req = types_pb2.InferenceRequest(model=MODEL, prompt_token_ids=ids, max_tokens=max_tokens)
                async for _ in rstub.Generate(router_pb2.RouterGenerateRequest(request=req)):
                    first = first or time.perf_counter()
                if first is None:
                    raise RuntimeError("no token")
                return first

            async def gateway_httpx(_i: int) -> float:
                first = None
                async with http.stream("POST", "/v1/completions", json=body) as resp:
                    if resp.status_code != 200:
                        await resp.aread()
                        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                    async for _ in resp.aiter_raw():  # the first bytes are the first token's SSE event
                        first = first or time.perf_counter()
                if first is None:
                    raise RuntimeError("no token")
                return first

            async def gateway_aiohttp(_i: int) -> float:
                first = None
                async with aio.post(f"{gateway_url}/v1/completions", data=body_bytes,
                                    headers={"Content-Type": "application/json"}) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                    async for _ in resp.content.iter_any():  # the first bytes are the first token's SSE event
                        first = first or time.perf_counter()
                if first is None:
                    raise RuntimeError("no token")
                return first

            gateway = gateway_aiohttp if http_client == "aiohttp" else gateway_httpx

            # CPU per request of each part: where the HTTP hop's cost goes.
            parts = {"client": None, "gateway": g.pid, "router": procs[2].pid, "engine": procs[1].pid,
                     "queue": procs[0].pid}
            paths = {"gateway": gateway, "direct": direct}
            await _run_rate(paths, 20.0, 1.0, 99)  # warm both paths (connections, the router's first stats)
            settle_heap()  # the client's own collections would stall both paths alike
            rows = []
            for k, rate in enumerate(rates):
                cpu0, load0 = _cpu_busy(), time.perf_counter()
                part0 = {name: _proc_cpu_s(pid, name == "gateway") for name, pid in parts.items()}
                hist0 = await _overhead_buckets(http)
                ttfts, errors = await _run_rate(paths, rate, duration_s, k)
                hist1 = await _overhead_buckets(http)
                cpu1 = _cpu_busy()
                part1 = {name: _proc_cpu_s(pid, name == "gateway") for name, pid in parts.items()}
                if not len(ttfts["gateway"]) or not len(ttfts["direct"]):
                    raise RuntimeError(f"no request completed at {rate:g} req/s (errors: {errors}); see the logs in {work}")
                gw, d = ttfts["gateway"][:, 1], ttfts["direct"][:, 1]
                row = {"rate_rps": rate, "gateway_rps": rate / 2, "direct_rps": rate / 2,
                       "overhead_p50_ms": float(np.percentile(gw, 50) - np.percentile(d, 50)),
                       "overhead_p99_ms": float(np.percentile(gw, 99) - np.percentile(d, 99)),
                       "overhead_p50_ci95_ms": list(overhead_interval(ttfts["gateway"], ttfts["direct"], 50, seed=k)),
                       "overhead_p99_ci95_ms": list(overhead_interval(ttfts["gateway"], ttfts["direct"], 99, seed=k)),
                       "gateway_ttft_p50_ms": float(np.percentile(gw, 50)), "gateway_ttft_p99_ms": float(np.percentile(gw, 99)),
                       "direct_ttft_p50_ms": float(np.percentile(d, 50)), "direct_ttft_p99_ms": float(np.percentile(d, 99)),
                       "gateway_internal_p50_ms": _bucket_quantile(hist0, hist1, 0.50),
                       "gateway_internal_p99_ms": _bucket_quantile(hist0, hist1, 0.99),
                       "gateway_requests": len(gw), "direct_requests": len(d),
                       "gateway_errors": errors["gateway"], "direct_errors": errors["direct"],
                       "wall_s": time.perf_counter() - load0}
                n = len(gw) + len(d)
                # The gateway serves only the gateway half; the client, router and engine serve both.
                per = {name: (part1[name] - part0[name]) * 1e3 / (len(gw) if name == "gateway" else n)
                       for name in parts if part0[name] is not None and part1[name] is not None}
                row["cpu_ms_per_request"] = per
                if cpu1[1] > cpu0[1]:
                    row["machine_cpu_busy"] = (cpu1[0] - cpu0[0]) / (cpu1[1] - cpu0[1])
                rows.append(row)
                if progress:
                    progress(f"{rate:g} req/s")
    finally:
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                stop_process(p)
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {"results": rows,
            "config": {"duration_s": duration_s, "max_tokens": max_tokens, "prompt_tokens": len(ids),
                       "cpu_count": os.cpu_count(), "load_average_1m_after": os.getloadavg()[0], "http_client": http_client,
                       "gateway_workers": gateway_workers,
                       "engine": "simulated llama-3-8b, speedup 100, static batch 256",
                       "load": "rate_rps in total (open-loop Poisson), every other request through the gateway"}}
