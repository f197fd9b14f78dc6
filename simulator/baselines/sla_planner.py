"""NVIDIA Dynamo's SLA planner (baselines.md §5) as a pure decision over one :class:`RequestWindow`. Read
against ai-dynamo/dynamo:

- ``components/planner/src/dynamo/planner/utils/planner_core.py`` @ 07619258 (``Planner.observe_metrics``,
  ``make_adjustments``, ``_compute_replica_requirements``): every ``adjustment_interval`` the planner adds the
  interval's request count, mean ISL and OSL to three load predictors (a NaN is stored as 0), skips the
  adjustment when TTFT, ITL, ISL or OSL is NaN, forms the correction factors
  ``p_corr = TTFT_obs / TTFT_prof(ISL)`` and ``d_corr = ITL_obs / ITL_prof(conc, ISL + OSL/2)`` with
  ``conc = num_req / n_decode × request_duration / interval``, predicts the next interval's load, and sizes each
  pool: prefill ``ceil(num_req·ISL/interval·min(1, p_corr) / thpt_per_gpu(ISL) / prefill_gpus)``, decode
  ``ceil(num_req·OSL/interval / best thpt_per_gpu meeting ITL/d_corr at ISL + OSL/2 / decode_gpus)``
  (``d_corr <= 0``: the target is not corrected); both floored at ``min_endpoint``; over ``max_gpu_budget``
  both are scaled down (prefill ``max(min_endpoint, round(n_p·scale))``, decode the rest of the budget).
- ``.../planner/utils/perf_interpolation.py`` @ 52787de1: the profile (``PrefillInterpolator``: TTFT and
  throughput/GPU over ISL, clamped to the profiled range; ``DecodeInterpolator``: ITL and throughput/GPU over
  KV usage × context length, KV usage clamped to [0, 1]; ``find_best_throughput_per_gpu`` scans KV usage from
  the top for the first point meeting the ITL, else takes the lowest).
- ``.../planner/utils/load_predictor.py`` @ 62e1328d: ``constant`` (last value); ``arima``
  (``pmdarima.auto_arima(buffer, suppress_warnings=True, error_action="ignore")`` refitted on the last
  ``window_size`` points each interval, one-step forecast; the last value below 5 points).
  ``components/src/dynamo/planner/core/load/predictors.py`` @ 260b6ae9 adds guards kept here (a constant series
  forecasts itself; forecasts are floored at 0; a failed fit falls back to the last value) and the ``kalman``
  predictor (local linear trend, ``q_level`` 1.0, ``q_trend`` 0.1, ``r`` 10.0, ``P`` = 1000·I, the state started
  at the first point; until then the last value, i.e. 0: its ``kalman_min_points`` is not read by the code).
- ``.../planner/defaults.py`` @ 00c13f8d: the defaults below.
Readings of ours (fair-comparison.md §7): lengths from completed requests only; at the engines' batch or KV limit
(:func:`saturated`) the corrections may not shrink the fleet (``d_corr`` ≥ 1, ``min(1, p_corr)`` = 1): under
overload upstream's concurrency estimate includes queueing and loosens the ITL target; for our one engine type
(upstream's SLA mode is disaggregated only) the fleet is ``n_p + n_d``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simulator.baselines.snapshot import FleetSnapshot, RequestWindow

PREDICTORS = ("constant", "arima", "kalman")


@dataclass(frozen=True)
class SlaPlannerConfig:
    """Defaults from ``defaults.py`` @ 00c13f8d: ``adjustment_interval`` 180 s, ``ttft`` 0.5 s, ``itl`` 0.05 s,
    ``load_predictor`` "arima", ``load_prediction_window_size`` 50, ``min_endpoint`` 1, ``max_gpu_budget`` 8,
    ``prefill_engine_num_gpu`` / ``decode_engine_num_gpu`` 1; ``min_points`` 5 (``BasePredictor``
    ``minimum_data_points``); Kalman noise from ``SLAPlannerDefaults`` (newer defaults.py). ``clip_saturated``:
    our §7 fix (False: upstream's unguarded factors). ``no_correction``: upstream's ``--no-correction``."""

    adjustment_interval_s: float = 180.0
    ttft_ms: float = 500.0
    itl_ms: float = 50.0
    load_predictor: str = "arima"
    window_size: int = 50
    min_points: int = 5
    min_endpoint: int = 1
    max_gpu_budget: int = 8
    prefill_engine_num_gpu: int = 1
    decode_engine_num_gpu: int = 1
    kalman_q_level: float = 1.0
    kalman_q_trend: float = 0.1
    kalman_r: float = 10.0
    no_correction: bool = False
    clip_saturated: bool = True

    def validate(self) -> SlaPlannerConfig:
        if self.load_predictor not in PREDICTORS:
            raise ValueError(f"unknown load_predictor {self.load_predictor!r}; valid: {', '.join(PREDICTORS)}")
        if not (self.adjustment_interval_s > 0 and self.ttft_ms > 0 and self.itl_ms > 0):
            raise ValueError("sla-planner: need adjustment_interval_s, ttft_ms, itl_ms > 0")
        if self.window_size < 1 or self.min_points < 1 or self.min_endpoint < 0:
            raise ValueError("sla-planner: need window_size, min_points >= 1 and min_endpoint >= 0")
        if min(self.prefill_engine_num_gpu, self.decode_engine_num_gpu, self.max_gpu_budget) < 1:
            raise ValueError("sla-planner: engine GPUs and max_gpu_budget must be >= 1")
        return self


# ---------------------------------------------------------------------------------------------------------
# Load predictors
# ---------------------------------------------------------------------------------------------------------
class Predictor:
    """``BasePredictor``: a buffer of observations (non-finite stored as 0), the last value below
    ``min_points``."""

    def __init__(self, min_points: int = 1, window_size: int | None = None) -> None:
        self.min_points = min_points
        self.window_size = window_size
        self.buffer: list[float] = []

    def add(self, value: float) -> None:
        self.buffer.append(float(value) if math.isfinite(value) else 0.0)
        if self.window_size is not None and len(self.buffer) > self.window_size:
            del self.buffer[:-self.window_size]

    def last(self) -> float:
        return self.buffer[-1] if self.buffer else 0.0

    def predict(self) -> float:
        return self.last()


class ConstantPredictor(Predictor):
    """The next interval repeats the last one."""


class ArimaPredictor(Predictor):
    """pmdarima's ``auto_arima`` (the library upstream uses) refitted on the last ``window_size`` points."""

    def predict(self) -> float:
        if len(self.buffer) < self.min_points:
            return self.last()
        if len(set(self.buffer)) == 1:
            return self.buffer[0]
        import warnings

        import pmdarima  # a hard dependency: a missing library must not pass for a failed fit

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = pmdarima.auto_arima(self.buffer, suppress_warnings=True, error_action="ignore")
                forecast = float(np.asarray(model.predict(n_periods=1))[0])
        except Exception:  # upstream: any fit failure falls back to the last value
            return self.last()
        return max(0.0, forecast) if math.isfinite(forecast) else self.last()


class KalmanPredictor(Predictor):
    """Local linear trend ``x_t = x_{t-1} + v_{t-1} + w``, ``v_t = v_{t-1} + u``; one-step forecast of the
    level (filterpy's ``KalmanFilter`` equations, written out for a 2-state, 1-observation filter)."""

    def __init__(self, q_level: float = 1.0, q_trend: float = 0.1, r: float = 10.0) -> None:
        super().__init__(min_points=1)
        self.F = np.array([[1.0, 1.0], [0.0, 1.0]])
        self.H = np.array([[1.0, 0.0]])
        self.Q = np.diag([max(1e-12, q_level), max(1e-12, q_trend)])
        self.R = max(1e-9, r)
        self.x = np.zeros(2)
        self.P = np.eye(2) * 1000.0
        self.initialized = False
        self._predicted = False

    def _step(self) -> None:
        self.x = self.F @ self.x
        self.P = self.F @ self.P @ self.F.T + self.Q

    def add(self, value: float) -> None:
        super().add(value)
        z = self.buffer[-1]
        if not self.initialized:
            self.x = np.array([z, 0.0])
            self.initialized = True
        else:
            if not self._predicted:
                self._step()
            # H = [1, 0]: the innovation is z − level, its variance P[0, 0] + R.
            k = self.P[:, 0] / (self.P[0, 0] + self.R)
            self.x = self.x + k * (z - self.x[0])
            self.P = (np.eye(2) - np.outer(k, self.H[0])) @ self.P
        self._predicted = False

    def predict(self) -> float:
        if not self.initialized:
            return self.last()
        if not self._predicted:
            self._step()
            self._predicted = True
        return float(self.x[0])


def make_predictor(cfg: SlaPlannerConfig) -> Predictor:
    if cfg.load_predictor == "constant":
        return ConstantPredictor(min_points=1)
    if cfg.load_predictor == "arima":
        return ArimaPredictor(min_points=cfg.min_points, window_size=cfg.window_size)
    return KalmanPredictor(cfg.kalman_q_level, cfg.kalman_q_trend, cfg.kalman_r)


# ---------------------------------------------------------------------------------------------------------
# Profiles (pre-deployment profiling: built by the caller, from our performance model)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefillProfile:
    """TTFT (ms) and prefill throughput per GPU (tokens/s) at each profiled ISL (ascending)."""

    isl: np.ndarray
    ttft_ms: np.ndarray
    thpt_per_gpu: np.ndarray

    def _at(self, ys: np.ndarray, isl: float) -> float:
        # Clamped to the profiled range as upstream; linear where upstream fits a cubic.
        return float(np.interp(min(max(isl, self.isl[0]), self.isl[-1]), self.isl, ys))

    def interpolate_ttft(self, isl: float) -> float:
        return self._at(self.ttft_ms, isl)

    def interpolate_thpt_per_gpu(self, isl: float) -> float:
        return self._at(self.thpt_per_gpu, isl)


@dataclass(frozen=True)
class DecodeProfile:
    """ITL (ms) and decode throughput per GPU (tokens/s) over context length (rows, ascending) × concurrency
    (columns, ascending); NaN where the engine cannot hold that many requests (KV or batch limit)."""

    context: np.ndarray
    concurrency: np.ndarray
    itl_ms: np.ndarray
    thpt_per_gpu: np.ndarray

    def _row(self, ctx: float) -> int:
        # Nearest profiled context length, as DecodeInterpolator.compute_idx.
        return int(np.abs(self.context - ctx).argmin())

    def interpolate_itl(self, concurrency: float, ctx: float) -> float:
        """ITL at ``concurrency`` requests of ``ctx`` tokens; beyond what the engine holds, at its limit
        (upstream clamps KV usage to 1)."""
        row = self.itl_ms[self._row(ctx)]
        ok = np.isfinite(row)
        return float(np.interp(concurrency, self.concurrency[ok], row[ok]))

    def find_best_throughput_per_gpu(self, itl_ms: float, ctx: float) -> float:
        """The highest-concurrency profiled point meeting ``itl_ms`` (scanned from the top, the ITL need not be
        monotone); none: the lowest concurrency's throughput."""
        i = self._row(ctx)
        itl, thpt = self.itl_ms[i], self.thpt_per_gpu[i]
        for j in range(len(itl) - 1, -1, -1):
            if np.isfinite(itl[j]) and itl[j] <= itl_ms:
                return float(thpt[j])
        return float(thpt[0])


# ---------------------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SlaPlannerState:
    num_req: Predictor
    isl: Predictor
    osl: Predictor
    p_corr: float = 1.0
    d_corr: float = 1.0


def initial_state(cfg: SlaPlannerConfig) -> SlaPlannerState:
    return SlaPlannerState(make_predictor(cfg), make_predictor(cfg), make_predictor(cfg))


def saturated(snap: FleetSnapshot) -> bool:
    """Some serving engine is at its batch limit, or has a waiting request its free KV blocks cannot admit, or
    requests wait in the gateway queue for room: the engines' observed latencies are then not a sample of the
    profile's operating range."""
    if snap.gateway_queued > 0:
        return True
    for i in snap.serving():
        if i.num_running >= i.max_num_seqs:
            return True
        if i.num_waiting > 0 and i.free_blocks < i.head_waiting_blocks:
            return True
    return False


def replicas(cfg: SlaPlannerConfig, next_num_req: float, next_isl: float, next_osl: float, p_corr: float,
             d_corr: float, prefill: PrefillProfile, decode: DecodeProfile) -> tuple[int, int, str]:
    """``_compute_replica_requirements``: (prefill engines, decode engines, explanation)."""
    interval = cfg.adjustment_interval_s
    p_thpt = next_num_req * next_isl / interval * min(1.0, p_corr)
    n_p = math.ceil(p_thpt / prefill.interpolate_thpt_per_gpu(next_isl) / cfg.prefill_engine_num_gpu)
    itl = cfg.itl_ms / d_corr if d_corr > 0 else cfg.itl_ms
    d_per_gpu = decode.find_best_throughput_per_gpu(itl, next_isl + next_osl / 2)
    d_thpt = next_num_req * next_osl / interval
    n_d = math.ceil(d_thpt / d_per_gpu / cfg.decode_engine_num_gpu)
    n_p, n_d = max(n_p, cfg.min_endpoint), max(n_d, cfg.min_endpoint)
    why = f"prefill {p_thpt:.0f} tok/s → {n_p}, decode {d_thpt:.0f} tok/s at {d_per_gpu:.0f}/GPU → {n_d}"
    total = n_p * cfg.prefill_engine_num_gpu + n_d * cfg.decode_engine_num_gpu
    if total > cfg.max_gpu_budget:
        scale = cfg.max_gpu_budget / total
        n_p = max(cfg.min_endpoint, round(n_p * scale))
        n_d = max(cfg.min_endpoint, round((cfg.max_gpu_budget - n_p * cfg.prefill_engine_num_gpu)
                                          / cfg.decode_engine_num_gpu))
        why += f"; {total} GPUs over the budget {cfg.max_gpu_budget}: {n_p} + {n_d}"
    return n_p, n_d, why


def decide(cfg: SlaPlannerConfig, state: SlaPlannerState, window: RequestWindow, n_now: int,
           prefill: PrefillProfile, decode: DecodeProfile, is_saturated: bool = False,
           ) -> tuple[SlaPlannerState, int | None, str]:
    """One adjustment at the end of ``window``: (state, desired engines or None to leave the fleet, reason).

    ``n_now``: engines serving (upstream's ``len(d_endpoints)``); ``is_saturated``: :func:`saturated` of the
    fleet now."""
    state.num_req.add(float(window.arrivals))
    state.isl.add(window.isl)
    state.osl.add(window.osl)
    metrics = (window.ttft_ms, window.itl_ms, window.isl, window.osl)
    if not all(math.isfinite(m) for m in metrics):
        return state, None, "SLA planner: no completed requests in the interval, adjustment skipped"
    interval = cfg.adjustment_interval_s
    if not cfg.no_correction and n_now > 0:
        duration = window.duration_s if math.isfinite(window.duration_s) else 0.0
        conc = window.arrivals / n_now * duration / interval
        state.p_corr = window.ttft_ms / prefill.interpolate_ttft(window.isl)
        state.d_corr = window.itl_ms / decode.interpolate_itl(conc, window.isl + window.osl / 2)
    p_corr, d_corr, clipped = state.p_corr, state.d_corr, ""
    if cfg.clip_saturated and is_saturated and (p_corr < 1.0 or d_corr < 1.0):
        p_corr, d_corr = max(1.0, p_corr), max(1.0, d_corr)
        clipped = " clipped at the engines' limit"
    num_req, isl, osl = state.num_req.predict(), state.isl.predict(), state.osl.predict()
    n_p, n_d, why = replicas(cfg, num_req, isl, osl, p_corr, d_corr, prefill, decode)
    return state, n_p + n_d, (f"SLA planner ({cfg.load_predictor}): next {num_req:.0f} req, ISL {isl:.0f}, "
                              f"OSL {osl:.0f}; p_corr {state.p_corr:.2f}, d_corr {state.d_corr:.2f}{clipped}; {why}")


def prefill_profile(ttft_ms_at, isl_grid: np.ndarray, gpus_per_engine: int) -> PrefillProfile:
    """The prefill profile from ``ttft_ms_at(isl)`` (one request alone on an engine) at ``isl_grid``."""
    isl = np.asarray(sorted(set(int(x) for x in isl_grid)), dtype=float)
    ttft = np.array([ttft_ms_at(int(x)) for x in isl])
    return PrefillProfile(isl, ttft, isl / (ttft / 1e3) / gpus_per_engine)


def decode_profile(itl_ms_at, context_grid: np.ndarray, max_batch: int, kv_tokens: int,
                   gpus_per_engine: int) -> DecodeProfile:
    """The decode profile from ``itl_ms_at(batch, ctx)`` (``batch`` requests decoding at ``ctx`` tokens each),
    every batch size from 1 to what the engine holds (``max_batch``, ``kv_tokens``)."""
    ctx = np.asarray(sorted(set(int(x) for x in context_grid)), dtype=float)
    conc = np.arange(1, max_batch + 1, dtype=float)
    itl = np.full((len(ctx), len(conc)), np.nan)
    for i, c in enumerate(ctx):
        for j, b in enumerate(conc):
            if j > 0 and b * c > kv_tokens:
                break
            itl[i, j] = itl_ms_at(int(b), c)
    return DecodeProfile(ctx, conc, itl, conc / (itl / 1e3) / gpus_per_engine)
