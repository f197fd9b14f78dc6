"""Chiron's local autoscaler: the engine's maximum batch size from latency and throughput backpressure.

A pure function of ``(config, state, observation)`` — no clock, no I/O — so the engine agent (wall clock)
and the fleet simulator (virtual clock) run the very same code.

The rule (paper "Hierarchical Autoscaling for LLM Serving with Chiron", arXiv 2501.08090, local
autoscaler; restated in ``../shared/notes/paper.md`` §0b):

* latency backpressure ``LBP = observed ITL / ITL SLO``;
* throughput backpressure ``TBP = previous throughput / current throughput``;
* backpressure ``> 1`` ⇒ halve the max batch size; ``< 1`` ⇒ grow toward ``current / BP`` through an
  EWMA: ``B ← (1 − α)·B + α·B/BP``.

Choices where the paper is silent (``paper.md`` §0c lists the pitfalls they guard against):

* **Observed ITL** is a high quantile (``itl_quantile``, default p99) of the per-token ITLs of the last
  control interval, smoothed by an EWMA (``itl_smoothing``) so one prefill-heavy interval does
  not halve the batch (one interval above ``overload_factor`` × SLO still halves at once).
* **Halve only on a real violation, grow toward a margin.** LBP > 1 (ITL above the SLO itself) halves;
  growth aims at ``latency_target_fraction`` × SLO (default 0.9), and between that target and the SLO
  the same proportional EWMA step eases the batch down instead of halving it. A literal "halve when > 1"
  around the growth target throws half the throughput away on noise every few seconds (a sawtooth the
  first version of this module showed in ``chiron bench local-autoscaler``).
* **TBP counts only while the engine is saturated** (work waiting or batch at its cap) **and only right
  after a growth step.** Throughput also falls when load falls, and it falls right after a halving by
  construction; a literal TBP > 1 would then halve again and cascade to a batch of 1. Throughput is
  smoothed by the same EWMA, and TBP must exceed ``1 + tbp_tolerance`` before it halves (noise band).
* **Both EWMAs restart after a halving**, so the interval after a halving is judged on what the smaller
  batch does, not on the pre-halving ITL (which would halve twice for one violation).
* **A halving is judged once it is in effect.** A lower cap stops admissions but evicts no running request
  (vLLM's ``max_num_active_reqs``, the simulated engine alike), so until the running count
  (``Observation.running``) is down to the new cap the controller holds: those intervals still show the old
  batch. Seen in ``chiron bench local-autoscaler --backend vllm`` (SLO 3× the batch-1 ITL): halvings
  17 → 8 → 4 → 2 in consecutive seconds. With the wait, that run's halvings over 90 s went from 14 to 10 and
  its mean cap after the warm-up from 4.5 to 7.0; the simulated bench, ``chiron simulate --workload mixed``
  and ``make demo`` did not change.
* **A throughput fall must last ``tbp_confirm_intervals`` intervals (default 3).** The intervals after a
  growth step also pay the prefills of the requests the larger batch admitted (chunked, so over several
  intervals at a small token budget), and throughput dips with no cliff behind it. Seen in ``chiron bench
  local-autoscaler`` (seed 4): a false cliff at B = 41 capped a 100-ms-SLO engine at 30 for a minute, and
  at 2 intervals one at B = 35 still capped a 25-ms one. A fall past the band holds the batch size and
  keeps the pre-growth throughput as the reference; the batch halves only if throughput is still below it
  by more than the band after that many intervals. Over seeds 0–4 this raised the adaptive throughput by up
  to 11% where a false cliff had struck and changed nothing elsewhere.
* **A throughput cliff is remembered.** When TBP halves, the batch size before the growth step that lost
  throughput becomes a ceiling for ``tbp_ceiling_ttl_s`` seconds; otherwise a relaxed-SLO instance would
  grow straight back over the cliff and alternate forever. One step grows by at most
  ``max_growth_factor``.
* **Hold within 1 ± ``deadband`` (0.08).** The right batch size moves with the context lengths of the
  running requests, and the observed p99 ITL of a 1-s interval is noisy; inside the band the batch stays
  put. Measured over seeds 0–4 of ``chiron bench local-autoscaler``: at 0.05 the batch wandered by more than
  10% for minutes (convergence within 30 s in 4 of 15 SLO×seed runs), at 0.08 in 11 of 15, throughput
  and ITL attainment unchanged; asymmetric bands (easing sooner than growing) wandered more.
* **Aim lower while the running set is still growing** (``young_target_fraction``, 0.85). After a cold
  start the running set fills for about one request lifetime before admissions and completions balance,
  and the ITL at a fixed cap rises with it as contexts and the population grow. Measured in ``chiron bench
  local-autoscaler`` at a 100-ms SLO (simulated Llama-3-8B/A100, ShareGPT, cap 711): ITL p99 74 ms at 11 s
  with 46 running, 90 ms at 60 s with ~100 running. A controller that only follows the ITL ramps onto the
  young engine's batch size (895) and then eases for a minute (convergence 42.8 s). So while the running
  count is still growing, the ITL target is scaled by ``f + (1 − f)·m``, where ``m`` = running count
  ``maturity_window_s`` (10 s) ago / running count now (0 until that much history exists). Once
  ``m ≥ mature_running_ratio`` (0.9), or in any interval the engine is not saturated (the running set then
  follows arrivals, not the cap), the running set counts as settled and the full target applies for good.
  Needs ``Observation.running`` (``None`` turns it off). Over workload seeds 0–9 (5 tuned, 5 held out)
  convergence within 30 s went from 9 / 8 / 2 of 10 runs (25 / 50 / 100 ms) to 9 / 9 / 9, throughput and
  ITL attainment unchanged within 1%. Only BATCH instances use it in a cluster; INTERACTIVE and MIXED ones
  keep the full target (:func:`role_overrides` says why).
* **Combined** growth backpressure ``BP = max(ITL / target, TBP / (1 + tbp_tolerance))``: whichever
  resource is closer to its limit. A batch instance has a relaxed ITL SLO, so its LBP is small and TBP
  drives it.
* Worked example (ITL ≈ a + b·B, SLO target S): growth maps B to ``(1−α)B + α·B·S/(a+bB)``, which is
  increasing, concave and has its fixed point at the largest B whose ITL meets S, so growth approaches
  it from below. Growth uses the larger of the smoothed and the latest ITL, so the smoothing's lag does
  not carry it past the target; halving uses the smoothed value, so one noisy interval does not halve.
  ``tests/test_local_autoscaler.py`` checks the step-load, oscillation and noise cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LocalAutoscalerConfig:
    """Knobs of the local autoscaler (units in names; defaults from the bench in ``bench/local_autoscaler.py``).

    Raises ValueError from :meth:`validate` for inconsistent values.
    """

    itl_slo_ms: float = 50.0
    min_batch_size: int = 1
    max_batch_size: int = 1024
    initial_batch_size: int = 16
    control_interval_s: float = 1.0
    ewma_alpha: float = 0.9  # weight of the new target in the proportional step
    itl_quantile: float = 0.99
    itl_smoothing: float = 0.5  # EWMA weight of a new ITL / throughput observation
    latency_target_fraction: float = 0.9
    tbp_tolerance: float = 0.25
    deadband: float = 0.08  # hold while backpressure is within 1 ± deadband (damps wandering)
    max_growth_factor: float = 2.0  # one step grows the batch size by at most this factor
    tbp_ceiling_ttl_s: float = 60.0  # how long a throughput cliff caps growth [s]
    tbp_confirm_intervals: int = 3  # consecutive intervals a throughput fall must last before it halves
    overload_factor: float = 1.5  # one interval with ITL above this × SLO halves at once (no smoothing)
    young_target_fraction: float = 0.85  # ITL target scale while the running set still grows (1 = off)
    maturity_window_s: float = 10.0  # running count compared with this many seconds ago [s]
    mature_running_ratio: float = 0.9  # running(now - window) / running(now) at which the running set is settled

    def validate(self) -> LocalAutoscalerConfig:
        if self.itl_slo_ms <= 0:
            raise ValueError(f"itl_slo_ms must be > 0 (got {self.itl_slo_ms})")
        if not 1 <= self.min_batch_size <= self.initial_batch_size <= self.max_batch_size:
            raise ValueError("need 1 <= min_batch_size <= initial_batch_size <= max_batch_size")
        if self.control_interval_s <= 0:
            raise ValueError("control_interval_s must be > 0")
        for name in ("ewma_alpha", "itl_smoothing", "latency_target_fraction", "young_target_fraction",
                     "mature_running_ratio"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1] (got {v})")
        if not 0 < self.itl_quantile < 1:
            raise ValueError("itl_quantile must be in (0, 1)")
        if self.tbp_tolerance < 0:
            raise ValueError("tbp_tolerance must be >= 0")
        if self.max_growth_factor <= 1:
            raise ValueError("max_growth_factor must be > 1")
        if self.tbp_confirm_intervals < 1:
            raise ValueError("tbp_confirm_intervals must be >= 1")
        if self.maturity_window_s <= 0:
            raise ValueError("maturity_window_s must be > 0")
        return self


@dataclass(frozen=True)
class Observation:
    """What the engine saw over the last control interval.

    ``itl_ms``: the ``itl_quantile`` of per-token ITLs in the interval (NaN when no token was produced);
    ``throughput_tokens_per_s``: output tokens per second in the interval; ``saturated``: work was waiting
    or the batch was at its cap at the end of the interval; ``running``: requests running at the end of the
    interval (``None``: unknown, and the running set is taken as settled).
    """

    now: float
    itl_ms: float
    throughput_tokens_per_s: float
    saturated: bool
    running: int | None = None


@dataclass(frozen=True)
class LocalAutoscalerState:
    """State carried between decisions. ``batch_size`` is fractional; the engine gets its floor."""

    batch_size: float
    itl_ewma_ms: float | None = None
    throughput_ewma: float | None = None
    last_decision_s: float | None = None
    last_action: str = "hold"
    batch_size_before: float | None = None  # batch size before the last step
    ceiling: float | None = None  # throughput-cliff ceiling on the batch size
    ceiling_until_s: float = -math.inf
    tbp_reference: float | None = None  # pre-growth throughput while a throughput fall awaits confirmation
    tbp_low_intervals: int = 0  # consecutive intervals the fall has lasted so far
    draining: bool = False  # halved, and the running requests have not yet finished down to the new cap
    running_settled: bool = False  # the running set has stopped growing, or the engine was not saturated, once
    running_history: tuple[tuple[float, int], ...] = ()  # (t, running) until then, within maturity_window_s


@dataclass(frozen=True)
class Decision:
    """One control decision and the inputs that explain it."""

    now: float
    max_batch_size: int
    latency_backpressure: float
    throughput_backpressure: float
    backpressure: float
    action: str  # "grow", "halve", "hold"
    reason: str


def role_overrides(role: str) -> dict:
    """Per-role changes to :class:`LocalAutoscalerConfig`'s defaults (``role``: ``interactive``, ``mixed``,
    ``batch``), for the engine agent (``chiron engine --role``) and the fleet simulator alike.

    Only BATCH instances, fed from a backlog like ``chiron bench local-autoscaler``, aim lower while their running
    set fills up; INTERACTIVE and MIXED instances keep the full ITL target from their start
    (``young_target_fraction`` 1). On them a saturated interval is an interactive burst, and a lower cap queues
    it: ``make demo`` (Azure conversation replay on a local cluster) gave interactive SLO attainment 0.981, TTFT
    p99 13.9 s and 1,343 GPU-seconds with the rule on INTERACTIVE and BATCH instances, against 1.000, 1.2 s and
    885 with it off everywhere (and 0.999, 2.1 s, 1,039 with it on BATCH instances only); and
    on MIXED instances, whose running set is topped up with preemptible batch work, ``chiron simulate --policy
    chiron --workload mixed --seeds 20`` cost 1.251× the GPU-hours lower bound (worst seed 1.312×) against
    1.245× (worst 1.267×). BATCH instances changed nothing in that simulation either way.

    Raises ValueError for an unknown role.
    """
    if role not in ("interactive", "mixed", "batch"):
        raise ValueError(f"unknown role {role!r}: use interactive, mixed or batch")
    return {} if role == "batch" else {"young_target_fraction": 1.0}


def initial_state(config: LocalAutoscalerConfig) -> LocalAutoscalerState:
    return LocalAutoscalerState(batch_size=float(config.initial_batch_size))


def _ewma(prev: float | None, new: float, w: float) -> float:
    return new if prev is None else (1 - w) * prev + w * new


def _maturity(cfg: LocalAutoscalerConfig, state: LocalAutoscalerState,
              obs: Observation) -> tuple[float, bool, tuple[tuple[float, int], ...]]:
    """How settled the running set is: ``(m, settled, history)`` with ``m`` in [0, 1] (1 = settled).

    ``m`` = running count ``maturity_window_s`` ago / running count now, 0 until the history spans that
    window; settled (latched) once ``m >= mature_running_ratio`` or once the engine is not saturated.
    """
    if obs.running is None or cfg.young_target_fraction >= 1.0 or state.running_settled or not obs.saturated:
        return 1.0, True, ()
    if obs.running <= 0:  # saturated with nothing running (the queue's head does not fit yet): no evidence
        return 0.0, False, ()
    window = cfg.maturity_window_s
    history = state.running_history + ((obs.now, obs.running),)
    if obs.now - history[0][0] < window - cfg.control_interval_s:
        return 0.0, False, history  # less than a window of history: still young
    history = tuple(h for h in history if h[0] >= obs.now - window) or history[-1:]
    m = min(1.0, history[0][1] / obs.running)
    if m >= cfg.mature_running_ratio:
        return 1.0, True, ()
    return m, False, history


def decide(config: LocalAutoscalerConfig, state: LocalAutoscalerState,
           obs: Observation) -> tuple[LocalAutoscalerState, Decision]:
    """One control step. Returns the new state and the decision (``max_batch_size`` to apply)."""
    cfg = config
    cur = state.batch_size
    m, settled, history = _maturity(cfg, state, obs)

    def keep(lbp: float, reason: str) -> tuple[LocalAutoscalerState, Decision]:
        # Hold without judging the interval: the EWMAs and the throughput reference stay as they are.
        return (replace(state, last_decision_s=obs.now, last_action="hold", running_settled=settled,
                        running_history=history),
                Decision(obs.now, int(cur), lbp, 0.0, 0.0, "hold", reason))

    if state.draining and obs.running is not None and obs.running > int(cur):
        # A lower cap stops admissions but evicts no one: until the running requests finish down to it, the
        # interval shows the old batch, and judging it would halve again for the same violation.
        return keep(0.0 if math.isnan(obs.itl_ms) else obs.itl_ms / cfg.itl_slo_ms,
                    f"halved: waiting for the running requests to finish down to the cap "
                    f"({obs.running} running, cap {int(cur)})")
    if math.isnan(obs.itl_ms):
        # No tokens in the interval: nothing to learn from; keep the batch size.
        return keep(0.0, "no tokens produced in the interval")

    itl = _ewma(state.itl_ewma_ms, obs.itl_ms, cfg.itl_smoothing)
    lbp = itl / cfg.itl_slo_ms  # the paper's latency backpressure
    young = cfg.young_target_fraction + (1.0 - cfg.young_target_fraction) * m
    target_ms = cfg.itl_slo_ms * cfg.latency_target_fraction * young

    prev_tp = state.throughput_ewma  # None right after a halving
    tp = _ewma(prev_tp, obs.throughput_tokens_per_s, cfg.itl_smoothing)
    tbp, tbp_reference, low_intervals = 0.0, None, 0
    confirming = state.tbp_reference is not None
    if obs.saturated and tp > 0 and confirming:
        tbp = state.tbp_reference / tp
    elif obs.saturated and state.last_action == "grow" and prev_tp is not None and tp > 0:
        tbp = prev_tp / tp
    # Backpressure against the growth target: latency against the SLO margin, throughput against its noise band.
    # Growth is judged on the larger of the smoothed and the latest ITL (the smoothing's lag must not carry
    # growth past the target); easing down is judged on the smoothed ITL alone (one spike must not shrink it).
    tbp_term = tbp / (1.0 + cfg.tbp_tolerance)
    bp = max(itl / target_ms, tbp_term)
    bp_grow = max(max(itl, obs.itl_ms) / target_ms, tbp_term)
    ceiling, ceiling_until = (state.ceiling, state.ceiling_until_s) if obs.now < state.ceiling_until_s else (None, -math.inf)

    if lbp > 1.0 or obs.itl_ms > cfg.overload_factor * cfg.itl_slo_ms:
        new, action = cur / 2.0, "halve"
        reason = (f"latency backpressure {max(lbp, obs.itl_ms / cfg.itl_slo_ms):.2f} > 1 "
                  f"(ITL {itl:.1f} ms, SLO {cfg.itl_slo_ms:g} ms)")
    elif tbp > 1.0 + cfg.tbp_tolerance and state.tbp_low_intervals + 1 < cfg.tbp_confirm_intervals:
        # Below the band, not yet for long enough: hold and look again before calling it a cliff.
        new, action = cur, "hold"
        tbp_reference, low_intervals = (state.tbp_reference if confirming else prev_tp), state.tbp_low_intervals + 1
        reason = (f"throughput backpressure {tbp:.2f} > 1 after growing: holding to confirm over one more "
                  f"interval (it may be the admitted requests' prefills)")
    elif tbp > 1.0 + cfg.tbp_tolerance:
        new, action = cur / 2.0, "halve"
        ceiling = state.batch_size_before if state.batch_size_before is not None else cur / 2.0
        ceiling_until = obs.now + cfg.tbp_ceiling_ttl_s
        reason = (f"throughput backpressure {tbp:.2f} > 1: throughput fell after growing while saturated; "
                  f"batch size capped at {ceiling:.0f} for {cfg.tbp_ceiling_ttl_s:g} s")
    elif bp_grow < 1.0 and not obs.saturated:
        # Below the target and not saturated: the cap is not binding; growing it would add no evidence.
        new, action, reason = cur, "hold", "engine not saturated: the cap is not binding"
    elif bp > 1.0 + cfg.deadband or bp_grow < 1.0 - cfg.deadband:
        # Proportional move toward cur / bp, smoothed: eases down above the target (on the smoothed ITL),
        # grows below it (on the larger of smoothed and latest ITL), at most max_growth_factor per step.
        step_bp = bp if bp > 1.0 + cfg.deadband else bp_grow
        target = min(cur / max(step_bp, 1e-3), cur * cfg.max_growth_factor)
        new = (1 - cfg.ewma_alpha) * cur + cfg.ewma_alpha * target
        reason = f"backpressure {step_bp:.2f} against ITL target {target_ms:.1f} ms: move toward {target:.0f}"
        if young < 1.0:
            reason += f" (running set still growing: target scaled by {young:.2f})"
        if ceiling is not None and new > ceiling:
            new = max(cur, ceiling)
            reason += f" (throughput ceiling {ceiling:.0f})"
        action = "grow" if new > cur else "hold"
    else:
        new, action, reason = cur, "hold", f"backpressure {bp:.2f} within the deadband around the ITL target"
    new = min(float(cfg.max_batch_size), max(float(cfg.min_batch_size), new))
    halved = action == "halve"
    # While a throughput fall awaits confirmation, the batch size before the growth step stays the cliff's edge.
    before = state.batch_size_before if tbp_reference is not None else cur
    new_state = LocalAutoscalerState(new, None if halved else itl, None if halved else tp, obs.now, action,
                                     batch_size_before=before, ceiling=ceiling, ceiling_until_s=ceiling_until,
                                     tbp_reference=tbp_reference, tbp_low_intervals=low_intervals,
                                     draining=halved, running_settled=settled, running_history=history)
    return new_state, Decision(obs.now, int(new), lbp, tbp, bp, action, reason)
