"""Unit tests of the sliding windows in services/engine/stats.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.engine.stats import LatencyWindow, RateWindow, weighted_quantile, weighted_statistic

# ---- weighted_quantile --------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0])
def test_weighted_quantile_matches_numpy_on_repeated_values(q):
    """Weights are repeat counts: the result equals numpy's quantile of the expanded sample.

    numpy's ``inverted_cdf`` is the definition without interpolation: the smallest value whose
    cumulative share reaches ``q`` (a latency that was actually observed).
    """
    rng = np.random.default_rng(1234)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        values = rng.integers(0, 6, n).astype(float)  # small range: many ties
        weights = rng.integers(1, 6, n)
        expected = np.quantile(np.repeat(values, weights), q, method="inverted_cdf")
        got = weighted_quantile(values, weights.astype(float), q)
        assert got == expected, (values, weights, q)


def test_weighted_quantile_known_values():
    v = np.array([30.0, 10.0, 20.0])
    w = np.array([1.0, 8.0, 1.0])  # 10 samples: eight 10s, one 20, one 30
    assert weighted_quantile(v, w, 0.5) == 10.0
    assert weighted_quantile(v, w, 0.8) == 10.0
    assert weighted_quantile(v, w, 0.85) == 20.0
    assert weighted_quantile(v, w, 0.9) == 20.0
    assert weighted_quantile(v, w, 0.95) == 30.0
    assert weighted_quantile(v, w, 1.0) == 30.0
    # Unweighted equivalent of the same sample.
    assert weighted_quantile(np.repeat(v, w.astype(int)), np.ones(10), 0.9) == 20.0


def test_weighted_quantile_does_not_mutate_inputs():
    v = np.array([3.0, 1.0, 2.0])
    w = np.array([1.0, 2.0, 3.0])
    weighted_quantile(v, w, 0.5)
    assert v.tolist() == [3.0, 1.0, 2.0] and w.tolist() == [1.0, 2.0, 3.0]


def test_weighted_quantile_empty_is_nan():
    assert math.isnan(weighted_quantile(np.array([]), np.array([]), 0.5))
    assert math.isnan(weighted_quantile(np.array([1.0, 2.0]), np.array([0.0, 0.0]), 0.5))


def test_weighted_quantile_ignores_zero_weight_values():
    assert weighted_quantile(np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, 1.0]), 0.0) == 2.0


# ---- LatencyWindow ----------------------------------------------------------------------------


def test_latency_window_trims_by_horizon():
    w = LatencyWindow(horizon_s=10.0)
    for k in range(30):
        t = k + 0.5
        w.add(t, latency_ms=t)  # the latency encodes the sample's time
    now = 29.5
    # Samples older than now - horizon (19.5) are gone: the smallest latency left is the oldest kept time.
    assert w.quantile(0.0, now) >= now - 10.0
    assert w.quantile(0.0, now) == pytest.approx(19.5)
    assert w.quantile(1.0, now) == pytest.approx(29.5)
    assert w.count(now) == 11
    # Later queries trim further even without new samples.
    assert w.count(35.0) == 5  # 25.5 .. 29.5
    assert w.quantile(0.0, 35.0) == pytest.approx(25.5)
    assert math.isnan(w.quantile(0.5, 100.0))
    assert w.count(100.0) == 0


def test_latency_window_since_and_counts():
    w = LatencyWindow(horizon_s=60.0)
    w.add(1.0, 10.0, count=9)  # one iteration produced 9 tokens with 10 ms ITL
    w.add(2.0, 100.0, count=1)
    w.add(3.0, 50.0, count=0)  # ignored: no tokens
    assert w.count(3.0) == 10
    assert w.quantile(0.5, 3.0) == 10.0
    assert w.quantile(0.9, 3.0) == 10.0
    assert w.quantile(0.95, 3.0) == 100.0
    # Only samples at or after since_s.
    assert w.quantile(0.5, 3.0, since_s=1.5) == 100.0
    assert w.count(3.0, since_s=1.5) == 1
    assert math.isnan(w.quantile(0.5, 3.0, since_s=2.5))


# ---- RateWindow -------------------------------------------------------------------------------


def test_the_mean_itl_weights_each_iteration_by_its_tokens():
    # 9 iterations of 20 ms for 40 decodes each, one of 60 ms (a prefill chunk) for 40: every request's mean ITL
    # over the interval is 24 ms, while the p99 token ITL is the chunk's 60 ms.
    w = LatencyWindow(10.0)
    for k in range(9):
        w.add(k * 0.02, 20.0, 40)
    w.add(0.2, 60.0, 40)
    assert w.statistic(None, 0.2) == pytest.approx(24.0)
    assert w.statistic(0.99, 0.2) == w.quantile(0.99, 0.2) == 60.0
    assert w.statistic(None, 0.2, since_s=0.2) == 60.0  # only the last iteration
    assert math.isnan(LatencyWindow(1.0).statistic(None, 5.0))
    assert weighted_statistic(np.array([10.0, 30.0]), np.array([3.0, 1.0]), None) == pytest.approx(15.0)
    assert math.isnan(weighted_statistic(np.array([10.0]), np.array([0.0]), None))


def test_rate_window_empty_is_zero():
    assert RateWindow(5.0).rate(100.0) == 0.0


def test_rate_window_startup_rate_uses_elapsed_time():
    r = RateWindow(window_s=10.0)
    r.add(0.0, 0)  # start of observation
    r.add(1.0, 10)
    r.add(2.0, 10)
    assert r.rate(2.0) == pytest.approx(10.0)  # 20 events over 2 s, not over the 10-s window
    assert r.rate(4.0) == pytest.approx(5.0)  # nothing new for 2 s


def test_rate_window_forgets_old_events():
    r = RateWindow(window_s=10.0)
    r.add(0.0, 0)
    for t in range(1, 6):
        r.add(float(t), 100)  # a burst of 500 events in the first 5 s
    for t in range(6, 40):
        r.add(float(t), 0)
    assert r.rate(39.0) == 0.0
    r.add(40.0, 50)
    assert r.rate(40.0) == pytest.approx(5.0)  # 50 events over the 10-s window


def test_rate_window_steady_rate_within_one_sample():
    r = RateWindow(window_s=10.0)
    for t in range(0, 101):
        r.add(float(t), 10)  # 10 events per second, reported once a second
    assert 10.0 <= r.rate(100.0) <= 11.0


def test_rate_window_steady_rate_exact():
    r = RateWindow(window_s=10.0)
    for t in range(0, 101):
        r.add(float(t), 10)
    assert r.rate(100.0) == pytest.approx(10.0)
    assert r.rate(100.0, window_s=5.0) == pytest.approx(10.0)
