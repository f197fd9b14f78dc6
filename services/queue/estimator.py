"""Waiting-time estimator of the global batch queue (pure: no I/O, no clock; time comes in as arguments).

For a request with ``k`` requests ahead of it (every request of the groups served before its own, earliest
deadline first, plus the earlier requests of its own group, FIFO) it answers how long until it *starts* being
served [s], as a mean and an upper quantile (default p95), given the model's serving capacity: output
throughput ``X`` [tokens/s] over ``B`` batch slots (a queued request starts the moment any slot frees).

Formula (Chiron, arXiv 2501.08090 §3.2, ``../shared/notes/paper.md``; ``../shared/DESIGN.md`` §2): the output
tokens ``S_n`` of the ``n`` requests ahead are ``≈ Normal(n·μ, n·σ²)`` (CLT over the output lengths) and
``W ≈ S_n / X``. With ``B`` slots the work identity of a busy server gives ``X·W_k = S_k − R_k`` exactly, ``R_k``
being the work left in the other ``B − 1`` running requests (``O(B·μ)``, far from normal near ``k = B``), so
the estimator works in slot tokens (``W·X/B``) and splits by position:

* ``k < B + small_n_threshold``: a Monte-Carlo table built once per distribution update: ``M`` queues of lengths
  drawn from the reservoir (rescaled to the Welford mean) through ``B`` slots (list scheduling), giving per
  position the mean, variance, third central moment and quantile of the start time (``M·B·(B + threshold)``
  numpy operations, ``M`` bounded by ``table_work_budget``).
* beyond it, cumulants grow linearly from the table's edge ``e``: ``mean_k = m_e + (k−e)·μ/B``,
  ``var_k = v_e + (k−e)·σ²/B²``, ``κ3_k = κ3_e + (k−e)·κ3(L)/B³``; the quantile is Cornish–Fisher,
  ``mean_k + (z + (z²−1)·γ_k/6)·sqrt(var_k)`` with ``γ_k = κ3_k / var_k^1.5``, plus the edge's residual decayed
  as ``sqrt(v_e / var_k)`` so the two regimes join. O(1) per position.
* the learned mean's own uncertainty is added in quadrature (not while the prior is in use):
  ``q ← mean + sqrt((q − mean)² + z²·mean²·σ²/(μ²·count))``.

Why a table, and its threshold: ``docs/decisions/0041-estimator-small-n-table.md``. :class:`OutputLengthModel`
(per model): Welford mean, variance and third moment of every observed length plus a seeded reservoir sample
(Vitter's Algorithm R); before ``min_observations`` lengths, the configured prior ``(mean, std)`` as a lognormal.
:meth:`WaitingTimeEstimator.refresh` costs ``O(G log G)`` for ``G`` groups whatever their sizes (per-group counts,
:class:`GroupSnapshot`); :meth:`WaitingTimeEstimator.prepare` rebuilds a table off the stats path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtri

__all__ = [
    "LengthPrior",
    "OutputLengthModel",
    "ServingCapacity",
    "WaitEstimate",
    "GroupSnapshot",
    "GroupEstimate",
    "WaitTable",
    "build_wait_table",
    "table_slots",
    "WaitingTimeEstimator",
]


# ----------------------------------------------------------------------------------------------
# Output-length distribution
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LengthPrior:
    """Prior output-length distribution of a model, used before enough lengths are observed.

    ``mean_tokens`` > 0 and ``std_tokens`` ≥ 0 are output tokens per request. Raises ValueError otherwise.
    """

    mean_tokens: float = 256.0
    std_tokens: float = 192.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean_tokens) and self.mean_tokens > 0):
            raise ValueError(f"prior mean_tokens must be a finite number > 0, got {self.mean_tokens}")
        if not (math.isfinite(self.std_tokens) and self.std_tokens >= 0):
            raise ValueError(f"prior std_tokens must be a finite number >= 0, got {self.std_tokens}")

    def grid(self, size: int = 1024) -> np.ndarray:
        """A deterministic sample of the prior: ``size`` mid-quantiles of a lognormal with this mean/std (tokens)."""
        if self.std_tokens == 0:
            return np.full(size, float(self.mean_tokens))
        s2 = math.log1p((self.std_tokens / self.mean_tokens) ** 2)
        mu = math.log(self.mean_tokens) - s2 / 2
        z = ndtri((np.arange(size) + 0.5) / size)
        return np.exp(mu + math.sqrt(s2) * z)


class OutputLengthModel:
    """Online output-length distribution of one model (tokens per request).

    * Welford's algorithm (Chan et al.'s pairwise merge for batches) for count, mean, variance and third
      central moment of every observed length;
    * a reservoir sample of at most ``reservoir_size`` observed lengths (Algorithm R, seeded RNG) as the
      empirical distribution;
    * ``prior`` stands in for both until ``min_observations`` lengths have been seen.

    Raises ValueError for a length that is negative or not finite, or bad constructor arguments.
    """

    def __init__(self, prior: LengthPrior | None = None, reservoir_size: int = 4096, min_observations: int = 20,
                 seed: int = 0) -> None:
        if reservoir_size < 1:
            raise ValueError(f"reservoir_size must be >= 1, got {reservoir_size}")
        if min_observations < 1:
            raise ValueError(f"min_observations must be >= 1, got {min_observations}")
        self.prior = prior or LengthPrior()
        self.reservoir_size = int(reservoir_size)
        self.min_observations = int(min_observations)
        self._rng = np.random.default_rng(seed)
        self._reservoir = np.empty(self.reservoir_size, dtype=float)
        self.count = 0  # observations seen (all of them, not only the reservoir's)
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations
        self._m3 = 0.0  # sum of cubed deviations
        self.version = 0  # bumped on every update; tables remember the version they were built at

    # -- updates -----------------------------------------------------------------------------------
    def observe(self, output_tokens: float) -> None:
        """Record one completed request's output length (tokens, ≥ 0). Raises ValueError for a bad length.

        Scalar arithmetic (the queue calls this once per acked request): the same update as :meth:`observe_many`
        with one item — Welford/Terriberry moments and one Algorithm-R draw."""
        x = float(output_tokens)
        if not (math.isfinite(x) and x >= 0):
            raise ValueError("output lengths must be finite and >= 0 tokens")
        na = self.count
        n = na + 1
        delta = x - self._mean
        delta_n = delta / n
        term = delta * delta_n * na
        self._m3 += term * delta_n * (n - 2) - 3 * delta_n * self._m2
        self._m2 += term
        self._mean += delta_n
        if na < self.reservoir_size:
            self._reservoir[na] = x
        else:
            j = int(self._rng.integers(0, n))
            if j < self.reservoir_size:
                self._reservoir[j] = x
        self.count = n
        self.version += 1

    def observe_many(self, output_tokens: Iterable[float] | np.ndarray) -> None:
        """Record a batch of output lengths (tokens, ≥ 0); same result as observing them one by one
        (up to floating-point rounding of the moments)."""
        x = np.asarray(output_tokens, dtype=float).ravel()
        if x.size == 0:
            return
        if not np.all(np.isfinite(x)) or np.any(x < 0):
            raise ValueError("output lengths must be finite and >= 0 tokens")
        # Chan et al. merge of (count, mean, M2, M3) with the batch's own moments.
        nb = x.size
        mb = float(x.mean())
        d = x - mb
        m2b = float(np.dot(d, d))
        m3b = float(np.dot(d * d, d))
        na = self.count
        n = na + nb
        delta = mb - self._mean
        self._m3 = (self._m3 + m3b + delta**3 * na * nb * (na - nb) / n**2
                    + 3 * delta * (na * m2b - nb * self._m2) / n)
        self._m2 = self._m2 + m2b + delta**2 * na * nb / n
        self._mean = self._mean + delta * nb / n
        # Algorithm R: item i (0-based overall index) replaces slot j ~ U{0..i} when j < size.
        fill = max(0, min(nb, self.reservoir_size - na))
        self._reservoir[na:na + fill] = x[:fill]
        if fill < nb:
            idx = np.arange(na + fill, n)
            j = self._rng.integers(0, idx + 1)
            keep = j < self.reservoir_size
            self._reservoir[j[keep]] = x[fill:][keep]  # repeated slots: the later item wins, as sequentially
        self.count = n
        self.version += 1

    # -- moments -----------------------------------------------------------------------------------
    @property
    def uses_prior(self) -> bool:
        """True while fewer than ``min_observations`` lengths have been observed."""
        return self.count < self.min_observations

    @property
    def mean(self) -> float:
        """Output tokens per request used by the estimator: the prior's mean or the observed mean."""
        return self.prior.mean_tokens if self.uses_prior else self._mean

    @property
    def variance(self) -> float:
        """Variance (tokens²) used by the estimator: the prior's std² or the observed variance."""
        return self.prior.std_tokens**2 if self.uses_prior else self._m2 / self.count

    @property
    def std(self) -> float:
        """Standard deviation (tokens) used by the estimator."""
        return math.sqrt(self.variance)

    @property
    def third_central_moment(self) -> float:
        """E[(L − μ)³] (tokens³) used by the estimator (of the prior's lognormal grid while it is in use)."""
        if self.uses_prior:
            g = self.prior.grid()
            return float(np.mean((g - g.mean()) ** 3))
        return self._m3 / self.count

    def sample(self) -> np.ndarray:
        """The empirical distribution (a copy of the reservoir, tokens) or the prior's grid while it is in use."""
        if self.uses_prior:
            return self.prior.grid()
        return self._reservoir[:min(self.count, self.reservoir_size)].copy()


# ----------------------------------------------------------------------------------------------
# Capacity, groups, estimates
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServingCapacity:
    """Batch-serving capacity of one model.

    ``throughput_tokens_per_s``: aggregate continuous-batching output-token throughput of the instances
    serving the model's batch work (tokens/s, > 0). ``slots``: their total concurrency (batch slots, ≥ 1);
    each slot decodes one request at ``throughput_tokens_per_s / slots`` tokens/s. ``in_service``: False
    when all slots are free at the refresh (e.g. instances just started), True when every slot is busy with
    a running request whose remaining work is unknown (modelled as the stationary residual of a length).

    Raises ValueError for throughput ≤ 0 or not finite, or slots < 1.
    """

    throughput_tokens_per_s: float
    slots: int = 1
    in_service: bool = False

    def __post_init__(self) -> None:
        try:
            x = float(self.throughput_tokens_per_s)
        except (TypeError, ValueError):
            x = math.nan
        if not (math.isfinite(x) and x > 0):
            raise ValueError(f"throughput_tokens_per_s must be a finite number > 0, got {self.throughput_tokens_per_s!r}")
        if int(self.slots) != self.slots or self.slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {self.slots!r}")

    @property
    def slot_rate_tokens_per_s(self) -> float:
        """Decode rate of one slot (tokens/s)."""
        return self.throughput_tokens_per_s / self.slots


@dataclass(frozen=True)
class WaitEstimate:
    """Waiting time until service starts, in seconds: ``mean_s`` and ``quantile_s`` (the estimator's quantile
    level, default 0.95). Scalars for a scalar position, arrays of the positions' shape otherwise."""

    mean_s: float | np.ndarray
    quantile_s: float | np.ndarray


@dataclass(frozen=True)
class GroupSnapshot:
    """What the queue knows of one request group at a refresh (no per-request data).

    ``num_requests``: queued requests in the group (≥ 0). ``deadline_s``: the time by which the group's
    requests must start (TTFT SLO deadline, seconds on the same clock as ``now`` in :meth:`refresh`; e.g. the
    earliest request deadline in the group); groups are served earliest-deadline-first, FIFO inside.
    """

    group_id: str
    model: str
    deadline_s: float
    num_requests: int


@dataclass(frozen=True)
class GroupEstimate:
    """Estimated start times of a group's first and last queued request (seconds from ``now``).

    ``first_position`` / ``last_position``: requests ahead of the group's first / last request (the model's
    earlier EDF groups included). ``slack_s`` = ``deadline_s − now − last_wait_quantile_s`` (negative ⇒
    projected SLO violation). Waits are ``inf`` when the model has no serving capacity. An empty group has
    ``last_position = first_position − 1`` and its waits equal the first request's.
    """

    group_id: str
    model: str
    num_requests: int
    first_position: int
    last_position: int
    first_wait_mean_s: float
    first_wait_quantile_s: float
    last_wait_mean_s: float
    last_wait_quantile_s: float
    slack_s: float
    projected_violation: bool


# ----------------------------------------------------------------------------------------------
# Monte-Carlo small-n table
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WaitTable:
    """Start-time statistics per position, in slot tokens (multiply by 1/slot rate for seconds).

    Arrays have shape ``(B + small_n_threshold,)``, index = requests ahead. ``step_*`` are the per-request
    cumulant increments used beyond the table (``μ/B``, ``σ²/B²``, ``κ3/B³``).
    """

    slots: int
    in_service: bool
    quantile: float
    mean: np.ndarray
    var: np.ndarray
    m3: np.ndarray
    q: np.ndarray
    step_mean: float
    step_var: float
    step_m3: float
    edge_residual: float  # empirical minus Cornish–Fisher quantile at the last table position
    built_at_count: int
    built_at_version: int
    draws: int


def _cornish_fisher(mean: np.ndarray, var: np.ndarray, m3: np.ndarray, z: float) -> np.ndarray:
    sd = np.sqrt(np.maximum(var, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma = np.where(sd > 0, m3 / np.maximum(sd, 1e-300) ** 3, 0.0)
    gamma = np.clip(gamma, -2.0, 2.0)  # CF is only meant for mild skew; beyond the table skew is small anyway
    return mean + (z + (z * z - 1.0) * gamma / 6.0) * sd


def build_wait_table(lengths: np.ndarray, slots: int, quantile: float = 0.95, small_n_threshold: int = 256,
                     draws: int = 2000, in_service: bool = False, seed: int = 0, table_work_budget: float = 4e7,
                     moments: tuple[float, float, float] | None = None, built_at: tuple[int, int] = (0, 0)) -> WaitTable:
    """Simulate ``draws`` queues of ``slots + small_n_threshold`` requests with lengths drawn from ``lengths``
    (tokens, 1-D, non-empty) through ``slots`` continuous-batching slots, FIFO, and tabulate start times.

    ``moments`` = (μ, σ², κ3) of the length distribution for the beyond-table increments (default: of
    ``lengths``). ``draws`` is lowered (not below 256) when ``draws·slots·positions`` would exceed
    ``table_work_budget``. Raises ValueError for an empty/invalid ``lengths``, slots < 1, or a quantile
    outside (0, 1).
    """
    lengths = np.asarray(lengths, dtype=float).ravel()
    if lengths.size == 0 or not np.all(np.isfinite(lengths)) or np.any(lengths < 0):
        raise ValueError("lengths must be a non-empty array of finite token counts >= 0")
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if small_n_threshold < 1:
        raise ValueError(f"small_n_threshold must be >= 1, got {small_n_threshold}")
    if moments is not None and moments[0] > 0 and lengths.mean() > 0:
        # The reservoir holds a sample; the Welford mean saw every observation: rescale so both agree.
        lengths = lengths * (moments[0] / lengths.mean())
    positions = slots + small_n_threshold
    m = int(max(256, min(draws, table_work_budget // (slots * positions))))
    rng = np.random.default_rng(seed)
    draw_len = lengths[rng.integers(0, lengths.size, size=(m, positions))]
    if in_service:
        # Stationary residual of a running request: a length picked proportionally to its size, times U(0,1).
        w = lengths / lengths.sum() if lengths.sum() > 0 else None
        big = lengths[rng.choice(lengths.size, size=(m, slots), p=w)]
        free = big * rng.random((m, slots))
    else:
        free = np.zeros((m, slots))
    start = np.empty((m, positions))
    rows = np.arange(m)
    if slots == 1:
        start[:, 0] = free[:, 0]
        np.cumsum(draw_len[:, :-1], axis=1, out=start[:, 1:])
        start[:, 1:] += free[:, :1]
    else:
        for k in range(positions):
            j = np.argmin(free, axis=1)
            s = free[rows, j]
            start[:, k] = s
            free[rows, j] = s + draw_len[:, k]
    # Control variate: B·W_k = S_k (+ initial residuals) − R_k with E[S_k] = k·μ known exactly, so remove the
    # draws' sampling error of S_k from the mean and quantile (for one slot this makes the mean exact).
    work_ahead = np.zeros(positions)
    work_ahead[1:] = np.cumsum(draw_len[:, :-1], axis=1).mean(axis=0)
    shift = (work_ahead - np.arange(positions) * lengths.mean()) / slots
    if not in_service:
        shift[:slots] = 0.0  # the identity needs every slot busy since t = 0: true from position B on
    mean = start.mean(axis=0)
    dev = start - mean
    var = np.mean(dev * dev, axis=0)
    m3 = np.mean(dev * dev * dev, axis=0)
    mean = np.maximum.accumulate(np.maximum(mean - shift, 0.0))  # start times never decrease along a path
    q = np.quantile(start, quantile, axis=0) - shift
    q = np.maximum.accumulate(np.maximum(q, mean))
    if moments is None:
        mu = float(lengths.mean())
        moments = (mu, float(lengths.var()), float(np.mean((lengths - mu) ** 3)))
    mu, s2, k3 = moments
    z = float(ndtri(quantile))
    edge = float(q[-1] - _cornish_fisher(mean[-1:], var[-1:], m3[-1:], z)[0])
    return WaitTable(slots=slots, in_service=in_service, quantile=quantile, mean=mean, var=var, m3=m3, q=q,
                     step_mean=mu / slots, step_var=s2 / slots**2, step_m3=k3 / slots**3, edge_residual=edge,
                     built_at_count=built_at[0], built_at_version=built_at[1], draws=m)


def _table_lookup(table: WaitTable, k: np.ndarray, rel_mean_var: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and quantile start time (slot tokens) at positions ``k`` (int array ≥ 0), O(1) each.

    ``rel_mean_var``: variance of the learned mean relative to μ² (σ²/(μ²·count); 0 for a known distribution).
    """
    size = table.mean.size
    inside = k < size
    ki = np.minimum(k, size - 1)
    mean = table.mean[ki].astype(float)
    q = table.q[ki].astype(float)
    if not np.all(inside):
        extra = np.where(inside, 0, k - (size - 1)).astype(float)
        e_mean = table.mean[-1] + extra * table.step_mean
        e_var = table.var[-1] + extra * table.step_var
        e_m3 = table.m3[-1] + extra * table.step_m3
        z = float(ndtri(table.quantile))
        decay = np.sqrt(table.var[-1] / np.maximum(e_var, 1e-300)) if table.var[-1] > 0 else 0.0
        e_q = _cornish_fisher(e_mean, e_var, e_m3, z) + table.edge_residual * decay
        e_q = np.maximum(np.maximum(e_q, e_mean), table.q[-1])
        mean = np.where(inside, mean, e_mean)
        q = np.where(inside, q, e_q)
    if rel_mean_var > 0:
        # Uncertainty of the learned mean: the mean wait scales with μ, so an estimate μ̂ off by δ/μ shifts
        # it by mean·δ/μ, with Var(δ/μ) = σ²/(μ²·count). Independent of the queue's own randomness: add in
        # quadrature. Matters only when k is comparable to the number of lengths observed (√(k/count)).
        z = float(ndtri(table.quantile))
        q = mean + np.sqrt((q - mean) ** 2 + z * z * rel_mean_var * mean * mean)
    return mean, q


MAX_TABLE_SLOTS = 256


def table_slots(slots: int) -> int:
    """Slots of the Monte-Carlo table used for ``slots`` batch slots: exact up to 16, then the nearest point
    of a grid in steps of 2^(1/8) (≤ 4.5 % apart), at most :data:`MAX_TABLE_SLOTS`.

    The slots in service change with every lease, and a table costs tens of milliseconds to build for a
    hundred slots and seconds for thousands (a fleet of BATCH instances); on the grid a few tables serve every
    refresh. A position ``k`` with ``B`` slots is looked up as ``k·B'/B`` in the table for ``B'`` slots: the
    same work per slot, so the CLT regime (where the wait is ``(k − B)·μ/B`` slot tokens plus the residual)
    is unchanged and only the small-queue zone ``B ≤ k < B + small_n_threshold`` is approximated, a zone that
    shrinks relative to ``B`` as ``B`` grows.
    """
    if slots <= 16:
        return slots
    return min(MAX_TABLE_SLOTS, int(round(2 ** (round(math.log2(slots) * 8) / 8))))


# ----------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------
@dataclass
class WaitingTimeEstimator:
    """Per-model output-length models and waiting-time estimates for positions and request groups.

    ``priors``: per-model prior (config); ``default_prior`` for models not listed. ``quantile``: level of
    the upper estimate (0.95 = p95). ``small_n_threshold``: requests beyond the slots covered by the
    Monte-Carlo table (see the module docstring). ``draws``: Monte-Carlo queues per table. A table is rebuilt
    lazily when its model has seen at least ``min(max(rebuild_min_new, rebuild_fraction·count),
    rebuild_max_new)`` new lengths since it was built (or has left its prior). The tables are drawn from the
    reservoir sample (uniform over all lengths seen), of which ``n`` new lengths replace about
    ``reservoir_size·ln(1 + n/count)`` entries: ``rebuild_fraction`` 0.1 rebuilds once about a tenth of the
    sample is new. ``rebuild_max_new`` (65,536) only bounds the wait on a very long history; at 4,096 a
    1,000,000-request backlog rebuilt each table every 4,096 acks, each time for under 1% new sample (a few
    percent of ``chiron simulate --workload batch-backlog``'s time).
    """

    priors: Mapping[str, LengthPrior] = field(default_factory=dict)
    default_prior: LengthPrior = field(default_factory=LengthPrior)
    quantile: float = 0.95
    small_n_threshold: int = 256
    draws: int = 2000
    reservoir_size: int = 4096
    min_observations: int = 20
    rebuild_min_new: int = 64
    rebuild_fraction: float = 0.1
    rebuild_max_new: int = 65_536
    seed: int = 0
    table_work_budget: float = 4e7

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")
        if self.small_n_threshold < 1:
            raise ValueError(f"small_n_threshold must be >= 1, got {self.small_n_threshold}")
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")
        self._models: dict[str, OutputLengthModel] = {}
        self._tables: dict[tuple[str, int, bool], WaitTable] = {}
        self.table_builds = 0  # how many Monte-Carlo tables were built (for tests and metrics)

    # -- distribution --------------------------------------------------------------------------
    def model(self, name: str) -> OutputLengthModel:
        """The output-length model of ``name`` (created from its prior on first use)."""
        m = self._models.get(name)
        if m is None:
            m = OutputLengthModel(self.priors.get(name, self.default_prior), self.reservoir_size,
                                  self.min_observations, seed=self.seed + len(self._models))
            self._models[name] = m
        return m

    def observe(self, model: str, output_tokens: float | Sequence[float] | np.ndarray) -> None:
        """Record completed requests' output lengths (tokens ≥ 0) of ``model``. Raises ValueError for bad lengths."""
        if isinstance(output_tokens, int | float):
            self.model(model).observe(output_tokens)
        else:
            self.model(model).observe_many(np.atleast_1d(np.asarray(output_tokens, dtype=float)))

    def _table(self, model: str, capacity: ServingCapacity) -> WaitTable:
        m = self.model(model)
        key = (model, table_slots(int(capacity.slots)), bool(capacity.in_service))
        t = self._tables.get(key)
        if t is not None and t.built_at_version == m.version:
            return t
        if t is not None:
            new = m.count - t.built_at_count
            need = min(max(self.rebuild_min_new, self.rebuild_fraction * t.built_at_count), self.rebuild_max_new)
            left_prior = t.built_at_count < m.min_observations <= m.count
            if new < need and not left_prior:
                return t
        t = build_wait_table(m.sample(), key[1], self.quantile, self.small_n_threshold, self.draws, key[2],
                             seed=self.seed, table_work_budget=self.table_work_budget,
                             moments=(m.mean, m.variance, m.third_central_moment), built_at=(m.count, m.version))
        self._tables[key] = t
        self.table_builds += 1
        return t

    def prepare(self, model: str, capacity: ServingCapacity) -> WaitTable:
        """Build (or reuse) the Monte-Carlo table of ``model`` at ``capacity``'s slots now, so that a later
        :meth:`estimate` / :meth:`refresh` does not pay for it. Returns the table (slot-token units)."""
        return self._table(model, capacity)

    # -- estimates -----------------------------------------------------------------------------
    def estimate(self, model: str, requests_ahead: int | Sequence[int] | np.ndarray, capacity: ServingCapacity) -> WaitEstimate:
        """Waiting time (seconds) until a request with ``requests_ahead`` requests before it starts.

        ``requests_ahead``: an int or an int array (any shape) of positions ≥ 0 (requests, not tokens).
        Returns scalars for an int, arrays of the same shape otherwise; mean ≤ quantile, both non-decreasing in
        the position. Cost: O(1) per position after the (cached) table. Raises ValueError for a negative
        position or a capacity with throughput ≤ 0 (raised when the ServingCapacity is made).
        """
        if not isinstance(capacity, ServingCapacity):
            raise TypeError(f"capacity must be a ServingCapacity, got {type(capacity).__name__}")
        scalar = np.isscalar(requests_ahead)
        k = np.asarray(requests_ahead)
        if k.size and (not np.issubdtype(k.dtype, np.integer) or np.any(k < 0)):
            raise ValueError("requests_ahead must be integers >= 0")
        k = k.astype(np.int64)
        slots = int(capacity.slots)
        tslots = table_slots(slots)
        if tslots != slots:  # a table for nearby slots, positions scaled alike (exact in the CLT regime)
            k = np.rint(k * (tslots / slots)).astype(np.int64)
        m = self.model(model)
        rel_mean_var = 0.0 if m.uses_prior or m.mean <= 0 else m.variance / (m.mean**2 * m.count)
        mean, q = _table_lookup(self._table(model, capacity), k.ravel(), rel_mean_var)
        rate = capacity.slot_rate_tokens_per_s
        mean, q = (mean / rate).reshape(k.shape), (q / rate).reshape(k.shape)
        if scalar:
            return WaitEstimate(float(mean), float(q))
        return WaitEstimate(mean, q)

    def refresh(self, groups: Sequence[GroupSnapshot], capacity: Mapping[str, ServingCapacity],
                now: float) -> list[GroupEstimate]:
        """Estimate every group's first and last start time; O(G log G) for G groups, independent of queue size.

        ``groups``: snapshots of the queued groups (any order, several models). ``capacity``: per model; a
        model without an entry has no serving instances, so its waits are ``inf``. ``now``: current time
        (seconds, the deadlines' clock). Returns one :class:`GroupEstimate` per group, per model in EDF order
        (deadline, then group id). Raises ValueError for a negative ``num_requests`` or non-finite ``now``.
        """
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now}")
        by_model: dict[str, list[GroupSnapshot]] = {}
        for g in groups:
            if g.num_requests < 0:
                raise ValueError(f"group {g.group_id}: num_requests must be >= 0, got {g.num_requests}")
            by_model.setdefault(g.model, []).append(g)
        out: list[GroupEstimate] = []
        for model, gs in by_model.items():
            gs.sort(key=lambda g: (g.deadline_s, g.group_id))
            counts = np.array([g.num_requests for g in gs], dtype=np.int64)
            first = np.concatenate(([0], np.cumsum(counts)[:-1]))
            last = np.maximum(first + counts - 1, first)
            cap = capacity.get(model)
            if cap is None:
                fm = fq = lm = lq = np.full(len(gs), math.inf)
            else:
                est = self.estimate(model, np.concatenate((first, last)), cap)
                fm, lm = np.split(np.asarray(est.mean_s), 2)
                fq, lq = np.split(np.asarray(est.quantile_s), 2)
            for i, g in enumerate(gs):
                slack = g.deadline_s - now - float(lq[i])
                out.append(GroupEstimate(g.group_id, model, g.num_requests, int(first[i]), int(first[i] + counts[i] - 1),
                                         float(fm[i]), float(fq[i]), float(lm[i]), float(lq[i]), slack, slack < 0))
        return out
