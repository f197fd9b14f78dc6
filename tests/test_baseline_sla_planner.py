"""The SLA planner baseline (simulator/baselines/sla_planner.py) with hand-built windows and profiles."""

from __future__ import annotations

import math
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from simulator.baselines import sla_planner as slp
from simulator.baselines.snapshot import FleetSnapshot, InstanceSnapshot, RequestWindow, request_window

# A flat toy profile: TTFT 100 ms at every ISL (prefill 10 tokens/ms at ISL 1000); decode ITL 10 ms + 0.1 ms per
# request at every context, concurrency 1..100 (throughput b / ITL).
PREFILL = slp.PrefillProfile(np.array([100.0, 1000.0, 10000.0]), np.array([10.0, 100.0, 1000.0]),
                             np.array([10_000.0, 10_000.0, 10_000.0]))
_CONC = np.arange(1, 101, dtype=float)
_ITL = np.tile(10.0 + 0.1 * _CONC, (2, 1))
DECODE = slp.DecodeProfile(np.array([100.0, 5000.0]), _CONC, _ITL, _CONC / (_ITL / 1e3))

CFG = slp.SlaPlannerConfig(adjustment_interval_s=100.0, ttft_ms=500.0, itl_ms=20.05, load_predictor="constant",
                           max_gpu_budget=100)


def window(arrivals=1000, isl=1000.0, osl=100.0, duration_s=10.0, ttft_ms=100.0, itl_ms=15.0, completed=None):
    return RequestWindow(0.0, 100.0, arrivals, arrivals if completed is None else completed, isl, osl, duration_s,
                         ttft_ms, itl_ms)


# --- predictors -------------------------------------------------------------------------------------------
@pytest.fixture
def fake_pmdarima(monkeypatch):
    calls = []

    class Model:
        def __init__(self, y):
            self.y = list(y)

        def predict(self, n_periods):
            return np.array([self.y[-1] + (self.y[-1] - self.y[-2])])  # linear extrapolation

    def auto_arima(y, **kw):
        calls.append((list(y), kw))
        return Model(y)

    monkeypatch.setitem(sys.modules, "pmdarima", types.SimpleNamespace(auto_arima=auto_arima))
    return calls


def test_arima_returns_the_last_value_below_five_points_then_fits(fake_pmdarima):
    p = slp.make_predictor(slp.SlaPlannerConfig(load_predictor="arima"))
    for v in (10.0, 20.0, 30.0, 40.0):
        p.add(v)
        assert p.predict() == v
    assert fake_pmdarima == []
    p.add(50.0)
    assert p.predict() == 60.0
    assert fake_pmdarima[-1][0] == [10.0, 20.0, 30.0, 40.0, 50.0]
    assert fake_pmdarima[-1][1] == {"suppress_warnings": True, "error_action": "ignore"}


def test_arima_fits_on_the_last_window_only_and_stores_nan_as_zero(fake_pmdarima):
    p = slp.make_predictor(slp.SlaPlannerConfig(load_predictor="arima", window_size=6))
    for v in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, math.nan):
        p.add(v)
    p.predict()
    assert fake_pmdarima[-1][0] == [3.0, 4.0, 5.0, 6.0, 7.0, 0.0]


def test_arima_constant_series_and_failed_fit_fall_back(monkeypatch, fake_pmdarima):
    p = slp.make_predictor(slp.SlaPlannerConfig(load_predictor="arima"))
    for _ in range(6):
        p.add(7.0)
    assert p.predict() == 7.0 and fake_pmdarima == []

    def boom(y, **kw):
        raise ValueError("no fit")

    monkeypatch.setitem(sys.modules, "pmdarima", types.SimpleNamespace(auto_arima=boom))
    p.add(9.0)
    assert p.predict() == 9.0


def test_arima_forecast_is_floored_at_zero(fake_pmdarima):
    p = slp.make_predictor(slp.SlaPlannerConfig(load_predictor="arima"))
    for v in (50.0, 40.0, 30.0, 20.0, 5.0):
        p.add(v)
    assert p.predict() == 0.0


def test_arima_with_pmdarima_follows_a_trend():
    pytest.importorskip("pmdarima")
    p = slp.make_predictor(slp.SlaPlannerConfig(load_predictor="arima"))
    for v in range(100, 400, 20):
        p.add(float(v))
    assert 360.0 < p.predict() < 440.0


def test_constant_predictor_repeats_the_last_value():
    p = slp.make_predictor(slp.SlaPlannerConfig(load_predictor="constant"))
    assert p.predict() == 0.0
    p.add(3.0)
    p.add(8.0)
    assert p.predict() == 8.0


def test_kalman_starts_at_the_first_point_and_learns_a_trend():
    p = slp.make_predictor(slp.SlaPlannerConfig(load_predictor="kalman"))
    assert p.predict() == 0.0
    p.add(100.0)
    assert p.predict() == pytest.approx(100.0)
    assert p.predict() == pytest.approx(100.0)  # a repeated call does not advance the filter
    for v in range(110, 400, 10):
        p.add(float(v))
    assert p.predict() == pytest.approx(400.0, abs=5.0)


def test_unknown_predictor_is_rejected():
    with pytest.raises(ValueError, match="prophet"):
        slp.SlaPlannerConfig(load_predictor="prophet").validate()


# --- sizing -----------------------------------------------------------------------------------------------
def test_each_pool_is_rounded_up_with_its_floor():
    # prefill 1000 req × 1000 tok / 100 s = 10,000 tok/s → 1.0; decode 1000 × 150 / 100 = 1500 tok/s; at ITL
    # 20.05 ms the best point is b = 100 (ITL 20 ms, 5000 tok/s) → 0.3.
    n_p, n_d, _ = slp.replicas(CFG, 1000, 1000, 150, 1.0, 1.0, PREFILL, DECODE)
    assert (n_p, n_d) == (1, 1)
    n_p, n_d, _ = slp.replicas(CFG, 1100, 1000, 150, 1.0, 1.0, PREFILL, DECODE)
    assert (n_p, n_d) == (2, 1)  # 1.1 and 0.33: each rounded up, 3 engines where ceil(1.43) would give 2
    n_p, n_d, _ = slp.replicas(CFG, 0, 1000, 150, 1.0, 1.0, PREFILL, DECODE)
    assert (n_p, n_d) == (1, 1)
    cfg0 = slp.SlaPlannerConfig(**{**CFG.__dict__, "min_endpoint": 0})
    assert slp.replicas(cfg0, 0, 1000, 150, 1.0, 1.0, PREFILL, DECODE)[:2] == (0, 0)


def test_prefill_uses_min_one_p_corr_and_decode_tightens_itl_by_d_corr():
    base = slp.replicas(CFG, 5000, 1000, 100, 1.0, 1.0, PREFILL, DECODE)
    assert base[:2] == (5, 1)  # 50,000 tok/s prefill; 5000 tok/s decode at 5000/GPU
    assert slp.replicas(CFG, 5000, 1000, 100, 30.0, 1.0, PREFILL, DECODE)[0] == 5  # p_corr > 1 ignored
    assert slp.replicas(CFG, 5000, 1000, 100, 0.5, 1.0, PREFILL, DECODE)[0] == 3
    # d_corr 1.3: ITL target 15.4 ms → b = 53 (ITL 15.3 ms, 3464 tok/s) → 2 decode engines.
    assert slp.replicas(CFG, 5000, 1000, 100, 1.0, 1.3, PREFILL, DECODE)[1] == 2
    # No profiled point meets the target: the lowest concurrency's throughput (~99 tok/s).
    assert slp.replicas(CFG, 5000, 1000, 100, 1.0, 10.0, PREFILL, DECODE)[1] == math.ceil(5000 / (1 / 10.1e-3))


def test_budget_scales_both_pools_down_as_upstream():
    cfg = slp.SlaPlannerConfig(**{**CFG.__dict__, "max_gpu_budget": 8})
    n_p, n_d, why = slp.replicas(cfg, 6000, 1000, 500, 1.0, 1.0, PREFILL, DECODE)  # 6 + 6 = 12 GPUs
    assert (n_p, n_d) == (4, 4) and "budget" in why  # round(6 × 8/12) = 4, decode the rest
    cfg2 = slp.SlaPlannerConfig(**{**CFG.__dict__, "max_gpu_budget": 8, "prefill_engine_num_gpu": 2,
                                   "decode_engine_num_gpu": 2})
    n_p, n_d, _ = slp.replicas(cfg2, 6000, 1000, 500, 1.0, 1.0, PREFILL, DECODE)  # 3 + 3 engines = 12 GPUs
    assert (n_p, n_d) == (2, 2)
    n_p, n_d, _ = slp.replicas(cfg, 6000, 1000, 500, 1.0, 1.0, PREFILL, DECODE)
    assert n_p + n_d <= 8


# --- decide -----------------------------------------------------------------------------------------------
def test_decide_adds_points_and_skips_without_completed_requests():
    st = slp.initial_state(CFG)
    st, desired, reason = slp.decide(CFG, st, window(completed=0, isl=math.nan, osl=math.nan, itl_ms=math.nan),
                                     2, PREFILL, DECODE)
    assert desired is None and "skipped" in reason
    assert st.num_req.buffer == [1000.0] and st.isl.buffer == [0.0]  # upstream stores NaN as 0, then skips


def test_decide_reads_lengths_from_the_window_and_sums_the_pools():
    st = slp.initial_state(CFG)
    st, desired, _ = slp.decide(CFG, st, window(arrivals=5000, isl=1000.0, osl=100.0), 5, PREFILL, DECODE)
    # TTFT as profiled (p_corr 1); conc 5000/5 × 10/100 = 100, ITL 15 of 20 ms expected: d_corr 0.75.
    assert st.p_corr == pytest.approx(1.0) and st.d_corr == pytest.approx(0.75)
    assert desired == 5 + 1
    st2 = slp.initial_state(CFG)
    _, desired2, _ = slp.decide(CFG, st2, window(arrivals=5000, isl=2000.0, osl=100.0, ttft_ms=200.0), 5, PREFILL,
                                   DECODE)
    assert desired2 == 10 + 1


def test_correction_cannot_shrink_the_fleet_while_saturated():
    # Target ITL 15.05 ms. Observed ITL 15 ms where the profile expects 20 ms at conc 100: d_corr 0.75 loosens
    # the target to 20.07 ms (b = 100, 5000 tok/s, where 15.05 ms allows b = 50, 3333 tok/s); observed TTFT
    # below the profile (p_corr 0.5) halves prefill.
    cfg = slp.SlaPlannerConfig(**{**CFG.__dict__, "itl_ms": 15.05})
    w = window(arrivals=5000, isl=1000.0, osl=350.0, ttft_ms=50.0, itl_ms=15.0)
    free = slp.decide(cfg, slp.initial_state(cfg), w, 5, PREFILL, DECODE, is_saturated=False)[1]
    sat_state, sat, reason = slp.decide(cfg, slp.initial_state(cfg), w, 5, PREFILL, DECODE, is_saturated=True)
    assert "clipped" in reason
    assert sat_state.d_corr == pytest.approx(0.75)  # the observed factor is kept, only its use is clipped
    assert free == 3 + 4  # prefill 50,000 × 0.5 → 3; decode 17,500 tok/s at 5000 → 4
    assert sat == 5 + 6  # prefill 50,000 → 5; decode 17,500 at 3333 → 6
    unguarded = slp.SlaPlannerConfig(**{**cfg.__dict__, "clip_saturated": False})
    assert slp.decide(unguarded, slp.initial_state(unguarded), w, 5, PREFILL, DECODE, is_saturated=True)[1] == free
    # Factors above 1 (tightening) are used as observed under saturation.
    w2 = window(arrivals=5000, isl=1000.0, osl=350.0, ttft_ms=100.0, itl_ms=32.0)
    assert "clipped" not in slp.decide(cfg, slp.initial_state(cfg), w2, 5, PREFILL, DECODE, is_saturated=True)[2]


def test_expected_itl_is_read_at_the_engines_limit():
    # conc 5000/1 × 100/100 = 5000 requests: beyond the profile (100), ITL at the limit (20 ms), as upstream
    # clamps KV usage to 1; observed 20 ms → d_corr 1.
    st, _, _ = slp.decide(CFG, slp.initial_state(CFG), window(arrivals=5000, duration_s=100.0, itl_ms=20.0), 1,
                          PREFILL, DECODE)
    assert st.d_corr == pytest.approx(1.0)


def test_saturated_reads_batch_kv_and_gateway_limits():
    def snap(*insts, gw=0):
        return FleetSnapshot(0.0, tuple(insts), gateway_interactive=gw)

    ok = InstanceSnapshot("i-1", "serving", 1, num_running=100, num_waiting=0, max_num_seqs=256, free_blocks=500,
                          total_blocks=1000)
    assert not slp.saturated(snap(ok))
    assert slp.saturated(snap(ok, InstanceSnapshot("i-2", "serving", 2, num_running=256, max_num_seqs=256)))
    kv = InstanceSnapshot("i-3", "serving", 3, num_running=50, num_waiting=3, max_num_seqs=256, free_blocks=10,
                          total_blocks=1000, head_waiting_blocks=40.0)
    assert slp.saturated(snap(ok, kv))
    assert not slp.saturated(snap(ok, InstanceSnapshot("i-4", "loading", 4, num_running=256, max_num_seqs=256)))
    assert slp.saturated(snap(ok, gw=3))


def test_request_window_lengths_come_from_completed_requests_only():
    # Two requests arrive in [0, 100); only the first completes there. The second's prompt (9000) and its
    # true output length must not enter ISL/OSL (the old reading took both from arrivals).
    def rec(arrival, first, last, done, tokens):
        return SimpleNamespace(arrival=np.array(arrival), first=np.array(first), last=np.array(last),
                               done=np.array(done), tokens=np.array(tokens))

    fleet = SimpleNamespace(
        inter=rec([1.0, 2.0], [2.0, 50.0], [11.0, 60.0], [11.0, math.nan], [10, 11]),
        batch=rec([], [], [], [], []), _ip=np.array([1000, 9000]), _bp=np.array([], dtype=np.int64))
    w = request_window(fleet, 0.0, 100.0)
    assert (w.arrivals, w.completed) == (2, 1)
    assert (w.isl, w.osl) == (1000.0, 10.0)
    assert w.duration_s == pytest.approx(10.0)
    assert w.ttft_ms == pytest.approx((1000.0 + 48000.0) / 2)


def test_profiles_from_callables_stop_at_the_engine_limits():
    d = slp.decode_profile(lambda b, c: 10.0 + b * c / 1000.0, np.array([100, 1000]), max_batch=8, kv_tokens=4000,
                           gpus_per_engine=2)
    assert np.isfinite(d.itl_ms[0]).sum() == 8  # context 100: the batch limit
    assert np.isfinite(d.itl_ms[1]).sum() == 4  # context 1000: the KV limit
    assert d.thpt_per_gpu[0, 0] == pytest.approx(1 / 10.1e-3 / 2)
    p = slp.prefill_profile(lambda isl: isl / 10.0, np.array([100, 1000, 1000]), gpus_per_engine=1)
    assert list(p.isl) == [100.0, 1000.0]
    assert p.interpolate_thpt_per_gpu(500) == pytest.approx(10_000.0)
    assert p.interpolate_ttft(5000) == pytest.approx(100.0)  # clamped to the profiled range
