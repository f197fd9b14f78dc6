"""The SLO-met rule of the DESIGN.md §4 reports (``chiron simulate``'s and ``chiron replay``'s).

A request meets its SLO when it completed, its TTFT is within the TTFT SLO and its mean ITL (over its output
tokens after the first; 0 for a request of one token) within the ITL SLO. Batch requests are judged on TTFT only
(their ITL SLO is the relaxed target of the BATCH instances' local autoscaler, not an SLO of the request).
"""

from __future__ import annotations

import math

import numpy as np


def slo_met(done: np.ndarray | bool, ttft: np.ndarray | float, ttft_slo: float,
            mean_itl_ms: np.ndarray | float = 0.0, itl_slo_ms: float = math.inf) -> np.ndarray | bool:
    """Whether each request met its SLO (element-wise over arrays, or one request's bool). ``ttft`` and
    ``ttft_slo`` in the same unit; a NaN TTFT or ITL never meets it."""
    met = done & (ttft <= ttft_slo) & (mean_itl_ms <= itl_slo_ms)
    return met if isinstance(met, np.ndarray) else bool(met)
