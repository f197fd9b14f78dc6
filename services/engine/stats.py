"""Sliding windows over per-token latencies and token counts (engine statistics, local-autoscaler input).

Pure: every call takes ``now`` in seconds of the caller's clock.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """Quantile ``q`` in [0, 1] of ``values`` where each value counts ``weights`` times (NaN when empty)."""
    keep = weights > 0
    values, weights = values[keep], weights[keep]
    if values.size == 0:
        return math.nan
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    idx = int(np.searchsorted(cum, q * cum[-1], side="left"))
    return float(v[min(idx, v.size - 1)])


def weighted_statistic(values: np.ndarray, weights: np.ndarray, q: float | None) -> float:
    """The count-weighted mean of ``values`` when ``q`` is None, else :func:`weighted_quantile` ``q`` (NaN when
    empty). The local autoscaler's observed ITL: per-token ITLs weighted by the tokens each iteration produced."""
    if q is not None:
        return weighted_quantile(values, weights, q)
    keep = weights > 0
    return float(np.average(values[keep], weights=weights[keep])) if keep.any() else math.nan


class LatencyWindow:
    """Samples ``(time_s, latency_ms, count)`` kept for ``horizon_s`` seconds.

    ``count`` lets one engine iteration record the ITL of all the tokens it produced at once.
    """

    def __init__(self, horizon_s: float = 10.0) -> None:
        self.horizon_s = horizon_s
        self._samples: deque[tuple[float, float, int]] = deque()

    def add(self, now: float, latency_ms: float, count: int = 1) -> None:
        if count > 0:
            self._samples.append((now, latency_ms, count))
        self._trim(now)

    def _trim(self, now: float) -> None:
        cutoff = now - self.horizon_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()

    def quantile(self, q: float, now: float, since_s: float | None = None) -> float:
        """Quantile of the samples newer than ``since_s`` (default: the whole horizon). NaN if none."""
        return self.statistic(q, now, since_s)

    def statistic(self, q: float | None, now: float, since_s: float | None = None) -> float:
        """:func:`weighted_statistic` of the samples newer than ``since_s`` (default: the whole horizon): their
        count-weighted mean when ``q`` is None, else their quantile ``q``. NaN if none."""
        self._trim(now)
        start = now - self.horizon_s if since_s is None else since_s
        sel = [(lat, c) for t, lat, c in self._samples if t >= start]
        if not sel:
            return math.nan
        arr = np.array(sel, dtype=float)
        return weighted_statistic(arr[:, 0], arr[:, 1], q)

    def count(self, now: float, since_s: float | None = None) -> int:
        self._trim(now)
        start = now - self.horizon_s if since_s is None else since_s
        return sum(c for t, _, c in self._samples if t >= start)


class RateWindow:
    """Event counts over a sliding window; ``rate`` is events per second over the last ``window_s``."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._first_s: float | None = None

    def add(self, now: float, count: int) -> None:
        if self._first_s is None:
            self._first_s = now
        if count:
            self._events.append((now, count))
        cutoff = now - self.window_s
        while self._events and self._events[0][0] < cutoff:
            self._events.popleft()

    def rate(self, now: float, window_s: float | None = None) -> float:
        w = self.window_s if window_s is None else min(window_s, self.window_s)
        if self._first_s is None:
            return 0.0
        span = min(w, max(now - self._first_s, 1e-9))
        # Half-open window (now - w, now]: a closed one counts one sample interval too many.
        return sum(c for t, c in self._events if t > now - w) / span
