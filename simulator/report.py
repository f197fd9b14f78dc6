"""Reports of a simulation (the schema of ``../shared/DESIGN.md`` §4, shared with ``chiron replay``), plots,
:func:`run_policy`, which runs one policy on one workload (``llumnix-tuned``: a sweep, the best kept), and
:func:`seed_summary`, which sums up runs that differ only in their seed."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from services.engine.stats import weighted_quantile
from simulator.workloads import Workload, gpu_seconds_lower_bound

if TYPE_CHECKING:
    from simulator.fleet import Fleet, SimConfig


def _pct(x: np.ndarray, q: float) -> float:
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if len(x) else math.nan


def build_report(fleet: Fleet, wall_s: float) -> dict:
    """The §4 report of a finished :class:`~simulator.fleet.Fleet` run plus time series and model notes."""
    wl = fleet.workload
    end = fleet.now
    i, b = fleet.inter, fleet.batch
    n_i, n_b = len(i.arrival), len(b.arrival)
    ttft_i = (i.first - i.arrival) * 1e3
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_itl = np.where(i.tokens > 1, (i.last - i.first) / np.maximum(i.tokens - 1, 1) * 1e3, 0.0)
    done_i = np.isfinite(i.done)
    met_i = done_i & (ttft_i <= wl.interactive_ttft_ms) & (mean_itl <= wl.interactive_itl_ms)
    ttft_b = b.first - b.arrival
    done_b = np.isfinite(b.done)
    met_b = done_b & (ttft_b <= wl.batch_ttft_s)
    unfinished = int((~done_i & ~i.rejected).sum() + (~done_b & ~b.rejected).sum())
    ran_out = bool(fleet._work_left())
    itl_vals = np.frombuffer(fleet.itl_ms, dtype=float)
    itl_cnts = np.frombuffer(fleet.itl_n, dtype=float)
    inst_s: dict[str, float] = {r: 0.0 for r in fleet.policy.roles}
    for inst in fleet.retired + fleet.instances:
        stop = inst.end_s if inst.end_s is not None else end
        inst_s[inst.role] = inst_s.get(inst.role, 0.0) + (stop - inst.start_s)
    gpus = fleet.config.gpus_per_instance
    gpu_s = sum(inst_s.values()) * gpus
    tokens = int(i.tokens.sum() + b.tokens.sum())
    lb = gpu_seconds_lower_bound(wl, fleet.perf, gpus)
    pol = fleet.policy
    return {
        "policy": pol.name,
        "trace": wl.name,
        "workload": {"name": wl.name, "description": wl.description, "interactive_requests": n_i, "batch_requests": n_b,
                     "interactive_ttft_slo_ms": wl.interactive_ttft_ms, "interactive_itl_slo_ms": wl.interactive_itl_ms,
                     "batch_ttft_slo_s": wl.batch_ttft_s, "batch_itl_slo_ms": wl.batch_itl_ms,
                     "duration_s": wl.duration_s},
        "requests": n_i + n_b,
        "interactive": {"count": n_i, "accepted": int(n_i - i.rejected.sum()), "rejected": int(i.rejected.sum()),
                        "done": int(done_i.sum()),
                        "slo_attainment": float(met_i.sum() / n_i) if n_i else math.nan,
                        "ttft_p50_ms": _pct(ttft_i, 50), "ttft_p99_ms": _pct(ttft_i, 99),
                        "itl_p50_ms": weighted_quantile(itl_vals, itl_cnts, 0.50),
                        "itl_p99_ms": weighted_quantile(itl_vals, itl_cnts, 0.99)},
        "batch": {"count": n_b, "done": int(done_b.sum()), "rejected": int(b.rejected.sum()),
                  "slo_attainment": float(met_b.sum() / n_b) if n_b else math.nan,
                  "ttft_p50_s": _pct(ttft_b, 50), "ttft_p99_s": _pct(ttft_b, 99),
                  "evicted": fleet.evicted},
        "slo_attainment": float((met_i.sum() + met_b.sum()) / max(n_i + n_b, 1)),
        "gpu_seconds": gpu_s,
        "gpu_hours": gpu_s / 3600,
        "gpu_seconds_lower_bound": lb["gpu_seconds_lower_bound"],
        "gpu_seconds_over_lower_bound": gpu_s / lb["gpu_seconds_lower_bound"] if lb["gpu_seconds_lower_bound"] else math.nan,
        "lower_bound": lb,
        "instance_seconds_by_role": inst_s,
        "max_instances": max((sum(r.get(k, 0) for k in pol.roles) for r in fleet.timeseries), default=0),
        "throughput_tokens_per_s": tokens / max(end, 1e-9),
        "scale_events": fleet.scale_events,
        "lost_requests": 0 if ran_out else unfinished,
        "lost_request_ids": [] if ran_out else (
            [f"i{k}" for k in np.flatnonzero(~done_i & ~i.rejected)[:50]]
            + [f"b{k}" for k in np.flatnonzero(~done_b & ~b.rejected)[:50]]),
        "unfinished_requests": unfinished if ran_out else 0,
        "migrations": fleet.migrated,
        "sim_seconds": end,
        "wall_seconds": wall_s,
        "policy_params": pol.params,
        "mean_theta": float(np.mean(pol.thetas)) if getattr(pol, "thetas", None) else math.nan,
        "sim_config": {k: getattr(fleet.config, k) for k in fleet.config.__dataclass_fields__},
        "timeseries": fleet.timeseries,
        "interactive_attainment_by_minute": _attainment_by_minute(i.arrival, met_i),
    }


def _attainment_by_minute(arrival: np.ndarray, met: np.ndarray) -> list[tuple[float, float]]:
    if not len(arrival):
        return []
    minute = (arrival // 60).astype(int)
    out = []
    for m in range(minute.max() + 1):
        sel = minute == m
        if sel.any():
            out.append((m * 60.0, float(met[sel].mean())))
    return out


def plot_report(report: dict, path: str) -> None:
    """PNG: instances by role, queued batch requests, mean max batch size and interactive SLO attainment over
    (virtual) time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = report["timeseries"]
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    t = [r["t_s"] for r in ts]
    for role in report["instance_seconds_by_role"]:
        axes[0].step(t, [r.get(role, 0) for r in ts], where="post", label=role, linewidth=2)
    axes[0].set_ylabel("instances")
    axes[0].legend(loc="upper right")
    axes[1].plot(t, [r["queued_batch"] for r in ts], color="tab:purple", label="batch waiting")
    axes[1].plot(t, [r["waiting"] for r in ts], color="tab:gray", label="waiting in engines", alpha=0.7)
    axes[1].set_ylabel("requests")
    axes[1].legend(loc="upper right")
    axes[2].plot(t, [r["mean_max_batch_size"] for r in ts], color="tab:orange")
    axes[2].set_ylabel("mean max batch size")
    att = report["interactive_attainment_by_minute"]
    if att:
        axes[3].plot([a for a, _ in att], [v for _, v in att], color="tab:green", marker=".")
    axes[3].set_ylim(-0.02, 1.02)
    axes[3].set_ylabel("interactive SLO attainment\n(by arrival minute)")
    axes[3].set_xlabel("simulated time [s]")
    fig.suptitle(f"{report['policy']} on {report['trace']}: SLO attainment {report['slo_attainment']:.3f}, "
                 f"{report['gpu_hours']:.2f} GPU-h ({report['gpu_seconds_over_lower_bound']:.2f}× lower bound)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_one(args: tuple) -> dict:
    workload, policy, sim, params = args
    from simulator.fleet import Fleet
    from simulator.policies import make_policy

    return Fleet(workload, make_policy(policy, workload, sim, **params), sim).run()


def _better(a: dict, b: dict) -> bool:
    """Higher SLO attainment wins; within 0.1 pp, fewer GPU-seconds."""
    if abs(a["slo_attainment"] - b["slo_attainment"]) > 1e-3:
        return a["slo_attainment"] > b["slo_attainment"]
    return a["gpu_seconds"] < b["gpu_seconds"]


def run_policy(policy: str, workload: Workload, sim: SimConfig, params: dict | None = None, workers: int = 1,
               progress: Callable[[str], None] | None = None) -> dict:
    """Simulate ``policy`` on ``workload``; ``llumnix-tuned`` runs the sweep of
    :data:`~simulator.policies.LLUMNIX_SWEEP` (``workers`` processes) and returns the best run with the sweep
    table under ``sweep``."""
    from simulator.policies import LLUMNIX_SWEEP, POLICIES

    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(POLICIES)}")
    params = dict(params or {})
    if policy != "llumnix-tuned":
        return _run_one((workload, policy, sim, params))
    grid = [{**params, "max_batch_size": bs, "scale_up_threshold": up, "scale_down_threshold": down,
             "max_batched_tokens": tok}
            for bs in LLUMNIX_SWEEP["max_batch_size"] for up, down in LLUMNIX_SWEEP["thresholds"]
            for tok in LLUMNIX_SWEEP["max_batched_tokens"]]
    jobs = [(workload, "llumnix-tuned", sim, g) for g in grid]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            runs = list(ex.map(_run_one, jobs))
    else:
        runs = []
        for j in jobs:
            runs.append(_run_one(j))
            if progress:
                progress(f"llumnix-tuned sweep {len(runs)}/{len(jobs)}")
    best = runs[0]
    for r in runs[1:]:
        if _better(r, best):
            best = r
    best["sweep"] = [{**{k: r["policy_params"][k] for k in ("max_batch_size", "scale_up_threshold", "scale_down_threshold",
                                                           "max_num_batched_tokens")},
                      "slo_attainment": r["slo_attainment"], "gpu_seconds": r["gpu_seconds"]} for r in runs]
    best["wall_seconds"] = sum(r["wall_seconds"] for r in runs)
    return best


# Metrics :func:`seed_summary` reports: name → how to read it from a report.
SEED_METRICS: dict[str, Callable[[dict], float]] = {
    "gpu_hours": lambda r: r["gpu_hours"],
    "gpu_seconds_over_lower_bound": lambda r: r["gpu_seconds_over_lower_bound"],
    "slo_attainment": lambda r: r["slo_attainment"],
    "interactive_slo_attainment": lambda r: r["interactive"]["slo_attainment"],
    "batch_slo_attainment": lambda r: r["batch"]["slo_attainment"],
}


def seed_summary(reports: Sequence[dict]) -> list[dict]:
    """Per policy (in first-seen order), over reports of runs that differ only in their seed: ``seeds`` (the
    ``sim_config`` seed of each run, in order) and, for each of :data:`SEED_METRICS`, ``<metric>_mean``,
    ``_min`` and ``_max`` (NaN where a run has no such requests, e.g. batch attainment without batch work;
    NaNs are left out of the mean). One seed is one draw of the arrivals and token lengths: a policy whose
    cost moves by several percent from draw to draw needs several to be judged."""
    by: dict[str, list[dict]] = {}
    for r in reports:
        by.setdefault(r["policy"], []).append(r)
    out = []
    for policy, runs in by.items():
        row: dict = {"policy": policy, "runs": len(runs), "seeds": [r["sim_config"]["seed"] for r in runs]}
        for name, get in SEED_METRICS.items():
            vals = np.array([get(r) for r in runs], dtype=float)
            ok = vals[np.isfinite(vals)]
            row[f"{name}_mean"] = float(ok.mean()) if ok.size else math.nan
            row[f"{name}_min"] = float(ok.min()) if ok.size else math.nan
            row[f"{name}_max"] = float(ok.max()) if ok.size else math.nan
        out.append(row)
    return out
