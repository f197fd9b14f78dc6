"""Scaling and dispatch policies as peers behind one registry (Vidur's shape: ``../shared/DESIGN.md`` §7).

A policy tells the fleet simulator (:mod:`simulator.fleet`) how each instance's engine is configured, where
a request goes, and how many instances to run. Chiron's policy is the product's own code (router routing,
global scaler policy, queue, local autoscaler); each baseline follows its published rule and defaults as
gathered in ``../shared/notes/baselines.md`` (sources and commits there). Where a published form was
ambiguous, the reading taken is stated in :data:`READINGS` and printed in every report.

Registry: :data:`POLICIES` maps a name to a factory ``(workload, sim_config, **params) -> FleetPolicy``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from services.engine.core import EngineConfig
from services.engine.local_autoscaler import LocalAutoscalerConfig, role_overrides
from services.engine.perf_model import PerfModel
from services.global_scaler.policy import (
    EngineLoad,
    GroupView,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    decide,
    observe,
)
from services.router.routing import InstanceLoad, Rejected, choose_instance
from simulator.baselines import kpa, oracle, queue_length
from simulator.baselines.kpa import KpaConfig, KpaState
from simulator.baselines.queue_length import QueueLengthConfig, QueueLengthState
from simulator.baselines.snapshot import take_snapshot

if TYPE_CHECKING:
    from simulator.fleet import Fleet, SimConfig, SimInstance
    from simulator.workloads import Workload

# vLLM's defaults on an A100-80GB for the OpenAI server (baselines.md §7): max_num_seqs 256,
# max_num_batched_tokens 2048.
VLLM_A100_MAX_NUM_SEQS = 256
VLLM_A100_MAX_BATCHED_TOKENS = 2048


class FleetPolicy:
    """The interface. ``roles``: instance roles it uses; ``uses_queue``: batch requests go to Chiron's global
    queue (else they are dispatched on arrival like interactive ones); ``local_autoscaler``: instances run one;
    ``params``: what the report shows of its configuration."""

    name = "base"
    roles: tuple[str, ...] = ("uniform",)
    uses_queue = False
    local_autoscaler = False

    def __init__(self, workload: Workload, sim: SimConfig) -> None:
        self.workload = workload
        self.sim = sim
        self.params: dict = {}

    def setup(self, fleet: Fleet) -> None:
        """Start the initial (warm) fleet and schedule the policy's ticks."""
        for _ in range(self.sim.initial_instances):
            fleet.start_instance(self.roles[0], warm=True)

    def engine_setup(self, role: str) -> tuple[EngineConfig, LocalAutoscalerConfig | None]:
        raise NotImplementedError

    def dispatch(self, fleet: Fleet, rid: str) -> SimInstance | None:
        """Instance for a new request (None = rejected)."""
        raise NotImplementedError

    def on_tick(self, fleet: Fleet, name: str) -> None:
        """A tick scheduled with :meth:`Fleet.schedule_tick` fired."""


def _least_loaded(insts: list[SimInstance]) -> SimInstance | None:
    return min(insts, key=lambda i: (i.num_running + i.num_waiting, i.iid)) if insts else None


class _VllmFleet(FleetPolicy):
    """A uniform fleet of vLLM engines at a fixed max batch size (the baselines' engines).

    ``variant`` (one of :data:`simulator.fleet.VARIANTS`) says how requests reach the engines; every engine
    option an operator can set is open (``max_batch_size`` up to 1024, ``max_batched_tokens``: vLLM's
    ``max_num_batched_tokens``, the per-iteration token budget with chunked prefill)."""

    def __init__(self, workload: Workload, sim: SimConfig, max_batch_size: int = VLLM_A100_MAX_NUM_SEQS,
                 max_batched_tokens: int = VLLM_A100_MAX_BATCHED_TOKENS, variant: str = "engine-queue") -> None:
        super().__init__(workload, sim)
        from simulator.fleet import VARIANTS

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 (got {max_batch_size})")
        if max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens must be >= 1 (got {max_batched_tokens})")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
        self.variant = variant
        self.max_batch_size = max_batch_size
        self.max_batched_tokens = max(max_batched_tokens, max_batch_size)
        self.params.update(variant=variant, max_batch_size=max_batch_size, max_num_batched_tokens=self.max_batched_tokens)
        self._rr = 0

    def engine_setup(self, role: str) -> tuple[EngineConfig, LocalAutoscalerConfig | None]:
        return EngineConfig(max_num_seqs=self.max_batch_size, max_num_seqs_limit=max(1024, self.max_batch_size),
                            max_num_batched_tokens=self.max_batched_tokens), None

    def candidates(self, fleet: Fleet) -> list[SimInstance]:
        """Where a request may go now: serving instances (with room, for a gateway-queued one)."""
        if fleet.gateway is not None:
            return [i for i in fleet.serving() if fleet.has_room(i)]
        return fleet.serving()

    def fallback(self, fleet: Fleet) -> SimInstance | None:
        """No serving instance: the engine-queue variants queue at the instance that loads first (the gateway
        variant holds the request instead)."""
        if fleet.gateway is not None:
            return None
        return _least_loaded([i for i in fleet.instances if i.state == "loading"])

    def round_robin(self, fleet: Fleet) -> SimInstance | None:
        insts = self.candidates(fleet)
        if not insts:
            return self.fallback(fleet)
        self._rr = (self._rr + 1) % len(insts)
        return insts[self._rr]

    def least_loaded(self, fleet: Fleet) -> SimInstance | None:
        return _least_loaded(self.candidates(fleet)) or self.fallback(fleet)


# ---------------------------------------------------------------------------------------------------------
# Chiron
# ---------------------------------------------------------------------------------------------------------
class ChironPolicy(FleetPolicy):
    """Chiron as built: the router's :func:`choose_instance` for interactive requests (INTERACTIVE first, MIXED
    overflow, admission control on the projected TTFT), batch requests through the global queue (leased by
    BATCH and idle MIXED instances), the global scaler's :func:`decide` every ``interval_s``, and a local
    autoscaler on every instance (ITL SLO: the workload's interactive one on INTERACTIVE/MIXED instances, its
    relaxed batch one on BATCH instances). Role limits: INTERACTIVE 0..budget, MIXED 1..budget, BATCH 0..budget,
    so the fleet multiplexes batch work onto interactive headroom from its first instance. The arrival CV given to
    the scaler is measured over the last ``cv_window_s`` of interactive arrivals (the router sees them),
    or fixed with ``arrival_cv``."""

    name = "chiron"
    roles = ("interactive", "mixed", "batch")
    uses_queue = True
    local_autoscaler = True

    def __init__(self, workload: Workload, sim: SimConfig, interval_s: float = 5.0, arrival_cv: float | None = None,
                 cv_window_s: float = 300.0, scale_down_delay_s: float = 120.0, la_itl_slo_ms: float | None = None,
                 batch_la_itl_slo_ms: float | None = None, policy_config: PolicyConfig | None = None,
                 min_prefill_tokens: int = 512) -> None:
        super().__init__(workload, sim)
        budget = sim.gpu_budget // sim.gpus_per_instance
        self.cfg = (policy_config or PolicyConfig(
            interval_s=interval_s, model_load_time_s=max(sim.model_load_time_s, 1.0), scale_down_delay_s=scale_down_delay_s,
            gpus_per_instance=sim.gpus_per_instance, gpu_budget=sim.gpu_budget,
            limits={"interactive": RoleLimits(0, budget), "mixed": RoleLimits(1, budget), "batch": RoleLimits(0, budget)},
        )).validate()
        self.arrival_cv = arrival_cv
        self.cv_window_s = cv_window_s
        self.min_prefill_tokens = min_prefill_tokens
        self.la_itl = la_itl_slo_ms or workload.interactive_itl_ms
        self.batch_la_itl = batch_la_itl_slo_ms or workload.batch_itl_ms
        self.state = PolicyState()
        self.samples: dict = {}
        self.decisions = 0
        self.params.update(interval_s=self.cfg.interval_s, scale_down_delay_s=self.cfg.scale_down_delay_s,
                           local_autoscaler_itl_slo_ms={"interactive": self.la_itl, "batch": self.batch_la_itl},
                           arrival_cv="measured" if arrival_cv is None else arrival_cv)
        self.thetas: list[float] = []

    def setup(self, fleet: Fleet) -> None:
        lim = self.cfg.limit("interactive")
        for k in range(self.sim.initial_instances):  # the first ones MIXED when INTERACTIVE may be 0 (multiplexing)
            fleet.start_instance("mixed" if k < self.cfg.limit("mixed").min_instances or lim.max_instances == 0
                                 else "interactive", warm=True)
        fleet.schedule_tick("scale", 0.0)

    def engine_setup(self, role: str) -> tuple[EngineConfig, LocalAutoscalerConfig | None]:
        la = LocalAutoscalerConfig(itl_slo_ms=self.batch_la_itl if role == "batch" else self.la_itl,
                                   **role_overrides(role))
        return EngineConfig(max_num_seqs=la.initial_batch_size, max_num_seqs_limit=la.max_batch_size,
                            min_prefill_tokens=self.min_prefill_tokens), la

    def dispatch(self, fleet: Fleet, rid: str) -> SimInstance | None:
        now = fleet.now
        loads, by_id = [], {}
        for inst in fleet.instances:
            if inst.state != "serving" or inst.role not in ("interactive", "mixed"):
                continue
            p50 = inst.ttft.quantile(0.5, now)
            loads.append(InstanceLoad(inst.iid, inst.role, inst.iid, fleet.config.model, inst.max_batch_size,
                                      inst.num_running, inst.num_waiting, 0.0 if math.isnan(p50) else p50,
                                      batch_requests=len(inst.leases)))
            by_id[inst.iid] = inst
        try:
            chosen = choose_instance(loads, fleet.config.model, self.workload.interactive_ttft_ms)
        except Rejected:
            return None
        return by_id[chosen.instance_id]

    def _arrival_cv(self, fleet: Fleet) -> float:
        if self.arrival_cv is not None:
            return self.arrival_cv
        t = np.frombuffer(fleet.arrival_times, dtype=float)
        t = t[t >= fleet.now - self.cv_window_s]
        if len(t) < 20:
            return 1.0
        gaps = np.diff(t)
        return float(gaps.std() / gaps.mean()) if gaps.mean() > 0 else 1.0

    def on_tick(self, fleet: Fleet, name: str) -> None:
        now = fleet.now
        loads = [EngineLoad(i.iid, i.role, i.max_batch_size, i.num_running, i.num_waiting, i.finished_total,
                            batch_requests=len(i.leases), batch_finished_total=i.batch_finished_total)
                 for i in fleet.serving()]
        groups = []
        if fleet.queue is not None and fleet.queue.store.groups():
            gstats, estimates, _caps = fleet.queue.group_estimates()
            by_id = {g.group_id: g for g in gstats}
            for e in estimates:
                g = by_id[e.group_id]
                w = e.last_wait_quantile_s
                groups.append(GroupView(g.group_id, g.queued, w if math.isfinite(w) else math.inf, g.deadline_s, g.leased))
            # groups with only leased requests (the estimator sees queued ones)
            seen = {e.group_id for e in estimates}
            groups += [GroupView(g.group_id, 0, 0.0, g.deadline_s, g.leased) for g in gstats if g.group_id not in seen]
        inputs = observe(now, loads, self.samples, self._arrival_cv(fleet), groups)
        inputs = replace(inputs, pending={r: sum(1 for i in fleet.instances if i.role == r and i.state == "loading")
                                          for r in self.roles})
        self.state, d = decide(self.cfg, self.state, inputs)
        self.thetas.append(d.theta)
        self.decisions += 1
        for role in self.roles:
            fleet.set_count(role, d.desired(role), d.roles[role].reason)
        fleet.schedule_tick("scale", now + self.cfg.interval_s)


# ---------------------------------------------------------------------------------------------------------
# Llumnix
# ---------------------------------------------------------------------------------------------------------
class LlumnixPolicy(_VllmFleet):
    """Llumnix (baselines.md §1, v0.1.0 semantics): freeness F in KV blocks per request, load-based dispatch
    (argmax F), migration with defragmentation (pairs of F < ``migrate_out_threshold`` sources and
    F > threshold destinations, most loaded with least loaded, shortest running request moved) every
    ``migration_interval_s``, and ``avg_load`` auto-scaling every ``scaling_interval_s``: pooled F below
    ``scale_up_threshold`` adds one instance, pooled F without the newest instance above
    ``scale_down_threshold`` removes it. vLLM's A100 default max batch size 256."""

    name = "llumnix"

    def __init__(self, workload: Workload, sim: SimConfig, max_batch_size: int = VLLM_A100_MAX_NUM_SEQS,
                 scale_up_threshold: float = 10.0, scale_down_threshold: float = 60.0,
                 scaling_interval_s: float = 10.0, migration_interval_s: float = 0.05,
                 migrate_out_threshold: float = 3.0, watermark_fraction: float = 0.01,
                 max_batched_tokens: int = VLLM_A100_MAX_BATCHED_TOKENS, variant: str = "engine-queue") -> None:
        super().__init__(workload, sim, max_batch_size, max_batched_tokens, variant)
        if scale_down_threshold <= scale_up_threshold:
            raise ValueError("scale_down_threshold must exceed scale_up_threshold")
        self.up, self.down = scale_up_threshold, scale_down_threshold
        self.scaling_interval_s = scaling_interval_s
        self.migration_interval_s = migration_interval_s
        self.migrate_out = migrate_out_threshold
        self.watermark_fraction = watermark_fraction
        self.params.update(scale_up_threshold=scale_up_threshold, scale_down_threshold=scale_down_threshold,
                           scaling_interval_s=scaling_interval_s, migration_interval_s=migration_interval_s,
                           migrate_out_threshold=migrate_out_threshold, dispatch="load (argmax freeness)",
                           scaling_policy="avg_load")

    def setup(self, fleet: Fleet) -> None:
        super().setup(fleet)
        fleet.schedule_tick("scale", self.scaling_interval_s)
        fleet.schedule_tick("migrate", self.migration_interval_s)

    # Blocks of the waiting requests: exact up to 256 waiting, else extrapolated from the first 256 (a
    # backlog of thousands changes F by far more than the sampling error).
    @staticmethod
    def _waiting_blocks(inst: SimInstance) -> float:
        core = inst.core
        bs = core.config.block_size
        w = core.waiting
        if not w:
            return 0.0
        if len(w) <= 256:
            return float(sum(-(-(r.context_len - r.num_computed) // bs) for r in w))
        head = [w[i] for i in range(256)]
        return sum(-(-(r.context_len - r.num_computed) // bs) for r in head) * len(w) / 256

    def _parts(self, inst: SimInstance) -> tuple[float, float, float, int]:
        core = inst.core
        return core.free_blocks, self.watermark_fraction * core.total_blocks, self._waiting_blocks(inst), \
            len(core.running) + len(core.waiting)

    def freeness(self, inst: SimInstance) -> float:
        free, wm, wb, n = self._parts(inst)
        return math.inf if n == 0 else (free - wm - wb) / n

    def _migration_freeness(self, inst: SimInstance) -> float:
        core = inst.core
        head = core.waiting[0] if core.waiting else None
        need = -(-(head.context_len - head.num_computed) // core.config.block_size) if head is not None else 0
        n = len(core.running) + (1 if head is not None else 0)
        wm = self.watermark_fraction * core.total_blocks
        return math.inf if n == 0 else (core.free_blocks - wm - need) / n

    def dispatch(self, fleet: Fleet, rid: str) -> SimInstance | None:
        insts = self.candidates(fleet)
        if not insts:
            if fleet.gateway is not None:
                return None
            insts = [i for i in fleet.instances if i.state == "loading"]
            return min(insts, key=lambda i: i.ready_s) if insts else None
        return max(insts, key=lambda i: (self.freeness(i), -(i.num_running + i.num_waiting)))

    def on_tick(self, fleet: Fleet, name: str) -> None:
        if name == "migrate":
            self._migrate(fleet)
            fleet.schedule_tick("migrate", fleet.now + self.migration_interval_s)
            return
        self._scale(fleet)
        fleet.schedule_tick("scale", fleet.now + self.scaling_interval_s)

    def _migrate(self, fleet: Fleet) -> None:
        insts = fleet.serving()
        if len(insts) < 2:
            return
        f = {i.iid: self._migration_freeness(i) for i in insts}
        src = sorted((i for i in insts if f[i.iid] < self.migrate_out and i.core.running), key=lambda i: f[i.iid])
        dst = sorted((i for i in insts if f[i.iid] > self.migrate_out), key=lambda i: -f[i.iid])
        for s, d in zip(src, dst, strict=False):
            # SR: the shortest running request (fewest context tokens) moves.
            req = min(s.core.running, key=lambda r: r.context_len)
            if d.num_running + d.num_waiting >= d.max_batch_size:
                continue
            fleet.migrate(s, d, req.request_id)

    def _scale(self, fleet: Fleet) -> None:
        serving = fleet.serving()
        if not serving:
            return
        parts = [self._parts(i) for i in serving]
        free = sum(p[0] for p in parts)
        wm = sum(p[1] for p in parts)
        wb = sum(p[2] for p in parts)
        n = sum(p[3] for p in parts)
        pooled = math.inf if n == 0 else (free - wm - wb) / n
        active = fleet.active(self.roles[0])
        if pooled < self.up:
            fleet.set_count(self.roles[0], len(active) + 1, f"avg_load freeness {pooled:.1f} < {self.up:g}")
            return
        if len(serving) > 1:
            last = serving[-1]
            lf, lwm, lwb, ln = self._parts(last)
            n2 = n - ln
            pooled2 = math.inf if n2 == 0 else (free - lf - (wm - lwm) - (wb - lwb)) / n2
            if pooled2 > self.down:
                fleet.set_count(self.roles[0], len(active) - 1, f"avg_load freeness without the newest {pooled2:.1f} > {self.down:g}")


LLUMNIX_SWEEP = {"max_batch_size": (64, 128, 256), "thresholds": ((10.0, 60.0), (50.0, 150.0), (150.0, 400.0))}


# ---------------------------------------------------------------------------------------------------------
# KEDA + HPA on waiting requests (vLLM production-stack)
# ---------------------------------------------------------------------------------------------------------
class QueueLengthPolicy(_VllmFleet):
    """vLLM production-stack's KEDA ScaledObject on waiting requests as an HPA AverageValue target
    (:mod:`simulator.baselines.queue_length`); round-robin routing (the stack's default)."""

    name = "queue-length"

    def __init__(self, workload: Workload, sim: SimConfig, threshold: float = 5.0, sync_s: float = 15.0,
                 stabilization_s: float = 300.0, max_batch_size: int = VLLM_A100_MAX_NUM_SEQS,
                 max_batched_tokens: int = VLLM_A100_MAX_BATCHED_TOKENS, variant: str = "engine-queue") -> None:
        super().__init__(workload, sim, max_batch_size, max_batched_tokens, variant)
        self.cfg = QueueLengthConfig(threshold=threshold, sync_s=sync_s, stabilization_s=stabilization_s).validate()
        self.state = QueueLengthState()
        self.params.update(threshold=threshold, sync_s=sync_s, stabilization_s=stabilization_s, routing="round-robin")

    def setup(self, fleet: Fleet) -> None:
        super().setup(fleet)
        fleet.schedule_tick("scale", self.cfg.sync_s)

    def dispatch(self, fleet: Fleet, rid: str) -> SimInstance | None:
        return self.round_robin(fleet)

    def on_tick(self, fleet: Fleet, name: str) -> None:
        self.state, desired, reason = queue_length.decide(self.cfg, self.state, take_snapshot(fleet))
        if desired != len(fleet.active(self.roles[0])):
            fleet.set_count(self.roles[0], desired, reason)
        fleet.schedule_tick("scale", fleet.now + self.cfg.sync_s)


# ---------------------------------------------------------------------------------------------------------
# Knative KPA
# ---------------------------------------------------------------------------------------------------------
class KpaPolicy(_VllmFleet):
    """Knative's KPA on concurrency (:mod:`simulator.baselines.kpa`): a sample every second, a decision every
    ``tick_s``; min-scale 1 (scale to zero would add a cold start to every idle gap). Least-in-flight routing
    (the activator's load balancing for unlimited concurrency picks among pods; least in-flight is its
    strongest reading)."""

    name = "kpa"

    def __init__(self, workload: Workload, sim: SimConfig, target: float = 70.0, stable_s: float = 60.0,
                 panic_s: float = 6.0, tick_s: float = 2.0, panic_threshold: float = 2.0,
                 max_batch_size: int = VLLM_A100_MAX_NUM_SEQS, max_batched_tokens: int = VLLM_A100_MAX_BATCHED_TOKENS,
                 variant: str = "engine-queue") -> None:
        super().__init__(workload, sim, max_batch_size, max_batched_tokens, variant)
        self.cfg = KpaConfig(target=target, stable_s=stable_s, panic_s=panic_s, tick_s=tick_s,
                             panic_threshold=panic_threshold).validate()
        self.state = KpaState()
        self.params.update(target=target, stable_window_s=stable_s, panic_window_s=panic_s, tick_s=tick_s,
                           panic_threshold=panic_threshold, routing="least in-flight")

    def setup(self, fleet: Fleet) -> None:
        super().setup(fleet)
        fleet.schedule_tick("sample", 1.0)
        fleet.schedule_tick("scale", self.cfg.tick_s)

    def dispatch(self, fleet: Fleet, rid: str) -> SimInstance | None:
        return self.least_loaded(fleet)

    def on_tick(self, fleet: Fleet, name: str) -> None:
        snap = take_snapshot(fleet)
        if name == "sample":
            self.state = kpa.observe(self.cfg, self.state, snap)
            fleet.schedule_tick("sample", fleet.now + 1.0)
            return
        fleet.schedule_tick("scale", fleet.now + self.cfg.tick_s)
        self.state, desired, reason = kpa.decide(self.cfg, self.state, snap)
        if desired is not None and desired != len(fleet.active(self.roles[0])):
            fleet.set_count(self.roles[0], desired, reason)


# ---------------------------------------------------------------------------------------------------------
# NVIDIA Dynamo SLA planner
# ---------------------------------------------------------------------------------------------------------
class SlaPlannerPolicy(_VllmFleet):
    """NVIDIA Dynamo's SLA planner (baselines.md §5) with our performance model as its profile, for an
    aggregated (not prefill/decode-disaggregated) fleet: every ``adjustment_interval_s`` it measures the
    request count, mean ISL/OSL, TTFT and ITL over the interval, forms the correction factors
    ``p_corr = TTFT_obs / TTFT_prof(ISL)`` and ``d_corr = ITL_obs / ITL_prof(conc, ISL + OSL/2)``, predicts
    the next interval's load, and sets ``n = ceil(prefill GPUs + decode GPUs)``:
    prefill ``num_req·ISL/interval·min(1, p_corr) / prefill_throughput(ISL)``, decode
    ``num_req·OSL/interval / best decode throughput per GPU meeting ITL_target / d_corr at ISL + OSL/2``.
    Targets are the workload's interactive TTFT/ITL SLOs. Round-robin routing."""

    name = "sla-planner"

    def __init__(self, workload: Workload, sim: SimConfig, adjustment_interval_s: float = 180.0,
                 max_batch_size: int = VLLM_A100_MAX_NUM_SEQS, perf: PerfModel | None = None,
                 max_batched_tokens: int = VLLM_A100_MAX_BATCHED_TOKENS, variant: str = "engine-queue") -> None:
        super().__init__(workload, sim, max_batch_size, max_batched_tokens, variant)
        self.interval = adjustment_interval_s
        self.perf = perf
        self.prev_i = 0
        self.prev_b = 0
        self.params.update(adjustment_interval_s=adjustment_interval_s, load_predictor="constant (last interval)",
                           ttft_target_ms=workload.interactive_ttft_ms, itl_target_ms=workload.interactive_itl_ms,
                           routing="round-robin", deployment="aggregated")

    def setup(self, fleet: Fleet) -> None:
        super().setup(fleet)
        self.perf = self.perf or fleet.perf
        fleet.schedule_tick("scale", self.interval)

    def dispatch(self, fleet: Fleet, rid: str) -> SimInstance | None:
        return self.round_robin(fleet)

    def _decode_tput(self, itl_ms: float, ctx: float, kv_tokens: int) -> float:
        best = 0.0
        for b in range(1, self.max_batch_size + 1):
            if b * ctx > kv_tokens:
                break
            ms = self.perf.iteration_ms(b, int(b * ctx), [])
            if ms > itl_ms:
                break
            best = max(best, b / ms * 1e3)
        return best or 1e3 / self.perf.iteration_ms(1, int(ctx), [])

    def on_tick(self, fleet: Fleet, name: str) -> None:
        now, perf = fleet.now, self.perf
        fleet.schedule_tick("scale", now + self.interval)
        lo = now - self.interval
        ii, bi = fleet._next_i, fleet._next_b
        idx_i = np.arange(self.prev_i, ii)
        idx_b = np.arange(self.prev_b, bi)
        self.prev_i, self.prev_b = ii, bi
        num_req = len(idx_i) + len(idx_b)
        if num_req == 0:
            return
        isl = float(np.concatenate((fleet._ip[idx_i], fleet._bp[idx_b])).mean())
        osl = float(np.concatenate((fleet._io[idx_i], fleet._bo[idx_b])).mean())
        # Observed TTFT and ITL of requests whose first / last token came in the interval.
        ttfts, itls = [], []
        arrays = []
        for rec in (fleet.inter, fleet.batch):
            first, last, done = np.asarray(rec.first), np.asarray(rec.last), np.asarray(rec.done)
            tokens = np.asarray(rec.tokens)
            arrays.append((rec.arrival, done))
            m = (first >= lo) & (first < now)
            ttfts.append((first[m] - rec.arrival[m]) * 1e3)
            d = (done >= lo) & (tokens > 1)
            itls.append((last[d] - first[d]) / (tokens[d] - 1) * 1e3)
        ttft_obs = float(np.concatenate(ttfts).mean()) if sum(len(x) for x in ttfts) else math.nan
        itl_obs = float(np.concatenate(itls).mean()) if sum(len(x) for x in itls) else math.nan
        n_now = max(1, len(fleet.serving()))
        ctx = isl + osl / 2
        ttft_prof = perf.iteration_ms(0, 0, [(int(isl), 0)])
        durs = np.concatenate([(done - arr)[(done >= lo) & (done < now)] for arr, done in arrays])
        dur = float(durs.mean()) if len(durs) else self.interval
        conc = max(1.0, num_req / n_now * dur / self.interval)
        itl_prof = perf.iteration_ms(int(conc), int(conc * ctx), [])
        p_corr = ttft_obs / ttft_prof if math.isfinite(ttft_obs) and ttft_prof > 0 else 1.0
        d_corr = itl_obs / itl_prof if math.isfinite(itl_obs) and itl_prof > 0 else 1.0
        prefill_tput = isl / (ttft_prof / 1e3)
        n_p = num_req * isl / self.interval * min(1.0, p_corr) / prefill_tput
        kv = fleet.instances[0].core.kv_capacity_tokens if fleet.instances else 400_000
        decode_tput = self._decode_tput(self.workload.interactive_itl_ms / max(d_corr, 1e-3), ctx, kv)
        n_d = num_req * osl / self.interval / decode_tput
        desired = max(1, min(math.ceil(n_p + n_d), fleet.config.gpu_budget // fleet.config.gpus_per_instance))
        if desired != len(fleet.active(self.roles[0])):
            fleet.set_count(self.roles[0], desired, f"SLA planner: prefill {n_p:.2f} + decode {n_d:.2f} GPUs "
                            f"(p_corr {p_corr:.2f}, d_corr {d_corr:.2f})")


# ---------------------------------------------------------------------------------------------------------
# Static fleet
# ---------------------------------------------------------------------------------------------------------
class StaticPolicy(_VllmFleet):
    """A fixed fleet: ``instances`` engines at ``max_batch_size`` (default vLLM's 256), no scaling;
    least-loaded routing. One engine at a fixed cap replays a trace for comparison with other simulators."""

    name = "static"

    def __init__(self, workload: Workload, sim: SimConfig, instances: int = 1,
                 max_batch_size: int = VLLM_A100_MAX_NUM_SEQS, max_batched_tokens: int = VLLM_A100_MAX_BATCHED_TOKENS) -> None:
        super().__init__(workload, sim, max_batch_size, max_batched_tokens)
        if instances < 1 or instances * sim.gpus_per_instance > sim.gpu_budget:
            raise ValueError(f"instances must be in [1, gpu_budget] (got {instances})")
        self.instances = instances
        self.params.update(instances=instances, routing="least loaded")

    def setup(self, fleet: Fleet) -> None:
        for _ in range(self.instances):
            fleet.start_instance(self.roles[0], warm=True)

    def dispatch(self, fleet: Fleet, rid: str) -> SimInstance | None:
        return _least_loaded(fleet.serving())


# ---------------------------------------------------------------------------------------------------------
# Oracle (fair-comparison.md §6): knows the future; not deployable
# ---------------------------------------------------------------------------------------------------------
class OraclePolicy(FleetPolicy):
    """Counts from :mod:`simulator.baselines.oracle`'s schedule (future arrivals and output lengths, the
    performance model), re-applied every ``tick_s``: INTERACTIVE instances at the SLO-feasible batch size
    ``B*`` of the lower bound (least-loaded routing, never rejecting), BATCH instances leasing the backlog from
    Chiron's queue at the batch class's ``B*``. Same initial fleet as every policy (warm INTERACTIVE)."""

    name = "oracle"
    roles = ("interactive", "batch")
    uses_queue = True

    def __init__(self, workload: Workload, sim: SimConfig, tick_s: float = 5.0, margin: float = 0.1,
                 batch_margin: float = 0.2, min_prefill_tokens: int = 512) -> None:
        super().__init__(workload, sim)
        self.tick_s, self.margin, self.batch_margin = tick_s, margin, batch_margin
        self.min_prefill_tokens = min_prefill_tokens
        self.schedule: oracle.OracleSchedule | None = None
        self.params.update(tick_s=tick_s, margin=margin, batch_margin=batch_margin, knows_the_future=True)

    def setup(self, fleet: Fleet) -> None:
        from simulator.workloads import gpu_seconds_lower_bound

        wl, perf = self.workload, fleet.perf
        # Sized at 80% of the ITL SLO: prefill chunks share the decode steps and lengthen them.
        lb = gpu_seconds_lower_bound(replace(wl, interactive_itl_ms=0.8 * wl.interactive_itl_ms,
                                             batch_itl_ms=0.8 * wl.batch_itl_ms), perf, self.sim.gpus_per_instance)
        self.b_int = max(1, int(lb["interactive_batch_size"] or 1))
        self.b_batch = max(1, int(lb["batch_batch_size"] or 1))
        self.batch_work_s = lb["batch_gpu_seconds"] / self.sim.gpus_per_instance
        ctx = lb["interactive_decode_context_tokens"]
        step_s = perf.iteration_ms(self.b_int, self.b_int * ctx) / 1e3
        prompts = np.asarray(wl.interactive.prompt_tokens, dtype=np.int64)
        uniq, inv = np.unique(prompts, return_inverse=True)
        prefill_s = np.array([perf.iteration_ms(0, 0.0, [(int(p), 0)]) for p in uniq])[inv] / 1e3
        service = prefill_s + np.maximum(np.asarray(wl.interactive.output_tokens, dtype=float) - 1, 0) * step_s
        grid, need = oracle.interactive_need(np.asarray(wl.interactive.arrival_s, dtype=float), service,
                                             self.b_int, self.margin)
        self.schedule = oracle.OracleSchedule(grid, need, 0)
        self.params.update(interactive_batch_size=self.b_int, batch_batch_size=self.b_batch)
        for _ in range(self.sim.initial_instances):
            fleet.start_instance("interactive", warm=True)
        fleet.schedule_tick("scale", 0.0)

    def engine_setup(self, role: str) -> tuple[EngineConfig, LocalAutoscalerConfig | None]:
        b = self.b_batch if role == "batch" else self.b_int
        return EngineConfig(max_num_seqs=b, max_num_seqs_limit=max(1024, b), min_prefill_tokens=self.min_prefill_tokens), None

    def dispatch(self, fleet: Fleet, rid: str) -> SimInstance | None:
        return _least_loaded(fleet.serving("interactive")) or _least_loaded(
            [i for i in fleet.instances if i.role == "interactive" and i.state == "loading"])

    def on_tick(self, fleet: Fleet, name: str) -> None:
        now, load = fleet.now, self.sim.model_load_time_s
        n_i = max(1, self.schedule.interactive_at(now, now + load + self.tick_s))
        fleet.set_count("interactive", n_i, "oracle: future interactive concurrency / B*")
        n_b_total = len(self.workload.batch)
        in_service = sum(len(i.leases) for i in fleet.instances)
        left = (fleet.queued_batch + in_service) / n_b_total if n_b_total else 0.0
        n_b = 0
        if fleet.queued_batch > 0 or in_service:
            deadline = float(self.workload.batch.arrival_s.min()) + self.workload.batch_ttft_s
            serving_b = len(fleet.serving("batch"))
            n_b = oracle.batch_instances(self.batch_work_s * left, deadline - now, 0.0 if serving_b else load,
                                         self.batch_margin)
            n_b = max(n_b, len(fleet.active("batch"))) if fleet.queued_batch > 0 else len(fleet.active("batch"))
        fleet.set_count("batch", n_b, "oracle: the backlog's work spread to its deadline")
        fleet.schedule_tick("scale", now + self.tick_s)


POLICIES: dict[str, Callable[..., FleetPolicy]] = {
    "chiron": ChironPolicy,
    "llumnix": LlumnixPolicy,
    "llumnix-tuned": LlumnixPolicy,  # swept by simulator.run.run_policy
    "static": StaticPolicy,
    "queue-length": QueueLengthPolicy,
    "kpa": KpaPolicy,
    "sla-planner": SlaPlannerPolicy,
    "oracle": OraclePolicy,
}

READINGS = {
    "llumnix": "Scaling as in v0.1.0's check_scale with avg_load (its manager never calls it; HEAD disables it): "
               "+1 instance per 10 s interval while pooled freeness < 10, including while earlier ones still load. "
               "No request priorities (the paper's priority headroom is not in the code): batch and interactive "
               "requests are dispatched alike on arrival and served FCFS. Migration every 50 ms (polling interval); "
               "instance information is exact at each dispatch (Llumnix refreshes it every 50 ms: a stronger reading). "
               "Waiting blocks beyond 256 waiting requests are extrapolated from the first 256.",
    "llumnix-tuned": "The llumnix policy with max batch size in {64, 128, 256} and (scale-up, scale-down) freeness "
                     "thresholds in {(10, 60), (50, 150), (150, 400)}, the best SLO attainment on the workload kept "
                     "(ties: fewer GPU-seconds).",
    "queue-length": "KEDA's Prometheus query summed over pods (the chart's un-summed query fails with several pods); "
                    "HPA default behaviour; min 1 replica.",
    "kpa": "Concurrency = running + waiting requests of all pods; min-scale 1; least in-flight routing.",
    "sla-planner": "Aggregated deployment (prefill + decode GPUs summed on one engine type); ARIMA load predictor "
                   "replaced by the constant predictor (statsmodels is not a dependency); default adjustment interval 180 s.",
    "static": "Least-loaded routing, vLLM's A100 defaults (256 requests, 2048 batched tokens) unless given.",
    "oracle": "Knows every future arrival and output length; INTERACTIVE instances sized by future concurrency over "
              "the lower bound's SLO-feasible batch size, each started one model-load time before it is needed; "
              "BATCH instances spread the backlog's work to its deadline. A reference, not a deployable policy.",
    "chiron": "As built (services/*): router choose_instance, global scaler decide, queue + estimator, local autoscaler.",
}


def make_policy(name: str, workload: Workload, sim: SimConfig, **params) -> FleetPolicy:
    """The policy ``name`` with ``params``. Raises ValueError naming the valid policies."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}")
    pol = POLICIES[name](workload, sim, **params)
    pol.name = name
    return pol


__all__ = ["POLICIES", "READINGS", "FleetPolicy", "LLUMNIX_SWEEP", "make_policy"]
