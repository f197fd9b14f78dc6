"""Chiron's local autoscaler: the engine's maximum batch size from latency and throughput backpressure.

A pure function of ``(config, state, observation)`` (no clock, no I/O): the engine agent and the fleet simulator
run the very same code. The paper's rule (arXiv 2501.08090, local autoscaler; ``../shared/notes/paper.md``
§0b): latency backpressure ``LBP = ITL / SLO``, throughput backpressure ``TBP = previous / current
throughput``; ``> 1`` halves the batch size, ``< 1`` grows it through an EWMA ``B ← (1 − α)·B + α·B/BP``.

Where the paper is silent (pitfalls: ``paper.md`` §0c; measurements: ``docs/decisions/0022``):

* **Observed ITL** is the token-weighted mean of the interval's per-token ITLs (``itl_quantile`` None; a
  quantile when set), EWMA-smoothed (``itl_smoothing``): the SLO judges each request's mean ITL, which every
  running request sees; a p99 chases prefill-chunk iterations no cap shortens (``docs/decisions/0027``).
  One interval above ``overload_factor`` × SLO still halves at once.
* **Halve above the SLO, grow toward ``latency_target_fraction`` × SLO** (0.9); between the two the same
  proportional step eases down; it holds within 1 ± ``deadband`` (0.08). **Unless prefill-bound**:
  when decode-only iterations meet the target, prefill chunks (no cap shortens them) set the ITL, so the cap
  is pinned to the running count (no new admissions, no queue built behind a halved cap; ``docs/decisions/0031``).
* **TBP counts only while saturated and right after a growth step** (throughput also falls with load, and after
  a halving by construction), beyond ``1 + tbp_tolerance``, and only once the fall has lasted
  ``tbp_confirm_intervals``: the prefills a larger batch admitted dip throughput with no cliff behind them.
  A confirmed cliff caps growth at the pre-growth size for ``tbp_ceiling_ttl_s``.
* **After a halving** both EWMAs restart, and nothing is judged until the running requests have finished down
  to the new cap (a lower cap evicts no one; the intervals until then show the old batch).
* **Aim lower while the running set grows** (BATCH instances only, :func:`role_overrides`): the target is
  scaled by ``f + (1 − f)·m``, ``f = young_target_fraction``, ``m`` = running count ``maturity_window_s`` ago /
  now, until ``m ≥ mature_running_ratio`` or an unsaturated interval; the ITL at a fixed cap rises as it fills.
* Growth uses ``BP = max(ITL / target, TBP / (1 + tbp_tolerance))``, on the larger of the smoothed and latest
  ITL, at most ``max_growth_factor`` per step. With ITL ≈ a + b·B it maps B to ``(1−α)B + α·B·S/(a+bB)``,
  concave with its fixed point at the largest B meeting target S, approached from below (tests check it).
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
    itl_quantile: float | None = None  # None: the token-weighted mean ITL of the interval
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
        if self.itl_quantile is not None and not 0 < self.itl_quantile < 1:
            raise ValueError("itl_quantile must be None (the mean) or in (0, 1)")
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

    ``itl_ms``: the mean (or ``itl_quantile``) of per-token ITLs in the interval (NaN when no token was produced);
    ``throughput_tokens_per_s``: output tokens per second in the interval; ``saturated``: work was waiting
    or the batch was at its cap at the end of the interval; ``running``: requests running at the end of the
    interval (``None``: unknown, and the running set is taken as settled); ``decode_itl_ms``: the mean ITL of
    the interval's iterations that prefilled nothing (NaN: none, or not measured), what the cap alone sets.
    """

    now: float
    itl_ms: float
    throughput_tokens_per_s: float
    saturated: bool
    running: int | None = None
    decode_itl_ms: float = math.nan


def observation(now: float, itl_ms: float, output_tokens: int, interval_s: float, saturated: bool,
                running: int | None = None, decode_itl_ms: float = math.nan) -> Observation:
    """The observation of one control interval of ``interval_s`` [s] ending at ``now``: ``itl_ms`` the interval's
    observed ITL (NaN: no token), ``output_tokens`` generated in it, ``saturated`` and ``running`` at its end,
    ``decode_itl_ms`` over its decode-only iterations (:class:`Observation`). Built by the engine agent and the
    fleet simulator alike."""
    return Observation(now, itl_ms, output_tokens / max(interval_s, 1e-9), saturated, running=running,
                       decode_itl_ms=decode_itl_ms)


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
    decode_itl_ewma_ms: float | None = None  # smoothed ITL of decode-only iterations (the last ones seen)


@dataclass(frozen=True)
class Decision:
    """One control decision and the inputs that explain it."""

    now: float
    max_batch_size: int
    latency_backpressure: float
    throughput_backpressure: float
    backpressure: float
    action: str  # "grow", "halve", "pin" (to the running count, prefill-bound), "hold"
    reason: str


def role_overrides(role: str) -> dict:
    """Per-role changes to :class:`LocalAutoscalerConfig`'s defaults (``role``: ``interactive``, ``mixed``,
    ``batch``), for the engine agent (``chiron engine --role``) and the fleet simulator alike.

    Only BATCH instances, fed from a backlog, aim lower while their running set fills up; INTERACTIVE and MIXED
    instances keep the full ITL target (``young_target_fraction`` 1): on them a saturated interval is an
    interactive burst, and a lower cap queues it (measurements: ``docs/decisions/0022``).

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


def _throughput_backpressure(state: LocalAutoscalerState, saturated: bool, tp: float) -> float:
    """TBP for smoothed throughput ``tp`` [tokens/s]: against the pre-growth reference while a fall awaits
    confirmation, else against the previous interval right after a growth step; 0 unless saturated."""
    if saturated and tp > 0 and state.tbp_reference is not None:
        return state.tbp_reference / tp
    if saturated and state.last_action == "grow" and state.throughput_ewma is not None and tp > 0:
        return state.throughput_ewma / tp
    return 0.0


def _unjudged(cfg: LocalAutoscalerConfig, state: LocalAutoscalerState, obs: Observation) -> tuple[float, str] | None:
    """(LBP, reason) when the interval is not to be judged, else None: right after a halving while more requests
    run than the new cap (a lower cap evicts no one, so the interval still shows the old batch), or when no
    token was produced (nothing to learn from)."""
    cur = int(state.batch_size)
    if state.draining and obs.running is not None and obs.running > cur:
        return (0.0 if math.isnan(obs.itl_ms) else obs.itl_ms / cfg.itl_slo_ms,
                f"halved: waiting for the running requests to finish down to the cap ({obs.running} running, cap {cur})")
    if math.isnan(obs.itl_ms):
        return 0.0, "no tokens produced in the interval"
    return None


def _prefill_pin(cfg: LocalAutoscalerConfig, state: LocalAutoscalerState, obs: Observation, itl_ms: float,
                 target_ms: float, slow: bool) -> tuple[float | None, tuple[float, str] | None]:
    """(smoothed decode-only ITL [ms] to carry, (batch size, reason) or None). A pin is due when the smoothed
    ITL ``itl_ms`` calls for a smaller batch (``slow``: above the SLO, or above ``target_ms`` beyond the deadband)
    while decode-only iterations meet ``target_ms``: prefill chunks push the mean up and a smaller batch would not
    shorten them; halving would only queue new prompts (TTFT). The cap is pinned to the running count instead
    (never raised): nothing is admitted until one finishes, nothing is evicted."""
    decode = (_ewma(state.decode_itl_ewma_ms, obs.decode_itl_ms, cfg.itl_smoothing)
              if math.isfinite(obs.decode_itl_ms) else state.decode_itl_ewma_ms)
    if not slow or decode is None or not decode <= target_ms:
        return decode, None
    cur = state.batch_size
    running = cur if obs.running is None else float(obs.running)
    new = min(cur, max(running, float(cfg.min_batch_size)))
    return decode, (new, f"ITL {itl_ms:.1f} ms over target {target_ms:.1f} ms from prefill chunks (decode-only "
                         f"iterations {decode:.1f} ms): cap pinned to the {running:.0f} running requests, not cut")


def decide(config: LocalAutoscalerConfig, state: LocalAutoscalerState,
           obs: Observation) -> tuple[LocalAutoscalerState, Decision]:
    """One control step. Returns the new state and the decision (``max_batch_size`` to apply)."""
    cfg = config
    cur = state.batch_size
    m, settled, history = _maturity(cfg, state, obs)

    unjudged = _unjudged(cfg, state, obs)
    if unjudged is not None:
        # Hold without judging the interval: the EWMAs and the throughput reference stay as they are.
        lbp, reason = unjudged
        return (replace(state, last_decision_s=obs.now, last_action="hold", running_settled=settled,
                        running_history=history),
                Decision(obs.now, int(cur), lbp, 0.0, 0.0, "hold", reason))

    itl = _ewma(state.itl_ewma_ms, obs.itl_ms, cfg.itl_smoothing)
    lbp = itl / cfg.itl_slo_ms  # the paper's latency backpressure
    young = cfg.young_target_fraction + (1.0 - cfg.young_target_fraction) * m
    target_ms = cfg.itl_slo_ms * cfg.latency_target_fraction * young

    prev_tp = state.throughput_ewma  # None right after a halving
    tp = _ewma(prev_tp, obs.throughput_tokens_per_s, cfg.itl_smoothing)
    tbp, tbp_reference, low_intervals = _throughput_backpressure(state, obs.saturated, tp), None, 0
    confirming = state.tbp_reference is not None
    # Backpressure against the growth target: latency against the SLO margin, throughput against its noise band.
    # Growth is judged on the larger of the smoothed and the latest ITL (the smoothing's lag must not carry
    # growth past the target); easing down is judged on the smoothed ITL alone (one spike must not shrink it).
    tbp_term = tbp / (1.0 + cfg.tbp_tolerance)
    bp = max(itl / target_ms, tbp_term)
    bp_grow = max(max(itl, obs.itl_ms) / target_ms, tbp_term)
    ceiling, ceiling_until = (state.ceiling, state.ceiling_until_s) if obs.now < state.ceiling_until_s else (None, -math.inf)

    over_slo = lbp > 1.0 or obs.itl_ms > cfg.overload_factor * cfg.itl_slo_ms
    decode, pin = _prefill_pin(cfg, state, obs, itl, target_ms, over_slo or itl / target_ms > 1.0 + cfg.deadband)
    if pin is not None:
        (new, reason), action = pin, "pin"
    elif over_slo:
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
                                     draining=halved, running_settled=settled, running_history=history,
                                     decode_itl_ewma_ms=decode)
    return new_state, Decision(obs.now, int(new), lbp, tbp, bp, action, reason)
