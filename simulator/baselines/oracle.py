"""The oracle's schedule: instance counts from the future arrivals and the performance model
(fair-comparison.md §6). Not a deployable policy: it reads every request's arrival time and output length
before they happen. It shows what is achievable *with* model-load times; a policy's distance to it is its own
inefficiency (the offline lower bound, by contrast, charges no load time, idle time or headroom at all).

Interactive: every request occupies one batch slot from its arrival for ``prefill_s + (output − 1) ×
step_s`` (its prefill at stand-alone cost, then one decode step per token at the step time of an
SLO-feasible full batch ``B*``). The concurrency ``c(t)`` of those slots, over ``B*`` with ``margin``, gives
the instances needed at ``t``; the count asked for at ``t`` is the largest need over ``[t, t + L + tick]``
(``L`` the model-load time), so each instance starts one load time before it is needed and goes as soon as
the need has passed. Batch: the backlog's work at the batch class's best batch size, spread evenly over the
time to its deadline less one load time (and ``margin``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OracleSchedule:
    """``grid_s``: times [s] (1-s steps); ``interactive``: instances needed at each; ``batch_instances``:
    BATCH instances while the backlog lasts."""

    grid_s: np.ndarray
    interactive: np.ndarray
    batch_instances: int

    def interactive_at(self, t0: float, t1: float) -> int:
        """Most instances needed over ``[t0, t1]`` (0 past the grid)."""
        lo = int(np.searchsorted(self.grid_s, t0, side="left"))
        hi = int(np.searchsorted(self.grid_s, t1, side="right"))
        return int(self.interactive[lo:hi].max()) if hi > lo else 0


def interactive_need(arrival_s: np.ndarray, service_s: np.ndarray, slots_per_instance: float, margin: float,
                     step_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(grid [s], instances needed): ``ceil(c(t) · (1 + margin) / slots_per_instance)`` where ``c(t)`` counts
    requests with ``arrival ≤ t < arrival + service``. Shapes: ``arrival_s``, ``service_s`` (n,)."""
    if not len(arrival_s):
        return np.zeros(1), np.zeros(1, dtype=int)
    end = arrival_s + service_s
    grid = np.arange(0.0, float(end.max()) + step_s, step_s)
    starts = np.searchsorted(np.sort(arrival_s), grid, side="right")
    ends = np.searchsorted(np.sort(end), grid, side="right")
    conc = (starts - ends).astype(float)
    # A slot is busy for part of the bin it starts and ends in: count the bin's peak, not its instant.
    peak = np.maximum(conc, np.concatenate(([0.0], conc[:-1])))
    return grid, np.ceil(peak * (1 + margin) / slots_per_instance - 1e-9).astype(int)


def batch_instances(work_gpu_s: float, time_left_s: float, load_s: float, margin: float) -> int:
    """BATCH instances that finish ``work_gpu_s`` of batch work by the deadline, started now: work over the
    time left after one load time, with ``margin``. 0 without work; at least 1 with work."""
    if work_gpu_s <= 0:
        return 0
    usable = max(time_left_s - load_s, 1.0)
    return max(1, math.ceil(work_gpu_s * (1 + margin) / usable))


def prefill_need(arrival_s: np.ndarray, prompt_tokens: np.ndarray, grid: np.ndarray, window_s: float,
                 tokens_per_s: float, margin: float) -> np.ndarray:
    """Instances needed at each grid time [s] for prefill alone: the prompt tokens arriving in ``[t, t +
    window_s)`` prefilled within the window at ``tokens_per_s`` per instance (each iteration carries one prefill
    chunk), with ``margin``. ``window_s`` is a share of the TTFT SLO: a prompt must be prefilled by then."""
    if not len(arrival_s):
        return np.zeros(len(grid), dtype=int)
    order = np.argsort(arrival_s)
    cum = np.concatenate(([0.0], np.cumsum(np.asarray(prompt_tokens, dtype=float)[order])))
    t = np.asarray(arrival_s, dtype=float)[order]
    lo = np.searchsorted(t, grid, side="left")
    hi = np.searchsorted(t, grid + window_s, side="left")
    rate = (cum[hi] - cum[lo]) / window_s
    return np.ceil(rate * (1 + margin) / tokens_per_s - 1e-9).astype(int)
