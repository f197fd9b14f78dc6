"""Knative's KPA on concurrency (baselines.md §2).

Source: knative/serving @ 98e5ef90 ``pkg/autoscaler/scaling/autoscaler.go`` (``Scale``),
``pkg/autoscaler/config/config.go`` (defaults): per-second samples of in-flight requests averaged over a
stable window (60 s) and a panic window (6 s); target per pod = container concurrency × utilization (0 → 100 ×
0.7 = 70); ``dspc = ceil(stable / target)``, ``dppc = ceil(panic / target)``, both clamped to
``[floor(R / max_scale_down_rate), ceil(max_scale_up_rate × R)]``; panic when ``dppc / R ≥ 2``, held (never
scaling down, never below the panic episode's highest count) until a stable window passes without the
trigger; a decision every 2 s. ``R`` = ready pods (at least 1). Concurrency counts every accepted request not
finished, the activator's buffer (the gateway queue) included.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from simulator.baselines.snapshot import FleetSnapshot


@dataclass(frozen=True)
class KpaConfig:
    target: float = 70.0
    stable_s: float = 60.0
    panic_s: float = 6.0
    tick_s: float = 2.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    min_scale: int = 1

    def validate(self) -> KpaConfig:
        if not (self.target > 0 and self.stable_s > 0 and 0 < self.panic_s <= self.stable_s and self.tick_s > 0):
            raise ValueError("kpa: need target > 0 and 0 < panic_s <= stable_s, tick_s > 0")
        return self


@dataclass
class KpaState:
    samples: deque = field(default_factory=deque)  # (time s, concurrency)
    panic_since: float | None = None
    panic_max: int = 0


def observe(cfg: KpaConfig, state: KpaState, snap: FleetSnapshot) -> KpaState:
    """One per-second concurrency sample (the metric collector's scrape)."""
    state.samples.append((snap.now, float(snap.inflight)))
    while state.samples and state.samples[0][0] <= snap.now - cfg.stable_s:
        state.samples.popleft()
    return state


def decide(cfg: KpaConfig, state: KpaState, snap: FleetSnapshot) -> tuple[KpaState, int | None, str]:
    """One ``Scale(now)``: (state, desired pods or None without samples, reason)."""
    if not state.samples:
        return state, None, "no samples yet"
    now = snap.now
    vals = [v for _, v in state.samples]
    stable = sum(vals) / len(vals)
    panic_vals = [v for t, v in state.samples if t > now - cfg.panic_s]
    panic = sum(panic_vals) / len(panic_vals) if panic_vals else stable
    ready = max(1, len(snap.serving()))
    lo, hi = math.floor(ready / cfg.max_scale_down_rate), math.ceil(cfg.max_scale_up_rate * ready)
    dspc = min(hi, max(lo, math.ceil(stable / cfg.target)))
    dppc = min(hi, max(lo, math.ceil(panic / cfg.target)))
    if dppc / ready >= cfg.panic_threshold:
        if state.panic_since is None:
            state.panic_max = ready
        state.panic_since = now
    elif state.panic_since is not None and now - state.panic_since >= cfg.stable_s:
        state.panic_since, state.panic_max = None, 0
    if state.panic_since is not None:
        desired = max(dspc, dppc, state.panic_max)
        state.panic_max = desired
    else:
        desired = dspc
    desired = max(cfg.min_scale, min(desired, snap.budget_instances))
    return state, desired, f"KPA stable {stable:.1f} panic {panic:.1f} (target {cfg.target:g})"
