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
    ArrivalRates,
    GroupView,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    ScalerDecision,
    decide,
    engine_load,
    group_views,
    observe,
)
from services.router.routing import EngineStatsView, Rejected, choose_instance, instance_load
from simulator.baselines import kpa, llumnix, oracle, queue_length, sla_planner
from simulator.baselines.kpa import KpaConfig, KpaState
from simulator.baselines.queue_length import QueueLengthConfig, QueueLengthState
from simulator.baselines.snapshot import request_window, snapshot_instance, take_snapshot

if TYPE_CHECKING:
    from simulator.fleet import Fleet, SimConfig, SimInstance
    from simulator.workloads import Workload

# vLLM's defaults on an A100-80GB for the OpenAI server (baselines.md §7): max_num_seqs 256,
# max_num_batched_tokens 2048.
VLLM_A100_MAX_NUM_SEQS = 256
VLLM_A100_MAX_BATCHED_TOKENS = 2048


def engine_stats(inst: SimInstance, now: float | None = None, prompts_at: float | None = None) -> EngineStatsView:
    """A simulated engine's stats as the engine agent reports them (``Engine.GetStats``), for the router's and the
    scaler's builders; the median TTFT (last 10 s, 0 when none) only with ``now`` (the router reads it), the mean
    interactive prompt (last 10 s) only with ``prompts_at`` (the scaler reads it)."""
    p50 = inst.ttft.quantile(0.5, now) if now is not None else 0.0
    prompt = inst.prompts.statistic(None, prompts_at) if prompts_at is not None else 0.0
    return EngineStatsView(inst.max_batch_size, inst.num_running, inst.num_waiting, inst.finished_total,
                           len(inst.leases), inst.batch_finished_total, 0.0 if math.isnan(p50) else p50,
                           0.0 if math.isnan(prompt) else prompt)


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
    """Chiron as built: the router's :func:`choose_instance` for interactive requests (the least loaded
    INTERACTIVE or batch-free MIXED instance, MIXED instances with batch work as overflow, admission control on
    the projected TTFT), batch requests through the global queue (leased by BATCH and idle MIXED instances), the
    global scaler's :func:`decide` every ``interval_s``, and a local autoscaler on every instance (ITL SLO: the
    workload's interactive one on INTERACTIVE/MIXED instances, its relaxed batch one on BATCH instances). Role
    limits: INTERACTIVE 1..budget, MIXED 1..budget, BATCH 0..budget: the fleet multiplexes batch work onto
    interactive headroom from its first instance, and never serves interactive traffic from a single instance,
    which a burst would overrun for a whole model-load time (``docs/decisions/0033``). The arrival CV given to
    the scaler is measured as the service measures it, from its own arrival rates over the last ``cv_window_s``
    (:class:`~services.global_scaler.policy.ArrivalRates`), or fixed with ``arrival_cv``.
    ``on_decision(decision)``, when given, is called with every
    :class:`~services.global_scaler.policy.ScalerDecision` the scaler makes (``chiron bench fidelity`` records them)."""

    name = "chiron"
    roles = ("interactive", "mixed", "batch")
    uses_queue = True
    local_autoscaler = True

    def __init__(self, workload: Workload, sim: SimConfig, interval_s: float = 5.0, arrival_cv: float | None = None,
                 cv_window_s: float = 300.0, scale_down_delay_s: float | None = None, la_itl_slo_ms: float | None = None,
                 batch_la_itl_slo_ms: float | None = None, policy_config: PolicyConfig | None = None,
                 min_prefill_tokens: int = 512, on_decision: Callable[[ScalerDecision], None] | None = None) -> None:
        super().__init__(workload, sim)
        self.on_decision = on_decision
        budget = sim.gpu_budget // sim.gpus_per_instance
        self.cfg = (policy_config or PolicyConfig(
            interval_s=interval_s, model_load_time_s=max(sim.model_load_time_s, 1.0), scale_down_delay_s=scale_down_delay_s,
            gpus_per_instance=sim.gpus_per_instance, gpu_budget=sim.gpu_budget,
            interactive_ttft_slo_s=workload.interactive_ttft_ms / 1e3, arrival_cv_window_s=cv_window_s,
            limits={"interactive": RoleLimits(1, budget), "mixed": RoleLimits(1, budget), "batch": RoleLimits(0, budget)},
        )).validate()
        self.arrivals = ArrivalRates(self.cfg.arrival_cv_window_s, arrival_cv)
        self.min_prefill_tokens = min_prefill_tokens
        self.la_itl = la_itl_slo_ms or workload.interactive_itl_ms
        self.batch_la_itl = batch_la_itl_slo_ms or workload.batch_itl_ms
        self.state = PolicyState()
        self.samples: dict = {}
        self.decisions = 0
        self.params.update(interval_s=self.cfg.interval_s, scale_down_delay_s=self.cfg.delay_s,
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
            loads.append(instance_load(inst.iid, inst.role, inst.iid, fleet.config.model, engine_stats(inst, now)))
            by_id[inst.iid] = inst
        try:
            chosen = choose_instance(loads, fleet.config.model, self.workload.interactive_ttft_ms)
        except Rejected:
            return None
        return by_id[chosen.instance_id]

    def group_views(self, fleet: Fleet, groups: list[GroupView]) -> list[GroupView]:
        """The request groups the scaler is shown (an ablation overrides it)."""
        return groups

    def on_tick(self, fleet: Fleet, name: str) -> None:
        now = fleet.now
        loads = [engine_load(i.iid, i.role, engine_stats(i, prompts_at=now)) for i in fleet.serving()]
        groups = []
        if fleet.queue is not None and fleet.queue.store.groups():
            gstats, estimates, _caps = fleet.queue.group_estimates()
            groups = group_views(gstats, estimates)
        inputs = observe(now, loads, self.samples, self.arrivals.cv(now), self.group_views(fleet, groups))
        self.arrivals.add(now, inputs.arrivals.rate_per_s)
        inputs = replace(inputs, pending={r: sum(1 for i in fleet.instances if i.role == r and i.state == "loading")
                                          for r in self.roles})
        self.state, d = decide(self.cfg, self.state, inputs)
        if self.on_decision is not None:
            self.on_decision(d)
        self.thetas.append(d.theta)
        self.decisions += 1
        for role in self.roles:
            fleet.set_count(role, d.desired(role), d.roles[role].reason)
        fleet.schedule_tick("scale", now + self.cfg.interval_s)


# ---------------------------------------------------------------------------------------------------------
# Llumnix
# ---------------------------------------------------------------------------------------------------------
class LlumnixPolicy(_VllmFleet):
    """Llumnix (baselines.md §1; the rules in :mod:`simulator.baselines.llumnix`, read against v0.1.0 and
    HEAD): load-based dispatch (argmax freeness), migration with defragmentation every
    ``migration_interval_s`` (sources: a preempted request or freeness below ``migrate_out_threshold``;
    destinations: no preempted request and freeness above it; the shortest running request moves), and
    ``avg_load`` auto-scaling every ``scaling_interval_s``. This wrapper only builds the snapshot and acts on
    the decisions. vLLM's A100 default max batch size 256."""

    name = "llumnix"

    def __init__(self, workload: Workload, sim: SimConfig, max_batch_size: int = VLLM_A100_MAX_NUM_SEQS,
                 scale_up_threshold: float = 10.0, scale_down_threshold: float = 60.0,
                 scaling_interval_s: float = 10.0, migration_interval_s: float = 0.05,
                 migrate_out_threshold: float = 3.0, watermark_fraction: float = 0.01,
                 max_batched_tokens: int = VLLM_A100_MAX_BATCHED_TOKENS, variant: str = "engine-queue") -> None:
        super().__init__(workload, sim, max_batch_size, max_batched_tokens, variant)
        prompts = np.concatenate((np.asarray(workload.interactive.prompt_tokens, dtype=float),
                                  np.asarray(workload.batch.prompt_tokens, dtype=float)))
        self.cfg = llumnix.LlumnixConfig(
            scale_up_threshold=scale_up_threshold, scale_down_threshold=scale_down_threshold,
            scaling_interval_s=scaling_interval_s, migration_interval_s=migration_interval_s,
            migrate_out_threshold=migrate_out_threshold, watermark_fraction=watermark_fraction,
            gateway_prompt_tokens=float(prompts.mean()) if len(prompts) else 0.0).validate()
        self.state = llumnix.LlumnixState()
        self.up, self.down = scale_up_threshold, scale_down_threshold
        self.params.update(scale_up_threshold=scale_up_threshold, scale_down_threshold=scale_down_threshold,
                           scaling_interval_s=scaling_interval_s, migration_interval_s=migration_interval_s,
                           migrate_out_threshold=migrate_out_threshold, dispatch="load (argmax freeness)",
                           scaling_policy=self.cfg.scaling_policy,
                           request_migration_policy=self.cfg.request_migration_policy)

    def setup(self, fleet: Fleet) -> None:
        super().setup(fleet)
        fleet.schedule_tick("scale", self.cfg.scaling_interval_s)
        if self.cfg.enable_migration:
            fleet.schedule_tick("migrate", self.cfg.migration_interval_s)

    def freeness(self, inst: SimInstance) -> float:
        """The dispatch/scaling freeness of one instance (blocks per request)."""
        return llumnix.freeness(self.cfg, snapshot_instance(inst, 0))

    def dispatch(self, fleet: Fleet, rid: str) -> SimInstance | None:
        insts = self.candidates(fleet)
        if not insts:
            return self.fallback(fleet)
        iid = llumnix.dispatch(self.cfg, take_snapshot(fleet, insts))
        return next(i for i in insts if i.iid == iid)

    def on_tick(self, fleet: Fleet, name: str) -> None:
        if name == "migrate":
            self._migrate(fleet)
            fleet.schedule_tick("migrate", fleet.now + self.cfg.migration_interval_s)
            return
        self.state, delta, reason = llumnix.scale(self.cfg, self.state, take_snapshot(fleet))
        if delta:
            fleet.set_count(self.roles[0], len(fleet.active(self.roles[0])) + delta, reason)
        fleet.schedule_tick("scale", fleet.now + self.cfg.scaling_interval_s)

    def _migrate(self, fleet: Fleet) -> None:
        if len(fleet.serving()) < 2:
            return
        by_id = {i.iid: i for i in fleet.serving()}
        for s, d in llumnix.migration_pairs(self.cfg, take_snapshot(fleet)):
            src = by_id[s]
            rid = llumnix.migrate_out_request(self.cfg, [
                llumnix.RunningRequest(r.request_id, r.context_len, r.num_generated > 0 and r.num_computed >= r.context_len - 1)
                for r in src.core.running])
            if rid is not None:
                fleet.migrate(src, by_id[d], rid)


LLUMNIX_SWEEP = {"max_batch_size": (128, 256, 512, 1024),
                 "thresholds": ((2.0, 20.0), (10.0, 60.0), (50.0, 150.0), (150.0, 400.0)),
                 "max_batched_tokens": (2048, 8192)}


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
    """NVIDIA Dynamo's SLA planner (baselines.md §5; the rules in :mod:`simulator.baselines.sla_planner`, read
    against upstream) for an aggregated fleet: every ``adjustment_interval_s`` the module reads the interval's
    :class:`~simulator.baselines.snapshot.RequestWindow` (lengths of completed requests only) and the fleet's
    saturation, and returns ``n_prefill + n_decode`` engines. This wrapper builds the profiles once from the
    performance model (TTFT over ISL at the engine's token budget; ITL over batch size × context up to the
    engine's batch and KV limits), the inputs each tick, and acts. ``load_predictor``: ``arima`` (upstream's
    default, pmdarima), ``constant`` or ``kalman``. Targets default to the workload's interactive TTFT/ITL SLOs.
    Round-robin routing."""

    name = "sla-planner"

    def __init__(self, workload: Workload, sim: SimConfig, adjustment_interval_s: float = 180.0,
                 max_batch_size: int = VLLM_A100_MAX_NUM_SEQS, perf: PerfModel | None = None,
                 max_batched_tokens: int = VLLM_A100_MAX_BATCHED_TOKENS, variant: str = "engine-queue",
                 load_predictor: str = "arima", ttft_target_ms: float | None = None,
                 itl_target_ms: float | None = None) -> None:
        super().__init__(workload, sim, max_batch_size, max_batched_tokens, variant)
        self.cfg = sla_planner.SlaPlannerConfig(
            adjustment_interval_s=adjustment_interval_s, load_predictor=load_predictor,
            ttft_ms=ttft_target_ms or workload.interactive_ttft_ms, itl_ms=itl_target_ms or workload.interactive_itl_ms,
            max_gpu_budget=sim.gpu_budget, prefill_engine_num_gpu=sim.gpus_per_instance,
            decode_engine_num_gpu=sim.gpus_per_instance).validate()
        self.state = sla_planner.initial_state(self.cfg)
        self.perf = perf
        self.params.update(adjustment_interval_s=adjustment_interval_s, load_predictor=load_predictor,
                           load_prediction_window_size=self.cfg.window_size, ttft_target_ms=self.cfg.ttft_ms,
                           itl_target_ms=self.cfg.itl_ms, routing="round-robin",
                           deployment="aggregated (prefill + decode engines, each pool rounded up)")

    def setup(self, fleet: Fleet) -> None:
        super().setup(fleet)
        perf = self.perf = self.perf or fleet.perf
        budget = self.max_batched_tokens

        def ttft_ms(isl: int) -> float:
            chunks = [(min(budget, isl - done), done) for done in range(0, isl, budget)]
            return sum(perf.iteration_ms(0, 0.0, [c]) for c in chunks)

        max_len = fleet.instances[0].core.max_model_len if fleet.instances else 8192
        kv = fleet.instances[0].core.kv_capacity_tokens if fleet.instances else 400_000
        grid = np.geomspace(16, max_len, 40)
        g = self.sim.gpus_per_instance
        self.prefill_profile = sla_planner.prefill_profile(ttft_ms, grid, g)
        self.decode_profile = sla_planner.decode_profile(lambda b, c: perf.iteration_ms(b, b * c), grid,
                                                      self.max_batch_size, kv, g)
        fleet.schedule_tick("scale", self.cfg.adjustment_interval_s)

    def dispatch(self, fleet: Fleet, rid: str) -> SimInstance | None:
        return self.round_robin(fleet)

    def on_tick(self, fleet: Fleet, name: str) -> None:
        now, interval = fleet.now, self.cfg.adjustment_interval_s
        fleet.schedule_tick("scale", now + interval)
        snap = take_snapshot(fleet)
        self.state, desired, reason = sla_planner.decide(
            self.cfg, self.state, request_window(fleet, now - interval, now), len(snap.serving()),
            self.prefill_profile, self.decode_profile, sla_planner.saturated(snap))
        if desired is not None and desired != len(fleet.active(self.roles[0])):
            fleet.set_count(self.roles[0], desired, reason)


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
    ``B*`` of the lower bound, enough for both the slots and the prompt tokens per second arriving (least-loaded
    routing, never rejecting), BATCH instances leasing the backlog from
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
        # Every iteration of a busy instance carries B* decodes and a prefill chunk of min_prefill_tokens; a request
        # holds its slot for its prefill chunks and then one iteration per output token.
        ctx = lb["interactive_decode_context_tokens"]
        chunk = self.min_prefill_tokens
        step_s = perf.iteration_ms(self.b_int, self.b_int * ctx, [(chunk, int(ctx))]) / 1e3
        prompts = np.asarray(wl.interactive.prompt_tokens, dtype=float)
        service = (np.ceil(prompts / chunk) + np.maximum(np.asarray(wl.interactive.output_tokens, dtype=float) - 1, 0)) * step_s
        arrival = np.asarray(wl.interactive.arrival_s, dtype=float)
        grid, need = oracle.interactive_need(arrival, service, self.b_int, self.margin)
        # Prefill-bound traffic (long prompts, short outputs) needs instances for the prompt tokens per second.
        need = np.maximum(need, oracle.prefill_need(arrival, prompts, grid, wl.interactive_ttft_ms / 2e3,
                                                    chunk / step_s, self.margin))
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
               "+1 instance per 10 s interval while pooled freeness < 10, including while earlier ones still load (a "
               "loading instance has not reported and is unknown to the scheduler); -1 when the pooled freeness with the "
               "newest serving instance removed exceeds 60, its requests and waiting blocks pooled into the others and its "
               "used blocks taken from their free ones (AvgLoad.compute_load_metric_down). No request priorities (the "
               "paper's priority headroom is not in the code). Migration on (upstream default off), defrag form, "
               "defrag_constrained pairing, every 50 ms (polling interval): sources have a preempted request (the "
               "snapshot counts running and waiting requests ever preempted; upstream counts swapped and preempted "
               "waiting ones) or freeness < 3; a destination at its batch cap is skipped; the shortest decoding request "
               "moves (SR). Instance information is exact at each dispatch (Llumnix refreshes it every 50 ms: a stronger "
               "reading). Waiting blocks beyond 256 waiting requests are extrapolated from the first 256. Gateway-queue "
               "variant: the gateway's queued requests count as waiting requests in the pooled freeness, each with the "
               "engines' mean waiting-request blocks (none waiting: the workload's mean prompt).",
    "llumnix-tuned": "The llumnix policy over max batch size {128, 256, 512, 1024} × (scale-up, scale-down) freeness "
                     "thresholds {(2, 20), (10, 60), (50, 150), (150, 400)} × max_num_batched_tokens {2048, 8192} "
                     "(LLUMNIX_SWEEP), the best SLO attainment on the workload kept (ties: fewer GPU-seconds).",
    "queue-length": "KEDA's Prometheus query summed over pods (the chart's un-summed query fails with several pods); "
                    "HPA default behaviour; min 1 replica.",
    "kpa": "Concurrency = running + waiting requests of all pods; min-scale 1; least in-flight routing.",
    "sla-planner": "Aggregated deployment: n_prefill + n_decode engines of one type, each pool rounded up with its floor "
                   "of 1 (upstream's SLA mode is disaggregated only); profiles from our performance model (prefill at "
                   "the engine's token budget; decode up to its batch and KV limits; linear, not cubic, interpolation). "
                   "Load predictor as upstream: ARIMA by pmdarima auto_arima refitted on the last 50 intervals (the last "
                   "value below 5 points); constant and kalman selectable. ISL/OSL/duration/ITL from requests completed "
                   "in the interval, request count from arrivals (the frontend's counter). Correction factors as "
                   "upstream, clipped so they cannot shrink the fleet while an engine is at its batch or KV limit or "
                   "requests wait in the gateway queue (fair-comparison.md §7). Adjustment interval 180 s.",
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
