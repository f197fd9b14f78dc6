"""Discrete-event fleet simulator: many engine instances, one scaling policy, a workload, in virtual time.

What runs here is the product's own decision code, imported, never copied (``../shared/DESIGN.md`` §3):

* every instance is a :class:`~services.engine.core.EngineCore` (the simulated backend's continuous-batching
  scheduler and fitted A100 performance model), advanced with :meth:`EngineCore.advance` (bulk steady-decode
  iterations between events, identical to stepping one iteration at a time);
* its local autoscaler is :func:`services.engine.local_autoscaler.decide`, fed by the engine agent's builder
  (:func:`~services.engine.local_autoscaler.observation`: ITL quantile, output tokens/s, saturation);
* Chiron's batch path is the queue's own core (:class:`~services.queue.core.QueueCore` over an
  in-memory :class:`~services.queue.store.QueueStore`, its waiting-time estimator and capacity tracker) with
  the batch worker's leasing and eviction rules (:func:`~services.engine.batch_rules.lease_room`,
  :func:`~services.engine.batch_rules.eviction_need`, :func:`~services.engine.batch_rules.eviction_order`);
* routing and scaling come from the policy (:mod:`simulator.policies`): Chiron's policy calls the router's
  :func:`~services.router.routing.choose_instance` and the global scaler's :func:`~services.global_scaler.policy.decide`;
  baselines are peers behind the same interface.

What the simulator adds, and why (each a modelling choice, documented in the report's ``model`` section):

* **Model load time.** A started instance holds its GPU for ``model_load_time_s`` before it serves
  (``../shared/notes/hardware.md``: order of 30 s for an 8B model). GPU-seconds count from start to release.
* **Leases never expire** (no instance fails in the simulator). **Eviction on MIXED instances** moves the batch
  request's KV cache to host memory; leased again, it pays the host-to-GPU copy (``EngineCore``'s
  ``host_kv_tokens``) instead of recomputing its prefill. The copy-out costs the evicting instance nothing.
* **Drain.** An instance being removed takes no new work; its not-yet-started requests are dispatched again
  (batch work under Chiron goes back to the queue with its progress) and it is released once empty.
* **Metrics.** An interactive request meets its SLO when its TTFT and mean ITL are within the workload's SLOs
  (a rejected one misses it); a batch request when its first token comes within its TTFT SLO. ITL percentiles
  are over interactive output tokens.
"""

from __future__ import annotations

import heapq
import math
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.engine.batch_rules import eviction_need, eviction_order, lease_room
from services.engine.core import EngineConfig, EngineCore
from services.engine.local_autoscaler import LocalAutoscalerConfig, decide, initial_state, observation
from services.engine.perf_model import PerfModel, default_perf_model
from services.engine.stats import LatencyWindow, weighted_statistic
from services.queue.core import CapacityTracker, QueueCore
from services.queue.estimator import WaitingTimeEstimator
from services.queue.store import QueueConfig, QueueStore
from simulator.results import build_report
from simulator.workloads import Workload


class FleetPolicy(Protocol):
    """What the fleet asks of a scaling policy (implemented by :class:`simulator.policies.FleetPolicy`; defined
    here so that the fleet does not import the policies, which import it)."""

    name: str
    roles: tuple[str, ...]
    uses_queue: bool
    local_autoscaler: bool
    params: dict

    def setup(self, fleet: Fleet) -> None: ...

    def engine_setup(self, role: str) -> tuple[EngineConfig, LocalAutoscalerConfig | None]: ...

    def dispatch(self, fleet: Fleet, rid: str) -> SimInstance | None: ...

    def on_tick(self, fleet: Fleet, name: str) -> None: ...

ROLES = ("interactive", "mixed", "batch", "uniform")

# How a baseline's fleet takes requests (fair-comparison.md §2): straight into the engines' own waiting queues
# on arrival (``engine-queue``), through a gateway queue in front of the fleet that dispatches when an instance
# has room (``gateway-queue``), or on arrival with interactive work ahead of batch work in every engine's
# waiting queue (``priority``, vLLM's ``--scheduling-policy priority`` with batch at low priority).
VARIANTS = ("engine-queue", "gateway-queue", "priority")
# An instance has room for a gateway-queued request while its batch is below its cap and fewer than this many
# requests wait in it: llm-d's saturation detector's default queue-depth threshold (5).
GATEWAY_QUEUE_DEPTH = 5


@dataclass(frozen=True)
class SimConfig:
    """Fleet-level settings (units in names). :meth:`validate` raises ValueError.

    ``model_load_time_s``: start → serving of a new instance; ``gpu_budget``: most GPUs at once (the paper's
    cap is 50); ``initial_instances``: serving instances at t = 0 (each policy decides from there);
    ``sample_interval_s``: time-series resolution; ``max_sim_s``: stop even if work remains (default: the
    workload's span plus ``drain_limit_s``); ``itl_window``: how many (ITL, count) samples to keep for the
    ITL percentiles (older ones are decimated, so memory stays bounded).
    """

    model: str = "llama-3-8b"
    model_load_time_s: float = 30.0
    gpu_budget: int = 50
    gpus_per_instance: int = 1
    initial_instances: int = 2
    sample_interval_s: float = 10.0
    drain_limit_s: float = 4 * 3600.0
    max_sim_s: float | None = None
    seed: int = 0

    def validate(self) -> SimConfig:
        if not self.model_load_time_s >= 0:
            raise ValueError(f"model_load_time_s must be >= 0 (got {self.model_load_time_s})")
        if self.gpu_budget < 1 or self.gpus_per_instance < 1:
            raise ValueError("gpu_budget and gpus_per_instance must be >= 1")
        if self.initial_instances < 0 or self.initial_instances * self.gpus_per_instance > self.gpu_budget:
            raise ValueError(f"initial_instances must be in [0, gpu_budget / gpus_per_instance] (got {self.initial_instances})")
        if not self.sample_interval_s > 0:
            raise ValueError("sample_interval_s must be > 0")
        return self


class SimInstance:
    """One engine instance in the simulator: an EngineCore plus what its agent keeps (local autoscaler state,
    control-interval windows, leased batch requests)."""

    def __init__(self, iid: str, role: str, core: EngineCore, la: LocalAutoscalerConfig | None, start_s: float,
                 ready_s: float) -> None:
        self.iid = iid
        self.role = role
        self.core = core
        self.la = la
        self.la_state = initial_state(la) if la is not None else None
        if la is not None:
            core.set_max_num_seqs(la.initial_batch_size)
        self.start_s = start_s
        self.ready_s = ready_s
        self.end_s: float | None = None
        self.state = "loading" if ready_s > start_s else "serving"
        self.busy = False  # an iteration is in flight
        self.ctl_itl_ms: list[float] = []
        self.ctl_itl_n: list[int] = []
        self.ctl_decode_ms: list[float] = []  # of those, iterations that prefilled nothing (decode-only)
        self.ctl_decode_n: list[int] = []
        self.ctl_tokens = 0
        self.ttft = LatencyWindow(10.0)
        self.prompts = LatencyWindow(10.0)  # prompt tokens of the interactive requests it accepted (engine stats)
        self.finished_total = 0
        self.batch_finished_total = 0  # leased batch requests finished here (Chiron)
        self.leases: dict[str, str] = {}  # batch request id → lease id (Chiron's queue)
        self.lease_started: dict[str, float] = {}
        self.interactive_waiting = 0  # interactive requests dispatched here without a first token yet
        self.decisions = 0

    @property
    def serving(self) -> bool:
        return self.state == "serving"

    @property
    def num_running(self) -> int:
        return len(self.core.running)

    @property
    def num_waiting(self) -> int:
        return len(self.core.waiting)

    @property
    def max_batch_size(self) -> int:
        return self.core.max_num_seqs


class GatewayQueue:
    """The queue in front of a baseline's fleet (variant ``gateway-queue``): two FIFO bands, interactive
    ahead of batch (llm-d's flow control orders bands by priority; FIFO inside). Entries: (request id,
    output tokens already generated elsewhere)."""

    def __init__(self) -> None:
        self.interactive: deque[tuple[str, int]] = deque()
        self.batch: deque[tuple[str, int]] = deque()

    def __len__(self) -> int:
        return len(self.interactive) + len(self.batch)

    def push(self, rid: str, resumed: int = 0) -> None:
        (self.interactive if rid[0] == "i" else self.batch).append((rid, resumed))

    def pop(self) -> tuple[str, int]:
        return self.interactive.popleft() if self.interactive else self.batch.popleft()


class _Records:
    """Per-request outcomes indexed by the request's number within its class: Python lists while the run goes
    (element access on them is several times cheaper than on numpy arrays, and it is per token event), numpy
    arrays after :meth:`finalize`. Times in virtual seconds; NaN = not yet."""

    def __init__(self, arrival: np.ndarray) -> None:
        n = len(arrival)
        self.arrival = arrival
        self.arrival_list: list[float] = arrival.tolist()
        self.first: list[float] | np.ndarray = [math.nan] * n
        self.last: list[float] | np.ndarray = [math.nan] * n
        self.done: list[float] | np.ndarray = [math.nan] * n
        self.tokens: list[int] | np.ndarray = [0] * n
        self.rejected: list[bool] | np.ndarray = [False] * n

    def finalize(self) -> None:
        self.first = np.asarray(self.first, dtype=float)
        self.last = np.asarray(self.last, dtype=float)
        self.done = np.asarray(self.done, dtype=float)
        self.tokens = np.asarray(self.tokens, dtype=np.int64)
        self.rejected = np.asarray(self.rejected, dtype=bool)


class Fleet:
    """The simulated cluster. Policies read it and act through :meth:`start_instance`, :meth:`drain`,
    :meth:`submit`, :meth:`migrate` and (Chiron) :attr:`queue`. Times are virtual seconds."""

    def __init__(self, workload: Workload, policy: FleetPolicy, config: SimConfig | None = None,
                 perf: PerfModel | None = None) -> None:
        self.config = cfg = (config or SimConfig()).validate()
        self.workload = workload
        self.policy = policy
        self.perf = perf or default_perf_model(cfg.model)
        self.now = 0.0
        self.instances: list[SimInstance] = []
        self.retired: list[SimInstance] = []
        self._n_started = 0
        self._heap: list[tuple[float, int, str, object]] = []
        self._seq = 0
        wi, wb = workload.interactive, workload.batch
        self.inter = _Records(np.asarray(wi.arrival_s, dtype=float))
        self.batch = _Records(np.asarray(wb.arrival_s, dtype=float))
        self._ip, self._io = np.asarray(wi.prompt_tokens, dtype=np.int64), np.asarray(wi.output_tokens, dtype=np.int64)
        self._bp, self._bo = np.asarray(wb.prompt_tokens, dtype=np.int64), np.asarray(wb.output_tokens, dtype=np.int64)
        self._next_i = 0
        self._next_b = 0
        self.itl_ms = array("d")  # interactive ITL samples [ms] and their token counts
        self.itl_n = array("d")
        self.timeseries: list[dict] = []
        self.scale_events: list[dict] = []
        self.evicted = 0
        self.migrated = 0
        self.host_kv: dict[str, int] = {}  # evicted batch request → KV tokens kept in host memory
        self.queued_batch = 0  # Chiron: batch requests queued (not leased)
        self.queue: QueueCore | None = None
        if policy.uses_queue:
            store = QueueStore(QueueConfig(":memory:", lease_timeout_s=1e12, max_prompt_tokens=1 << 30,
                                           capacity=max(2_000_000, len(wb) + 1)), clock=lambda: self.now)
            self.queue = QueueCore(store, WaitingTimeEstimator(), CapacityTracker(), clock=lambda: self.now)
        variant = getattr(policy, "variant", "engine-queue")  # checked by the policy (_VllmFleet)
        self.gateway: GatewayQueue | None = GatewayQueue() if variant == "gateway-queue" else None
        self.priority_interactive = variant == "priority"
        self._ticks: dict[str, float] = {}

    # ---- instances -------------------------------------------------------------------------
    def start_instance(self, role: str, warm: bool = False) -> SimInstance | None:
        """Start an instance of ``role`` (serving after the model load time unless ``warm``). None if the GPU
        budget is used up."""
        if self.gpus_in_use() + self.config.gpus_per_instance > self.config.gpu_budget:
            return None
        ecfg, la = self.policy.engine_setup(role)
        self._n_started += 1
        iid = f"{role}-{self._n_started}"
        ready = self.now if warm else self.now + self.config.model_load_time_s
        inst = SimInstance(iid, role, EngineCore(self.perf, ecfg), la, self.now, ready)
        self.instances.append(inst)
        if inst.state == "loading":
            self._push(ready, "ready", inst)
        else:
            self._on_ready(inst)
        return inst

    def gpus_in_use(self) -> int:
        return len(self.instances) * self.config.gpus_per_instance

    def active(self, role: str | None = None) -> list[SimInstance]:
        """Instances not draining (loading or serving), optionally of one role."""
        return [i for i in self.instances if i.state != "draining" and (role is None or i.role == role)]

    def serving(self, role: str | None = None) -> list[SimInstance]:
        return [i for i in self.instances if i.state == "serving" and (role is None or i.role == role)]

    def set_count(self, role: str, count: int, reason: str = "") -> None:
        """Provider semantics (as :class:`~services.global_scaler.local_provider.LocalProvider`): start or
        drain instances of ``role`` until ``count`` are loading or serving; newest (loading first) go first."""
        live = self.active(role)
        before = len(live)
        while len(live) < count:
            inst = self.start_instance(role)
            if inst is None:
                break
            live.append(inst)
        while len(live) > count:
            inst = next((i for i in reversed(live) if i.state == "loading"), live[-1])
            live.remove(inst)
            self.drain(inst)
        if len(live) != before:
            self.scale_events.append({"t_s": self.now, "role": role, "from": before, "to": len(live), "reason": reason})

    def drain(self, inst: SimInstance) -> None:
        """Stop giving ``inst`` work; re-dispatch what has not started there; release it once empty."""
        if inst.state == "loading":
            inst.state = "draining"
            self._release(inst)
            return
        inst.state = "draining"
        for rid in list(inst.leases):  # Chiron batch work goes back to the queue with its progress
            if rid in inst.core.requests:  # (one the in-flight iteration finishes is acked when it ends)
                self._return_batch(inst, rid, keep_kv=False)
        for req in list(inst.core.waiting):  # not started here: send it elsewhere, with any progress it has
            inst.core.remove(req.request_id)
            if req.request_id[0] == "i" and req.first_token_s is None:
                inst.interactive_waiting = max(0, inst.interactive_waiting - 1)
            self._dispatch(req.request_id, req.num_generated)
        self._maybe_release(inst)

    def _release(self, inst: SimInstance) -> None:
        inst.end_s = self.now
        if inst in self.instances:
            self.instances.remove(inst)
        self.retired.append(inst)

    def _on_ready(self, inst: SimInstance) -> None:
        if inst.state == "loading":
            inst.state = "serving"
        if inst.state == "serving":
            self._fill(inst)
            if self.gateway:
                self._drain_gateway(inst)

    # ---- requests ----------------------------------------------------------------------------
    def request(self, rid: str) -> tuple[str, int, int, int]:
        """(class, index, prompt tokens, output tokens) of a request id (``i<n>`` interactive, ``b<n>`` batch)."""
        k, idx = rid[0], int(rid[1:])
        if k == "i":
            return k, idx, int(self._ip[idx]), int(self._io[idx])
        return k, idx, int(self._bp[idx]), int(self._bo[idx])

    def submit(self, inst: SimInstance, rid: str, resumed_tokens: int = 0, host_kv_tokens: int = 0) -> None:
        """Put request ``rid`` on ``inst`` (the policy chose it)."""
        k, _idx, prompt, output = self.request(rid)
        inst.core.add_request(rid, prompt, output, self.now, resumed_tokens, host_kv_tokens,
                              priority=k == "i" and (inst.role == "mixed" or self.priority_interactive),
                              interactive=k == "i")
        if k == "i":
            inst.interactive_waiting += 1
            inst.prompts.add(self.now, prompt)
            if inst.role == "mixed" and inst.leases:
                self._make_room(inst, 1)
        self._kick(inst)

    def migrate(self, src: SimInstance, dst: SimInstance, rid: str) -> None:
        """Live-migrate a running request: its KV cache moves to ``dst`` (cost: the host-link copy)."""
        req = src.core.remove(rid)
        if req is None:
            return
        dst.core.add_request(rid, req.prompt_tokens, req.max_tokens, self.now, req.num_generated,
                             host_kv_tokens=req.num_computed, interactive=req.interactive)
        if req.num_generated == 0 and rid[0] == "i":
            src.interactive_waiting = max(0, src.interactive_waiting - 1)
            dst.interactive_waiting += 1
        self.migrated += 1
        self._kick(dst)
        self._maybe_release(src)

    def has_room(self, inst: SimInstance) -> bool:
        """A gateway-queued request may go to ``inst`` now (serving, below its cap, a short waiting queue)."""
        return inst.state == "serving" and inst.num_waiting < GATEWAY_QUEUE_DEPTH \
            and inst.num_running + inst.num_waiting < inst.max_batch_size

    def _drain_gateway(self, inst: SimInstance | None = None) -> None:
        """Dispatch gateway-queued requests, interactive band first, while ``inst`` (or, with None, the
        instance the policy picks among those with room) has room."""
        gw = self.gateway
        while gw:
            if inst is not None:
                if not self.has_room(inst):
                    return
                target = inst
            else:
                target = self.policy.dispatch(self, (gw.interactive or gw.batch)[0][0])
                if target is None:
                    return
            rid, resumed = gw.pop()
            self.submit(target, rid, resumed)

    def _dispatch(self, rid: str, resumed_tokens: int = 0) -> None:
        if self.gateway is not None:  # held in the gateway until an instance has room (never rejected)
            self.gateway.push(rid, resumed_tokens)
            self._drain_gateway()
            return
        inst = self.policy.dispatch(self, rid)
        if inst is None:
            k, idx = rid[0], int(rid[1:])
            (self.inter if k == "i" else self.batch).rejected[idx] = True
            return
        self.submit(inst, rid, resumed_tokens)

    def _kick(self, inst: SimInstance) -> None:
        if not inst.busy and inst.state != "loading" and inst.core.has_work():
            self._start_step(inst)

    # ---- Chiron's batch path -------------------------------------------------------------------
    def _fill(self, inst: SimInstance) -> None:
        """Lease batch work onto a BATCH or MIXED instance while it has room (the batch worker's rule)."""
        if self.queue is None or inst.role not in ("batch", "mixed") or not inst.serving or self.queued_batch <= 0:
            return
        if inst.role == "mixed" and inst.interactive_waiting > 0:
            return
        room = lease_room(inst.max_batch_size, inst.num_running, inst.num_waiting)
        if room <= 0:
            return
        leases = self.queue.store.lease(inst.iid, room, lease_timeout_s=1e12)
        self.queued_batch -= len(leases)
        for ls in leases:
            rid = ls.request_id
            inst.leases[rid] = ls.lease_id
            inst.lease_started[rid] = self.now
            resumed = len(ls.resume_token_ids)
            _k, _idx, prompt, output = self.request(rid)
            inst.core.add_request(rid, prompt, output, self.now, resumed, self.host_kv.pop(rid, 0))
        if leases:
            self._kick(inst)

    def _return_batch(self, inst: SimInstance, rid: str, keep_kv: bool) -> None:
        req = inst.core.remove(rid)
        lease = inst.leases.pop(rid)
        inst.lease_started.pop(rid, None)
        n = req.num_generated if req is not None else 0
        self.queue.give_back(rid, lease, [0] * n)
        if keep_kv and req is not None and req.num_computed:
            self.host_kv[rid] = req.num_computed
        self.queued_batch += 1

    def _make_room(self, inst: SimInstance, n: int) -> None:
        need = eviction_need(n, inst.max_batch_size, inst.num_running, inst.num_waiting - n, inst.interactive_waiting - n)
        if need <= 0:
            return
        # Only requests still in the engine: one the in-flight iteration finishes is acked when it ends.
        reqs = inst.core.requests
        victims = sorted((rid for rid in inst.leases if rid in reqs),
                         key=lambda rid: eviction_order(True, reqs[rid].num_generated, inst.lease_started[rid]))
        for rid in victims[:need]:
            self._return_batch(inst, rid, keep_kv=True)
            self.evicted += 1

    # ---- event loop --------------------------------------------------------------------------------
    def _push(self, t: float, kind: str, obj: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, obj))

    def schedule_tick(self, name: str, at_s: float) -> None:
        """Run ``policy.on_tick(fleet, name)`` at ``at_s`` (policies' periodic hooks)."""
        self._ticks[name] = at_s
        self._push(at_s, "tick", name)

    def _horizon(self) -> float:
        """Earliest time something external may change an instance: the next arrival or policy/control tick."""
        h = min(self._ticks.values()) if self._ticks else math.inf
        ia, ba = self.inter.arrival_list, self.batch.arrival_list
        if self._next_i < len(ia):
            h = min(h, ia[self._next_i])
        if self._next_b < len(ba):
            h = min(h, ba[self._next_b])
        return h

    def _start_step(self, inst: SimInstance) -> None:
        res = inst.core.advance(self.now, self._horizon(), all_events=False)
        if not res.events and res.duration_s == 0:
            return  # nothing schedulable now; an arrival or a finish elsewhere kicks it again
        inst.busy = True
        self._push(res.end_s, "step", (inst, res))

    def _on_step(self, inst: SimInstance, res) -> None:
        inst.busy = False
        t = res.end_s
        durs = res.step_durations_s or (res.duration_s,)
        finished_any = False
        inter, batch = self.inter, self.batch
        # Sparse events (advance(all_events=False)): a request's first token and its finish; the token and ITL
        # counts come with the result. A request's last token is its finish, and its output count there is its
        # total (resumed tokens included); one still running when the run stops is settled in _settle_unfinished.
        for ev in res.events:
            rid = ev.request_id
            k = rid[0]
            idx = int(rid[1:])
            rec = inter if k == "i" else batch
            if ev.first:
                if rec.first[idx] != rec.first[idx]:  # NaN: the request's first token anywhere
                    rec.first[idx] = t
                if k == "i":
                    inst.ttft.add(t, (t - rec.arrival_list[idx]) * 1e3)
                    inst.interactive_waiting = max(0, inst.interactive_waiting - 1)
            if ev.finished:
                finished_any = True
                rec.last[idx] = t
                rec.tokens[idx] = ev.num_generated
                rec.done[idx] = t
                inst.finished_total += 1
                if k == "b" and rid in inst.leases:
                    inst.batch_finished_total += 1
                    self.queue.complete(rid, inst.leases.pop(rid), ev.num_generated)
                    inst.lease_started.pop(rid, None)
        inst.ctl_tokens += res.num_tokens
        n_itl_all, n_itl_inter = res.num_itl, res.num_itl_interactive
        ms = [d * 1e3 for d in durs]
        if inst.la is not None and n_itl_all:  # the local autoscaler's samples (an engine without one keeps none)
            inst.ctl_itl_ms.extend(ms)
            inst.ctl_itl_n.extend([n_itl_all] * len(ms))
            if res.num_prefill_tokens == 0:
                inst.ctl_decode_ms.extend(ms)
                inst.ctl_decode_n.extend([n_itl_all] * len(ms))
        if n_itl_inter:
            self.itl_ms.extend(ms)
            self.itl_n.extend([float(n_itl_inter)] * len(ms))
        if inst.state == "draining":
            self._maybe_release(inst)
        elif finished_any or inst.role in ("batch", "mixed"):
            self._fill(inst)
        if self.gateway and inst.state == "serving":
            self._drain_gateway(inst)
        if inst.state != "draining" or inst.core.has_work():
            self._kick(inst)

    def _maybe_release(self, inst: SimInstance) -> None:
        if inst.state == "draining" and not inst.core.requests and not inst.busy:
            self._release(inst)

    def _control(self) -> None:
        """Every instance's local autoscaler (one control interval)."""
        for inst in self.instances:
            if inst.la is None or inst.state != "serving":
                continue
            interval = inst.la.control_interval_s
            q = (weighted_statistic(np.asarray(inst.ctl_itl_ms), np.asarray(inst.ctl_itl_n, dtype=float), inst.la.itl_quantile)
                 if inst.ctl_itl_ms else math.nan)
            dq = (weighted_statistic(np.asarray(inst.ctl_decode_ms), np.asarray(inst.ctl_decode_n, dtype=float), None)
                  if inst.ctl_decode_ms else math.nan)
            obs = observation(self.now, q, inst.ctl_tokens, interval, inst.core.saturated, len(inst.core.running),
                              decode_itl_ms=dq)
            inst.la_state, d = decide(inst.la, inst.la_state, obs)
            inst.core.set_max_num_seqs(d.max_batch_size)
            inst.ctl_itl_ms, inst.ctl_itl_n, inst.ctl_tokens = [], [], 0
            inst.ctl_decode_ms, inst.ctl_decode_n = [], []
            self._fill(inst)
            self._kick(inst)

    def _sample(self) -> None:
        row: dict = {"t_s": self.now}
        for role in self.policy.roles:
            row[role] = sum(1 for i in self.instances if i.role == role)
        row["loading"] = sum(1 for i in self.instances if i.state == "loading")
        row["draining"] = sum(1 for i in self.instances if i.state == "draining")
        row["queued_batch"] = self.queued_batch if self.queue is not None else sum(
            sum(1 for r in i.core.waiting if r.request_id[0] == "b") for i in self.instances) + (
            len(self.gateway.batch) if self.gateway else 0)
        row["gateway_queued"] = len(self.gateway) if self.gateway else 0
        row["running"] = sum(i.num_running for i in self.instances)
        row["waiting"] = sum(i.num_waiting for i in self.instances)
        caps = [i.max_batch_size for i in self.instances if i.serving]
        row["mean_max_batch_size"] = float(np.mean(caps)) if caps else 0.0
        self.timeseries.append(row)

    def _work_left(self) -> bool:
        if self._next_i < len(self.inter.arrival) or self._next_b < len(self.batch.arrival):
            return True
        if self.queued_batch > 0 or self.gateway:
            return True
        return any(i.core.requests or i.busy for i in self.instances)

    def run(self, progress: Callable[[float], None] | None = None) -> dict:
        """Simulate until every request is done (or ``max_sim_s``); returns the report (DESIGN.md §4 + series)."""
        t_wall = time.perf_counter()
        cfg = self.config
        end_limit = cfg.max_sim_s if cfg.max_sim_s is not None else self.workload.duration_s + cfg.drain_limit_s
        self.policy.setup(self)
        la_interval = min((i.la.control_interval_s for i in self.instances if i.la is not None), default=None)
        if la_interval is None and self.policy.local_autoscaler:
            la_interval = 1.0
        if la_interval:
            self._ticks["control"] = la_interval
            self._push(la_interval, "control", la_interval)
        self._push(0.0, "sample")
        ia, ba = self.inter.arrival_list, self.batch.arrival_list
        n_i, n_b = len(ia), len(ba)
        last_progress = 0.0
        while True:
            t_heap = self._heap[0][0] if self._heap else math.inf
            t_i = ia[self._next_i] if self._next_i < n_i else math.inf
            t_b = ba[self._next_b] if self._next_b < n_b else math.inf
            t = min(t_heap, t_i, t_b)
            if t == math.inf or t > end_limit or not self._work_left():
                break  # (a pending policy tick after the last completion does not extend the run)
            self.now = t
            if t_b <= t_heap and t_b <= t_i:
                self._arrive_batch()
            elif t_i <= t_heap:
                rid = f"i{self._next_i}"
                self._next_i += 1
                self._dispatch(rid)
            else:
                _, _, kind, obj = heapq.heappop(self._heap)
                if kind == "step":
                    inst, res = obj
                    self._on_step(inst, res)
                elif kind == "ready":
                    self._on_ready(obj)
                elif kind == "control":
                    self._control()
                    if self._work_left():
                        self._ticks["control"] = t + obj
                        self._push(t + obj, "control", obj)
                    else:
                        self._ticks.pop("control", None)
                elif kind == "tick":
                    if self._ticks.get(obj) == t:
                        del self._ticks[obj]
                        if self._work_left():
                            self.policy.on_tick(self, obj)
                elif kind == "sample":
                    self._sample()
                    if self._work_left():
                        self._push(t + cfg.sample_interval_s, "sample")
            if progress is not None and t - last_progress >= 60.0:
                last_progress = t
                progress(t)
            if not self._heap and not self._work_left():
                break
        self._sample()
        self._settle_unfinished()
        self.inter.finalize()
        self.batch.finalize()
        return build_report(self, time.perf_counter() - t_wall)

    def _settle_unfinished(self) -> None:
        """Output tokens and last-token times of requests still in an engine when the run stops (``max_sim_s``
        or the drain limit): the sparse step events only carry them at a finish. (A batch request back in the
        queue with progress made keeps that progress uncounted.)"""
        for inst in self.instances:
            for req in inst.core.requests.values():
                rid = req.request_id
                rec = self.inter if rid[0] == "i" else self.batch
                idx = int(rid[1:])
                rec.tokens[idx] = req.num_generated
                if req.last_token_s is not None:
                    rec.last[idx] = req.last_token_s

    def _arrive_batch(self) -> None:
        """Every batch request arriving now (a backlog at one instant is taken in one go)."""
        ba = self.batch.arrival
        start = self._next_b
        end = int(np.searchsorted(ba, self.now, side="right"))
        self._next_b = end
        if self.queue is not None:
            rows = [(f"b{i}", self.config.model, (1,), int(self._bo[i]), max(1, round(self.workload.batch_ttft_s * 1e3)))
                    for i in range(start, end)]
            for k in range(0, len(rows), 50_000):
                self.queue.store.enqueue_many(rows[k:k + 50_000])
            self.queued_batch += len(rows)
            for inst in self.instances:
                self._fill(inst)
        else:
            for i in range(start, end):
                self._dispatch(f"b{i}")
