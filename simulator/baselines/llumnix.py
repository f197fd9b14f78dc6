"""Llumnix's global scheduler (AlibabaPAI/llumnix) as pure decisions over one
:class:`~simulator.baselines.snapshot.FleetSnapshot`: load-based dispatch, migration pairing and ``avg_load``
auto-scaling, read against the source at tag v0.1.0 = ``312edd8a`` (2024-12-05) and HEAD ``24220fb8``
(2025-08-13); ``../shared/notes/baselines.md`` §1 sums them up.

Where the code is, at 312edd8a (HEAD keeps the same rules, with the sign of the load flipped):

* freeness (the ``remaining_steps`` load metric, in KV blocks per request): ``llumnix/instance_info.py``,
  ``DispatchAndScalingLoadComputation`` (dispatch and scaling) and ``MigrationLoadComputation`` (migration,
  ``enable_defrag`` form); HEAD: ``llumnix/load_computation.py``, ``RemainingStepsLoad``. v0.1.0 stores the
  load as ``-F`` and negates the user's thresholds (``llumnix/internal_config.py``,
  ``GlobalSchedulerConfig``); here F is kept positive and the comparisons are flipped accordingly.
* dispatch: ``llumnix/global_scheduler/dispatch_scheduler.py``, ``Load.dispatch`` on the instances sorted by
  load (the least loaded, i.e. the freest, first).
* migration: ``llumnix/global_scheduler/migration_filter.py`` (``LoadConstrainedFilter``: sources have a
  killed, i.e. preempted, request *or* a load above the migrate-out threshold; destinations have no killed
  request and a load below it), ``migration_policy.py`` (``DefragConstrained``: sources by load descending,
  destinations ascending, i-th with i-th, no further check), ``llumlet/local_migration_scheduler.py`` (which
  running request leaves: ``SR`` = the shortest running decode request).
* scaling: ``llumnix/global_scheduler/scaling_scheduler.py``, ``ScalingScheduler.check_scale`` with
  ``AvgLoad`` (HEAD moved the policies to ``scaling_policy.py``, unchanged): scale up when the pooled load is
  above the up threshold (freeness below it), else scale down by one when the load "after removing the last
  instance" (``AvgLoad.compute_load_metric_down``) is below the down threshold (freeness above it). That
  load *keeps* every instance's requests and waiting blocks, takes the last instance's whole KV capacity out
  of the pooled free blocks (so its used blocks land on the others, floored at 0), and drops its watermark.
* defaults: ``llumnix/config/default.py`` (``_C.MANAGER.*``).

Units: KV blocks, requests, seconds. Everything here reads only the snapshot, the config and the state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from simulator.baselines.snapshot import FleetSnapshot, InstanceSnapshot

SCALING_POLICIES = ("avg_load", "max_load", "min_load")
REQUEST_MIGRATION_POLICIES = ("SR", "LR", "LCR")


@dataclass(frozen=True)
class LlumnixConfig:
    """Llumnix's manager options (defaults from ``llumnix/config/default.py`` @312edd8a unless said).

    ``scale_up_threshold`` / ``scale_down_threshold``: ``SCALE_UP_THRESHOLD`` 10 / ``SCALE_DOWN_THRESHOLD`` 60
    (freeness, blocks per request). ``scaling_interval_s``: ``SCALING_INTERVAL`` 10. ``scaling_policy``:
    ``SCALING_POLICY`` ``avg_load`` (``max_load``; ``min_load`` is in the code only). ``migration_interval_s``:
    ``POLLING_INTERVAL`` 0.05 × ``PAIR_MIGRATION_FREQUENCY`` 1. ``migrate_out_threshold``:
    ``MIGRATE_OUT_THRESHOLD`` 3.0. ``enable_migration``: ``ENABLE_MIGRATION`` is False by default; the paper's
    Llumnix migrates, so on here, in its ``enable_defrag`` form (``ENABLE_DEFRAG`` False by default) with
    ``PAIR_MIGRATION_POLICY`` ``defrag_constrained`` (without defrag upstream forces the ``balanced`` pairing,
    which needs each instance's last running request's blocks: not modelled). ``request_migration_policy``:
    ``REQUEST_MIGRATION_POLICY`` ``SR``. ``watermark_fraction``: the engine's watermark (Llumnix reports vLLM's
    ``block_manager.watermark_blocks``, ``llumnix/backends/vllm/scheduler.py``; vLLM's default watermark
    0.01 of the blocks). ``min_instances``: ``MIN_INSTANCES`` 1. Dispatch is ``DISPATCH_POLICY`` ``load``
    (``topk_random_dispatch`` 1 at HEAD: the argmax).

    ``gateway_prompt_tokens`` (this simulator's, not Llumnix's): mean prompt tokens assumed for a request
    held in a gateway queue in front of the fleet when no engine has a waiting request to estimate it from
    (see :func:`gateway_demand`)."""

    scale_up_threshold: float = 10.0
    scale_down_threshold: float = 60.0
    scaling_interval_s: float = 10.0
    scaling_policy: str = "avg_load"
    migration_interval_s: float = 0.05
    migrate_out_threshold: float = 3.0
    enable_migration: bool = True
    request_migration_policy: str = "SR"
    watermark_fraction: float = 0.01
    min_instances: int = 1
    gateway_prompt_tokens: float = 0.0

    def validate(self) -> LlumnixConfig:
        if not self.scale_down_threshold > self.scale_up_threshold:
            raise ValueError("scale_down_threshold must exceed scale_up_threshold "
                             f"(got {self.scale_up_threshold:g} / {self.scale_down_threshold:g})")
        if not self.scaling_interval_s > 0 or not self.migration_interval_s > 0:
            raise ValueError("scaling_interval_s and migration_interval_s must be > 0")
        if self.scaling_policy not in SCALING_POLICIES:
            raise ValueError(f"unknown scaling_policy {self.scaling_policy!r}; valid: {', '.join(SCALING_POLICIES)}")
        if self.request_migration_policy not in REQUEST_MIGRATION_POLICIES:
            raise ValueError(f"unknown request_migration_policy {self.request_migration_policy!r}; "
                             f"valid: {', '.join(REQUEST_MIGRATION_POLICIES)}")
        if not 0 <= self.watermark_fraction < 1:
            raise ValueError(f"watermark_fraction must be in [0, 1) (got {self.watermark_fraction})")
        if self.min_instances < 1:
            raise ValueError(f"min_instances must be >= 1 (got {self.min_instances})")
        if not self.gateway_prompt_tokens >= 0:
            raise ValueError(f"gateway_prompt_tokens must be >= 0 (got {self.gateway_prompt_tokens})")
        return self


@dataclass(frozen=True)
class LlumnixState:
    """What the last scaling check saw (for reports; the rule itself keeps no memory): the freeness of the up
    and down tests, and the number of checks."""

    checks: int = 0
    last_up: float = math.nan
    last_down: float = math.nan


# ---- freeness ------------------------------------------------------------------------------------------------
def watermark_blocks(cfg: LlumnixConfig, inst: InstanceSnapshot) -> float:
    return cfg.watermark_fraction * inst.total_blocks


def _remaining_steps(available_blocks: float, num_requests: int) -> float:
    """Blocks per request; +inf with no request (upstream returns a load of -inf: the least loaded)."""
    return math.inf if num_requests == 0 else available_blocks / num_requests


def freeness(cfg: LlumnixConfig, inst: InstanceSnapshot) -> float:
    """Dispatch and scaling form: ``(free - watermark - blocks of all waiting) / (running + waiting)``."""
    return _remaining_steps(inst.free_blocks - watermark_blocks(cfg, inst) - inst.waiting_blocks,
                            inst.num_running + inst.num_waiting)


def migration_freeness(cfg: LlumnixConfig, inst: InstanceSnapshot) -> float:
    """Migration form with defragmentation ("virtual usage"): only the head-of-line waiting request counts,
    ``(free - watermark - blocks of the first waiting) / (running + [any waiting])``."""
    return _remaining_steps(inst.free_blocks - watermark_blocks(cfg, inst) - inst.head_waiting_blocks,
                            inst.num_running + (1 if inst.num_waiting else 0))


# ---- dispatch ------------------------------------------------------------------------------------------------
def dispatch(cfg: LlumnixConfig, snap: FleetSnapshot, among: Sequence[str] | None = None) -> str | None:
    """Instance id for a new request: the freest serving instance (``among`` restricts the choice, e.g. to
    instances with room for a gateway-queued request); ties go to the earliest started, as upstream's stable
    sort of the instance table does. None when there is none."""
    allowed = None if among is None else set(among)
    insts = [i for i in snap.serving() if allowed is None or i.iid in allowed]
    if not insts:
        return None
    best = min(insts, key=lambda i: (-freeness(cfg, i), i.order))
    return best.iid


# ---- migration -----------------------------------------------------------------------------------------------
def migration_pairs(cfg: LlumnixConfig, snap: FleetSnapshot) -> list[tuple[str, str]]:
    """(source, destination) instance ids, as ``LoadConstrainedFilter`` + ``DefragConstrained``: sources have a
    preempted request or migration freeness below ``migrate_out_threshold``; destinations have no preempted
    request and freeness above it; sources from the least free, destinations from the freest, paired in
    order. One filter of this simulator's: a destination already holding ``max_num_seqs`` requests is left
    out (it could not run the request it takes)."""
    insts = snap.serving()
    if not cfg.enable_migration or len(insts) < 2:
        return []
    f = {i.iid: migration_freeness(cfg, i) for i in insts}
    thr = cfg.migrate_out_threshold
    src = [i for i in insts if i.preempted > 0 or f[i.iid] < thr]
    dst = [i for i in insts if i.preempted == 0 and f[i.iid] > thr
           and i.num_running + i.num_waiting < i.max_num_seqs]
    src.sort(key=lambda i: f[i.iid])  # most loaded (least free) first; stable on start order
    dst.sort(key=lambda i: -f[i.iid])  # least loaded (freest) first
    return [(s.iid, d.iid) for s, d in zip(src, dst, strict=False)]


@dataclass(frozen=True)
class RunningRequest:
    """A running request on a migration source: ``length`` = prompt + generated tokens (``request_len``),
    ``decoding``: past its prefill (only decode requests migrate upstream)."""

    request_id: str
    length: int
    decoding: bool = True


def migrate_out_request(cfg: LlumnixConfig, running: Sequence[RunningRequest]) -> str | None:
    """Which running request leaves a source (``LocalMigrationScheduler``, running queue in its order): ``SR``
    the shortest, ``LR`` the longest, ``LCR`` the last; None when no request is decoding."""
    cands = [r for r in running if r.decoding]
    if not cands:
        return None
    if cfg.request_migration_policy == "SR":
        return min(cands, key=lambda r: r.length).request_id
    if cfg.request_migration_policy == "LR":
        return max(cands, key=lambda r: r.length).request_id
    return cands[-1].request_id


# ---- scaling -------------------------------------------------------------------------------------------------
def gateway_demand(cfg: LlumnixConfig, snap: FleetSnapshot) -> tuple[int, float]:
    """(requests, KV blocks) held in a gateway queue in front of the fleet, counted as waiting demand in the
    pooled freeness (upstream has no such queue: its waiting requests sit in the engines, and there they
    count). Blocks per request: the mean of the engines' waiting requests, else ``gateway_prompt_tokens``."""
    q = snap.gateway_queued
    if q == 0:
        return 0, 0.0
    serving = snap.serving()
    nw = sum(i.num_waiting for i in serving)
    per = (sum(i.waiting_blocks for i in serving) / nw if nw
           else math.ceil(cfg.gateway_prompt_tokens / snap.block_size))
    return q, q * per


def _pooled(cfg: LlumnixConfig, insts: Sequence[InstanceSnapshot], gw_requests: int, gw_blocks: float,
            without: InstanceSnapshot | None = None) -> float:
    """``compute_load_metric_avg`` (``without`` None) or ``AvgLoad.compute_load_metric_down`` (``without`` =
    the instance to remove) as freeness: requests and waiting blocks of every instance pooled; the removed
    instance's capacity taken out of the free blocks (floored at 0) and its watermark dropped."""
    n = sum(i.num_running + i.num_waiting for i in insts) + gw_requests
    waiting = sum(i.waiting_blocks for i in insts) + gw_blocks
    free = sum(i.free_blocks - (i.total_blocks if i is without else 0) for i in insts)
    if without is not None:
        free = max(0, free)
    wm = sum(watermark_blocks(cfg, i) for i in insts if i is not without)
    return _remaining_steps(free - wm - waiting, n)


def scale(cfg: LlumnixConfig, state: LlumnixState, snap: FleetSnapshot) -> tuple[LlumnixState, int, str]:
    """One ``check_scale``: (new state, instance delta, reason). Over the serving instances (those reporting
    instance information; a loading one is not yet known to the scheduler). +1 when the up test's freeness is
    below ``scale_up_threshold`` (upstream adds empty instances of infinite capacity until the pooled load is
    fine: always one), else -1 when the down test's freeness is above ``scale_down_threshold`` and more than
    ``min_instances`` are active. The delta is clipped to the GPU budget."""
    insts = snap.serving()
    if not insts:
        return state, 0, "no instance reports load"
    if cfg.scaling_policy == "avg_load":
        q, qb = gateway_demand(cfg, snap)
        last = max(insts, key=lambda i: i.order)
        up = _pooled(cfg, insts, q, qb)
        down = _pooled(cfg, insts, q, qb, without=last) if len(insts) > 1 else -math.inf
    else:
        f = [freeness(cfg, i) for i in insts]
        up = down = min(f) if cfg.scaling_policy == "max_load" else max(f)
    state = replace(state, checks=state.checks + 1, last_up=up, last_down=down)
    active = len(snap.active())
    if up < cfg.scale_up_threshold:
        if active >= snap.budget_instances:
            return state, 0, f"{cfg.scaling_policy} freeness {up:.2f} < {cfg.scale_up_threshold:g}, at the GPU budget"
        return state, 1, f"{cfg.scaling_policy} freeness {up:.2f} < {cfg.scale_up_threshold:g}"
    if down > cfg.scale_down_threshold and active > cfg.min_instances and len(insts) > 1:
        what = "pooled without the last instance" if cfg.scaling_policy == "avg_load" else "freeness"
        return state, -1, f"{cfg.scaling_policy} {what} {down:.2f} > {cfg.scale_down_threshold:g}"
    return state, 0, ""
