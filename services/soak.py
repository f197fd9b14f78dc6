"""``chiron soak``: a local cluster under steady load for N minutes, sampling every process's memory and descriptors.

A benchmark, not a CI test: a local cluster (:func:`services.cluster.start_cluster`), for ``minutes`` of wall time:

* **Load**: interactive requests at a constant rate (``interactive_rate_per_s``) as streaming ``POST
  /v1/completions`` through the OpenAI-compatible gateway (so gateway → router → engine), at most
  ``max_in_flight`` at once (an arrival beyond that is counted as ``skipped``, not sent), plus a trickle of
  batch requests (``batch_rate_per_s``, constant spacing) through ``Router.Submit`` with a short TTFT SLO, so
  the scaler starts BATCH instances and removes them again: engines come and go.
* **Sampling**: every ``interval_s`` seconds, every process of the cluster: etcd, queue, router, gateway,
  scaler (a part the supervisor restarted appears as a new pid), every process below them (the scaler's engine
  agents) and every ``chiron engine`` whose port file is under the cluster's ``engines`` folder (an engine
  whose scaler died), tracked by pid with role and name; a sample is ``[t_s, rss_bytes, open_fds]`` (``t_s``:
  seconds since the load started) from ``/proc/PID/status`` (``VmRSS``) and ``/proc/PID/fd`` (Linux).

**Summary per process** (:func:`summarize_process`, a pure function), over the *window*: the last 50 minutes of
the run (``--minutes`` ≥ 60), else the last ``minutes − 10`` minutes, but at least the second half of the run
(so ``--minutes 20``: the last 10 minutes; ``--minutes 0.5``: the last 15 s); the first minutes are warm-up.

* ``rss_growth_pct`` = 100 × (median RSS of the process's samples in the final ``edge`` minutes of the window −
  median RSS of its samples in the first ``edge`` minutes of the window) / that first median, with ``edge`` =
  min(5 min, window / 2). A process that was not alive for the whole window is measured over the part of the
  window it lived (``covers_window`` false) and gets ``None`` when that part is shorter than two edges.
* ``fd_slope_per_min``: the least-squares slope (``numpy.polyfit``, degree 1) of open descriptors against
  minutes, over the process's samples in the window; ``fd_drift`` = |slope| × span (the window's length for a
  process that covers it, else the minutes it was sampled in the window); ``fd_flat`` = ``fd_drift`` ≤ 2.

**Targets** (``--minutes 60``): every process that covers the window has ``rss_growth_pct`` ≤ 5 and a flat
descriptor count (``targets.met``); processes that did not (engines the scaler added or removed) are not judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MODEL = "llama-3-8b"
RSS_GROWTH_TARGET_PCT = 5.0
FD_FLAT_MAX = 2.0
SERVICES = ("etcd", "queue", "router", "gateway", "scaler")


@dataclass
class SoakConfig:
    minutes: float = 60.0
    interval_s: float = 5.0  # sampling period
    interactive_rate_per_s: float = 5.0
    interactive_prompt_words: int = 64
    interactive_max_tokens: int = 32
    batch_rate_per_s: float = 0.1
    batch_prompt_tokens: int = 256
    batch_max_tokens: int = 128
    batch_ttft_s: float = 60.0  # short: the scaler adds BATCH instances, then removes them after its delay window
    max_in_flight: int = 64
    window_min: float | None = None  # None: default_window_min(minutes)
    edge_min: float | None = None  # None: min(5, window / 2)
    work_dir: str | None = None


def default_window_min(minutes: float) -> float:
    """The summary window: 50 min when ``minutes`` ≥ 60, else ``minutes`` − 10, but at least ``minutes`` / 2."""
    if minutes >= 60:
        return 50.0
    return max(minutes - 10.0, minutes / 2.0)


def default_edge_min(window_min: float) -> float:
    return min(5.0, window_min / 2.0)


# ---------------------------------------------------------------------------------------------------------------
# Summary math (pure)
# ---------------------------------------------------------------------------------------------------------------
def summarize_process(samples: list[list[float]] | np.ndarray, window_start_s: float, window_end_s: float,
                      edge_s: float) -> dict:
    """Summary of one process's ``samples`` (rows ``[t_s, rss_bytes, fds]``) over ``[window_start_s,
    window_end_s]`` (module docstring for the definitions). Pure: no clock, no I/O."""
    a = np.asarray(samples, dtype=float).reshape(-1, 3)
    a = a[(a[:, 0] >= window_start_s) & (a[:, 0] <= window_end_s)]
    window_s = window_end_s - window_start_s
    out: dict = {"samples_in_window": int(len(a)), "covers_window": False, "rss_first_bytes": None,
                 "rss_final_bytes": None, "rss_growth_pct": None, "fd_slope_per_min": None, "fd_drift": None,
                 "fd_flat": None, "fd_min": None, "fd_max": None, "span_min": 0.0}
    if len(a) == 0:
        return out
    t0, t1 = float(a[0, 0]), float(a[-1, 0])
    # Covers the window when sampled within one edge of both of its ends (sampling period ≪ edge).
    covers = t0 - window_start_s <= edge_s / 2 and window_end_s - t1 <= edge_s / 2
    span_s = window_s if covers else t1 - t0
    out.update(covers_window=bool(covers), span_min=span_s / 60.0, fd_min=int(a[:, 2].min()), fd_max=int(a[:, 2].max()))
    if t1 - t0 >= 2 * edge_s * 0.9 or covers:
        lo, hi = (window_start_s, window_end_s) if covers else (t0, t1)
        first = a[a[:, 0] <= lo + edge_s, 1]
        final = a[a[:, 0] >= hi - edge_s, 1]
        if len(first) and len(final):
            f0, f1 = float(np.median(first)), float(np.median(final))
            out.update(rss_first_bytes=f0, rss_final_bytes=f1,
                       rss_growth_pct=100.0 * (f1 - f0) / f0 if f0 > 0 else None)
    if len(a) >= 2 and t1 > t0:
        slope = float(np.polyfit(a[:, 0] / 60.0, a[:, 2], 1)[0])
        drift = abs(slope) * span_s / 60.0
        out.update(fd_slope_per_min=slope, fd_drift=drift, fd_flat=bool(drift <= FD_FLAT_MAX))
    return out


def summarize(processes: dict[str, dict], run_end_s: float, window_min: float, edge_min: float) -> dict:
    """Add ``summary`` to every process of ``processes`` (key → ``{"samples": [...], ...}``) over the window
    ending at ``run_end_s``; return the totals and targets."""
    w0, w1, edge_s = run_end_s - window_min * 60.0, run_end_s, edge_min * 60.0
    judged, failing = [], []
    for key, p in processes.items():
        s = summarize_process(p["samples"], w0, w1, edge_s)
        p["summary"] = s
        if not s["covers_window"]:
            continue
        judged.append(key)
        ok_rss = s["rss_growth_pct"] is not None and s["rss_growth_pct"] <= RSS_GROWTH_TARGET_PCT
        if not (ok_rss and s["fd_flat"]):
            failing.append(key)
    growth = [p["summary"]["rss_growth_pct"] for k, p in processes.items() if k in judged]
    growth = [g for g in growth if g is not None]
    drift = [p["summary"]["fd_drift"] for k, p in processes.items() if k in judged and p["summary"]["fd_drift"] is not None]
    last_rss = [p["samples"][-1][1] for p in processes.values() if p["samples"] and p["samples"][-1][0] >= run_end_s - 1e-9]
    return {
        "window": {"start_s": w0, "end_s": w1, "minutes": window_min, "edge_minutes": edge_min},
        "totals": {"processes": len(processes), "processes_covering_window": len(judged),
                   "max_rss_growth_pct": max(growth) if growth else None,
                   "max_fd_drift": max(drift) if drift else None,
                   "rss_bytes_at_end": float(sum(last_rss))},
        "targets": {"rss_growth_pct_max": RSS_GROWTH_TARGET_PCT, "fd_drift_max": FD_FLAT_MAX,
                    "judged": judged, "failing": failing, "met": bool(judged) and not failing,
                    "note": "issue 29: RSS growth ≤ 5% and a flat descriptor count per process over the last "
                            "50 minutes of --minutes 60"},
    }


# ---------------------------------------------------------------------------------------------------------------
# /proc sampling
# ---------------------------------------------------------------------------------------------------------------
def read_rss_fds(pid: int) -> tuple[int, int] | None:
    """(RSS bytes, open descriptors) of ``pid`` from /proc, or None when it is gone (or a zombie)."""
    try:
        rss = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:") and line.split()[1] == "Z":
                    return None
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    break
        if rss is None:
            return None
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError, IndexError):
        return None


def _proc_table() -> dict[int, tuple[int, list[str]]]:
    """pid → (ppid, argv) of every process readable in /proc."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = [x.decode(errors="replace") for x in f.read().split(b"\0") if x]
        except (OSError, ValueError, IndexError):
            continue
        table[int(d)] = (ppid, argv)
    return table


def _arg(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def _engine_label(argv: list[str]) -> tuple[str, str] | None:
    if "engine" not in argv or "--role" not in argv:
        return None
    return "engine", f"{_arg(argv, '--instance-id') or '?'} ({_arg(argv, '--role')})"


def discover(roots: dict[str, int], engines_dir: Path | None) -> dict[int, tuple[str, str]]:
    """pid → (role, name) of the cluster's processes: ``roots`` (service name → pid), every descendant of them,
    and every ``chiron engine`` with its port file under ``engines_dir``."""
    table = _proc_table()
    found = {pid: (name, name) for name, pid in roots.items() if pid in table}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in found:
                argv = table[c][1]
                found[c] = _engine_label(argv) or ("child", f"{_parent_name(found, table, c)}/{Path(argv[0]).name if argv else '?'}")
                stack.append(c)
    if engines_dir is not None:
        prefix = str(engines_dir) + os.sep
        for pid, (_, argv) in table.items():
            pf = _arg(argv, "--port-file")
            if pid not in found and pf and pf.startswith(prefix) and (lab := _engine_label(argv)):
                found[pid] = lab
    return found


def _parent_name(found: dict[int, tuple[str, str]], table: dict[int, tuple[int, list[str]]], pid: int) -> str:
    return found.get(table[pid][0], ("?", "?"))[1]


@dataclass
class Sampler:
    """Samples every discovered process; ``processes`` is keyed ``"ROLE:NAME[PID]"``."""

    t0: float
    processes: dict[str, dict] = field(default_factory=dict)
    _keys: dict[int, str] = field(default_factory=dict)

    def sample(self, pids: dict[int, tuple[str, str]], now: float | None = None) -> int:
        t = round((now if now is not None else time.monotonic()) - self.t0, 3)
        n = 0
        for pid, (role, name) in pids.items():
            v = read_rss_fds(pid)
            if v is None:
                continue
            key = self._keys.get(pid)
            if key is None or self.processes[key]["name"] != name:
                key = self._keys[pid] = f"{role}:{name}[{pid}]"
                self.processes.setdefault(key, {"pid": pid, "role": role, "name": name, "samples": []})
            self.processes[key]["samples"].append([t, v[0], v[1]])
            n += 1
        return n


# ---------------------------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LoadStats:
    interactive_sent: int = 0
    interactive_ok: int = 0
    interactive_skipped: int = 0
    interactive_errors: dict[str, int] = field(default_factory=dict)
    interactive_ttft_ms: list[float] = field(default_factory=list)
    batch_submitted: int = 0
    batch_accepted: int = 0
    batch_errors: dict[str, int] = field(default_factory=dict)
    batch_ids: list[str] = field(default_factory=list)

    def error(self, d: dict[str, int], what: str) -> None:
        d[what] = d.get(what, 0) + 1


async def _interactive_load(client, base_url: str, cfg: SoakConfig, stats: LoadStats, end: float,
                            rng: np.random.Generator) -> None:
    import httpx

    in_flight: set[asyncio.Task] = set()
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "again"]

    async def one() -> None:
        body = {"model": MODEL, "prompt": " ".join(rng.choice(words, cfg.interactive_prompt_words).tolist()),
                "max_tokens": cfg.interactive_max_tokens, "stream": True}
        t = time.monotonic()
        first = None
        try:
            async with client.stream("POST", f"{base_url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    stats.error(stats.interactive_errors, f"HTTP {r.status_code}")
                    return
                done = False
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and first is None:
                        first = time.monotonic()
                    if line.startswith("data: {\"error\""):
                        stats.error(stats.interactive_errors, "stream error")
                        return
                    if line == "data: [DONE]":
                        done = True
                if done:
                    stats.interactive_ok += 1
                    stats.interactive_ttft_ms.append(((first or time.monotonic()) - t) * 1000)
                else:
                    stats.error(stats.interactive_errors, "no [DONE]")
        except httpx.HTTPError as e:
            stats.error(stats.interactive_errors, type(e).__name__)

    period = 1.0 / cfg.interactive_rate_per_s
    k = 0
    start = time.monotonic()
    while True:
        at = start + k * period
        if at >= end:
            break
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        k += 1
        if len(in_flight) >= cfg.max_in_flight:
            stats.interactive_skipped += 1
            continue
        stats.interactive_sent += 1
        task = asyncio.create_task(one())
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=60)


async def _batch_load(router: str, cfg: SoakConfig, stats: LoadStats, end: float, rng: np.random.Generator) -> None:
    import grpc

    from chiron.v1 import router_pb2, router_pb2_grpc, types_pb2
    from services.common.failover import FailoverChannel
    from services.common.security import auth_metadata

    if cfg.batch_rate_per_s <= 0:
        return
    period = 1.0 / cfg.batch_rate_per_s
    auth = auth_metadata()
    async with FailoverChannel(router) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        k = 0
        start = time.monotonic() + period / 2
        while start + k * period < end:
            await asyncio.sleep(max(0.0, start + k * period - time.monotonic()))
            rid = f"soak-b-{k}"
            k += 1
            req = types_pb2.InferenceRequest(
                request_id=rid, model=MODEL, prompt_token_ids=rng.integers(3, 32000, size=cfg.batch_prompt_tokens).tolist(),
                max_tokens=cfg.batch_max_tokens, ignore_eos=True, request_class=types_pb2.REQUEST_CLASS_BATCH,
                slo=types_pb2.SLO(ttft_ms=int(cfg.batch_ttft_s * 1000)))
            stats.batch_submitted += 1
            try:
                await stub.Submit(router_pb2.SubmitRequest(request=req), metadata=auth, timeout=30)
                stats.batch_accepted += 1
                stats.batch_ids.append(rid)
            except grpc.aio.AioRpcError as e:
                stats.error(stats.batch_errors, e.code().name)


async def _batch_outcomes(router: str, ids: list[str]) -> dict[str, int]:
    """State of each accepted batch request at the end (no waiting): counts by queue state name."""
    import grpc

    from chiron.v1 import queue_pb2, router_pb2, router_pb2_grpc
    from services.common.failover import FailoverChannel
    from services.common.security import auth_metadata

    counts: dict[str, int] = {}
    auth = auth_metadata()
    async with FailoverChannel(router) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        for rid in ids:
            try:
                res = (await stub.GetResult(router_pb2.GetResultRequest(request_id=rid), metadata=auth, timeout=10)).result
                name = queue_pb2.QueuedRequestState.Name(res.state).removeprefix("QUEUED_REQUEST_STATE_").lower()
            except grpc.aio.AioRpcError as e:
                name = e.code().name
            counts[name] = counts.get(name, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
async def _load_and_sample(cluster, cfg: SoakConfig, stats: LoadStats, rng: np.random.Generator,
                           progress) -> tuple[Sampler, int]:
    """Load ``cluster`` (interactive through the gateway, batch through the router) for ``cfg.minutes`` while
    sampling every process of it every ``cfg.interval_s``; returns the sampler and the number of samples."""
    import httpx

    total_s = cfg.minutes * 60.0
    t0 = time.monotonic()
    end = t0 + total_s
    sampler = Sampler(t0)

    def pids() -> dict[int, tuple[str, str]]:
        roots = {n: p.pid for n, p in cluster.procs.items() if p.poll() is None}
        if cluster.etcd.running and cluster.etcd.proc is not None:
            roots["etcd"] = cluster.etcd.proc.pid
        return discover(roots, cluster.work / "engines")

    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=10.0),
                                 limits=httpx.Limits(max_connections=cfg.max_in_flight)) as client:
        load = [asyncio.create_task(_interactive_load(client, cluster.gateway_url, cfg, stats, end, rng)),
                asyncio.create_task(_batch_load(cluster.endpoint("router"), cfg, stats, end, rng))]
        k = 0
        while True:
            now = time.monotonic()
            at = t0 + k * cfg.interval_s
            if at > end + 1e-6:
                break
            await asyncio.sleep(max(0.0, at - now))
            found = await asyncio.to_thread(pids)
            await asyncio.to_thread(sampler.sample, found)
            k += 1
            if progress:
                progress(min(time.monotonic() - t0, total_s), total_s)
        await asyncio.gather(*load, return_exceptions=True)
    return sampler, k


async def run_soak(cfg: SoakConfig, progress=None, on_message=None) -> dict:
    """Start a local cluster, load it and sample it for ``cfg.minutes``, stop it; return the report.
    ``progress(elapsed_s, total_s)`` is called after every sample; ``on_message(str)`` with cluster messages."""
    from services.cluster import ClusterConfig, start_cluster

    say = on_message or (lambda _m: None)
    ccfg = ClusterConfig(work_dir=cfg.work_dir)
    t_start_cluster = time.monotonic()
    cluster = await start_cluster(ccfg, on_progress=say)
    startup_s = time.monotonic() - t_start_cluster
    stats = LoadStats()
    rng = np.random.default_rng(0)
    try:
        sampler, samples_taken = await _load_and_sample(cluster, cfg, stats, rng, progress)
        # The run's end: the last sampling time (every covering process has a sample there).
        run_end_s = max((s["samples"][-1][0] for s in sampler.processes.values() if s["samples"]), default=0.0)
        batch_states = await _batch_outcomes(cluster.endpoint("router"), stats.batch_ids)
        restarts = dict(cluster.restarts)
    finally:
        say("stopping the cluster (engines drain first)")
        await cluster.stop(grace_s=30)

    window = cfg.window_min if cfg.window_min is not None else default_window_min(cfg.minutes)
    window = min(window, run_end_s / 60.0)
    edge = cfg.edge_min if cfg.edge_min is not None else default_edge_min(window)
    processes = sampler.processes
    result = summarize(processes, run_end_s, window, edge)
    ttft = np.array(stats.interactive_ttft_ms) if stats.interactive_ttft_ms else np.array([np.nan])
    return {
        "benchmark": "soak",
        "config": {"minutes": cfg.minutes, "interval_s": cfg.interval_s,
                   "interactive_rate_per_s": cfg.interactive_rate_per_s,
                   "interactive_prompt_words": cfg.interactive_prompt_words,
                   "interactive_max_tokens": cfg.interactive_max_tokens, "batch_rate_per_s": cfg.batch_rate_per_s,
                   "batch_prompt_tokens": cfg.batch_prompt_tokens, "batch_max_tokens": cfg.batch_max_tokens,
                   "batch_ttft_s": cfg.batch_ttft_s, "max_in_flight": cfg.max_in_flight,
                   "engines": ccfg.engine_args, "scaler_args": ccfg.scaler_args,
                   "interactive_path": "gateway POST /v1/completions (stream)", "batch_path": "Router.Submit"},
        "cluster_startup_s": startup_s,
        "samples_taken": samples_taken,
        "run_end_s": run_end_s,
        "restarts": restarts,
        "load": {"interactive": {"sent": stats.interactive_sent, "ok": stats.interactive_ok,
                                 "skipped_at_max_in_flight": stats.interactive_skipped,
                                 "errors": stats.interactive_errors,
                                 "ttft_p50_ms": float(np.nanpercentile(ttft, 50)),
                                 "ttft_p99_ms": float(np.nanpercentile(ttft, 99))},
                 "batch": {"submitted": stats.batch_submitted, "accepted": stats.batch_accepted,
                           "errors": stats.batch_errors, "states_at_end": batch_states}},
        **result,
        "processes": processes,
    }


def print_summary(report: dict, console) -> None:
    from rich.table import Table

    w = report["window"]
    table = Table(title=f"soak: last {w['minutes']:g} min of {report['config']['minutes']:g} "
                        f"(edges {w['edge_minutes']:g} min)")
    for c in ("process", "pid", "samples", "covers", "RSS first MB", "RSS final MB", "RSS growth %", "fds",
              "fd slope/min", "fd drift", "flat"):
        table.add_column(c)
    for _key, p in sorted(report["processes"].items(), key=lambda kv: (kv[1]["role"] == "engine", kv[0])):
        s = p["summary"]

        def mb(v):
            return "-" if v is None else f"{v / 2**20:.1f}"

        table.add_row(f"{p['role']}:{p['name']}", str(p["pid"]), str(len(p["samples"])), "yes" if s["covers_window"] else "no",
                      mb(s["rss_first_bytes"]), mb(s["rss_final_bytes"]),
                      "-" if s["rss_growth_pct"] is None else f"{s['rss_growth_pct']:+.2f}",
                      "-" if s["fd_min"] is None else f"{s['fd_min']}–{s['fd_max']}",
                      "-" if s["fd_slope_per_min"] is None else f"{s['fd_slope_per_min']:+.3f}",
                      "-" if s["fd_drift"] is None else f"{s['fd_drift']:.2f}",
                      "-" if s["fd_flat"] is None else ("yes" if s["fd_flat"] else "NO"))
    console.print(table)
    t = report["targets"]
    li, lb = report["load"]["interactive"], report["load"]["batch"]
    console.print(f"load: interactive {li['ok']}/{li['sent']} ok (errors {li['errors'] or 'none'}, skipped "
                  f"{li['skipped_at_max_in_flight']}), batch {lb['accepted']}/{lb['submitted']} accepted, at end "
                  f"{lb['states_at_end']}; restarts {report['restarts'] or 'none'}")
    console.print(f"targets (RSS growth ≤ {t['rss_growth_pct_max']:g}%, fd drift ≤ {t['fd_drift_max']:g}) over "
                  f"{len(t['judged'])} processes covering the window: "
                  + ("[green]met[/]" if t["met"] else f"[red]not met[/] ({', '.join(t['failing']) or 'nothing judged'})"))


def plot_report(report: dict, path: str) -> None:
    """PNG: RSS [MiB] and open descriptors over time per process, the summary window shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_fd) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    for key, p in sorted(report["processes"].items()):
        a = np.asarray(p["samples"], dtype=float).reshape(-1, 3)
        if not len(a):
            continue
        style = ":" if p["role"] == "engine" else "-"
        ax_rss.plot(a[:, 0] / 60, a[:, 1] / 2**20, style, label=key, linewidth=1.2)
        ax_fd.plot(a[:, 0] / 60, a[:, 2], style, label=key, linewidth=1.2)
    w = report["window"]
    for ax in (ax_rss, ax_fd):
        ax.axvspan(w["start_s"] / 60, w["end_s"] / 60, color="0.9", zorder=0)
    ax_rss.set_ylabel("RSS [MiB]")
    ax_fd.set_ylabel("open file descriptors")
    ax_fd.set_xlabel("minutes since the load started (shaded: summary window)")
    ax_rss.legend(fontsize=7, ncol=3, loc="upper left")
    t = report["targets"]
    fig.suptitle(f"chiron soak, {report['config']['minutes']:g} min: targets "
                 f"{'met' if t['met'] else 'not met'} (max RSS growth "
                 f"{_fmt(report['totals']['max_rss_growth_pct'])}%, max fd drift {_fmt(report['totals']['max_fd_drift'])})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def write_json(report: dict, path: str) -> None:
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    Path(path).write_text(json.dumps(report, indent=1))
