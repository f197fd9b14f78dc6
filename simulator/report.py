"""Simulation reports beyond one run's (:mod:`simulator.results` builds that): plots, :func:`run_policy`, which
runs one policy on one workload (``llumnix-tuned``: a sweep, the best kept), and :func:`seed_summary`, which sums
up runs that differ only in their seed."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from simulator.workloads import Workload

if TYPE_CHECKING:
    from simulator.fleet import SimConfig


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
