"""One fleet snapshot: everything a baseline autoscaler may read, as plain frozen data.

Each baseline in :mod:`simulator.baselines` is a pure decision function over a :class:`FleetSnapshot` (and
its own config and state), so it reads beside its upstream source and is tested with hand-built snapshots
and a fake clock. :func:`take_snapshot` builds one from a running :class:`~simulator.fleet.Fleet`; it is the
only place that reads the simulator's internals for the baselines.

Units: times in seconds (the fleet's virtual clock), KV in blocks (``block_size`` tokens each), counts in
requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from simulator.fleet import Fleet, SimInstance


@dataclass(frozen=True)
class InstanceSnapshot:
    """One engine instance. ``state``: ``loading`` | ``serving`` | ``draining``. ``waiting_blocks``: KV
    blocks the waiting requests still need; ``head_waiting_blocks``: the first waiting request's share;
    ``preempted``: running-or-waiting requests preempted at least once (vLLM's "killed" requests, Llumnix's
    migrate-out trigger). ``order``: start order (Llumnix removes the highest-numbered instance)."""

    iid: str
    state: str
    order: int
    num_running: int = 0
    num_waiting: int = 0
    max_num_seqs: int = 256
    free_blocks: int = 0
    total_blocks: int = 0
    waiting_blocks: float = 0.0
    head_waiting_blocks: float = 0.0
    preempted: int = 0

    @property
    def serving(self) -> bool:
        return self.state == "serving"


@dataclass(frozen=True)
class RequestWindow:
    """What a metrics endpoint (Prometheus over the frontend and engines) reports for ``[start_s, end_s)``:
    ``arrivals`` (requests that arrived), and over requests that *completed* in the window (the only ones whose
    lengths a real planner sees): ``completed``, mean ``isl`` / ``osl`` (tokens), mean ``duration_s``
    (arrival → last token); ``ttft_ms`` mean over first tokens in the window, ``itl_ms`` mean over completed
    requests' decode phases. NaN where nothing was observed."""

    start_s: float
    end_s: float
    arrivals: int = 0
    completed: int = 0
    isl: float = math.nan
    osl: float = math.nan
    duration_s: float = math.nan
    ttft_ms: float = math.nan
    itl_ms: float = math.nan


@dataclass(frozen=True)
class FleetSnapshot:
    """The fleet at ``now``. ``gateway_interactive`` / ``gateway_batch``: requests held in the gateway queue
    in front of the fleet (0 when the variant has none); ``inflight``: every accepted request not finished
    (engines plus gateway); ``budget_instances``: most instances the GPU budget allows."""

    now: float
    instances: tuple[InstanceSnapshot, ...]
    gateway_interactive: int = 0
    gateway_batch: int = 0
    budget_instances: int = 50
    block_size: int = 16

    def serving(self) -> tuple[InstanceSnapshot, ...]:
        return tuple(i for i in self.instances if i.state == "serving")

    def active(self) -> tuple[InstanceSnapshot, ...]:
        """Loading or serving (not draining): what a provider counts as the current replica count."""
        return tuple(i for i in self.instances if i.state != "draining")

    @property
    def engine_waiting(self) -> int:
        return sum(i.num_waiting for i in self.instances)

    @property
    def gateway_queued(self) -> int:
        return self.gateway_interactive + self.gateway_batch

    @property
    def inflight(self) -> int:
        return sum(i.num_running + i.num_waiting for i in self.instances) + self.gateway_queued


# Blocks of the waiting requests: exact up to this many, beyond it extrapolated from the first ones (a backlog
# of thousands changes Llumnix's freeness by far more than the sampling error).
_WAITING_SAMPLE = 256


def snapshot_instance(inst: SimInstance, order: int) -> InstanceSnapshot:
    """One instance's :class:`InstanceSnapshot`. Waiting blocks and preempted waiting requests are counted over
    the first ``_WAITING_SAMPLE`` waiting requests and scaled to the whole queue."""
    core = inst.core
    bs = core.config.block_size
    w = core.waiting
    wb = head = 0.0
    preempted = sum(1 for r in core.running if r.num_preemptions)
    if w:
        blocks = pre = n = 0
        for r in islice(w, _WAITING_SAMPLE):  # context_len spelled out: this loop is the baselines' hot path
            blocks += -(-(r.prompt_tokens + r.num_generated - r.num_computed) // bs)
            if r.num_preemptions:
                pre += 1
            n += 1
        head = float(-(-(w[0].context_len - w[0].num_computed) // bs))
        wb = blocks * len(w) / n
        preempted += round(pre * len(w) / n)
    return InstanceSnapshot(inst.iid, inst.state, order, len(core.running), len(w), core.max_num_seqs,
                            core.free_blocks, core.total_blocks, float(wb), head, preempted)


def take_snapshot(fleet: Fleet, instances: list[SimInstance] | None = None) -> FleetSnapshot:
    """The :class:`FleetSnapshot` of ``fleet`` now (instances in start order); ``instances`` limits it to
    those (a dispatch that reads only its candidates need not snapshot the whole fleet)."""
    gw = fleet.gateway
    insts = tuple(snapshot_instance(i, int(i.iid.rsplit("-", 1)[1]))
                  for i in (fleet.instances if instances is None else instances))
    return FleetSnapshot(fleet.now, insts, len(gw.interactive) if gw else 0, len(gw.batch) if gw else 0,
                         fleet.config.gpu_budget // fleet.config.gpus_per_instance,
                         fleet.instances[0].core.config.block_size if fleet.instances else 16)


def request_window(fleet: Fleet, start_s: float, end_s: float) -> RequestWindow:
    """The :class:`RequestWindow` of ``[start_s, end_s)`` over both request classes (a planner sees one
    frontend). Only completed requests contribute lengths and durations, as from Prometheus histograms."""
    arrivals = completed = 0
    isl, osl, dur, ttft, itl = [], [], [], [], []
    for rec, prompts in ((fleet.inter, fleet._ip), (fleet.batch, fleet._bp)):
        arr = rec.arrival
        arrivals += int(np.searchsorted(arr, end_s, side="left") - np.searchsorted(arr, start_s, side="left"))
        first = np.asarray(rec.first, dtype=float)
        done = np.asarray(rec.done, dtype=float)
        last = np.asarray(rec.last, dtype=float)
        tokens = np.asarray(rec.tokens, dtype=float)
        m = (first >= start_s) & (first < end_s)
        ttft.append((first[m] - arr[m]) * 1e3)
        d = (done >= start_s) & (done < end_s)
        completed += int(d.sum())
        isl.append(prompts[d].astype(float))
        osl.append(tokens[d])
        dur.append(done[d] - arr[d])
        k = d & (tokens > 1)
        itl.append((last[k] - first[k]) / (tokens[k] - 1) * 1e3)

    def mean(parts: list[np.ndarray]) -> float:
        x = np.concatenate(parts) if parts else np.empty(0)
        return float(x.mean()) if len(x) else math.nan

    return RequestWindow(start_s, end_s, arrivals, completed, mean(isl), mean(osl), mean(dur), mean(ttft), mean(itl))
