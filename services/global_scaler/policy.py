"""Chiron's global scaling policy: desired INTERACTIVE, MIXED and BATCH instances. Pure and clock-injected.

:func:`decide` maps observed instances, arrivals and queue groups plus a :class:`PolicyState` to a new state and
desired counts per role with reasons (run by ``chiron scaler`` and the simulator). Shape from the paper (arXiv
2501.08090; ``../shared/notes/paper.md`` §0b, §3.4), formulas Chiron's (``docs/decisions/0020``+).

**Interactive need** ``N = max(D / C, λ / μ̄, λ̄·P̄ / R_p)`` instances. ``D``: interactive requests running at
INTERACTIVE and MIXED instances (a queue counts until the instance has a measured admission rate). ``μ̄``: mean
admission rate of instances where a queue stood through an interval. ``λ̄·P̄ / R_p``: prefilling the mean arrivals of
the last ``arrival_cv_window_s`` (R_p: prompt tokens/s an instance prefills, P̄: mean prompt). ``C``: the mean of
what each instance holds, its max batch size or its running count when a queue last stood below that cap through an
interval and outlasted the TTFT SLO (kept ``concurrency_memory_s`` while the cap stays within 2×), at most
``ttft_burst_factor · R_p · T / P̄`` (T: TTFT SLO; ~2 T to prefill).

**Headroom Θ.** Arrivals over one model-load time ``L`` ~ Normal(λL, λL·CV²), so the ``theta_quantile`` fits with
``Θ = z_q · CV / sqrt(λL)`` in ``[theta_min, theta_max]``; headroom ``H = max(N·Θ, N̄·Θ(λ̄))``, N̄ and λ̄ the means of
the last ``arrival_cv_window_s`` (a lull between bursts keeps what the window saw). ``n_I = floor(N)`` or its minimum,
``n_M = ceil(max(N, n_I) + H) − n_I``: MIXED instances lend their idle capacity to batch work (λ = 10/s, CV = 1, L =
60 s, p99: Θ ≈ 0.1; N = 4.5 → 4 I + 1 M); if ``(N − n_I)·C`` requests exceed the largest MIXED cap, ``n_I = ceil(N)``.

**Batch backpressure.** ``B`` = BATCH instances + what MIXED ones lend (each its idle share, at most its batch
requests over a busy BATCH instance's). A group's wait scales as ``1 / B``: ``BBP = max_g(wait_p95 / time_left)
− 1``, the groups need ``B·(1 + BBP)·(1 + batch_margin)``; a group past its deadline counts ``max_ratio``, one
whose wait is under ``L`` at most 1. Empty queue: no BATCH instance; leased work only: hold. Scale-up is paced:
none while BATCH instances start or within ``batch_settle_s`` of serving, else ≤ max(2×, +4) per step (HPA's).

**Stability and limits.** Per-role min/max apply; a count below the current one (serving + starting) applies only
after :attr:`PolicyConfig.delay_s` (default 2 × ``L``; the window's largest count, for I + M its largest total); a
growing role first uses what the other interactive role's window holds. GPU budget: cut BATCH, MIXED, INTERACTIVE.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.stats import norm

from services.router.routing import INTERACTIVE_QUEUE, EngineStatsView, queue_binds

ROLES = ("interactive", "mixed", "batch")
# RoleDecision.code: what shaped a desired count, as a short stable label (the reason text carries the numbers).
REASON_CODES = ("demand", "headroom", "batch_in_service", "queue_empty", "no_batch_capacity", "batch_backpressure",
                "min_instances", "max_instances", "other_role_covers", "batch_starting", "batch_settling", "batch_paced",
                "scale_down_delay", "gpu_budget")


@dataclass(frozen=True)
class RoleLimits:
    min_instances: int = 0
    max_instances: int = 64


@dataclass(frozen=True)
class PolicyConfig:
    """Knobs of the global scaling policy (units in names). :meth:`validate` raises ValueError."""

    interval_s: float = 5.0
    model_load_time_s: float = 60.0  # time from "start an instance" to "it serves" (L)
    theta_quantile: float = 0.99
    theta_min: float = 0.1
    theta_max: float = 2.0
    default_instance_concurrency: float = 64.0  # C before any instance reports its max batch size [requests]
    mixed_lend_fraction: float = 1.0  # share of a MIXED instance's idle capacity lent to batch work
    batch_margin: float = 0.1
    max_ratio: float = 10.0  # wait/time-left ratio assumed for a group already past its deadline
    scale_down_delay_s: float | None = None  # None: 2 × model_load_time_s (see delay_s)
    arrival_cv_window_s: float = 300.0  # arrival rates the measured arrival CV is taken over [s]
    concurrency_memory_s: float = 300.0  # how long an instance's saturated running count stands for its capacity
    batch_settle_s: float = 60.0  # after a BATCH scale-up, time for its capacity to show in the queue's measurement
    interactive_ttft_slo_s: float = 10.0  # TTFT SLO of interactive requests [s] (the router's default class)
    # An instance's prefill rate [prompt tokens/s] (the TTFT bound on C, the prefill need): Llama-3-8B on an A100-80GB
    # with a 512-token chunk beside 16 decodes takes 47.8 ms per iteration in services/engine/perf_model.py (10,700
    # tokens/s), rounded down.
    prefill_tokens_per_s: float = 10_000.0
    ttft_burst_factor: float = 2.0  # C <= this × the requests an instance prefills in one TTFT SLO (tune split)
    prompt_window_s: float = 300.0  # time constant of the EWMA over the engines' mean prompts [s]
    gpus_per_instance: int = 1
    gpu_budget: int = 50  # the paper's experiments cap the fleet at 50 GPUs
    limits: Mapping[str, RoleLimits] = field(default_factory=lambda: {
        "interactive": RoleLimits(1, 64), "mixed": RoleLimits(0, 64), "batch": RoleLimits(0, 64)})

    def validate(self) -> PolicyConfig:
        for name in ("interval_s", "model_load_time_s", "default_instance_concurrency", "interactive_ttft_slo_s",
                     "prefill_tokens_per_s", "ttft_burst_factor", "prompt_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.scale_down_delay_s is not None and self.scale_down_delay_s < 0:
            raise ValueError(f"scale_down_delay_s must be >= 0 (got {self.scale_down_delay_s})")
        if not 0.5 < self.theta_quantile < 1:
            raise ValueError(f"theta_quantile must be in (0.5, 1) (got {self.theta_quantile})")
        if not 0 <= self.theta_min <= self.theta_max:
            raise ValueError(f"need 0 <= theta_min <= theta_max (got {self.theta_min}, {self.theta_max})")
        if not 0 <= self.mixed_lend_fraction <= 1:
            raise ValueError(f"mixed_lend_fraction must be in [0, 1] (got {self.mixed_lend_fraction})")
        if self.batch_margin < 0 or self.max_ratio < 1:
            raise ValueError("batch_margin must be >= 0 and max_ratio >= 1")
        if self.gpus_per_instance < 1 or self.gpu_budget < 1:
            raise ValueError("gpus_per_instance and gpu_budget must be >= 1")
        unknown = set(self.limits) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown role(s) in limits: {sorted(unknown)}; roles are {ROLES}")
        mins = 0
        for role in ROLES:
            lim = self.limits.get(role, RoleLimits())
            if not 0 <= lim.min_instances <= lim.max_instances:
                raise ValueError(f"{role}: need 0 <= min_instances <= max_instances "
                                 f"(got {lim.min_instances} > {lim.max_instances})" if lim.min_instances > lim.max_instances
                                 else f"{role}: min_instances must be >= 0")
            mins += lim.min_instances
        if mins * self.gpus_per_instance > self.gpu_budget:
            raise ValueError(f"the per-role minimums need {mins * self.gpus_per_instance} GPUs, over the budget "
                             f"of {self.gpu_budget}")
        return self

    @property
    def delay_s(self) -> float:
        """The scale-down delay [s]: ``scale_down_delay_s``, or twice ``model_load_time_s`` when that is None. An
        instance that goes and is needed again costs its load time on a GPU that serves nothing, plus its load time
        of demand it cannot serve; keeping it idle for as long (the break-even of the rent-or-buy problem) bounds
        either loss by the other. Measured against fixed windows: ``docs/decisions/0025``."""
        return 2.0 * self.model_load_time_s if self.scale_down_delay_s is None else self.scale_down_delay_s

    def limit(self, role: str) -> RoleLimits:
        return self.limits.get(role, RoleLimits())


@dataclass(frozen=True)
class InstanceView:
    """One engine instance as the scaler sees it (membership + its engine stats).

    ``max_batch_size``: its local autoscaler's current cap [requests]; ``num_running`` / ``num_waiting``:
    requests [requests]; ``interactive_running`` / ``interactive_waiting``: of those, interactive ones (MIXED
    instances run both; ``interactive_waiting`` None: take ``num_waiting``). ``admit_rate_per_s``: interactive
    requests it admitted per second over the last interval when a queue of them (≥ ``INTERACTIVE_QUEUE``)
    stood there at its start and end, i.e. its service rate; NaN otherwise.
    ``serving``: registered and healthy (False while starting or draining).
    """

    instance_id: str
    role: str
    max_batch_size: int = 0
    num_running: int = 0
    num_waiting: int = 0
    interactive_running: int = 0
    serving: bool = True
    interactive_waiting: int | None = None
    admit_rate_per_s: float = math.nan


@dataclass(frozen=True)
class ArrivalStats:
    """Interactive arrivals over the scaler's window: ``rate_per_s`` (λ, requests/s) and ``cv`` (coefficient
    of variation of inter-arrival times; 1 for Poisson). ``inflight``: interactive requests running or
    waiting now (the demand D, requests). ``prompt_tokens_mean``: P̄ [tokens], NaN when no instance saw one."""

    rate_per_s: float = 0.0
    cv: float = 1.0
    inflight: float = 0.0
    prompt_tokens_mean: float = math.nan  # mean interactive prompt over the instances that saw one [tokens]


@dataclass(frozen=True)
class GroupView:
    """One request group from the queue: ``wait_p95_s`` (estimated wait of its last request, s),
    ``deadline_s`` (its TTFT deadline, s on the scaler's clock), ``size`` (queued requests), ``leased``
    (requests of the group engines are serving now)."""

    group_id: str
    size: int
    wait_p95_s: float
    deadline_s: float
    leased: int = 0  # requests of the group being served now (leased to engines)


@dataclass(frozen=True)
class ScalerInputs:
    """``pending``: instances per role the provider is starting (placed, not serving yet)."""

    now: float
    instances: Sequence[InstanceView] = ()
    arrivals: ArrivalStats = ArrivalStats()
    groups: Sequence[GroupView] = ()
    pending: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RoleDecision:
    role: str
    current: int
    wanted: float  # before rounding, limits and delay [instances]
    desired: int
    reason: str
    code: str = ""  # one of REASON_CODES: the base rule, or the last limit or delay that changed the count


@dataclass(frozen=True)
class ScalerDecision:
    """Desired counts per role with their explanation; ``inputs`` echoes the derived quantities."""

    now: float
    roles: Mapping[str, RoleDecision]
    theta: float
    batch_backpressure: float
    inputs: Mapping[str, float]

    def desired(self, role: str) -> int:
        return self.roles[role].desired


@dataclass(frozen=True)
class PolicyState:
    """What :func:`decide` carries from one call to the next (it returns a new one, never changes this one).

    ``history``: per role, the (time [s], raw desired count) pairs of the last :attr:`PolicyConfig.delay_s` (the
    delay window). ``saturated``: per instance, (time, running requests, its max batch size then) when it last
    had requests waiting below its cap. ``last_batch_up_s``: time of the last BATCH scale-up.
    ``last_interactive_mixed``: INTERACTIVE + MIXED instances the previous decision wanted (before the delay).
    ``admit_rate``: per instance, (time, interactive admissions/s) when it last admitted with a queue standing.
    ``prompt_tokens``: (time, P̄ smoothed over ``prompt_window_s``) at the last decision that saw prompts.
    ``recent``: (time, interactive need N, arrival rate λ) of each decision of the last ``arrival_cv_window_s``.
    """

    history: Mapping[str, tuple[tuple[float, int], ...]] = field(default_factory=lambda: {r: () for r in ROLES})
    saturated: Mapping[str, tuple[float, int, int]] = field(default_factory=dict)
    last_batch_up_s: float = -math.inf
    last_interactive_mixed: int = 0
    admit_rate: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    prompt_tokens: tuple[float, float] = (-math.inf, math.nan)  # (time [s], smoothed P̄ [tokens])
    recent: tuple[tuple[float, float, float], ...] = ()  # (time [s], N [instances], λ [1/s]) of the CV window


@dataclass(frozen=True)
class EngineLoad:
    """One serving instance's engine stats as the scaler reads them (``Engine.GetStats``; the simulator reads
    its engines directly). Counts in requests; ``finished_requests_total`` is cumulative."""

    instance_id: str
    role: str
    max_batch_size: int = 0
    num_running: int = 0
    num_waiting: int = 0
    finished_requests_total: int = 0
    has_stats: bool = True  # False when the stats call failed: the instance is counted without load
    batch_requests: int = 0  # of running + waiting, batch requests leased from the queue (MIXED instances)
    batch_finished_total: int = 0
    prompt_tokens_mean: float = 0.0  # mean prompt of the interactive requests it accepted lately [tokens], 0: none


@dataclass(frozen=True)
class LoadSample:
    """An instance's previous sample (for the arrival-rate and admission-rate estimates): time [s], finished
    total, in-flight, and of those the running and waiting interactive requests."""

    time_s: float
    finished: int
    inflight: int
    running: int = 0
    waiting: int = 0


def engine_load(instance_id: str, role: str, stats: EngineStatsView | None) -> EngineLoad:
    """The scaler's view of a serving instance from its engine stats (an :class:`EngineStatsView` or
    ``chiron.v1.EngineStats``; None when they could not be read). Used by the scaler service and the simulator."""
    if stats is None:
        return EngineLoad(instance_id, role, has_stats=False)
    return EngineLoad(instance_id, role, stats.max_batch_size, stats.num_running, stats.num_waiting,
                      stats.finished_requests_total, batch_requests=stats.num_batch_requests,
                      batch_finished_total=stats.batch_finished_total,
                      prompt_tokens_mean=stats.interactive_prompt_tokens_mean)


def group_view(group_id: str, queued: int, wait_p95_s: float, deadline_s: float, leased: int) -> GroupView:
    """One request group as the policy reads it; a wait that is not finite (no capacity known) reads as inf."""
    return GroupView(group_id, queued, wait_p95_s if math.isfinite(wait_p95_s) else math.inf, deadline_s, leased)


def group_views(groups: Sequence, estimates: Sequence) -> list[GroupView]:
    """The policy's groups from the queue's group stats (``group_id``, ``queued``, ``deadline_s``, ``leased``) and
    waiting-time estimates (``group_id``, ``last_wait_quantile_s``; only groups with queued requests have one):
    groups with an estimate in its order, then groups with leased requests only (wait 0)."""
    by_id = {g.group_id: g for g in groups}
    out = [group_view(g.group_id, g.queued, e.last_wait_quantile_s, g.deadline_s, g.leased)
           for e in estimates for g in (by_id[e.group_id],)]
    seen = {e.group_id for e in estimates}
    return out + [GroupView(g.group_id, 0, 0.0, g.deadline_s, g.leased) for g in groups if g.group_id not in seen]


def measured_arrival_cv(rates: Sequence[tuple[float, float]], now: float, window_s: float,
                        min_intervals: int = 12) -> float:
    """The arrival CV Θ needs, from the arrival rates :func:`observe` measured: ``rates`` holds (time [s],
    interactive arrivals/s over the interval ending then), oldest first. The counts per interval over the last
    ``window_s`` give the index of dispersion ``I = Var / Mean``, and ``CV = sqrt(I)``: for a renewal process the
    count over a window much longer than the mean gap has variance ≈ mean × CV² (Cox & Lewis, *The Statistical
    Analysis of Series of Events*, 1966, §4.5), the Normal(λL, λL·CV²) of Θ's formula. Needs no arrival
    timestamps, so the scaler service and the simulator measure it alike. 1 (Poisson) with fewer than
    ``min_intervals`` intervals in the window or no arrivals. E.g. counts 40, 0, 80, 0: mean 30, variance 1,467,
    I ≈ 49, CV ≈ 7.0."""
    counts = [r * (t - t0) for (t0, _), (t, r) in itertools.pairwise(rates) if t > now - window_s]
    if len(counts) < min_intervals:
        return 1.0
    mean = float(np.mean(counts))
    return math.sqrt(float(np.var(counts, ddof=1)) / mean) if mean > 0 else 1.0


class ArrivalRates:
    """The interactive arrival rates :func:`observe` measured, kept for :func:`measured_arrival_cv` over
    ``window_s`` [s]; ``fixed_cv`` (not None) replaces the measurement. The scaler service and the simulator each
    hold one: ``observe(now, ..., rates.cv(now), ...)``, then ``rates.add(now, inputs.arrivals.rate_per_s)``."""

    def __init__(self, window_s: float, fixed_cv: float | None = None) -> None:
        self.window_s = window_s
        self.fixed_cv = fixed_cv
        self._rates: collections.deque[tuple[float, float]] = collections.deque()  # (time [s], arrivals/s)

    def cv(self, now: float) -> float:
        """The arrival CV for a decision at ``now``: ``fixed_cv``, or measured from the rates added so far."""
        return self.fixed_cv if self.fixed_cv is not None else measured_arrival_cv(self._rates, now, self.window_s)

    def add(self, now: float, rate_per_s: float) -> None:
        """Record the arrival rate of the interval ending at ``now``; forget what no later window reads (an entry
        is kept while it is in the window or is the start of the first interval in it)."""
        rates = self._rates
        rates.append((now, rate_per_s))
        while len(rates) > 1 and rates[1][0] <= now - self.window_s:
            rates.popleft()


def observe(now: float, loads: Sequence[EngineLoad], samples: dict[str, LoadSample], arrival_cv: float,
            groups: Sequence[GroupView] = ()) -> ScalerInputs:
    """Build the policy's inputs from engine stats (pure; updates ``samples`` in place).

    Interactive demand = running + waiting interactive requests at INTERACTIVE and MIXED instances (batch work
    on MIXED instances is not interactive demand); the arrival rate λ = finished interactive requests per
    second plus the growth of in-flight ones since each instance's previous sample (in steady state arrivals =
    completions). The arrival CV is given (``arrival_cv``; 1 = Poisson). An instance's admission rate
    (finished + growth of its running interactive requests, per second) is reported only when a queue of
    interactive requests stood there at both samples (then it admitted as fast as it could) and it admitted at
    least ``INTERACTIVE_QUEUE`` of them meanwhile: a count of one or two in an interval is noise, not a rate.
    """
    instances, inflight, rate, prompts = [], 0.0, 0.0, []
    for s in loads:
        if not s.has_stats:
            instances.append(InstanceView(s.instance_id, s.role))
            continue
        busy = max(0, s.num_running + s.num_waiting - s.batch_requests)
        finished = s.finished_requests_total - s.batch_finished_total
        running = min(s.num_running, busy) if s.role != "batch" else 0
        waiting = busy - running if s.role != "batch" else 0
        admit = math.nan
        if s.role in ("interactive", "mixed"):
            inflight += busy
            if s.prompt_tokens_mean > 0:
                prompts.append(s.prompt_tokens_mean)
            prev = samples.get(s.instance_id)
            if prev is not None and now > prev.time_s:
                done = max(0, finished - prev.finished)
                rate += max(0.0, (done + busy - prev.inflight) / (now - prev.time_s))
                admitted = done + running - prev.running
                if min(prev.waiting, waiting) >= INTERACTIVE_QUEUE and admitted >= INTERACTIVE_QUEUE:
                    admit = admitted / (now - prev.time_s)
            samples[s.instance_id] = LoadSample(now, finished, busy, running, waiting)
        instances.append(InstanceView(s.instance_id, s.role, s.max_batch_size, s.num_running, s.num_waiting,
                                      interactive_running=running, interactive_waiting=waiting,
                                      admit_rate_per_s=admit))
    p_mean = sum(prompts) / len(prompts) if prompts else math.nan
    return ScalerInputs(now, instances, ArrivalStats(rate, arrival_cv, inflight, p_mean), tuple(groups))


def overprovisioning_theta(cfg: PolicyConfig, arrivals: ArrivalStats) -> float:
    """Θ = z_q · CV / sqrt(λ·L), clamped to [theta_min, theta_max] (module docstring). No traffic → theta_max."""
    lam_l = arrivals.rate_per_s * cfg.model_load_time_s
    if lam_l <= 0:
        return cfg.theta_max
    z = float(norm.ppf(cfg.theta_quantile))
    return min(cfg.theta_max, max(cfg.theta_min, z * max(arrivals.cv, 0.0) / math.sqrt(lam_l)))


@dataclass(frozen=True)
class InstanceCapacity:
    """What the interactive instances hold (:func:`instance_capacity`): ``concurrency`` C [requests per
    instance], ``admit_rate`` μ̄ [requests/s per instance, NaN when none is measured], ``left_out`` interactive
    requests waiting where the rate term covers them (not counted in D), and the updated per-instance memories."""

    concurrency: float
    admit_rate: float
    left_out: float
    saturated: Mapping[str, tuple[float, int, int]]
    admit_rates: Mapping[str, tuple[float, float]]


@dataclass(frozen=True)
class BatchNeed:
    """The batch rule's result (:func:`batch_need`): ``wanted`` BATCH instances before rounding, its reason
    code and text, MIXED ``lend`` and total ``capacity`` [instances], the worst group's wait/time-left
    ``ratio``, batch backpressure, queued and leased request counts, and ``need``: the groups' need
    [instances] under batch backpressure, else NaN."""

    wanted: float
    code: str
    reason: str
    lend: float
    capacity: float
    ratio: float
    backpressure: float
    queued: int
    in_service: int
    need: float = math.nan


def smooth_prompt(cfg: PolicyConfig, last: tuple[float, float], now: float, seen: float) -> tuple[float, float]:
    """The (time, P̄) to carry: an EWMA of the engines' mean prompts with time constant ``prompt_window_s`` (one
    10-s engine window of a few requests is noisy, and the delay window keeps the largest count it causes)."""
    if not (seen > 0 and math.isfinite(seen)):
        return last
    t, p = last
    if not math.isfinite(p):
        return now, seen
    w = 1.0 - math.exp(-max(0.0, now - t) / cfg.prompt_window_s)
    return now, p + w * (seen - p)


def ttft_concurrency(cfg: PolicyConfig, arrivals: ArrivalStats) -> float:
    """The TTFT bound on C [requests per instance] (module docstring): ``ttft_burst_factor`` ×
    ``prefill_tokens_per_s`` × TTFT SLO / P̄; infinite while no prompt has been seen."""
    p = arrivals.prompt_tokens_mean
    if not (p > 0 and math.isfinite(p)):
        return math.inf
    return cfg.ttft_burst_factor * cfg.prefill_tokens_per_s * cfg.interactive_ttft_slo_s / p


def instance_capacity(cfg: PolicyConfig, state: PolicyState, inp: ScalerInputs) -> InstanceCapacity:
    """C and μ̄ over INTERACTIVE and MIXED instances (module docstring, "Instance concurrency"). Pure."""
    now = inp.now
    saturated, admit_rates = dict(state.saturated), dict(state.admit_rate)
    caps, live, left_out = [], set(), 0.0
    for i in inp.instances:
        if i.role not in ("interactive", "mixed"):
            continue
        queued = i.num_waiting if i.interactive_waiting is None else i.interactive_waiting
        if i.max_batch_size <= 0:
            left_out += queued
            continue
        live.add(i.instance_id)
        if math.isfinite(i.admit_rate_per_s):
            admit_rates[i.instance_id] = (now, i.admit_rate_per_s)
        seen_rate = admit_rates.get(i.instance_id)
        rate_known = seen_rate is not None and now - seen_rate[0] <= cfg.concurrency_memory_s
        # A queue admitted within the TTFT SLO at the measured rate waits for the token budget, not for room.
        drains = rate_known and queued <= seen_rate[1] * cfg.interactive_ttft_slo_s
        if rate_known:
            # With a rate measured, the queue is the rate term's business (λ / μ); with none yet, it counts in D.
            left_out += queued
        # A bound only when the queue stood through an interval (its admission rate is measured now): a queue behind
        # one long prefill is gone by the next sample, and the TTFT bound sizes for prefills.
        stood = math.isfinite(i.admit_rate_per_s)
        if queue_binds(i.num_running, i.num_waiting, i.max_batch_size) and not drains and stood:
            saturated[i.instance_id] = (now, i.num_running, i.max_batch_size)
        seen = saturated.get(i.instance_id)
        # A count seen under a cap less than half the current one says nothing of what the instance holds now.
        fresh = seen is not None and now - seen[0] <= cfg.concurrency_memory_s and i.max_batch_size <= 2 * seen[2]
        caps.append(min(i.max_batch_size, seen[1]) if fresh else i.max_batch_size)
    saturated = {k: v for k, v in saturated.items() if k in live}
    admit_rates = {k: v for k, v in admit_rates.items() if k in live}
    conc = min(sum(caps) / len(caps) if caps else cfg.default_instance_concurrency, ttft_concurrency(cfg, inp.arrivals))
    rates = [r for t, r in admit_rates.values() if now - t <= cfg.concurrency_memory_s and r > 0]
    mu = sum(rates) / len(rates) if rates else math.nan
    return InstanceCapacity(conc, mu, left_out, saturated, admit_rates)


def mixed_lend(cfg: PolicyConfig, instances: Sequence[InstanceView]) -> float:
    """BATCH instances' worth of capacity the MIXED instances lend (module docstring, "What a MIXED instance
    lends"): each its idle share, at most its batch requests over what a busy BATCH instance runs."""
    busy_batch = [i.num_running for i in instances if i.role == "batch" and i.num_running > 0]
    batch_conc = sum(busy_batch) / len(busy_batch) if busy_batch else None

    def lent(i: InstanceView) -> float:
        idle = max(0.0, 1 - i.interactive_running / max(i.max_batch_size, 1))
        return idle if batch_conc is None else min(idle, max(0, i.num_running - i.interactive_running) / batch_conc)
    return sum(cfg.mixed_lend_fraction * lent(i) for i in instances if i.role == "mixed")


def batch_need(cfg: PolicyConfig, inp: ScalerInputs, batch_instances: int) -> BatchNeed:
    """BATCH instances the request groups need (module docstring, "Batch capacity and batch backpressure")."""
    now = inp.now
    lend = mixed_lend(cfg, inp.instances)
    batch_now = batch_instances + lend
    ratio, worst = 0.0, ""
    for g in inp.groups:
        if g.size <= 0:
            continue
        left = g.deadline_s - now
        r = cfg.max_ratio if left <= 0 else min(cfg.max_ratio, g.wait_p95_s / left) if math.isfinite(g.wait_p95_s) else cfg.max_ratio
        if g.wait_p95_s <= cfg.model_load_time_s:
            r = min(r, 1.0)  # what serves it now serves its last request before a new instance could load
        if r > ratio:
            ratio, worst = r, g.group_id
    bbp = ratio - 1.0 if inp.groups and ratio > 0 else -1.0
    need = math.nan
    queued = sum(g.size for g in inp.groups)
    in_service = sum(g.leased for g in inp.groups)
    if queued == 0 and in_service > 0:
        # Draining a BATCH instance would send its work back to the queue only to start another for it.
        want, code = float(batch_instances), "batch_in_service"
        reason = f"{in_service} batch requests in service, none waiting: keep the batch capacity"
    elif queued == 0:
        want, code, reason = 0.0, "queue_empty", "queue empty: no batch capacity needed"
    elif batch_now <= 0:
        want, code, reason = 1.0, "no_batch_capacity", f"{queued} queued requests and no batch capacity: start one"
    else:
        code = "batch_backpressure"
        need = batch_now * ratio * (1 + cfg.batch_margin)
        want = max(need - lend, 0.0)
        reason = (f"batch backpressure {bbp:+.2f} (worst group {worst}: wait p95 / time left = {ratio:.2f}); "
                  f"capacity {batch_now:.2f} instances (MIXED lend {lend:.2f}) → need {need:.2f}")
    if queued and want == 0 and batch_instances == 0 and lend <= 0:
        want = 1.0
    return BatchNeed(want, code, reason, lend, batch_now, ratio, bbp, queued, in_service, need)


def clamp_to_limits(cfg: PolicyConfig, wanted: Mapping[str, float], codes: dict[str, str]) -> dict[str, int]:
    """Round each role's wanted count up and clamp it to the role's limits; ``codes`` gets the limit that bound."""
    raw = {}
    for role in ROLES:
        lim = cfg.limit(role)
        unclamped = math.ceil(wanted[role] - 1e-9)
        raw[role] = min(lim.max_instances, max(lim.min_instances, unclamped))
        if raw[role] != unclamped:
            codes[role] = "min_instances" if raw[role] > unclamped else "max_instances"
    return raw


def pace_batch(cfg: PolicyConfig, last_up_s: float, now: float, want: int, have: int,
               pending: int) -> tuple[int, float, str, str]:
    """Pace a BATCH scale-up (module docstring, "Pace of batch scale-up"): none while earlier BATCH instances
    start or within model load + ``batch_settle_s`` of the last scale-up, else at most max(2×, +4) per step.
    Returns (count, time of the last scale-up, reason suffix, code; both "" when not held)."""
    if want <= have:
        return want, last_up_s, "", ""
    note = code = ""
    settling = now - last_up_s < cfg.model_load_time_s + cfg.batch_settle_s
    cap = have if pending > 0 or settling else max(2 * have, have + 4)
    if want > cap:
        note = (f"; held at {cap}: {pending} BATCH instance(s) still starting" if pending
                else f"; held at {cap}: the last scale-up's capacity is still being measured"
                if settling else f"; paced to {cap} (at most max(2×, +4) per step)")
        code = "batch_starting" if pending else "batch_settling" if settling else "batch_paced"
        want = max(cap, cfg.limit("batch").min_instances)
    return want, now if want > have else last_up_s, note, code


def delay_window(cfg: PolicyConfig, history: Mapping[str, tuple[tuple[float, int], ...]], now: float,
                 raw: Mapping[str, int], have: Mapping[str, int]
                 ) -> tuple[dict[str, tuple[tuple[float, int], ...]], dict[str, int], set[str]]:
    """The scale-down delay: a role below ``have`` gets the largest raw count of the last ``cfg.delay_s``; with
    no history for a role, ``have`` is that largest count. Returns the new history, the desired counts, and the
    roles the window held."""
    new_history, desired, held_roles = {}, {}, set()
    for role in ROLES:
        # No history yet (a scaler just started, or a new leader took over): the fleet it found is the window's
        # first count, so it is not torn down before one window of observations.
        seen = history.get(role) or (((now, have[role]),) if cfg.delay_s > 0 else ())
        h = (*seen, (now, raw[role]))
        first = next(k for k, (t, _) in enumerate(h) if t >= now - cfg.delay_s)
        h = h[first:]
        new_history[role] = h
        d = raw[role]
        if d < have[role]:
            held = max(c for _, c in h)
            if held > d:
                held_roles.add(role)
                d = min(have[role], held)
        desired[role] = d
    return new_history, desired, held_roles


def role_cover(cfg: PolicyConfig, raw: Mapping[str, int], desired: Mapping[str, int], have: Mapping[str, int],
               current: Mapping[str, int], rising: bool) -> dict[str, int]:
    """Instances of INTERACTIVE (MIXED) that MIXED (INTERACTIVE) instances kept by the delay window cover
    (module docstring, "INTERACTIVE and MIXED cover each other"); while ``rising`` only serving ones count."""
    desired, covers = dict(desired), {}
    for short, other in (("interactive", "mixed"), ("mixed", "interactive")):
        spare = desired[other] - raw[other]
        if rising:
            spare = min(spare, current[other] - raw[other])
        covered = min(desired[short] - have[short], spare, desired[short] - cfg.limit(short).min_instances)
        if covered > 0:
            desired[short] -= covered
            covers[short] = covered
    return covers


def joint_hold_excess(history: Mapping[str, tuple[tuple[float, int], ...]], raw: Mapping[str, int],
                      desired: Mapping[str, int], have: Mapping[str, int]) -> dict[str, int]:
    """Instances to drop per interactive role where the delay window, holding each role's largest count on its
    own, holds more INTERACTIVE + MIXED than any one decision of the window wanted (``history`` as
    :func:`delay_window` returns it). The need moves between the roles as its fraction does (4.9 → 4 I + 2 M,
    5.1 → 5 I + 1 M: the roles' maxima hold 7 where either decision wanted 6). MIXED first, never below ``raw``;
    none while either role grows (:func:`role_cover` settles that, and a starting instance is never cancelled)."""
    if any(desired[r] > have[r] for r in ("interactive", "mixed")):
        return {}
    # Both roles' windows are appended and trimmed together: pair them from the newest (the fleet found at
    # first is one such pair).
    pairs = zip(reversed(history.get("interactive", ())), reversed(history.get("mixed", ())), strict=False)
    totals = [ci + cm for (ti, ci), (tm, cm) in pairs if ti == tm]
    bound = max(max(totals, default=0), raw["interactive"] + raw["mixed"])
    over = desired["interactive"] + desired["mixed"] - bound
    cuts = {}
    for role in ("mixed", "interactive"):
        cut = min(over, desired[role] - raw[role])
        if cut > 0:
            cuts[role] = cut
            over -= cut
    return cuts


def gpu_budget_cuts(cfg: PolicyConfig, desired: Mapping[str, int]) -> dict[str, int]:
    """Instances to cut per role to fit ``gpu_budget``: BATCH first, then MIXED, then INTERACTIVE, none below its
    minimum."""
    over = sum(desired.values()) - cfg.gpu_budget // cfg.gpus_per_instance
    cuts = {}
    for role in ("batch", "mixed", "interactive"):
        if over <= 0:
            break
        cut = min(over, desired[role] - cfg.limit(role).min_instances)
        if cut > 0:
            cuts[role] = cut
            over -= cut
    return cuts


def prefill_need(cfg: PolicyConfig, window: tuple[tuple[float, float, float], ...],
                 arrivals: ArrivalStats) -> tuple[float, float]:
    """The instances that prefilling the arrivals' prompts keeps busy, ``λ̄·P̄ / R_p`` (module docstring): λ̄ the mean
    arrival rate [requests/s] of the decisions in ``window`` (those of the last ``arrival_cv_window_s``) and of this one,
    P̄ the smoothed mean prompt [tokens], R_p ``prefill_tokens_per_s``. Returns (need [instances], λ̄); need 0 while no
    prompt has been seen. Below it the fleet's prefill queue grows without bound, whatever C and μ̄ say: a fleet
    that kept up has no standing queue, so μ̄ ages out and D / C alone sizes it for what it runs, not what it
    prefills. The window mean, not this interval's λ, so one busy interval's noise is not held for the delay
    window. E.g. 4.2 requests/s of 5,200-token prompts at 10,000 tokens/s: 2.2 instances."""
    rates = [r[2] for r in window] + [arrivals.rate_per_s]
    lam = sum(rates) / len(rates)
    p = arrivals.prompt_tokens_mean
    return (lam * p / cfg.prefill_tokens_per_s if p > 0 and math.isfinite(p) else 0.0), lam


def window_headroom(cfg: PolicyConfig, window: tuple[tuple[float, float, float], ...], arrivals: ArrivalStats,
                    now: float, need: float, theta: float,
                    rate_bar: float) -> tuple[tuple[tuple[float, float, float], ...], float, bool]:
    """Headroom [instances]: the larger of ``N·Θ`` now and ``N̄·Θ(λ̄)``, N̄ the mean need over the decisions in
    ``window`` (those of the last ``arrival_cv_window_s``) and this one, λ̄ = ``rate_bar`` their mean arrival rate [requests/s] (as
    :func:`prefill_need` returns it; module docstring, "Headroom"). Returns the new window, the headroom and
    whether the window's term set it. Example: a burst needed 6 instances for 60 of the last 300 s and none
    since: N̄ = 1.2, and Θ(λ̄) over that window's CV keeps 1.2·Θ(λ̄) instances up where N·Θ would keep 0."""
    window = (*window, (now, need, arrivals.rate_per_s))
    n_bar = sum(r[1] for r in window) / len(window)
    kept = n_bar * overprovisioning_theta(cfg, replace(arrivals, rate_per_s=rate_bar))
    return window, max(need * theta, kept), kept > need * theta


def mixed_hold(instances: Sequence[InstanceView]) -> float:
    """Interactive requests one MIXED instance holds: the largest MIXED max batch size [requests] (its batch
    requests are evicted for them, so the whole cap counts); infinite while no MIXED instance reports one."""
    caps = [i.max_batch_size for i in instances if i.role == "mixed" and i.max_batch_size > 0]
    return float(max(caps)) if caps else math.inf


def decide(cfg: PolicyConfig, state: PolicyState, inp: ScalerInputs) -> tuple[PolicyState, ScalerDecision]:
    """One scaling decision, O(instances + groups): the next state (``state`` is not changed) and the decision."""
    now = inp.now
    prompt = smooth_prompt(cfg, state.prompt_tokens, now, inp.arrivals.prompt_tokens_mean)
    inp = replace(inp, arrivals=replace(inp.arrivals, prompt_tokens_mean=prompt[1]))
    current = {r: sum(1 for i in inp.instances if i.role == r) for r in ROLES}
    cap = instance_capacity(cfg, state, inp)
    # Interactive: N = max(D / C, λ / μ̄, λ̄·P̄ / R_p); whole instances INTERACTIVE, the rest plus the headroom MIXED.
    theta = overprovisioning_theta(cfg, inp.arrivals)
    demand = max(0.0, inp.arrivals.inflight - cap.left_out)
    by_rate = inp.arrivals.rate_per_s / cap.admit_rate if math.isfinite(cap.admit_rate) else 0.0
    window = tuple(r for r in state.recent if r[0] >= now - cfg.arrival_cv_window_s)  # (time, N, λ) of the CV window
    prefill, lam_bar = prefill_need(cfg, window, inp.arrivals)
    c_ttft = ttft_concurrency(cfg, inp.arrivals)
    need = max(demand / cap.concurrency, by_rate, prefill)
    want_i = float(math.floor(need + 1e-9))
    rest = (need - want_i) * cap.concurrency  # requests left to the MIXED instances [requests]
    if rest > mixed_hold(inp.instances):
        want_i = float(math.ceil(need - 1e-9))
    batch = batch_need(cfg, inp, current["batch"])
    recent, head, from_window = window_headroom(cfg, window, inp.arrivals, now, need, theta, lam_bar)
    # Below its minimum, the INTERACTIVE instances the minimum keeps serve N: MIXED instances hold the headroom.
    served_i = max(want_i, float(cfg.limit("interactive").min_instances))
    wanted = {"interactive": want_i, "mixed": max(0.0, max(need, served_i) + head - served_i), "batch": batch.wanted}
    reasons = {
        "interactive": (f"demand {demand:.1f} running requests / {cap.concurrency:.1f} per instance"
                        + (" (the TTFT bound)" if cap.concurrency >= c_ttft else "")
                        + (f"; arrivals {inp.arrivals.rate_per_s:.2f}/s / {cap.admit_rate:.2f}/s admitted per "
                           f"instance" if math.isfinite(cap.admit_rate) else "")
                        + (f"; prefilling {lam_bar:.2f}/s (the window's mean) × {inp.arrivals.prompt_tokens_mean:.0f} "
                           f"prompt tokens at {cfg.prefill_tokens_per_s:g} tokens/s per instance needs {prefill:.2f}"
                           if prefill > 0 and prefill >= need else "")),
        "mixed": (f"headroom Θ={theta:.2f} (λ={inp.arrivals.rate_per_s:.2f}/s, CV={inp.arrivals.cv:.2f}, "
                  f"L={cfg.model_load_time_s:g} s) over {need:.2f} instances' worth"
                  + (f"; {head:.2f} instances' worth kept from the last {cfg.arrival_cv_window_s:g} s"
                     if from_window else "")
                  + (f"; N served by the {served_i:g} INTERACTIVE instance(s) of the minimum" if served_i > want_i else "")),
        "batch": batch.reason,
    }
    codes = {"interactive": "demand", "mixed": "headroom", "batch": batch.code}
    raw = clamp_to_limits(cfg, wanted, codes)
    # Instances per role serving or starting (starting ones count: never cancel them early).
    have = {r: current[r] + int(inp.pending.get(r, 0)) for r in ROLES}
    raw["batch"], last_up, note, code = pace_batch(cfg, state.last_batch_up_s, now, raw["batch"], have["batch"],
                                                   int(inp.pending.get("batch", 0)))
    if code:
        reasons["batch"] += note
        codes["batch"] = code
    history, desired, held = delay_window(cfg, state.history, now, raw, have)
    for role in held:
        reasons[role] += f"; scale-down held by the {cfg.delay_s:g} s delay window"
        codes[role] = "scale_down_delay"
    both = raw["interactive"] + raw["mixed"]
    for role, covered in role_cover(cfg, raw, desired, have, current, both > state.last_interactive_mixed).items():
        other = "mixed" if role == "interactive" else "interactive"
        desired[role] -= covered
        reasons[role] += f"; {covered} of it covered by {other.upper()} instance(s) kept by the scale-down delay"
        codes[role] = "other_role_covers"
    for role, cut in joint_hold_excess(history, raw, desired, have).items():
        desired[role] -= cut
        reasons[role] += f"; {cut} fewer: the window never wanted this many INTERACTIVE + MIXED at once"
        codes[role] = "scale_down_delay"
    for role, cut in gpu_budget_cuts(cfg, desired).items():
        desired[role] -= cut
        reasons[role] += f"; cut by {cut} to fit the GPU budget of {cfg.gpu_budget}"
        codes[role] = "gpu_budget"
    roles = {r: RoleDecision(r, current[r], wanted[r], desired[r], reasons[r], codes[r]) for r in ROLES}
    decision = ScalerDecision(now, roles, theta, batch.backpressure, {
        "demand_requests": demand, "instance_concurrency": cap.concurrency,
        "arrival_rate_per_s": inp.arrivals.rate_per_s, "admit_rate_per_instance": cap.admit_rate,
        "interactive_need_instances": need, "prefill_need_instances": prefill, "arrival_cv": inp.arrivals.cv,
        "prompt_tokens_mean": inp.arrivals.prompt_tokens_mean, "ttft_concurrency": c_ttft,
        "batch_capacity_instances": batch.capacity, "mixed_lend_instances": batch.lend,
        "queued_requests": float(batch.queued), "in_service_requests": float(batch.in_service),
        "groups": float(len(inp.groups)), "worst_group_ratio": batch.ratio})
    nxt = PolicyState(history, cap.saturated, last_up, both, cap.admit_rates, prompt, recent)
    return nxt, decision


def hold_in_window(state: PolicyState, role: str, count: int) -> PolicyState:
    """``state`` with the delay window's latest ``role`` count raised to ``count`` (the service holds a count
    when an input is unavailable; the window remembers the held count, not the one read from missing inputs)."""
    h = state.history.get(role, ())
    if not h or h[-1][1] >= count:
        return state
    return replace(state, history={**state.history, role: (*h[:-1], (h[-1][0], count))})


def with_limits(cfg: PolicyConfig, **limits: tuple[int, int]) -> PolicyConfig:
    """A copy of ``cfg`` with ``role=(min, max)`` limits replaced (convenience for CLIs and tests)."""
    merged = dict(cfg.limits)
    for role, (lo, hi) in limits.items():
        merged[role] = RoleLimits(lo, hi)
    return replace(cfg, limits=merged)
