"""The global queue's domain core: the durable grouped store, the waiting-time estimator and the measured
serving capacity, without a transport.

* Requests live in a :class:`~services.queue.store.QueueStore` (SQLite) or
  :class:`~services.queue.pg_store.PgQueueStore` (PostgreSQL, several replicas): grouped by model and TTFT-SLO
  deadline bucket, served earliest-deadline-first and FIFO inside a group, handed out under leases that expire
  back into the queue.
* Waiting-time estimates come from :class:`~services.queue.estimator.WaitingTimeEstimator`, fed with the output
  lengths of acked requests. The serving capacity it assumes per model is measured (:class:`CapacityTracker`):
  output tokens acked (and returned) over the last ``window_s`` divided by that window, over as many slots as
  there are leases out; before the first ack, the configured prior or none (estimates then read ``inf``). On
  SQLite the tracker counts the acks this process sees; over PostgreSQL the served tokens are written in the ack /
  return transaction and read back from the database (``PgQueueStore.served_window``), so every replica measures
  the whole fleet's throughput and answers the same capacity.

:class:`QueueCore` is what the ``chiron.v1.Queue`` service (:mod:`services.queue.server`) serves and what the
fleet simulator drives in virtual time. Not thread-safe: one owner (an asyncio loop, or the simulator) calls it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.queue.estimator import GroupEstimate, ServingCapacity, WaitingTimeEstimator
from services.queue.store import QueueStore

log = logging.getLogger("chiron.queue")

LENGTHS_LAG_S = 5.0  # PostgreSQL: how far behind the newest ack seen the output-length pull looks again [s]
LENGTHS_HISTORY_S = 3600.0  # PostgreSQL: acks older than this at start-up are not read back [s]


@dataclass
class CapacityTracker:
    """Measured batch-serving capacity per model (tokens/s over ``window_s``, slots = leases out).

    ``prior_throughput_tokens_per_s``: assumed before any completion is seen (0 = unknown: no capacity).
    """

    window_s: float = 60.0
    prior_throughput_tokens_per_s: float = 0.0
    _events: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))
    _first_s: dict[str, float] = field(default_factory=dict)

    def record(self, model: str, tokens: int, now: float) -> None:
        """``tokens`` output tokens of ``model`` finished (acked or returned) at ``now`` [s]."""
        self._first_s.setdefault(model, now)
        self._events[model].append((now, tokens))

    def models(self) -> set[str]:
        """Models with completions recorded."""
        return set(self._events)

    def capacity(self, model: str, leased: int, now: float) -> ServingCapacity | None:
        """``model``'s capacity at ``now`` [s] with ``leased`` leases out; None when unknown (no completion in the
        window and no prior)."""
        ev = self._events.get(model)
        while ev and ev[0][0] < now - self.window_s:
            ev.popleft()
        if ev:
            return self.capacity_from(sum(t for _, t in ev), self._first_s[model], leased, now)
        return self.capacity_from(0.0, now, leased, now)

    def capacity_from(self, tokens: float, first_s: float, leased: int, now: float) -> ServingCapacity | None:
        """:meth:`capacity` from totals read elsewhere (the PostgreSQL store's served tokens, the same on every
        replica): ``tokens`` output tokens served over the last ``window_s``, the model's first served at
        ``first_s`` [s]. Throughput = ``tokens / min(window_s, max(now - first_s, 1))``."""
        slots = max(1, leased)
        if tokens > 0:
            span = min(self.window_s, max(now - first_s, 1.0))
            return ServingCapacity(tokens / span, slots, in_service=leased > 0)
        if self.prior_throughput_tokens_per_s > 0:
            return ServingCapacity(self.prior_throughput_tokens_per_s, slots, in_service=leased > 0)
        return None


class QueueCore:
    """The store, its estimator and capacity tracker, and the completion paths that feed them (module docstring).

    ``clock``: seconds (wall time in the service, virtual time in the simulator).
    """

    def __init__(self, store: QueueStore, estimator: WaitingTimeEstimator | None = None,
                 capacity: CapacityTracker | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.estimator = estimator or WaitingTimeEstimator()
        self.capacity = capacity or CapacityTracker()
        self.clock = clock
        # PostgreSQL: the store records served tokens in the ack / return transaction and answers the window's totals
        self._served_window = getattr(store, "served_window", None)
        # PostgreSQL: output lengths of requests acked through any replica, read back from the database (ack order),
        # so every replica's estimator learns the same lengths. A window of LENGTHS_LAG_S behind the newest one seen
        # catches acks that committed late; ids seen in it are skipped. History starts LENGTHS_HISTORY_S back.
        self._completed_since = getattr(store, "completed_since", None)
        self._lengths_cursor = self.clock() - LENGTHS_HISTORY_S
        self._lengths_seen: dict[str, float] = {}

    def maintain(self) -> int:
        """One maintenance round: fold the PostgreSQL store's deltas, learn the output lengths acked elsewhere,
        return expired leases to the queue and rebuild the estimator's tables (off the stats path). Returns the
        number of leases that expired."""
        compact = getattr(self.store, "compact", None)
        if compact is not None:  # PostgreSQL: fold the group deltas and served tokens (services/queue/pg_store.py)
            compact()
        if self._completed_since is not None:  # PostgreSQL: output lengths acked through any replica
            self._pull_lengths()
        n = self.store.expire_leases()
        if n:
            log.info("%d expired lease(s) returned to the queue", n)
        for model, cap in self.capacities().items():
            self.estimator.prepare(model, cap)
        return n

    # ---- estimates -------------------------------------------------------------------------
    def capacities(self, groups: list | None = None) -> dict[str, ServingCapacity]:
        """Serving capacity per model; ``groups``: :meth:`QueueStore.groups` if the caller has just read them."""
        now = self.clock()
        leased: dict[str, int] = defaultdict(int)
        models = set()
        for g in self.store.groups() if groups is None else groups:
            leased[g.model] += g.leased
            models.add(g.model)
        out = {}
        if self._served_window is not None:  # from the database: the same on every replica
            served = self._served_window(self.capacity.window_s, now)
            for m in models | set(served):
                tokens, first_s = served.get(m, (0.0, now))
                cap = self.capacity.capacity_from(tokens, first_s, leased[m], now)
                if cap is not None:
                    out[m] = cap
            return out
        models |= self.capacity.models()
        for m in models:
            cap = self.capacity.capacity(m, leased[m], now)
            if cap is not None:
                out[m] = cap
        return out

    def _pull_lengths(self) -> None:
        """Feed the estimator the output lengths of requests acked through any replica since the last pull."""
        new: dict[str, list[float]] = defaultdict(list)
        for rid, model, n, t in self._completed_since(self._lengths_cursor - LENGTHS_LAG_S):
            if rid not in self._lengths_seen:
                self._lengths_seen[rid] = t
                new[model].append(float(n))
                self._lengths_cursor = max(self._lengths_cursor, t)
        for model, lengths in new.items():
            self.estimator.observe(model, lengths)
        floor = self._lengths_cursor - LENGTHS_LAG_S  # no later query returns what finished before it
        for rid in [r for r, t in self._lengths_seen.items() if t <= floor]:
            del self._lengths_seen[rid]

    def group_estimates(self) -> tuple[list, list[GroupEstimate], dict[str, ServingCapacity]]:
        """The store's groups, each group's waiting-time estimate and the capacity per model."""
        if self._completed_since is not None:
            self._pull_lengths()
        groups = self.store.groups()
        caps = self.capacities(groups)
        snaps = [g.snapshot() for g in groups]
        est = self.estimator.refresh(snaps, caps, self.clock())
        return groups, est, caps

    # ---- completions -----------------------------------------------------------------------
    def complete(self, request_id: str, lease_id: str, output: int | list[int]) -> int:
        """Ack a leased request (``output``: all its output token ids, or their count) and feed its length to
        the estimator and its new tokens to the capacity tracker. Returns the output length [tokens]; raises
        :class:`~services.queue.store.QueueError`."""
        count, model, resume_tokens = self.store.ack_request(request_id, lease_id, output)
        if self._completed_since is None:  # else every replica reads it back from the database (_pull_lengths)
            self.estimator.observe(model, float(count))
        if self._served_window is None:  # else the store recorded them in the ack's transaction
            self.capacity.record(model, max(0, count - resume_tokens), self.clock())
        return count

    def give_back(self, request_id: str, lease_id: str, generated_token_ids: list[int]) -> str:
        """Return a leased request to the queue with its progress (eviction, drain); its new tokens count as
        served capacity. Returns the request's model; raises :class:`~services.queue.store.QueueError`."""
        model, resume_tokens = self.store.model_and_resume(request_id)
        self.store.return_request(request_id, lease_id, generated_token_ids)
        if self._served_window is None:  # else the store recorded them in the return's transaction
            self.capacity.record(model, max(0, len(generated_token_ids) - resume_tokens), self.clock())
        return model


__all__ = ["LENGTHS_HISTORY_S", "LENGTHS_LAG_S", "CapacityTracker", "QueueCore"]
