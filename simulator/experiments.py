"""``chiron experiments``: the paper's experiments for every policy, side by side, as a markdown report.

Experiments (paper: arXiv 2501.08090; its exact settings are not known, ``../shared/notes/paper.md`` §4, so
these are Chiron's choices, printed in the report):

0. **Headline**: every policy on ``azure-conv``, ``azure-code`` and ``mixed`` — SLO attainment, GPU-hours and
   their ratio to the offline lower bound (``gpu_seconds_lower_bound``).
1. **Interactive SLO attainment and throughput vs arrival rate** (Poisson, ShareGPT lengths).
2. **A large batch queue with interactive traffic** (``batch-backlog``): GPU-hours and batch TTFT SLO
   attainment vs queue size.
3. **Burstiness**: Gamma arrivals with CV 1–8 — Chiron's over-provisioning Θ and every policy's interactive
   SLO attainment.
4. **Waiting-time estimator accuracy vs queue size** (``bench/estimator.py``).
5. **Local-autoscaler convergence time** (``bench/local_autoscaler.py``, simulated A100 engine).

``quick`` shortens every run (trace slices, smaller queues, fewer points) so the whole report takes minutes;
the full form runs the paper's scales (one hour of trace, queues up to 1,000,000 requests).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from simulator.fleet import SimConfig
from simulator.policies import POLICIES, READINGS
from simulator.report import run_policy
from simulator.workloads import make_workload

ALL = tuple(POLICIES)


def _plan(quick: bool) -> dict:
    if quick:
        return {
            "headline": [("azure-conv", {"duration_s": 900}), ("azure-code", {"duration_s": 900}),
                         ("mixed", {"duration_s": 900, "batch_requests": 5000, "batch_ttft_s": 900})],
            "rates": (2.0, 8.0, 16.0), "rate_duration_s": 300,
            "queue_sizes": (10_000,), "queue_policies": ("chiron", "llumnix", "queue-length"),
            "cvs": (1.0, 2.0, 4.0, 8.0), "cv_rate": 8.0, "cv_duration_s": 300,
            "estimator_sizes": (50, 200, 2000), "la_duration_s": 180.0,
        }
    return {
        "headline": [("azure-conv", {}), ("azure-code", {}), ("mixed", {})],
        "rates": (2.0, 4.0, 8.0, 16.0, 32.0), "rate_duration_s": 600,
        "queue_sizes": (10_000, 100_000, 1_000_000), "queue_policies": ("chiron", "llumnix"),
        "cvs": (1.0, 2.0, 4.0, 8.0), "cv_rate": 8.0, "cv_duration_s": 600,
        "estimator_sizes": (50, 200, 2000, 20000), "la_duration_s": 300.0,
    }


def _job(args: tuple) -> dict:
    tag, workload_name, wl_kw, policy, sim = args
    wl = make_workload(workload_name, **wl_kw)
    rep = run_policy(policy, wl, sim)
    slim = {k: v for k, v in rep.items() if k not in ("timeseries", "scale_events", "interactive_attainment_by_minute")}
    slim["tag"] = tag
    slim["mean_theta"] = rep.get("mean_theta", math.nan)
    slim["n_scale_events"] = len(rep["scale_events"])
    return slim


def run_experiments(out_dir: str | Path, quick: bool = False, workers: int = 2, policies: tuple[str, ...] = ALL,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Run every experiment; writes ``report.md``, ``results.json`` and PNG plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(quick)
    sim = SimConfig()
    t0 = time.perf_counter()
    jobs = []
    for name, kw in plan["headline"]:
        jobs += [("headline", name, kw, p, sim) for p in policies]
    for rate in plan["rates"]:
        jobs += [(f"rate={rate:g}", "poisson", {"rate_per_s": rate, "duration_s": plan["rate_duration_s"]}, p, sim)
                 for p in policies]
    for n in plan["queue_sizes"]:
        kw = {"batch_requests": n, "duration_s": 1800 if quick else 3600}
        jobs += [(f"queue={n}", "batch-backlog", kw, p, sim) for p in plan["queue_policies"] if p in policies]
    for cv in plan["cvs"]:
        kw = {"rate_per_s": plan["cv_rate"], "cv": cv, "duration_s": plan["cv_duration_s"]}
        jobs += [(f"cv={cv:g}", "gamma", kw, p, sim) for p in policies]
    results: list[dict] = []
    with ProcessPoolExecutor(max(1, workers)) as ex:
        for r in ex.map(_job, jobs):
            results.append(r)
            if progress:
                progress(f"{len(results)}/{len(jobs)} runs ({r['tag']} {r['trace']} {r['policy']})")
    from bench.estimator import run_bench as estimator_bench
    from bench.local_autoscaler import PER_TOKEN_ITL_QUANTILE, LocalAutoscalerConfig, run_engine

    est = estimator_bench(sizes=plan["estimator_sizes"], splits=10)
    la = []
    for slo in (25.0, 50.0, 100.0):
        cfg = LocalAutoscalerConfig(itl_slo_ms=slo, itl_quantile=PER_TOKEN_ITL_QUANTILE)
        r, _ = run_engine(slo, "adaptive", cfg.initial_batch_size, plan["la_duration_s"], 60.0, 0, autoscaler=cfg)
        la.append({"itl_slo_ms": slo, "converge_s": r.converge_s, "throughput_tokens_per_s": r.throughput_tokens_per_s,
                   "itl_slo_attainment": r.itl_slo_attainment, "final_max_batch_size": r.max_batch_size})
    data = {"quick": quick, "plan": {k: v for k, v in plan.items() if k != "headline"},
            "headline_workloads": [[n, kw] for n, kw in plan["headline"]], "results": results,
            "estimator": est["results"], "local_autoscaler": la, "readings": READINGS,
            "wall_seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(data, indent=1, default=float))
    _plots(data, out)
    (out / "report.md").write_text(_markdown(data))
    return data


def _rows(data: dict, tag: str) -> list[dict]:
    return [r for r in data["results"] if r["tag"] == tag]


def _f(x, d: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def _plots(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = sorted({r["policy"] for r in data["results"]})

    def sweep(prefix: str, xs, xlabel: str, name: str) -> None:
        """Interactive SLO attainment and GPU-hours of every policy over one swept parameter."""
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for p in pols:
            rows = [next((r for r in _rows(data, f"{prefix}={x:g}") if r["policy"] == p), None) for x in xs]
            axes[0].plot(xs, [r["interactive"]["slo_attainment"] if r else np.nan for r in rows], marker="o", label=p)
            axes[1].plot(xs, [r["gpu_hours"] if r else np.nan for r in rows], marker="o", label=p)
        for ax, ylabel in zip(axes, ("interactive SLO attainment", "GPU-hours"), strict=True):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    sweep("rate", data["plan"]["rates"], "arrival rate [req/s]", "exp1_rate.png")
    sweep("cv", data["plan"]["cvs"], "inter-arrival CV", "exp3_burstiness.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in pols:
        rows = [(n, next((r for r in _rows(data, f"queue={n}") if r["policy"] == p), None)) for n in data["plan"]["queue_sizes"]]
        rows = [(n, r) for n, r in rows if r]
        if rows:
            ax.plot([n for n, _ in rows], [r["gpu_hours"] for _, r in rows], marker="o", label=p)
    ax.set_xscale("log")
    ax.set_xlabel("batch queue [requests]")
    ax.set_ylabel("GPU-hours")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "exp2_queue.png", dpi=110)
    plt.close(fig)


def _markdown(data: dict) -> str:
    L = [f"# Chiron experiments ({'quick' if data['quick'] else 'full'} form)", "",
         f"Generated by `chiron experiments` in {data['wall_seconds'] / 60:.1f} min. Simulated Llama-3-8B on A100-80GB "
         "engines (`services/engine/perf_model.py`), model load time 30 s, GPU budget 50. Every policy sees the same "
         "requests. SLO attainment counts rejected requests as misses. `× LB` is GPU-seconds over the offline lower "
         "bound (`gpu_seconds_lower_bound`: all work at the best SLO-feasible per-GPU throughput, no idle, no load time).",
         "", "## 0. Headline", ""]
    hdr = "| workload | policy | SLO att. | interactive att. | batch att. | TTFT p99 [ms] | GPU-hours | × LB | max inst. |"
    sep = "|---|---|---|---|---|---|---|---|---|"
    L += [hdr, sep]
    for r in _rows(data, "headline"):
        i, b = r["interactive"], r["batch"]
        L.append(f"| {r['trace']} | {r['policy']} | {_f(r['slo_attainment'], 4)} | {_f(i['slo_attainment'], 4)} | "
                 f"{_f(b['slo_attainment'], 4)} | {_f(i['ttft_p99_ms'], 0)} | {_f(r['gpu_hours'], 2)} | "
                 f"{_f(r['gpu_seconds_over_lower_bound'], 2)} | {r['max_instances']} |")
    L += ["", "Chiron vs llumnix-tuned on each headline workload:", ""]
    for wl in sorted({r["trace"] for r in _rows(data, "headline")}):
        c = next((r for r in _rows(data, "headline") if r["trace"] == wl and r["policy"] == "chiron"), None)
        t = next((r for r in _rows(data, "headline") if r["trace"] == wl and r["policy"] == "llumnix-tuned"), None)
        if c and t:
            L.append(f"- {wl}: SLO attainment {c['slo_attainment']:.4f} vs {t['slo_attainment']:.4f} "
                     f"({(c['slo_attainment'] - t['slo_attainment']) * 100:+.1f} pp); GPU-hours {c['gpu_hours']:.2f} vs "
                     f"{t['gpu_hours']:.2f} (Chiron uses {c['gpu_hours'] / t['gpu_hours']:.2f}× as many); llumnix-tuned kept "
                     f"max batch {t['policy_params'].get('max_batch_size')}, thresholds "
                     f"{t['policy_params'].get('scale_up_threshold')}/{t['policy_params'].get('scale_down_threshold')}")
    L += ["", "## 1. Interactive SLO attainment and throughput vs arrival rate (Poisson, ShareGPT lengths)", "",
          "![rate](exp1_rate.png)", "",
          "| rate [req/s] | policy | interactive att. | rejected | throughput [tok/s] | GPU-hours | × LB |",
          "|---|---|---|---|---|---|---|"]
    for rate in data["plan"]["rates"]:
        for r in _rows(data, f"rate={rate:g}"):
            L.append(f"| {rate:g} | {r['policy']} | {_f(r['interactive']['slo_attainment'], 4)} | {r['interactive']['rejected']} | "
                     f"{_f(r['throughput_tokens_per_s'], 0)} | {_f(r['gpu_hours'], 2)} | {_f(r['gpu_seconds_over_lower_bound'], 2)} |")
    L += ["", "## 2. Large batch queue with interactive traffic (`batch-backlog`)", "", "![queue](exp2_queue.png)", "",
          "| queue | policy | batch att. | interactive att. | GPU-hours | × LB | sim time [h] | wall [s] |",
          "|---|---|---|---|---|---|---|---|"]
    for n in data["plan"]["queue_sizes"]:
        for r in _rows(data, f"queue={n}"):
            L.append(f"| {n:,} | {r['policy']} | {_f(r['batch']['slo_attainment'], 4)} | "
                     f"{_f(r['interactive']['slo_attainment'], 4)} | "
                     f"{_f(r['gpu_hours'], 2)} | {_f(r['gpu_seconds_over_lower_bound'], 2)} | {r['sim_seconds'] / 3600:.2f} | "
                     f"{r['wall_seconds']:.0f} |")
    L += ["", "## 3. Burstiness (Gamma arrivals) vs over-provisioning and interactive SLO attainment", "",
          "![cv](exp3_burstiness.png)", "", "| CV | policy | interactive att. | GPU-hours | × LB |", "|---|---|---|---|---|"]
    for cv in data["plan"]["cvs"]:
        for r in _rows(data, f"cv={cv:g}"):
            L.append(f"| {cv:g} | {r['policy']} | {_f(r['interactive']['slo_attainment'], 4)} | {_f(r['gpu_hours'], 2)} | "
                     f"{_f(r['gpu_seconds_over_lower_bound'], 2)} |")
    L += ["", "## 4. Waiting-time estimator accuracy vs queue size (8 slots)", "",
          "| trace | queue | estimator | R² | p95 coverage | median rel. error |", "|---|---|---|---|---|---|"]
    for r in data["estimator"]:
        L.append(f"| {r['trace']} | {r['queue_size']} | {r['estimator']} | {_f(r['r2'])} | {_f(r['p95_coverage'])} | "
                 f"{_f(r['median_rel_error'])} |")
    L += ["", "## 5. Local-autoscaler convergence (simulated A100, saturated ShareGPT load)", "",
          "| ITL SLO [ms] | converge [s] | throughput [tok/s] | ITL attainment | final max batch |", "|---|---|---|---|---|"]
    for r in data["local_autoscaler"]:
        L.append(f"| {r['itl_slo_ms']:g} | {_f(r['converge_s'], 1)} | {_f(r['throughput_tokens_per_s'], 0)} | "
                 f"{_f(r['itl_slo_attainment'], 4)} | {r['final_max_batch_size']} |")
    L += ["", "## Baselines: readings taken where the published form is ambiguous", ""]
    L += [f"- **{k}**: {v}" for k, v in data["readings"].items()]
    return "\n".join(L) + "\n"
