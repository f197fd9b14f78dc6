"""The report of one finished fleet simulation (the schema of ``../shared/DESIGN.md`` §4, shared with ``chiron
replay``): request counts, SLO attainment, latency percentiles, GPU-seconds against the lower bound, time series.

:class:`~simulator.fleet.Fleet` builds it at the end of :meth:`~simulator.fleet.Fleet.run`; this module imports
nothing of the simulator's fleet or policies, so the fleet can depend on it without a cycle.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from services.engine.stats import weighted_quantile
from services.slo import slo_met
from simulator.workloads import gpu_seconds_lower_bound


def _pct(x: np.ndarray, q: float) -> float:
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if len(x) else math.nan


def build_report(fleet: Any, wall_s: float) -> dict:
    """The §4 report of a finished :class:`~simulator.fleet.Fleet` run (``fleet``; typed loosely because the fleet
    module imports this one) plus time series; ``wall_s``: the run's wall-clock seconds."""
    wl = fleet.workload
    end = fleet.now
    i, b = fleet.inter, fleet.batch
    n_i, n_b = len(i.arrival), len(b.arrival)
    ttft_i = (i.first - i.arrival) * 1e3
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_itl = np.where(i.tokens > 1, (i.last - i.first) / np.maximum(i.tokens - 1, 1) * 1e3, 0.0)
    done_i = np.isfinite(i.done)
    met_i = slo_met(done_i, ttft_i, wl.interactive_ttft_ms, mean_itl, wl.interactive_itl_ms)
    ttft_b = b.first - b.arrival
    done_b = np.isfinite(b.done)
    met_b = slo_met(done_b, ttft_b, wl.batch_ttft_s)
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
