"""``chiron replay``: a trace through a running cluster's router, and the report of DESIGN.md §4.

* **Interactive traffic**: an Azure LLM inference trace (``../shared/data/traces/azure_llm_2023/``, Microsoft,
  CC-BY; or a user's CSV with the same columns) replayed at its own arrival times divided by ``speedup``,
  each request streamed through ``Router.Generate`` with random prompt token ids of its ``ContextTokens`` and
  ``GeneratedTokens`` output tokens (``ignore_eos``). The simulated engines run their clock ``speedup`` times
  faster too, so TTFT/ITL (reported by the engine, in engine time) stay in trace time.
* **Batch traffic**: requests with ShareGPT lengths (``../shared/data/traces/sharegpt/``, via
  microsoft/sarathi-serve) submitted through ``Router.Submit`` at ``batch_rate_per_s`` (trace time) with a TTFT
  SLO of ``batch_ttft_s`` (trace time; the queue runs on the wall clock, so it gets ``batch_ttft_s / speedup``).
  A batch request meets its SLO when an engine took it (first lease) within that SLO.
* **Timeline**: the scaler's ``WatchDecisions`` (instances per role) and the queue's ``WatchStats`` (queued
  requests), sampled as they stream.
* **Reconciliation**: every accepted request id is checked against its final outcome. An interactive request
  is accepted once the router returned its first chunk; it must end with ``FINISH_REASON_LENGTH`` and all its
  tokens. A batch request is accepted when ``Submit`` returned; at the end it must be DONE with all its
  tokens, or still held by the queue (``unfinished``, reported, not lost). Anything else is ``lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from chiron.v1 import queue_pb2, queue_pb2_grpc, router_pb2, router_pb2_grpc, scaler_pb2, scaler_pb2_grpc, types_pb2
from services.common.failover import FailoverChannel
from services.common.security import auth_metadata
from services.common.traces import Trace
from services.slo import slo_met

MODEL = "llama-3-8b"


@dataclass
class ReplayConfig:
    speedup: float = 4.0
    interactive_ttft_ms: int = 10_000  # trace (engine) time
    interactive_itl_ms: int = 100
    max_output_tokens: int = 1024
    batch_rate_per_s: float = 0.5  # trace time
    batch_ttft_s: float = 600.0  # trace time
    batch_max_output_tokens: int = 512
    drain_timeout_s: float = 120.0  # wall seconds to wait for batch work after the trace ends
    seed: int = 0


@dataclass
class _Interactive:
    rid: str
    prompt: int
    output: int
    accepted: bool = False
    status: str = ""
    ttft_ms: float = math.nan
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    finish: int = 0


@dataclass
class _Batch:
    rid: str
    output: int
    accepted: bool = False
    status: str = ""
    state: int = 0
    ttft_s: float = math.nan
    tokens: int = 0


def _prompt(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(3, 32000, size=max(1, n)).tolist()


async def _generate(stub, rec: _Interactive, rng: np.random.Generator, cfg: ReplayConfig, auth) -> None:
    """Stream one interactive request through ``Router.Generate``, recording its outcome in ``rec``."""
    req = types_pb2.InferenceRequest(
        request_id=rec.rid, model=MODEL, prompt_token_ids=_prompt(rng, rec.prompt), max_tokens=rec.output,
        ignore_eos=True, slo=types_pb2.SLO(ttft_ms=cfg.interactive_ttft_ms, itl_ms=cfg.interactive_itl_ms))
    try:
        async for msg in stub.Generate(router_pb2.RouterGenerateRequest(request=req), metadata=auth):
            rec.accepted = True
            c = msg.chunk
            if c.token_ids:
                if rec.tokens == 0:
                    rec.ttft_ms = c.ttft_ms
                else:
                    rec.itls.append(c.itl_ms)
                rec.tokens += len(c.token_ids)
            if c.finish_reason:
                rec.finish = c.finish_reason
        rec.status = "OK"
    except grpc.aio.AioRpcError as e:
        rec.status = e.code().name


async def _submit(stub, rec: _Batch, prompt_len: int, rng: np.random.Generator, cfg: ReplayConfig, auth) -> None:
    """Submit one batch request (``Router.Submit``; its TTFT SLO in wall time, the queue's clock)."""
    req = types_pb2.InferenceRequest(
        request_id=rec.rid, model=MODEL, prompt_token_ids=_prompt(rng, prompt_len), max_tokens=rec.output,
        ignore_eos=True, request_class=types_pb2.REQUEST_CLASS_BATCH,
        slo=types_pb2.SLO(ttft_ms=max(1, int(cfg.batch_ttft_s * 1000 / cfg.speedup))))
    try:
        await stub.Submit(router_pb2.SubmitRequest(request=req), metadata=auth)
        rec.accepted = True
    except grpc.aio.AioRpcError as e:
        rec.status = e.code().name


async def _watch_scaler(scaler: str | None, timeline: list[dict], t_wall0: float, speedup: float) -> None:
    """Append each streamed scaler decision's current and desired instances per role to ``timeline`` (trace time)."""
    if not scaler:
        return
    async with FailoverChannel(scaler) as ch:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for msg in scaler_pb2_grpc.GlobalScalerStub(ch).WatchDecisions(scaler_pb2.WatchDecisionsRequest()):
                d = msg.decision
                timeline.append({"t_s": (time.monotonic() - t_wall0) * speedup,
                                 **{r.role: r.current for r in d.roles},
                                 **{f"desired_{r.role}": r.desired for r in d.roles}})


async def _watch_queue(queue: str | None, sizes: list[tuple[float, int]], t_wall0: float, speedup: float) -> None:
    """Append (trace time, queued + leased requests) to ``sizes`` every 500 ms of the queue's stats stream."""
    if not queue:
        return
    async with FailoverChannel(queue) as ch:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for msg in queue_pb2_grpc.QueueStub(ch).WatchStats(queue_pb2.QueueWatchStatsRequest(interval_ms=500)):
                sizes.append(((time.monotonic() - t_wall0) * speedup, msg.stats.queued + msg.stats.leased))


def _arrival_events(trace: Trace, batch_lengths: np.ndarray, rng: np.random.Generator, batch_rate_per_s: float,
                    duration_s: float) -> list[tuple[float, str, int, int]]:
    """(trace time, "i" or "b", prompt tokens, output tokens), sorted: interactive arrivals from the trace, batch
    ones at a Poisson rate over the same span with lengths drawn from ``batch_lengths``."""
    events = [(float(t), "i", int(p), int(g)) for t, p, g in zip(trace.arrival_s, trace.prompt_tokens,
                                                                 trace.output_tokens, strict=True)]
    t = rng.exponential(1 / batch_rate_per_s) if batch_rate_per_s > 0 else math.inf
    while t < duration_s:
        p, d = batch_lengths[rng.integers(len(batch_lengths))]
        events.append((t, "b", int(p), int(d)))
        t += rng.exponential(1 / batch_rate_per_s)
    events.sort()
    return events


async def _await_batch_results(stub, batch: list[_Batch], cfg: ReplayConfig, auth) -> None:
    """Poll ``Router.GetResult`` each second until every accepted batch request is done or ``drain_timeout_s``
    (wall) has passed, recording each one's state, TTFT (trace time) and tokens."""
    deadline = time.monotonic() + cfg.drain_timeout_s
    pending = [b for b in batch if b.accepted]
    while pending and time.monotonic() < deadline:
        still = []
        for b in pending:
            try:
                res = (await stub.GetResult(router_pb2.GetResultRequest(request_id=b.rid), metadata=auth)).result
            except grpc.aio.AioRpcError as e:
                b.status = e.code().name
                continue
            b.state = res.state
            if res.HasField("first_leased"):
                b.ttft_s = (res.first_leased.ToNanoseconds() - res.arrival.ToNanoseconds()) / 1e9 * cfg.speedup
            if res.state == queue_pb2.QUEUED_REQUEST_STATE_DONE:
                b.tokens = len(res.output_token_ids) or res.num_generated_tokens
                b.status = "OK"
            else:
                still.append(b)
        pending = still
        if pending:
            await asyncio.sleep(1.0)


async def replay(router: str, scaler: str | None, queue: str | None, trace: Trace, batch_lengths: np.ndarray,
                 cfg: ReplayConfig, progress=None) -> dict:
    """Replay ``trace`` (interactive) plus a batch stream through ``router``; returns the §4 report. ``router``
    (and ``queue``, ``scaler``): one address or several separated by commas; a call UNAVAILABLE at one is made
    at the next (:mod:`services.common.failover`; a stream only before its first message)."""
    rng = np.random.default_rng(cfg.seed)
    t_wall0 = time.monotonic()
    duration_trace_s = float(trace.arrival_s[-1]) if len(trace) else 0.0
    timeline: list[dict] = []
    queue_sizes: list[tuple[float, int]] = []
    inter: list[_Interactive] = []
    batch: list[_Batch] = []

    auth = auth_metadata()  # the Router is client-facing: CHIRON_TOKEN when it requires a bearer token
    async with FailoverChannel(router) as rch:  # several routers: 'a:1,b:2', failed over
        stub = router_pb2_grpc.RouterStub(rch)

        watchers = [asyncio.create_task(_watch_scaler(scaler, timeline, t_wall0, cfg.speedup)),
                    asyncio.create_task(_watch_queue(queue, queue_sizes, t_wall0, cfg.speedup))]
        events = _arrival_events(trace, batch_lengths, rng, cfg.batch_rate_per_s, duration_trace_s)
        tasks = []
        for k, (t_s, kind, p, d) in enumerate(events):
            delay = t_wall0 + t_s / cfg.speedup - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if kind == "i":
                rec = _Interactive(f"i-{k}", p, max(1, min(d, cfg.max_output_tokens)))
                inter.append(rec)
                tasks.append(asyncio.create_task(_generate(stub, rec, rng, cfg, auth)))
            else:
                brec = _Batch(f"b-{k}", max(1, min(d, cfg.batch_max_output_tokens)))
                batch.append(brec)
                tasks.append(asyncio.create_task(_submit(stub, brec, p, rng, cfg, auth)))
            if progress:
                progress(t_s / max(duration_trace_s, 1e-9))
        await asyncio.gather(*tasks)
        await _await_batch_results(stub, batch, cfg, auth)
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    wall = time.monotonic() - t_wall0
    return build_report(cfg, trace.name, inter, batch, timeline, queue_sizes, wall)


def build_report(cfg: ReplayConfig, trace_name: str, inter: list[_Interactive], batch: list[_Batch], timeline: list[dict],
                 queue_sizes: list[tuple[float, int]], wall_s: float) -> dict:
    acc_i = [r for r in inter if r.accepted]
    ok_i = [r for r in acc_i if r.status == "OK" and r.finish == types_pb2.FINISH_REASON_LENGTH and r.tokens == r.output]
    lost_i = [r.rid for r in acc_i if r not in ok_i]

    ok_ids = {id(r) for r in ok_i}

    def meets(r: _Interactive) -> bool:
        return slo_met(id(r) in ok_ids, r.ttft_ms, cfg.interactive_ttft_ms,
                       float(np.mean(r.itls)) if r.itls else 0.0, cfg.interactive_itl_ms)

    ttft = np.array([r.ttft_ms for r in ok_i]) if ok_i else np.array([math.nan])
    itl = np.concatenate([r.itls for r in ok_i if r.itls]) if any(r.itls for r in ok_i) else np.array([math.nan])
    acc_b = [b for b in batch if b.accepted]
    done_b = [b for b in acc_b if b.status == "OK" and b.tokens == b.output]
    unfinished = [b.rid for b in acc_b if b.state in (queue_pb2.QUEUED_REQUEST_STATE_QUEUED, queue_pb2.QUEUED_REQUEST_STATE_LEASED)]
    lost_b = [b.rid for b in acc_b if b not in done_b and b.rid not in unfinished]
    bt = np.array([b.ttft_s for b in done_b]) if done_b else np.array([math.nan])
    n_all = len(inter) + len(batch)
    met_b = sum(slo_met(True, b.ttft_s, cfg.batch_ttft_s) for b in done_b)
    met = sum(meets(r) for r in inter) + met_b

    # Instance-seconds by role from the scaler's timeline (trace time), and scale events.
    inst_s = {"interactive": 0.0, "mixed": 0.0, "batch": 0.0}
    events = []
    for a, b in zip(timeline, timeline[1:], strict=False):
        dt = b["t_s"] - a["t_s"]
        for role in inst_s:
            inst_s[role] += a.get(role, 0) * dt
            if b.get(role, 0) != a.get(role, 0):
                events.append({"t_s": b["t_s"], "role": role, "from": a.get(role, 0), "to": b.get(role, 0)})
    tokens = sum(r.tokens for r in ok_i) + sum(b.tokens for b in done_b)
    return {
        "policy": "chiron", "trace": trace_name, "requests": n_all,
        "interactive": {"count": len(inter), "accepted": len(acc_i), "rejected": len(inter) - len(acc_i),
                        "slo_attainment": sum(meets(r) for r in inter) / max(len(inter), 1),
                        "ttft_p50_ms": float(np.nanpercentile(ttft, 50)), "ttft_p99_ms": float(np.nanpercentile(ttft, 99)),
                        "itl_p50_ms": float(np.nanpercentile(itl, 50)), "itl_p99_ms": float(np.nanpercentile(itl, 99))},
        "batch": {"count": len(batch), "accepted": len(acc_b), "done": len(done_b), "unfinished": len(unfinished),
                  "slo_attainment": met_b / max(len(batch), 1),
                  "ttft_p50_s": float(np.nanpercentile(bt, 50)), "ttft_p99_s": float(np.nanpercentile(bt, 99))},
        "slo_attainment": met / max(n_all, 1),
        "gpu_seconds": sum(inst_s.values()),
        "instance_seconds_by_role": inst_s,
        "throughput_tokens_per_s": tokens / max(wall_s * cfg.speedup, 1e-9),
        "scale_events": events,
        "lost_requests": len(lost_i) + len(lost_b),
        "lost_request_ids": (lost_i + lost_b)[:50],
        "wall_seconds": wall_s,
        "config": {"speedup": cfg.speedup, "interactive_ttft_ms": cfg.interactive_ttft_ms,
                   "interactive_itl_ms": cfg.interactive_itl_ms, "batch_rate_per_s": cfg.batch_rate_per_s,
                   "batch_ttft_s": cfg.batch_ttft_s, "times": "trace time (wall × speedup)"},
        "timeline": timeline, "queue_sizes": queue_sizes,
        "interactive_outcomes": [(r.rid, r.ttft_ms, meets(r)) for r in inter],
    }


def plot_report(report: dict, path: str) -> None:
    """PNG: instances by role, queue size, and interactive SLO attainment over (trace) time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    tl = report["timeline"]
    if tl:
        t = [p["t_s"] for p in tl]
        for role, style in (("interactive", "-"), ("mixed", "--"), ("batch", ":")):
            axes[0].step(t, [p.get(role, 0) for p in tl], where="post", label=role, linestyle=style, linewidth=2)
    axes[0].set_ylabel("instances")
    axes[0].legend(loc="upper left")
    if report["queue_sizes"]:
        qt, qs = zip(*report["queue_sizes"], strict=True)
        axes[1].plot(qt, qs, color="tab:purple")
    axes[1].set_ylabel("batch requests in queue")
    outcomes = report["interactive_outcomes"]
    if outcomes and tl:
        # Attainment per window of 20 requests, placed at the window's share of the run.
        ok = np.array([m for _, _, m in outcomes], dtype=float)
        w = max(1, min(20, len(ok)))
        roll = np.convolve(ok, np.ones(w) / w, mode="valid")
        axes[2].plot(np.linspace(0, tl[-1]["t_s"], len(roll)), roll, color="tab:green")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_ylabel("interactive SLO attainment")
    axes[2].set_xlabel("trace time [s]")
    fig.suptitle(f"Chiron replay of {report['trace']}: lost requests {report['lost_requests']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
