"""The ``chiron.v1.Queue`` gRPC service: the durable grouped store plus the waiting-time estimator.

* Requests live in :class:`~services.queue.store.QueueStore` (SQLite, WAL): durable before ``Enqueue``
  returns, grouped by model and TTFT-SLO deadline bucket, served earliest-deadline-first and FIFO inside a
  group, handed out under leases that expire back into the queue.
* Waiting-time estimates come from :class:`~services.queue.estimator.WaitingTimeEstimator`, fed with the
  output lengths of acked requests. The serving capacity it assumes per model is measured here: output
  tokens acked (and returned) over the last ``capacity_window_s`` divided by that window, over as many
  slots as there are leases out (:class:`CapacityTracker`); before the first ack, the configured prior
  (``prior_throughput_tokens_per_s``) or none (estimates then read ``inf``). The global scaler reads the
  per-group estimates from ``GetStats`` / ``WatchStats``. On SQLite the tracker counts the acks this process
  sees; over PostgreSQL (several replicas, one database) the served tokens are written in the ack / return
  transaction and read back from the database (``PgQueueStore.served_window``), so every replica measures the
  whole fleet's throughput and answers the same capacity.
* Stats cost O(groups): the store keeps per-group aggregates (in memory on SQLite, a summary table over
  PostgreSQL); the estimator's Monte-Carlo tables are rebuilt by a background task (``prepare``), not on the
  stats path.

The store is not thread-safe; every RPC runs on the server's single asyncio event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from chiron.v1 import batch_pb2_grpc, queue_pb2, queue_pb2_grpc, types_pb2
from services.common.grpc_util import create_server, mark_serving, settle_heap, status_code, timestamp
from services.common.metrics import QueueMetrics
from services.queue.batches import BatchApiService, BatchStore
from services.queue.estimator import GroupEstimate, ServingCapacity, WaitingTimeEstimator
from services.queue.pg_store import answer_unavailable, is_postgres_url, open_store
from services.queue.store import QueueConfig, QueueError, QueueStore

log = logging.getLogger("chiron.queue")

_STATES = {"QUEUED": queue_pb2.QUEUED_REQUEST_STATE_QUEUED, "LEASED": queue_pb2.QUEUED_REQUEST_STATE_LEASED,
           "DONE": queue_pb2.QUEUED_REQUEST_STATE_DONE, "CANCELLED": queue_pb2.QUEUED_REQUEST_STATE_CANCELLED}


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

    def capacity(self, model: str, leased: int, now: float) -> ServingCapacity | None:
        ev = self._events.get(model)
        while ev and ev[0][0] < now - self.window_s:
            ev.popleft()
        slots = max(1, leased)
        if ev:
            span = min(self.window_s, max(now - self._first_s[model], 1.0))
            tput = sum(t for _, t in ev) / span
            if tput > 0:
                return ServingCapacity(tput, slots, in_service=leased > 0)
        if self.prior_throughput_tokens_per_s > 0:
            return ServingCapacity(self.prior_throughput_tokens_per_s, slots, in_service=leased > 0)
        return None

    def capacity_from(self, tokens: float, first_s: float, leased: int, now: float) -> ServingCapacity | None:
        """:meth:`capacity` from totals read elsewhere (the PostgreSQL store's served tokens, the same on every
        replica): ``tokens`` output tokens served over the last ``window_s``, the model's first served at
        ``first_s`` [s]."""
        slots = max(1, leased)
        if tokens > 0:
            span = min(self.window_s, max(now - first_s, 1.0))
            return ServingCapacity(tokens / span, slots, in_service=leased > 0)
        if self.prior_throughput_tokens_per_s > 0:
            return ServingCapacity(self.prior_throughput_tokens_per_s, slots, in_service=leased > 0)
        return None


LENGTHS_LAG_S = 5.0  # PostgreSQL: how far behind the newest ack seen the output-length pull looks again [s]
LENGTHS_HISTORY_S = 3600.0  # PostgreSQL: acks older than this at start-up are not read back [s]


class QueueService(queue_pb2_grpc.QueueServicer):
    """Implements ``chiron.v1.Queue`` over a :class:`QueueStore` (see the module docstring)."""

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
        self._tasks: list[asyncio.Task] = []
        self.metrics = QueueMetrics(self.stats)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, maintenance_interval_s: float = 1.0) -> None:
        self._tasks.append(asyncio.create_task(self._maintenance(maintenance_interval_s), name="queue-maintenance"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    async def _maintenance(self, interval_s: float) -> None:
        """Return expired leases; rebuild the estimator's tables off the stats path."""
        while True:
            try:
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
            except Exception:  # keep the service alive; the next round retries
                log.exception("queue maintenance failed")
            await asyncio.sleep(interval_s)

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
        models |= set(self.capacity._events)
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
        if self._completed_since is not None:
            self._pull_lengths()
        groups = self.store.groups()
        caps = self.capacities(groups)
        snaps = [g.snapshot() for g in groups]
        est = self.estimator.refresh(snaps, caps, self.clock())
        return groups, est, caps

    def stats(self) -> queue_pb2.QueueStats:
        groups, estimates, caps = self.group_estimates()
        by_id = {g.group_id: g for g in groups}
        out = queue_pb2.QueueStats(time=timestamp(self.clock()))
        for e in estimates:
            g = by_id[e.group_id]
            out.queued += g.queued
            out.leased += g.leased
            out.groups.append(queue_pb2.GroupStats(
                group_id=g.group_id, model=g.model, size=g.queued, leased=g.leased,
                oldest_arrival=timestamp(g.oldest_arrival_s if g.oldest_arrival_s is not None else math.nan),
                deadline=timestamp(g.deadline_s),
                estimated_wait_mean_s=e.last_wait_mean_s, estimated_wait_p95_s=e.last_wait_quantile_s,
                slack_s=e.slack_s, projected_slo_violation=e.projected_violation))
        for model, cap in sorted(caps.items()):
            out.capacity.append(queue_pb2.ModelCapacity(model=model, throughput_tokens_per_s=cap.throughput_tokens_per_s,
                                                        slots=cap.slots))
        return out

    # ---- completions (the RPCs and the fleet simulator share these) -----------------------------
    def complete(self, request_id: str, lease_id: str, output: int | list[int]) -> int:
        """Ack a leased request (``output``: all its output token ids, or their count) and feed its length to
        the estimator and its new tokens to the capacity tracker. Returns the output length [tokens]; raises
        :class:`~services.queue.store.QueueError`."""
        count, model, resume_tokens = self.store.ack_request(request_id, lease_id, output)
        if self._completed_since is None:  # else every replica reads it back from the database (_pull_lengths)
            self.estimator.observe(model, float(count))
        if self._served_window is None:  # else the store recorded them in the ack's transaction
            self.capacity.record(model, max(0, count - resume_tokens), self.clock())
        self.metrics.done()
        return count

    def give_back(self, request_id: str, lease_id: str, generated_token_ids: list[int]) -> None:
        """Return a leased request to the queue with its progress (eviction, drain); its new tokens count as
        served capacity. Raises :class:`~services.queue.store.QueueError`."""
        model, resume_tokens = self.store.model_and_resume(request_id)
        self.store.return_request(request_id, lease_id, generated_token_ids)
        if self._served_window is None:  # else the store recorded them in the return's transaction
            self.capacity.record(model, max(0, len(generated_token_ids) - resume_tokens), self.clock())
        self.metrics.returned.labels(model).inc()

    # ---- RPCs --------------------------------------------------------------------------------
    async def _fail(self, context, e: QueueError):
        await context.abort(status_code(e.code), e.message)

    async def Enqueue(self, request: queue_pb2.EnqueueRequest, context):
        r = request.request
        rid = r.request_id or f"batch-{uuid.uuid4().hex}"
        try:
            rid, group = self.store.enqueue(rid, r.model, r.prompt_token_ids, r.max_tokens, r.slo.ttft_ms)
        except QueueError as e:
            await self._fail(context, e)
        self.metrics.enqueued.labels(r.model).inc()
        return queue_pb2.EnqueueResponse(request_id=rid, group_id=group, deadline=timestamp(self.store.deadline_s(rid)))

    async def Lease(self, request: queue_pb2.LeaseRequest, context):
        if request.max_requests == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_requests must be >= 1")
        timeout = request.lease_timeout_ms / 1e3 if request.lease_timeout_ms else None
        leases = self.store.lease(request.worker_id or context.peer(), int(request.max_requests),
                                  models=list(request.models) or None, lease_timeout_s=timeout)
        resp = queue_pb2.LeaseResponse()
        now = self.clock()
        for ls in leases:
            if ls.attempts == 0:  # its first lease: the batch request starts (its TTFT, as replay reports count it)
                self.metrics.first_lease(now - ls.arrival_s, now <= ls.deadline_s)
            resp.leases.append(queue_pb2.LeasedRequest(
                lease_id=ls.lease_id, group_id=ls.group_id, deadline=timestamp(ls.deadline_s),
                lease_expiry=timestamp(ls.lease_expiry_s), attempts=ls.attempts,
                request=types_pb2.InferenceRequest(
                    request_id=ls.request_id, model=ls.model, prompt_token_ids=list(ls.prompt_token_ids),
                    max_tokens=ls.max_tokens, resume_token_ids=list(ls.resume_token_ids),
                    slo=types_pb2.SLO(ttft_ms=ls.ttft_slo_ms), request_class=types_pb2.REQUEST_CLASS_BATCH,
                    arrival_time=timestamp(ls.arrival_s))))
        return resp

    async def Ack(self, request: queue_pb2.AckRequest, context):
        output = list(request.output_token_ids) if request.output_token_ids else int(request.output_tokens)
        try:
            self.complete(request.request_id, request.lease_id, output)
        except QueueError as e:
            await self._fail(context, e)
        return queue_pb2.AckResponse()

    async def Return(self, request: queue_pb2.ReturnRequest, context):
        try:
            self.give_back(request.request_id, request.lease_id, list(request.generated_token_ids))
        except QueueError as e:
            await self._fail(context, e)
        log.info("request %s returned to the queue with %d tokens (%s)", request.request_id,
                 len(request.generated_token_ids), request.reason or "no reason given")
        return queue_pb2.ReturnResponse()

    async def Renew(self, request: queue_pb2.RenewRequest, context):
        timeout = request.lease_timeout_ms / 1e3 if request.lease_timeout_ms else None
        try:
            expiry = self.store.renew_lease(request.request_id, request.lease_id, timeout)
        except QueueError as e:
            await self._fail(context, e)
        return queue_pb2.RenewResponse(lease_expiry=timestamp(expiry))

    async def Cancel(self, request: queue_pb2.CancelRequest, context):
        try:
            cancelled = self.store.cancel(request.request_id)
        except QueueError as e:
            await self._fail(context, e)
        if cancelled:
            self.metrics.cancelled()
        return queue_pb2.CancelResponse(cancelled=cancelled)

    async def GetRequest(self, request: queue_pb2.GetRequestRequest, context):
        try:
            info = self.store.get(request.request_id)
        except QueueError as e:
            await self._fail(context, e)
        resp = queue_pb2.GetRequestResponse(
            request_id=request.request_id, state=_STATES[info.state], group_id=info.group_id,
            position=info.position, deadline=timestamp(info.deadline_s), attempts=info.attempts,
            num_generated_tokens=info.resume_tokens)
        arrival, first, finished = self.store.times_s(request.request_id)
        resp.arrival.CopyFrom(timestamp(arrival))
        if first is not None:
            resp.first_leased.CopyFrom(timestamp(first))
        if finished is not None:
            resp.finished.CopyFrom(timestamp(finished))
        if info.state == "DONE":
            resp.num_generated_tokens = info.output_tokens or 0
            output = self.store.get_tokens(request.request_id)[1]
            if output:
                resp.output_token_ids.extend(output)
        if info.position >= 0:
            cap = self.capacities().get(info.model)
            if cap is None:
                resp.estimated_wait_mean_s = resp.estimated_wait_p95_s = math.inf
            else:
                est = self.estimator.estimate(info.model, int(info.position), cap)
                resp.estimated_wait_mean_s, resp.estimated_wait_p95_s = est.mean_s, est.quantile_s
        return resp

    async def GetStats(self, request, context):
        return queue_pb2.QueueGetStatsResponse(stats=self.stats())

    async def WatchStats(self, request: queue_pb2.QueueWatchStatsRequest, context):
        interval = max(request.interval_ms or 1000, 50) / 1e3
        while True:
            yield queue_pb2.QueueWatchStatsResponse(stats=self.stats())
            await asyncio.sleep(interval)


@dataclass
class RunningQueue:
    server: grpc.aio.Server
    service: QueueService
    port: int

    async def stop(self, grace_s: float = 1.0) -> None:
        await self.server.stop(grace_s)
        await self.service.stop()
        self.service.store.close()


async def serve(config: QueueConfig, host: str = "127.0.0.1", port: int = 0,
                capacity: CapacityTracker | None = None, estimator: WaitingTimeEstimator | None = None,
                max_file_bytes: int = 64 * 2**20) -> RunningQueue:
    """Open the store (recovering what a previous process left) and serve ``chiron.v1.Queue`` and
    ``chiron.v1.BatchApi`` (files and batches in the same database; uploads up to ``max_file_bytes``) with health
    checking and reflection. ``port`` 0 picks a free port. Raises ValueError for a bad config."""
    config.validate()
    store = open_store(config)  # SQLite file, or PostgreSQL for a postgresql:// URL (services/queue/pg_store.py)
    service = QueueService(store, estimator, capacity)
    batch_api = BatchApiService(BatchStore(store, max_file_bytes), service.metrics)
    if is_postgres_url(config.db_path):  # a lost database answers UNAVAILABLE on every RPC; the store reconnects
        answer_unavailable(service, queue_pb2_grpc.QueueServicer)
        answer_unavailable(batch_api, batch_pb2_grpc.BatchApiServicer)
    name = queue_pb2.DESCRIPTOR.services_by_name["Queue"].full_name

    def add(s: grpc.aio.Server) -> None:
        queue_pb2_grpc.add_QueueServicer_to_server(service, s)
        batch_pb2_grpc.add_BatchApiServicer_to_server(batch_api, s)

    server, health_servicer, bound = create_server(add, name, host, port)
    await service.start()
    await server.start()
    settle_heap()
    await mark_serving(health_servicer, name)
    log.info("queue serving on %s:%d (store %s)", host, bound, getattr(store, "url", config.db_path))
    return RunningQueue(server, service, bound)
