"""The ``chiron.v1.Queue`` gRPC service: a thin shell over :class:`~services.queue.core.QueueCore`.

The core holds the durable grouped store, the waiting-time estimator and the measured serving capacity (see
:mod:`services.queue.core`); this module turns its answers into protobuf messages, maps
:class:`~services.queue.store.QueueError` to gRPC status codes, counts Prometheus metrics, runs the maintenance
round in the background and serves ``chiron.v1.BatchApi`` beside it. The global scaler reads the per-group
estimates from ``GetStats`` / ``WatchStats``. Stats cost O(groups): the store keeps per-group aggregates (in
memory on SQLite, a summary table over PostgreSQL); the estimator's Monte-Carlo tables are rebuilt by the
maintenance round, not on the stats path.

The store is not thread-safe; every RPC runs on the server's single asyncio event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc

from chiron.v1 import batch_pb2_grpc, queue_pb2, queue_pb2_grpc, types_pb2
from services.common.grpc_util import status_code, timestamp
from services.common.metrics import QueueMetrics
from services.common.serving import RunningService, every_interval, start_server
from services.queue.batch_service import BatchApiService
from services.queue.batches import BatchStore
from services.queue.core import CapacityTracker, QueueCore
from services.queue.estimator import WaitingTimeEstimator
from services.queue.pg_store import is_postgres_url, open_store
from services.queue.store import QueueConfig, QueueError, QueueStore

log = logging.getLogger("chiron.queue")

_STATES = {"QUEUED": queue_pb2.QUEUED_REQUEST_STATE_QUEUED, "LEASED": queue_pb2.QUEUED_REQUEST_STATE_LEASED,
           "DONE": queue_pb2.QUEUED_REQUEST_STATE_DONE, "CANCELLED": queue_pb2.QUEUED_REQUEST_STATE_CANCELLED}


class QueueService(QueueCore, queue_pb2_grpc.QueueServicer):
    """Implements ``chiron.v1.Queue`` over a :class:`~services.queue.core.QueueCore` (see the module docstring)."""

    def __init__(self, store: QueueStore, estimator: WaitingTimeEstimator | None = None,
                 capacity: CapacityTracker | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(store, estimator, capacity, clock)
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
        """Run :meth:`QueueCore.maintain` every ``interval_s`` [s]."""
        while True:
            try:
                self.maintain()
            except Exception:  # keep the service alive; the next round retries
                log.exception("queue maintenance failed")
            await asyncio.sleep(interval_s)

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

    # ---- completions: the core's, counted in the metrics ------------------------------------
    def complete(self, request_id: str, lease_id: str, output: int | list[int]) -> int:
        count = super().complete(request_id, lease_id, output)
        self.metrics.done()
        return count

    def give_back(self, request_id: str, lease_id: str, generated_token_ids: list[int]) -> str:
        model = super().give_back(request_id, lease_id, generated_token_ids)
        self.metrics.returned.labels(model).inc()
        return model

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
        async for msg in every_interval(lambda: queue_pb2.QueueWatchStatsResponse(stats=self.stats()),
                                        request.interval_ms):
            yield msg


class RunningQueue(RunningService):
    service: QueueService

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop the server and the service, then close the store."""
        await super().stop(grace_s)
        self.service.store.close()


def answer_unavailable(servicer: Any, base: type) -> None:
    """Make every RPC of ``servicer`` (the methods ``base``, its generated servicer class, declares) answer gRPC
    UNAVAILABLE with the store's message when the database is gone (``QueueError("UNAVAILABLE")``), including the
    handlers that do not catch :class:`QueueError` themselves (Lease, GetStats, WatchStats, ...). Call before the
    servicer is added to a server."""
    for name, fn in vars(base).items():
        if name.startswith("_") or not callable(fn):
            continue
        method = getattr(servicer, name)
        if inspect.isasyncgenfunction(method):
            async def stream(request: Any, context: Any, _m: Any = method) -> Any:
                try:
                    async for item in _m(request, context):
                        yield item
                except QueueError as e:
                    if e.code != "UNAVAILABLE":
                        raise
                    await context.abort(grpc.StatusCode.UNAVAILABLE, e.message)
            setattr(servicer, name, stream)
        else:
            async def unary(request: Any, context: Any, _m: Any = method) -> Any:
                try:
                    return await _m(request, context)
                except QueueError as e:
                    if e.code != "UNAVAILABLE":
                        raise
                    await context.abort(grpc.StatusCode.UNAVAILABLE, e.message)
            setattr(servicer, name, unary)


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

    server, _health, bound = await start_server(add, name, host, port, before_start=lambda _h: service.start())
    log.info("queue serving on %s:%d (store %s)", host, bound, getattr(store, "url", config.db_path))
    return RunningQueue(server, service, bound)
