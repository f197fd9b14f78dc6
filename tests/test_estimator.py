"""Unit tests of the queue's waiting-time estimator (``services/queue/estimator.py``) and its benchmark."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import ndtri

from services.queue import estimator as est_mod
from services.queue.estimator import (
    GroupSnapshot,
    LengthPrior,
    OutputLengthModel,
    ServingCapacity,
    WaitingTimeEstimator,
)


# ----------------------------------------------------------------------------------------------
# Output-length model
# ----------------------------------------------------------------------------------------------
def test_online_moments_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.lognormal(5.0, 0.9, size=10_000)
    m = OutputLengthModel(reservoir_size=512, min_observations=1)
    # mix single observations and batches of random size
    i = 0
    while i < x.size:
        step = int(rng.integers(1, 700)) if i % 2 else 1
        if step == 1:
            m.observe(x[i])
        else:
            m.observe_many(x[i:i + step])
        i += step
    assert m.count == x.size
    assert m.mean == pytest.approx(x.mean(), rel=1e-10)
    assert m.variance == pytest.approx(x.var(), rel=1e-9)
    assert m.third_central_moment == pytest.approx(np.mean((x - x.mean()) ** 3), rel=1e-7)
    sample = m.sample()
    assert sample.size == 512  # bounded reservoir
    assert np.all(np.isin(sample, x))  # holds observed lengths only


def test_reservoir_is_a_uniform_sample():
    # stream 0..N-1; a uniform reservoir has mean ≈ N/2 (a "keep the first" or "keep the last" bug fails this)
    n, size = 200_000, 4096
    m = OutputLengthModel(reservoir_size=size, seed=3)
    m.observe_many(np.arange(n, dtype=float))
    s = m.sample()
    assert s.size == size and np.unique(s).size == size
    assert abs(s.mean() - n / 2) < 4 * (n / math.sqrt(12)) / math.sqrt(size)


def test_prior_used_before_observations():
    prior = LengthPrior(mean_tokens=300.0, std_tokens=150.0)
    est = WaitingTimeEstimator(priors={"m": prior}, min_observations=20)
    m = est.model("m")
    assert m.uses_prior and m.mean == 300.0 and m.std == 150.0
    cap = ServingCapacity(throughput_tokens_per_s=100.0, slots=1)
    e = est.estimate("m", 10, cap)
    assert e.mean_s == pytest.approx(10 * 300.0 / 100.0, rel=1e-9)  # 10 requests ahead of μ=300 at 100 tokens/s
    # an unlisted model uses the default prior
    assert est.model("other").mean == est.default_prior.mean_tokens
    # still the prior below min_observations, the observed distribution from then on
    est.observe("m", [50.0] * 19)
    assert est.model("m").mean == 300.0
    est.observe("m", [50.0])
    assert est.model("m").mean == 50.0
    assert est.estimate("m", 10, cap).mean_s == pytest.approx(10 * 50.0 / 100.0, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Small-n accuracy
# ----------------------------------------------------------------------------------------------
def test_small_n_quantile_matches_brute_force_for_skewed_lengths():
    rng = np.random.default_rng(7)
    sample = rng.lognormal(mean=5.0, sigma=1.0, size=2000)  # skewness ≈ 6
    est = WaitingTimeEstimator(draws=20_000, reservoir_size=4096, seed=11)
    est.observe("m", sample)
    x = 1000.0
    cap = ServingCapacity(throughput_tokens_per_s=x, slots=1)
    e = est.estimate("m", 3, cap)  # three requests ahead
    brute = sample[rng.integers(0, sample.size, size=(400_000, 3))].sum(axis=1) / x
    true_q, true_mean = np.quantile(brute, 0.95), brute.mean()
    assert e.mean_s == pytest.approx(true_mean, rel=0.02)
    assert e.quantile_s == pytest.approx(true_q, rel=0.04)
    # the plain normal approximation is far off here: the test would catch a fallback to it
    normal_q = (3 * sample.mean() + ndtri(0.95) * sample.std() * math.sqrt(3)) / x
    assert abs(normal_q - true_q) / true_q > 0.10


def test_multi_slot_start_times_match_simulation():
    # 4 slots: request k waits for a slot to free (list scheduling), not for the whole work ahead
    rng = np.random.default_rng(5)
    sample = rng.gamma(1.5, 200.0, size=3000)
    est = WaitingTimeEstimator(draws=8000, seed=2)
    est.observe("m", sample)
    cap = ServingCapacity(throughput_tokens_per_s=400.0, slots=4)  # 100 tokens/s per slot
    from bench.estimator import simulate_waits

    actual = simulate_waits(sample[rng.integers(0, sample.size, size=(8000, 40))], 4, 400.0)
    e = est.estimate("m", np.arange(40), cap)
    assert np.all(e.mean_s[:4] == 0) and np.all(actual[:, :4] == 0)
    assert np.allclose(e.mean_s[4:], actual.mean(axis=0)[4:], rtol=0.03)
    cover = (actual[:, 4:] <= e.quantile_s[None, 4:]).mean(axis=0)
    assert np.all((cover > 0.93) & (cover < 0.97))


def test_p95_at_least_mean_and_monotone_in_position():
    rng = np.random.default_rng(9)
    est = WaitingTimeEstimator(small_n_threshold=64)
    est.observe("m", rng.lognormal(5.5, 0.8, size=5000))
    for slots in (1, 8, 32):
        cap = ServingCapacity(throughput_tokens_per_s=50.0 * slots, slots=slots)
        k = np.arange(0, 5000)  # crosses the table edge at slots + 64
        e = est.estimate("m", k, cap)
        assert np.all(e.quantile_s >= e.mean_s)
        assert np.all(np.diff(e.mean_s) >= 0)
        assert np.all(np.diff(e.quantile_s) >= -1e-9)
        assert np.all(e.mean_s[slots:] > 0)
        # far from the edge the mean grows by μ/X per request
        mu = est.model("m").mean
        assert e.mean_s[-1] - e.mean_s[-1001] == pytest.approx(1000 * mu / cap.throughput_tokens_per_s, rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Groups and cost
# ----------------------------------------------------------------------------------------------
def test_refresh_positions_are_arithmetic_and_edf_ordered():
    est = WaitingTimeEstimator()
    est.observe("a", np.full(100, 100.0))
    groups = [GroupSnapshot("late", "a", 500.0, 30), GroupSnapshot("early", "a", 100.0, 10),
              GroupSnapshot("empty", "a", 200.0, 0), GroupSnapshot("other-model", "b", 50.0, 5)]
    out = {g.group_id: g for g in est.refresh(groups, {"a": ServingCapacity(100.0, 1)}, now=0.0)}
    assert (out["early"].first_position, out["early"].last_position) == (0, 9)
    assert (out["empty"].first_position, out["empty"].last_position) == (10, 9)
    assert (out["late"].first_position, out["late"].last_position) == (10, 39)
    # every length is 100 tokens at 100 tokens/s, one slot: request k starts at k seconds exactly
    assert out["late"].last_wait_mean_s == pytest.approx(39.0)
    assert out["late"].last_wait_quantile_s >= 39.0
    assert out["early"].slack_s == pytest.approx(100.0 - out["early"].last_wait_quantile_s)
    assert not out["early"].projected_violation
    # no capacity for model b: infinite wait, projected violation
    assert math.isinf(out["other-model"].last_wait_mean_s) and out["other-model"].projected_violation


def test_refresh_of_a_million_requests_is_not_o_requests(monkeypatch):
    est = WaitingTimeEstimator()
    est.observe("m", np.random.default_rng(0).gamma(2.0, 100.0, size=2000))
    cap = ServingCapacity(1000.0, 16)
    est.prepare("m", cap)
    calls: list[int] = []
    real = est_mod._table_lookup

    def spy(table, k, *args):
        calls.append(int(np.asarray(k).size))
        return real(table, k, *args)

    monkeypatch.setattr(est_mod, "_table_lookup", spy)
    groups = [GroupSnapshot(f"g{i:02d}", "m", float(i), 20_000) for i in range(50)]  # 1,000,000 requests
    out = est.refresh(groups, {"m": cap}, now=0.0)
    assert len(out) == 50 and out[-1].last_position == 999_999
    assert sum(calls) <= 2 * len(groups)  # two positions per group, none per request
    # the same holds for absurd queue sizes that could never be iterated
    calls.clear()
    huge = [GroupSnapshot(f"g{i:02d}", "m", float(i), 10**12) for i in range(50)]
    out = est.refresh(huge, {"m": cap}, now=0.0)
    assert out[-1].last_position == 50 * 10**12 - 1 and math.isfinite(out[-1].last_wait_quantile_s)
    assert sum(calls) <= 2 * len(huge)
    assert est.table_builds == 1  # the table was built once, not per refresh


def test_table_rebuilt_only_after_enough_new_observations():
    est = WaitingTimeEstimator(rebuild_min_new=64, rebuild_fraction=0.1)
    est.observe("m", np.full(1000, 200.0))
    cap = ServingCapacity(100.0, 2)
    est.prepare("m", cap)
    assert est.table_builds == 1
    est.observe("m", np.full(50, 200.0))  # 50 < max(64, 100)
    est.prepare("m", cap)
    assert est.table_builds == 1
    est.observe("m", np.full(60, 200.0))  # 110 new since the build
    est.prepare("m", cap)
    assert est.table_builds == 2


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("throughput", [0.0, -5.0, math.nan, math.inf])
def test_bad_throughput_raises(throughput):
    with pytest.raises(ValueError, match="throughput"):
        ServingCapacity(throughput_tokens_per_s=throughput, slots=4)


def test_other_bad_inputs_raise():
    est = WaitingTimeEstimator()
    with pytest.raises(ValueError):
        ServingCapacity(100.0, slots=0)
    with pytest.raises(ValueError):
        est.estimate("m", -1, ServingCapacity(100.0, 1))
    with pytest.raises(ValueError):
        est.observe("m", [10.0, -1.0])
    with pytest.raises(ValueError):
        LengthPrior(mean_tokens=0.0)
    with pytest.raises(ValueError):
        WaitingTimeEstimator(quantile=1.0)
    with pytest.raises(ValueError):
        est.refresh([GroupSnapshot("g", "m", 1.0, -3)], {"m": ServingCapacity(1.0, 1)}, now=0.0)


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------
def test_bench_short_run_shape(tmp_path):
    from bench import estimator as bench

    try:
        report = bench.run_bench(sizes=(20, 60), draws={20: 40, 60: 20}, slots=4, splits=2)
    except FileNotFoundError as e:
        pytest.skip(f"shared traces not available: {e}")
    rows = report["results"]
    assert len(rows) == 2 * 2 * 3  # traces × sizes × estimators
    for r in rows:
        assert {"trace", "queue_size", "estimator", "r2", "median_rel_error", "p95_coverage"} <= set(r)
        assert r["trace"] in ("sharegpt", "azure_conv") and r["queue_size"] in (20, 60)
        assert r["estimator"] in ("chiron", "clt_normal", "mean_only")
        assert 0.0 <= r["p95_coverage"] <= 1.0 and r["median_rel_error"] >= 0
    path = tmp_path / "sub" / "est.json"
    bench.write_json(report, str(path))
    import json

    assert json.loads(path.read_text())["results"][0].keys() == rows[0].keys()


def test_in_service_slots_start_busy_with_stationary_residual_work():
    rng = np.random.default_rng(4)
    sample = rng.gamma(2.0, 150.0, size=4000)
    est = WaitingTimeEstimator(draws=20_000)
    est.observe("m", sample)
    cap = ServingCapacity(throughput_tokens_per_s=100.0, slots=1, in_service=True)
    e = est.estimate("m", np.array([0, 5]), cap)
    residual = np.mean(sample**2) / (2 * sample.mean())  # mean residual of a running request (renewal theory)
    assert e.mean_s[0] == pytest.approx(residual / 100.0, rel=0.03)
    assert e.mean_s[1] == pytest.approx((residual + 5 * sample.mean()) / 100.0, rel=0.03)
