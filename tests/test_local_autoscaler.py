"""Unit tests of the local autoscaler (services/engine/local_autoscaler.py) against synthetic plants.

The plant is the decode-latency shape of the performance model: ITL(B) = a + b·B milliseconds for a batch
of B requests, observed once per control interval (a fake clock of plain floats, one second apart), with
the engine saturated unless a test says otherwise. Its throughput is B / ITL tokens per second.

With the default config (SLO 50 ms, growth target 0.9 × SLO = 45 ms, deadband ±8 % of backpressure) and
a = 12, b = 0.1: the largest B meeting the target is B* = (45 − 12) / 0.1 = 330, and ITL reaches the SLO
itself at B_slo = (50 − 12) / 0.1 = 380.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from services.engine.local_autoscaler import (
    Decision,
    LocalAutoscalerConfig,
    LocalAutoscalerState,
    Observation,
    decide,
    initial_state,
    observation,
    role_overrides,
)

CFG = LocalAutoscalerConfig().validate()
SLO = CFG.itl_slo_ms
TARGET = SLO * CFG.latency_target_fraction


@dataclass
class Trace:
    batch: list[int] = field(default_factory=list)  # batch size applied during each interval
    itl: list[float] = field(default_factory=list)  # ITL observed in that interval
    decisions: list[Decision] = field(default_factory=list)
    states: list[LocalAutoscalerState] = field(default_factory=list)

    def halvings(self, start: int = 0, stop: int | None = None) -> int:
        return sum(d.action == "halve" for d in self.decisions[start:stop])


def run_plant(cfg: LocalAutoscalerConfig, steps: int, a: float = 12.0, b: float = 0.1,
              noise: float = 0.0, seed: int = 0, b_after: tuple[int, float] | None = None,
              saturated: bool = True) -> Trace:
    """Drive ``decide`` against ITL(B) = (a + b·B)·(1 + U(−noise, noise)); ``b_after = (k, b2)`` switches b at k."""
    rng = np.random.default_rng(seed)
    state = initial_state(cfg)
    batch = cfg.initial_batch_size
    tr = Trace()
    for k in range(steps):
        slope = b if b_after is None or k < b_after[0] else b_after[1]
        itl = (a + slope * batch) * (1.0 + noise * rng.uniform(-1.0, 1.0))
        obs = Observation(now=float(k), itl_ms=itl, throughput_tokens_per_s=1e3 * batch / itl,
                          saturated=saturated)
        state, d = decide(cfg, state, obs)
        tr.batch.append(batch)
        tr.itl.append(itl)
        tr.decisions.append(d)
        tr.states.append(state)
        batch = d.max_batch_size
    return tr


def b_at(itl_ms: float, a: float, b: float) -> float:
    return (itl_ms - a) / b


# ---- (a) convergence on a clean plant ---------------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [(12.0, 0.1), (12.0, 0.2), (12.0, 0.05), (20.0, 0.05)])
def test_converges_to_itl_target_without_overshoot_or_oscillation(a, b):
    tr = run_plant(CFG, 160, a=a, b=b)
    b_star, b_slo = b_at(TARGET, a, b), b_at(SLO, a, b)
    assert tr.batch[0] == CFG.initial_batch_size

    # Converged: the applied batch is within the deadband around the ITL target and under the SLO.
    final = tr.batch[-1]
    itl_final = a + b * final
    assert (1 - CFG.deadband) * TARGET <= itl_final <= (1 + CFG.deadband) * TARGET, (final, itl_final)
    assert itl_final < SLO
    # Inside the deadband it holds, so it may stop short of B*, but not by what costs real throughput.
    assert final / itl_final >= 0.95 * b_star / TARGET, (final, b_star)

    # It got there from far below (16 → hundreds) in a few dozen intervals.
    first_near = next(k for k, x in enumerate(tr.batch) if abs(x - final) <= 0.1 * final)
    assert first_near <= 30

    # Never overshoots B_slo (where ITL = SLO) by more than a few percent.
    assert max(tr.batch) <= 1.05 * b_slo, (max(tr.batch), b_slo)

    # No oscillation: once converged, 100 intervals within ±10 % and no halving.
    settled = tr.batch[40:140]
    assert max(settled) <= 1.1 * min(settled)
    ref = tr.batch[40]
    assert all(abs(x - ref) <= 0.1 * ref for x in settled)
    assert tr.halvings(0, None) == 0


def test_convergence_is_monotone_growth_from_below():
    tr = run_plant(CFG, 20)
    # The first intervals only grow, each step a bounded multiple (EWMA α = 0.75, ITL ≥ a).
    grow = [d for d in tr.decisions[:6]]
    assert all(d.action == "grow" for d in grow)
    for prev, nxt in zip(tr.batch[:6], tr.batch[1:7], strict=True):
        assert prev < nxt <= 4 * prev + 1


def test_noiseless_plant_never_exceeds_slo():
    tr = run_plant(CFG, 100, a=12.0, b=0.1)
    assert max(tr.itl) <= SLO
    tr2 = run_plant(dataclasses.replace(CFG, initial_batch_size=1), 100, a=8.0, b=0.3)
    assert max(tr2.itl) <= SLO
    assert tr2.halvings() == 0


# ---- (b) noise -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_noisy_plant_stays_in_band_without_collapse(seed):
    tr = run_plant(CFG, 200, noise=0.10, seed=seed)
    b_star, b_slo = 330.0, 380.0
    after_warmup = tr.batch[20:]
    # In a band around the target: never collapsed far below, never far above the SLO point.
    assert min(after_warmup) >= 0.75 * b_star, min(after_warmup)
    assert max(after_warmup) <= 1.05 * b_slo, max(after_warmup)
    # Halvings are rare (a handful at most in 200 intervals).
    assert tr.halvings() <= 3
    # SLO violations (observed ITL above the SLO) are a small fraction of intervals.
    violations = sum(itl > SLO for itl in tr.itl)
    assert violations / len(tr.itl) <= 0.10
    # Mean throughput after warm-up is close to the clean optimum's (B*/ITL(B*)).
    tput = [1e3 * bb / itl for bb, itl in zip(tr.batch[20:], tr.itl[20:], strict=True)]
    assert np.mean(tput) >= 0.85 * (1e3 * b_star / TARGET)


@pytest.mark.parametrize(("itl_ms", "expect"), [
    (TARGET * 1.03, "hold"),  # inside the deadband above the target: hold, batch unchanged
    (TARGET * 0.97, "hold"),  # inside the deadband below the target: hold
    (TARGET * 1.10, "ease"),  # between target+deadband and the SLO: proportional step down, no halving
    (TARGET * 0.80, "grow"),
])
def test_deadband_and_margin_around_the_target(itl_ms, expect):
    state = LocalAutoscalerState(batch_size=300.0, itl_ewma_ms=itl_ms, throughput_ewma=6000.0,
                                 last_decision_s=0.0, last_action="hold")
    s, d = decide(CFG, state, Observation(1.0, itl_ms, 6000.0, saturated=True))
    assert d.backpressure == pytest.approx(itl_ms / TARGET)
    assert d.latency_backpressure == pytest.approx(itl_ms / SLO)
    if expect == "hold":
        assert d.action == "hold" and s.batch_size == 300.0
    elif expect == "ease":
        bp = itl_ms / TARGET
        assert d.action == "hold"  # easing down is not a halving
        assert s.batch_size == pytest.approx((1 - CFG.ewma_alpha) * 300.0 + CFG.ewma_alpha * 300.0 / bp)
        assert 0.9 * 300.0 < s.batch_size < 300.0
    else:
        assert d.action == "grow"
        assert s.batch_size == pytest.approx((1 - CFG.ewma_alpha) * 300.0 + CFG.ewma_alpha * 300.0 / 0.8)


def test_single_spike_is_smoothed_but_overload_halves_at_once():
    base = LocalAutoscalerState(batch_size=300.0, itl_ewma_ms=40.0, throughput_ewma=7500.0,
                                last_decision_s=0.0, last_action="hold")
    # One interval at 1.2 × SLO: the EWMA (50 ms) is not above the SLO, so no halving.
    s, d = decide(CFG, base, Observation(1.0, 60.0, 5000.0, True))
    assert d.action != "halve"
    assert s.batch_size >= 0.9 * 300.0
    # One interval above overload_factor × SLO (75 ms) halves at once even though the EWMA (57.5) is
    # what LBP reports.
    s, d = decide(CFG, base, Observation(1.0, 80.0, 5000.0, True))
    assert d.action == "halve"
    assert s.batch_size == pytest.approx(150.0)
    assert d.max_batch_size == 150


# ---- (c) step change of load -------------------------------------------------------------------------


def test_step_change_in_plant_brings_itl_back_under_slo():
    change = 100
    tr = run_plant(CFG, 200, a=12.0, b=0.1, b_after=(change, 0.2))
    assert tr.batch[change - 1] >= 300  # converged on the old plant
    assert tr.itl[change] > SLO  # the change hits: 12 + 0.2·333 ≈ 78.6 ms
    assert tr.decisions[change].action == "halve"
    # Within a few intervals the ITL is back under the SLO, and it stays there.
    assert all(itl <= SLO for itl in tr.itl[change + 3:])
    assert tr.itl[change + 1] <= SLO
    # It re-converges to the new plant's target (B* = (45 − 12) / 0.2 = 165).
    itl_final = 12.0 + 0.2 * tr.batch[-1]
    assert (1 - CFG.deadband) * TARGET <= itl_final <= (1 + CFG.deadband) * TARGET
    assert tr.halvings(change + 3) == 0


def test_step_change_down_in_load_lets_batch_grow_again():
    tr = run_plant(CFG, 200, a=12.0, b=0.2, b_after=(100, 0.1))
    assert abs(tr.batch[99] - 165) <= 0.1 * 165
    itl_final = 12.0 + 0.1 * tr.batch[-1]
    assert (1 - CFG.deadband) * TARGET <= itl_final <= (1 + CFG.deadband) * TARGET
    assert tr.halvings() == 0


def test_step_change_halves_once_when_one_halving_suffices():
    change = 100
    tr = run_plant(CFG, 200, a=12.0, b=0.1, b_after=(change, 0.2))
    assert tr.itl[change + 1] <= SLO  # one halving was enough ...
    assert tr.halvings(change) == 1  # ... so no second halving
    assert min(tr.batch[change:]) >= 0.9 * 165


# ---- (d) throughput backpressure ------------------------------------------------------------------


def _after_growth(batch: float = 200.0, tp: float = 5000.0, action: str = "grow") -> LocalAutoscalerState:
    return LocalAutoscalerState(batch_size=batch, itl_ewma_ms=20.0, throughput_ewma=tp,
                                last_decision_s=0.0, last_action=action)


def _falling(state: LocalAutoscalerState, intervals: int, tp: float = 2000.0) -> tuple[LocalAutoscalerState, list[Decision]]:
    """``intervals`` control steps in a row at throughput ``tp`` (saturated, ITL 20 ms)."""
    out = []
    for k in range(intervals):
        state, d = decide(CFG, state, Observation(1.0 + k, 20.0, tp, saturated=True))
        out.append(d)
    return state, out


def test_tbp_halves_when_throughput_falls_after_growth_while_saturated():
    n = CFG.tbp_confirm_intervals
    assert n >= 2
    s, ds = _falling(_after_growth(), n)
    # The first intervals hold to confirm: the batch size stays, the pre-growth throughput is the reference.
    for d in ds[:-1]:
        assert d.action == "hold" and d.max_batch_size == 200
        assert d.throughput_backpressure > 1.0 + CFG.tbp_tolerance
        assert "confirm" in d.reason
    d = ds[-1]
    # Smoothed throughput falls towards 2000 against 5000 before: TBP > 1 + tolerance for n intervals.
    ewma = 5000.0
    for _ in range(n):
        ewma = (1 - CFG.itl_smoothing) * ewma + CFG.itl_smoothing * 2000.0
    assert d.throughput_backpressure == pytest.approx(5000.0 / ewma)
    assert d.action == "halve"
    assert s.batch_size == pytest.approx(100.0)
    assert d.max_batch_size == 100
    assert "throughput" in d.reason
    # Throughput smoothing restarts after a halving.
    assert s.throughput_ewma is None
    assert s.last_action == "halve"


def test_tbp_transient_dip_that_recovers_does_not_halve():
    # One interval's dip (the admitted requests' prefills), then throughput comes back above the reference.
    s, ds = _falling(_after_growth(), 1)
    assert ds[0].action == "hold" and s.tbp_reference == 5000.0
    for k in range(4):
        s, d = decide(CFG, s, Observation(2.0 + k, 20.0, 7000.0, saturated=True))
        assert d.action != "halve"
    assert s.tbp_reference is None and s.ceiling is None
    assert s.batch_size >= 200.0


def test_tbp_small_drop_within_tolerance_does_not_halve():
    s, d = decide(CFG, _after_growth(), Observation(1.0, 20.0, 4000.0, saturated=True))
    assert 1.0 < d.throughput_backpressure <= 1.0 + CFG.tbp_tolerance
    assert d.action != "halve"
    assert s.batch_size >= 200.0


def test_tbp_ignored_when_not_saturated():
    s, d = decide(CFG, _after_growth(), Observation(1.0, 20.0, 1000.0, saturated=False))
    assert d.throughput_backpressure == 0.0
    assert d.action == "hold"
    assert s.batch_size == 200.0


def test_tbp_ignored_after_lowering_step():
    # The previous step eased the batch down (action "hold"): falling throughput is expected, not a signal.
    s, d = decide(CFG, _after_growth(action="hold"), Observation(1.0, 20.0, 1000.0, saturated=True))
    assert d.throughput_backpressure == 0.0
    assert d.action != "halve"
    assert s.batch_size >= 200.0


def test_no_halving_cascade_after_a_halving():
    state, ds = _falling(_after_growth(), CFG.tbp_confirm_intervals)
    assert ds[-1].action == "halve"
    # Throughput keeps falling right after the halving (fewer requests in the batch), still saturated.
    state, d = decide(CFG, state, Observation(10.0, 18.0, 1000.0, saturated=True))
    assert d.action != "halve"
    assert d.throughput_backpressure == 0.0
    assert state.batch_size >= 100.0


def _cliff_throughput(batch: int, power: float = 2.0) -> float:
    """Plant throughput (tokens/s) with a cliff past B = 250 (e.g. KV thrash): B/ITL below, falling as B^-power above."""
    itl = 12.0 + 0.1 * batch
    if batch <= 250:
        return 1e3 * batch / itl
    return 1e3 * 250 / (12.0 + 0.1 * 250) * (250 / batch) ** power


def _run_cliff(steps: int, slo_ms: float = 1000.0) -> tuple[list[int], list[float], list[Decision]]:
    cfg = dataclasses.replace(CFG, itl_slo_ms=slo_ms).validate()  # relaxed SLO (batch role): TBP drives
    state = initial_state(cfg)
    batch = cfg.initial_batch_size
    batches, tputs, decisions = [], [], []
    for k in range(steps):
        tput = _cliff_throughput(batch)
        state, d = decide(cfg, state, Observation(float(k), 12.0 + 0.1 * batch, tput, saturated=True))
        batches.append(batch)
        tputs.append(tput)
        decisions.append(d)
        batch = d.max_batch_size
    return batches, tputs, decisions


def test_tbp_fires_on_throughput_cliff_without_cascade():
    batches, _, decisions = _run_cliff(40)
    halves = [k for k, d in enumerate(decisions) if d.action == "halve"]
    assert halves, "growing past the throughput cliff must trigger TBP"
    for k in halves:
        d = decisions[k]
        # Caused by throughput, not latency (ITL ≤ 114 ms against a 1000-ms SLO).
        assert d.latency_backpressure < 0.2
        assert d.throughput_backpressure > 1.0 + CFG.tbp_tolerance
        assert "throughput" in d.reason
        # The growth step that crossed the cliff, then holds while the fall was confirmed.
        n = CFG.tbp_confirm_intervals
        assert decisions[k - n].action == "grow"
        assert all(x.action == "hold" and "confirm" in x.reason for x in decisions[k - n + 1:k])
        assert batches[k] > 250  # only ever past the cliff
    # No cascade: never two halvings in a row, and one halving from past the cliff never goes below half of it.
    assert all(b - a > 1 for a, b in zip(halves, halves[1:], strict=False))
    assert min(batches[halves[0]:]) >= 125


def test_tbp_settles_near_throughput_peak():
    batches, tputs, decisions = _run_cliff(80)
    peak = _cliff_throughput(250)
    assert sum(d.action == "halve" for d in decisions[20:]) <= 5
    assert np.mean(tputs[20:]) >= 0.5 * peak


# ---- (e) no tokens ---------------------------------------------------------------------------------


def test_nan_itl_holds():
    state = LocalAutoscalerState(batch_size=123.7, itl_ewma_ms=30.0, throughput_ewma=4000.0,
                                 last_decision_s=4.0, last_action="grow")
    s, d = decide(CFG, state, Observation(5.0, math.nan, 0.0, saturated=True))
    assert d.action == "hold"
    assert d.max_batch_size == 123
    assert s.batch_size == 123.7
    assert s.itl_ewma_ms == 30.0 and s.throughput_ewma == 4000.0
    assert s.last_decision_s == 5.0
    # And with no previous observation at all.
    s0, d0 = decide(CFG, initial_state(CFG), Observation(0.0, math.nan, 0.0, saturated=False))
    assert d0.action == "hold" and d0.max_batch_size == CFG.initial_batch_size
    assert s0.itl_ewma_ms is None


# ---- bounds ----------------------------------------------------------------------------------------


def test_batch_size_clamped_to_config_bounds():
    cfg = dataclasses.replace(CFG, min_batch_size=4, initial_batch_size=16, max_batch_size=64).validate()
    up = run_plant(cfg, 30, a=1.0, b=0.001)  # ITL far below target: grows to the max and stops
    assert max(up.batch) == 64 and up.batch[-1] == 64
    assert all(d.max_batch_size <= 64 for d in up.decisions)
    down = run_plant(cfg, 30, a=200.0, b=0.1)  # ITL above SLO at any batch: halves down to the min
    assert down.batch[-1] == 4 and min(down.batch) == 4
    assert all(d.max_batch_size >= 4 for d in down.decisions)


def test_idle_engine_below_target_does_not_grow():
    tr = run_plant(CFG, 20, saturated=False)
    assert all(bb == CFG.initial_batch_size for bb in tr.batch)


def test_after_a_halving_it_waits_for_the_running_requests_to_finish_down_to_the_new_cap():
    state = dataclasses.replace(initial_state(CFG), batch_size=200.0)
    state, d = decide(CFG, state, Observation(1.0, 2 * SLO, 1000.0, True, running=200))
    assert d.action == "halve" and d.max_batch_size == 100 and state.draining
    # A lower cap evicts no one: with 150 still running the interval shows the old batch; no second halving.
    for k, running in enumerate((180, 150, 101)):
        state, d = decide(CFG, state, Observation(2.0 + k, 2 * SLO, 1000.0, True, running=running))
        assert d.action == "hold" and d.max_batch_size == 100 and "waiting" in d.reason
    # Down to the cap: judged again, and a violation that persists halves again.
    state, d = decide(CFG, state, Observation(5.0, 2 * SLO, 1000.0, True, running=100))
    assert d.action == "halve" and d.max_batch_size == 50
    # Without running counts nothing tells the drain: the next interval is judged as before.
    state = dataclasses.replace(initial_state(CFG), batch_size=200.0)
    state, d = decide(CFG, state, Observation(1.0, 2 * SLO, 1000.0, True))
    state, d = decide(CFG, state, Observation(2.0, 2 * SLO, 1000.0, True))
    assert d.action == "halve" and d.max_batch_size == 50


def test_an_itl_over_the_slo_from_prefill_chunks_pins_the_cap_to_the_running_count():
    # Decode-only iterations at 20 ms meet the target: the 60-ms mean comes from prefill chunks, which a smaller
    # batch would not shorten. The cap goes to the 40 running requests (no new admissions), not to 32.
    state = dataclasses.replace(initial_state(CFG), batch_size=64.0)
    pinned, d = decide(CFG, state, Observation(1.0, 1.2 * SLO, 1000.0, True, running=40, decode_itl_ms=20.0))
    assert d.action == "pin" and d.max_batch_size == 40 and "prefill" in d.reason and not pinned.draining
    # The same mean with slow decode-only iterations: the batch is what is too big, and it is halved.
    _, d = decide(CFG, state, Observation(1.0, 1.2 * SLO, 1000.0, True, running=40, decode_itl_ms=0.95 * SLO))
    assert d.action == "halve" and d.max_batch_size == 32
    # No decode-only iteration seen yet: nothing tells prefill from batch, so it halves as before.
    _, d = decide(CFG, state, Observation(1.0, 1.2 * SLO, 1000.0, True, running=40))
    assert d.action == "halve" and d.max_batch_size == 32
    # A pin never raises the cap: with more running than the cap it holds the cap.
    _, d = decide(CFG, state, Observation(1.0, 1.2 * SLO, 1000.0, True, running=100, decode_itl_ms=20.0))
    assert d.action == "pin" and d.max_batch_size == 64


def test_the_decode_only_itl_is_remembered_through_intervals_that_all_prefilled():
    state = dataclasses.replace(initial_state(CFG), batch_size=64.0)
    state, d = decide(CFG, state, Observation(1.0, 0.6 * SLO, 1000.0, True, running=40, decode_itl_ms=20.0))
    assert d.action != "pin" and state.decode_itl_ewma_ms == 20.0  # under the target: nothing to pin
    # Every iteration of the next interval prefilled (no decode-only ITL): the last one seen still says prefill.
    state, d = decide(CFG, state, Observation(2.0, 2 * SLO, 1000.0, True, running=40))
    assert d.action == "pin" and d.max_batch_size == 40
    # Decode-only iterations that slow down past the target end the pin: the smoothed value crosses and it halves.
    state, d = decide(CFG, state, Observation(3.0, 2 * SLO, 1000.0, True, running=40, decode_itl_ms=2 * SLO))
    assert d.action == "halve"


# ---- (e2) a running set that is still growing -------------------------------------------------------


def _drive_with_running(cfg: LocalAutoscalerConfig, running: list[int | None], a: float = 12.0,
                        b: float = 0.1) -> Trace:
    """``run_plant`` with ``Observation.running`` taken from ``running[k]`` at step k."""
    state, batch, tr = initial_state(cfg), cfg.initial_batch_size, Trace()
    for k, n in enumerate(running):
        itl = a + b * batch
        state, d = decide(cfg, state, Observation(float(k), itl, 1e3 * batch / itl, True, running=n))
        tr.batch.append(batch)
        tr.decisions.append(d)
        tr.states.append(state)
        batch = d.max_batch_size
    return tr


# 40 s of a running set that grows 20% a second (10 s ago / now = 1.2^-10 = 0.16, far below 0.9), then flat.
GROWING_THEN_FLAT = [round(10 * 1.2 ** k) for k in range(40)] + [round(10 * 1.2 ** 39)] * 40


def test_growth_aims_lower_while_the_running_set_grows_then_at_the_full_target():
    m = 1.2 ** -10
    young_target = TARGET * (CFG.young_target_fraction + (1 - CFG.young_target_fraction) * m)
    tr = _drive_with_running(CFG, GROWING_THEN_FLAT)
    # Young: settles around the scaled target (deadband below it), well short of the full target's B* = 330.
    assert b_at(young_target * (1 - CFG.deadband) * 0.97, 12, 0.1) <= tr.batch[39] <= b_at(young_target, 12, 0.1) + 1
    assert not tr.states[39].running_settled
    assert "running set still growing" in " ".join(d.reason for d in tr.decisions[:40] if d.action == "grow")
    # Flat for a window: settled (latched), and growth resumes toward the full target without passing the SLO.
    assert tr.states[-1].running_settled
    assert b_at(TARGET * (1 - CFG.deadband), 12, 0.1) <= tr.batch[-1] <= b_at(TARGET, 12, 0.1) + 1
    assert tr.halvings() == 0
    # The same run with the rule off (or without running counts) goes straight to the full target.
    off = _drive_with_running(dataclasses.replace(CFG, young_target_fraction=1.0), GROWING_THEN_FLAT)
    unknown = _drive_with_running(CFG, [None] * len(GROWING_THEN_FLAT))
    assert off.batch == unknown.batch
    assert off.batch[39] >= b_at(TARGET * (1 - CFG.deadband), 12, 0.1) > tr.batch[39] * 1.05


def test_a_settled_running_set_stays_settled():
    tr = _drive_with_running(CFG, GROWING_THEN_FLAT + [400, 800, 1600])  # grows again after settling: no effect
    assert all(s.running_settled for s in tr.states[-3:])
    assert all("still growing" not in d.reason for d in tr.decisions[-3:])


def test_an_unsaturated_engine_settles_the_running_set_at_once():
    state, d = decide(CFG, initial_state(CFG), Observation(1.0, 20.0, 1000.0, True, running=8))
    assert not state.running_settled and "still growing" in d.reason
    # Not saturated: arrivals set the running count, not the cap, so there is no fill-up to wait for.
    state, d = decide(CFG, state, Observation(2.0, 20.0, 1000.0, False, running=16))
    assert state.running_settled and state.running_history == ()
    state, d = decide(CFG, state, Observation(3.0, 20.0, 1000.0, True, running=64))
    assert state.running_settled and "still growing" not in d.reason


def test_role_overrides_keep_the_rule_for_batch_instances_only():
    assert role_overrides("mixed") == role_overrides("interactive") == {"young_target_fraction": 1.0}
    assert role_overrides("batch") == {}
    for role in ("interactive", "mixed"):
        cfg = dataclasses.replace(CFG, **role_overrides(role))
        state, d = decide(cfg, initial_state(cfg), Observation(1.0, 20.0, 1000.0, True, running=8))
        assert state.running_settled and "still growing" not in d.reason
    with pytest.raises(ValueError, match="unknown role"):
        role_overrides("prefill")


# ---- (f) config validation -----------------------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {"itl_slo_ms": 0.0},
    {"itl_slo_ms": -5.0},
    {"min_batch_size": 32, "initial_batch_size": 16},
    {"min_batch_size": 0},
    {"initial_batch_size": 2048},  # above max_batch_size
    {"control_interval_s": 0.0},
    {"ewma_alpha": 0.0},
    {"ewma_alpha": 1.5},
    {"itl_smoothing": 0.0},
    {"itl_smoothing": -0.1},
    {"latency_target_fraction": 1.2},
    {"itl_quantile": 1.0},
    {"itl_quantile": 0.0},
    {"tbp_tolerance": -0.1},
    {"young_target_fraction": 0.0},
    {"young_target_fraction": 1.5},
    {"mature_running_ratio": 0.0},
    {"maturity_window_s": 0.0},
])
def test_config_validate_rejects_bad_values(changes):
    with pytest.raises(ValueError):
        dataclasses.replace(LocalAutoscalerConfig(), **changes).validate()


def test_config_validate_accepts_defaults_and_edges():
    assert LocalAutoscalerConfig().validate() == LocalAutoscalerConfig()
    LocalAutoscalerConfig(ewma_alpha=1.0, itl_smoothing=1.0, latency_target_fraction=1.0,
                          min_batch_size=8, initial_batch_size=8, max_batch_size=8).validate()


# ---- (g) the bench's summary ------------------------------------------------------------------------------


def test_bench_summary_flags_a_best_static_cap_that_missed_its_own_slo():
    from bench.local_autoscaler import summarize

    def row(setting, tput, att, conv=None):
        return {"itl_slo_ms": 10.0, "setting": setting, "throughput_tokens_per_s": tput, "itl_slo_attainment": att,
                "converge_s": conv}

    ok = summarize({"results": [row("adaptive", 960.0, 0.995, 12.0), row("best_static", 1000.0, 0.993)]})
    assert ok == [{"itl_slo_ms": 10.0, "adaptive_vs_best_static": 0.96, "targets_met": True,
                   "best_static_meets_slo": True}]
    moved = summarize({"results": [row("adaptive", 900.0, 0.995, 12.0), row("best_static", 1000.0, 0.95)]})
    assert moved[0]["best_static_meets_slo"] is False and moved[0]["targets_met"] is False
    alone = summarize({"results": [row("adaptive", 900.0, 0.995, 12.0)]})
    assert alone[0]["best_static_meets_slo"] is None and math.isnan(alone[0]["adaptive_vs_best_static"])


def test_vllm_bench_counts_the_one_second_intervals_whose_p99_is_over_the_slo():
    from bench.local_autoscaler_vllm import _interval_p99s, _over_slo_share
    from services.engine.backend import StepStats

    def step(t, itl):
        return StepStats(t, 2, 0, 0.0, sum(c for _, c in itl), 0, 0, tuple(itl), (), True)

    # Second 0: 99 fast tokens and one slow one (p99 stays fast); second 1: a stall over 5 of 100 tokens;
    # second 2: only a prefill (no ITL sample) and is left out.
    steps = [step(10.2, [(2.0, 99)]), step(10.9, [(9.0, 1)]), step(11.1, [(2.0, 95)]), step(11.5, [(9.0, 5)]),
             step(12.3, [])]
    p99s = _interval_p99s(steps, start_s=10.0)
    assert p99s == [2.0, 9.0]
    assert _over_slo_share(p99s, 5.0) == 0.5
    assert _over_slo_share(p99s, 10.0) == 0.0
    assert _over_slo_share([], 5.0) is None


def test_vllm_bench_sweeps_only_caps_the_token_budget_can_run():
    from bench.local_autoscaler_vllm import MAX_CAP, cap_grid, run_bench

    assert cap_grid(32) == (1, 2, 4, 8, 12, 16, 24, 32)
    assert cap_grid(20) == (1, 2, 4, 8, 12, 16, 20)  # the budget itself is the top cap
    assert cap_grid(1) == (1,)
    assert max(cap_grid(4096)) == MAX_CAP  # never above vLLM's default max_num_seqs
    with pytest.raises(ValueError, match="token_budget"):
        asyncio.run(run_bench(token_budget=0))  # refused before any engine starts


def test_cli_refuses_a_token_budget_below_one():
    from click.testing import CliRunner

    from services.cli import main

    res = CliRunner().invoke(main, ["bench", "local-autoscaler", "--backend", "vllm", "--token-budget", "0"])
    assert res.exit_code == 2 and "token-budget" in res.output


def test_observation_builder_gives_tokens_per_second_over_the_interval():
    assert observation(10.0, 42.0, 500, 2.0, True, 12) == Observation(10.0, 42.0, 250.0, True, running=12)
    assert observation(10.0, math.nan, 0, 0.0, False).throughput_tokens_per_s == 0.0  # empty interval: no division by 0
