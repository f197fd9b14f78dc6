"""Batch work on BATCH and MIXED engine agents: lease from the global queue, serve, renew, ack; evict and return.

DESIGN.md §1 "Batch path" and "Eviction". A :class:`BatchWorker` runs as asyncio tasks inside the engine agent
process, next to the gRPC service, and talks to the backend directly (batch requests do not go through
``Engine.Generate``):

* **Leasing.** While the engine has room (:func:`~services.engine.batch_rules.lease_room`: ``running + waiting < max_batch_size`` from
  ``backend.snapshot()`` and fewer than ``lease_batch`` requests waiting in the engine, so work it cannot start
  stays in the global queue; on a MIXED instance also only while no interactive request waits for admission) it leases up to
  ``min(room, lease_batch)`` requests of its model. Without room it sleeps until a request finishes (a step
  listener and its own completions wake it) or ``poll_interval_s`` passes; with an empty queue it polls every
  ``poll_interval_s``. No busy loop.
* **Serving.** Each lease becomes ``backend.generate(BackendRequest(...))`` resuming after the lease's
  ``resume_token_ids``; the lease is renewed every ``lease_timeout_s / 3`` while the request runs, and on
  completion the request is acked with all its output tokens (resumed ones included). A lease the queue says is
  lost (FAILED_PRECONDITION / NOT_FOUND on renew or ack: it expired and went elsewhere, or was cancelled) is
  logged and dropped, and its generation stopped.
* **Eviction** (:meth:`BatchWorker.make_room`, MIXED only): when an interactive request arrives at the cap, or
  behind a queue of interactive requests below it (:func:`~services.engine.batch_rules.eviction_need`), running
  batch requests with the least progress are evicted from the backend and returned to the queue with every
  token generated so far, so they resume elsewhere rather than restart.
* **Drain** (:meth:`BatchWorker.drain`): stop leasing, evict everything still running and return it with its
  progress; returns once the queue has it back (bounded by ``drain_timeout_s``).
* **Queue failures** (UNAVAILABLE, deadlines, ...) are logged and retried with exponential backoff up to
  ``max_backoff_s``; nothing here raises into the agent. A request whose ack never gets through is not lost:
  its lease expires and the queue serves it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from chiron.v1 import queue_pb2, queue_pb2_grpc, types_pb2
from services.common.failover import FailoverChannel
from services.engine.backend import Backend, BackendRequest, Progress, StepStats
from services.engine.batch_rules import DRAINING, EVICTED_FOR_INTERACTIVE, eviction_need, eviction_order, lease_room
from services.engine.core import RequestRejected

log = logging.getLogger("chiron.engine.batch")

_ROLES = {"batch": types_pb2.INSTANCE_ROLE_BATCH, "mixed": types_pb2.INSTANCE_ROLE_MIXED}
# Answers that retrying cannot change: the lease is gone (expired and re-queued, cancelled, done) or the call is bad.
_FINAL = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
_MIN_BACKOFF_S = 0.05
# Output tokens per chunk of a batch request's stream (BackendRequest.stream_interval; vLLM coalesces in its output
# processor): the worker needs the output, not each token as it comes, and coalescing saves frontend CPU
# (docs/decisions/0044-batch-stream-interval.md). An eviction keeps only the tokens already handed back, so up to 7
# are generated again elsewhere; the first token still comes at once (batch TTFT).
_BATCH_STREAM_INTERVAL = 8


@dataclass(eq=False)
class _Job:
    """One leased request on this engine. ``tokens``: every output token so far (the lease's resume tokens first)."""

    lease: queue_pb2.LeasedRequest
    tokens: list[int]
    resumed: int
    started_s: float  # backend clock, when the job was created
    ttft_ms: float = 0.0  # backend-clock ms from the lease to its first new token
    submitted: bool = False  # handed to backend.generate
    evict_reason: str | None = None  # set by make_room / drain: return it with its progress
    progress: Progress | None = None
    lease_lost: bool = False
    task: asyncio.Task | None = None

    @property
    def request_id(self) -> str:
        return self.lease.request.request_id

    @property
    def lease_id(self) -> str:
        return self.lease.lease_id


class Agent(Protocol):
    """What the worker reads of the engine agent it runs in (:class:`~services.engine.server.EngineAgent`)."""

    backend: Backend
    interactive_waiting: int  # interactive requests waiting for their first token


class BatchWorker:
    """Serves batch requests leased from the ``chiron.v1.Queue`` at ``queue_address`` (``host:port``, or several
    replicas' addresses separated by commas: calls fail over between them, :mod:`services.common.failover`) on one
    engine.

    ``agent_or_backend``: the :class:`~services.engine.server.EngineAgent` it runs in (preferred: a MIXED worker
    then sees the agent's waiting interactive requests) or a bare :class:`~services.engine.backend.Backend`.
    ``role``: ``INSTANCE_ROLE_BATCH`` / ``INSTANCE_ROLE_MIXED`` (or "batch" / "mixed"). ``lease_batch``: most
    requests per Lease call; ``lease_timeout_s``: lease visibility timeout [s] (renewed every third of it);
    ``poll_interval_s``: idle polling period [s]; ``rpc_timeout_s``: deadline of one queue call [s];
    ``max_backoff_s``: longest wait between retries of a failed queue call [s]; ``drain_timeout_s``: the most
    :meth:`drain` waits for returns and acks to reach the queue [s].

    Counters (attributes, since start): ``leased``, ``acked``, ``returned``; also ``evicted`` (by
    :meth:`make_room`), ``renewed``, ``lost`` (leases the queue no longer honoured: work dropped), ``rejected``
    (leased requests the backend refused; returned) and ``queue_errors`` (failed queue calls, retried).
    """

    def __init__(self, agent_or_backend: Agent | Backend, queue_address: str, instance_id: str, model: str,
                 role: int | str, *, lease_batch: int = 8, lease_timeout_s: float = 60.0, poll_interval_s: float = 0.2,
                 rpc_timeout_s: float = 5.0, max_backoff_s: float = 5.0, drain_timeout_s: float = 30.0) -> None:
        if isinstance(agent_or_backend, Backend):
            self.agent: Agent | None = None
            self.backend = agent_or_backend
        else:
            self.agent = agent_or_backend
            self.backend = agent_or_backend.backend
        role = _ROLES.get(role.lower(), -1) if isinstance(role, str) else role
        if role not in (types_pb2.INSTANCE_ROLE_BATCH, types_pb2.INSTANCE_ROLE_MIXED):
            raise ValueError(f"a batch worker runs on a BATCH or MIXED instance, not role {role!r}")
        if not queue_address:
            raise ValueError("queue_address must be host:port of the chiron.v1.Queue service")
        if not instance_id or not model:
            raise ValueError("instance_id and model must be non-empty")
        if int(lease_batch) != lease_batch or lease_batch < 1:
            raise ValueError(f"lease_batch must be an integer >= 1 (requests), got {lease_batch}")
        for name, v in (("lease_timeout_s", lease_timeout_s), ("poll_interval_s", poll_interval_s),
                        ("rpc_timeout_s", rpc_timeout_s), ("max_backoff_s", max_backoff_s),
                        ("drain_timeout_s", drain_timeout_s)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {v}")
        if lease_timeout_s < 0.003:
            raise ValueError(f"lease_timeout_s must be >= 0.003 s (renewed every third of it), got {lease_timeout_s}")
        self.queue_address = queue_address
        self.instance_id = instance_id
        self.model = model
        self.role = role
        self.lease_batch = int(lease_batch)
        self.lease_timeout_s = float(lease_timeout_s)
        self.poll_interval_s = float(poll_interval_s)
        self.rpc_timeout_s = float(rpc_timeout_s)
        self.max_backoff_s = float(max_backoff_s)
        self.drain_timeout_s = float(drain_timeout_s)
        self.leased = self.acked = self.returned = 0
        self.evicted = self.renewed = self.lost = self.rejected = self.queue_errors = 0
        self._jobs: dict[str, _Job] = {}  # by lease id
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._channel: FailoverChannel | None = None
        self._stub: queue_pb2_grpc.QueueStub | None = None
        self._loop_task: asyncio.Task | None = None
        self._drain_task: asyncio.Future | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the queue channel and start leasing (idempotent). The queue need not be up yet."""
        if self._loop_task is not None or self._stopping:
            return
        # Reconnect as often as we retry, and at least once a second (a restarted queue is used again at once).
        backoff_ms = min(1000, max(100, round(self.max_backoff_s * 1e3)))
        # Several queue replicas (one database): "a:1,b:2"; a call UNAVAILABLE at one is made at the next.
        self._channel = FailoverChannel(self.queue_address, options=[
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", backoff_ms)])
        self._stub = queue_pb2_grpc.QueueStub(self._channel)
        self.backend.add_step_listener(self._on_step)
        self._loop_task = asyncio.create_task(self._lease_loop(), name=f"batch-worker-{self.instance_id}")
        log.info("batch worker %s (%s) leasing %s from %s", self.instance_id, types_pb2.InstanceRole.Name(self.role),
                 self.model, self.queue_address)

    async def drain(self) -> None:
        """Stop leasing; evict every batch request still on the engine and return it to the queue with its
        progress; wait (at most ``drain_timeout_s``) until those returns and any pending acks are done. Idempotent;
        afterwards the worker is stopped."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._drain_task)

    async def _drain(self) -> None:
        self._stopping = True
        self._stop.set()
        self._wake.set()
        if self._loop_task is not None:
            done, _ = await asyncio.wait({self._loop_task}, timeout=self.rpc_timeout_s + 1.0)
            if not done:  # stuck in a queue call: leases it got expire back into the queue
                self._loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._loop_task
        jobs = list(self._jobs.values())
        n = 0
        for job in jobs:
            if job.evict_reason is None and not job.lease_lost:
                n += await self._evict(job, DRAINING)
        tasks = [j.task for j in jobs if j.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.drain_timeout_s)
            for t in pending:
                log.warning("batch worker %s: %s did not reach the queue within %.1f s; its lease will expire "
                            "and the queue serves it again", self.instance_id, t.get_name(), self.drain_timeout_s)
                t.cancel()
            for t in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        if self._loop_task is not None:
            with contextlib.suppress(ValueError):
                self.backend.remove_step_listener(self._on_step)
        if self._channel is not None:
            await self._channel.close()
        if jobs:
            log.info("batch worker %s drained: %d request(s) evicted and returned to the queue", self.instance_id, n)

    # ---- state ---------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Leased requests being served on this engine."""
        return len(self._jobs)

    def stats(self) -> dict[str, int]:
        return {"leased": self.leased, "acked": self.acked, "returned": self.returned, "evicted": self.evicted,
                "renewed": self.renewed, "lost": self.lost, "rejected": self.rejected,
                "queue_errors": self.queue_errors, "active": self.active}

    def _interactive_waiting(self) -> int:
        if self.agent is not None:
            return self.agent.interactive_waiting
        # Bare backend: anything waiting beyond our own not-yet-started requests is someone else's.
        ours = sum(1 for j in self._jobs.values() if len(j.tokens) == j.resumed)
        return max(0, self.backend.snapshot().num_waiting - ours)

    def room(self) -> int:
        """Requests this engine could take now: ``max_batch_size - running - waiting`` (0 on a MIXED instance
        while interactive work waits for admission, and once draining)."""
        if self._stopping:
            return 0
        if self.role == types_pb2.INSTANCE_ROLE_MIXED and self._interactive_waiting() > 0:
            return 0
        snap = self.backend.snapshot()
        unsubmitted = sum(1 for j in self._jobs.values() if not j.submitted)
        return lease_room(snap.max_batch_size, snap.num_running, snap.num_waiting + unsubmitted, self.lease_batch)

    def wake(self) -> None:
        """Re-check for room now (e.g. an interactive request finished or got admitted)."""
        self._wake.set()

    def _on_step(self, s: StepStats) -> None:
        if s.num_finished:
            self._wake.set()

    # ---- leasing ---------------------------------------------------------------------------
    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` unless the worker stops first."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _wait_for_room(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval_s)

    async def _lease_loop(self) -> None:
        assert self._stub is not None
        backoff = _MIN_BACKOFF_S
        timeout_ms = max(1, round(self.lease_timeout_s * 1e3))
        while not self._stopping:
            try:
                self._wake.clear()
                room = self.room()
                if room <= 0:
                    await self._wait_for_room()
                    continue
                want = min(room, self.lease_batch)
                try:
                    resp = await self._stub.Lease(queue_pb2.LeaseRequest(
                        worker_id=self.instance_id, max_requests=want, models=[self.model], lease_timeout_ms=timeout_ms),
                        timeout=self.rpc_timeout_s)
                except grpc.aio.AioRpcError as e:
                    self.queue_errors += 1
                    log.warning("batch worker %s: Lease from %s failed (%s: %s); retrying in %.2f s", self.instance_id,
                                self.queue_address, e.code().name, e.details(), backoff)
                    await self._pause(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
                    continue
                backoff = _MIN_BACKOFF_S
                rejected = self.rejected
                for ls in resp.leases:  # started even when draining began meanwhile: drain evicts and returns them
                    self.leased += 1
                    self._start_job(ls)
                if len(resp.leases) < want:
                    await self._pause(self.poll_interval_s)  # the queue ran dry: poll again later
                elif self.rejected != rejected:
                    await self._pause(self.poll_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # never take the agent down; try again after a pause
                log.exception("batch worker %s: lease loop error", self.instance_id)
                await self._pause(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    def _start_job(self, ls: queue_pb2.LeasedRequest) -> None:
        r = ls.request
        log.debug("batch worker %s leased %s (lease %s, attempt %d, %d resume tokens)", self.instance_id,
                  r.request_id, ls.lease_id, ls.attempts, len(r.resume_token_ids))
        job = _Job(ls, list(r.resume_token_ids), len(r.resume_token_ids), self.backend.now())
        self._jobs[ls.lease_id] = job
        job.task = asyncio.create_task(self._serve(job), name=f"batch-request-{r.request_id}")

    # ---- serving ---------------------------------------------------------------------------
    async def _serve(self, job: _Job) -> None:
        renewer = asyncio.create_task(self._renew_loop(job), name=f"renew-{job.request_id}")
        try:
            reason = await self._generate(job)
            max_tokens = job.lease.request.max_tokens
            if job.lease_lost:
                log.warning("batch worker %s: dropped %s after %d tokens: its lease was lost", self.instance_id,
                            job.request_id, len(job.tokens))
            elif reason in ("length", "stop") or len(job.tokens) >= max_tokens:
                await self._ack(job)
            else:
                why = job.evict_reason or (f"rejected by engine {self.instance_id}" if reason == "rejected"
                                           else f"{reason} on engine {self.instance_id}")
                await self._return(job, why)
        except asyncio.CancelledError:
            raise
        except Exception:  # the lease expires and the queue serves the request again
            log.exception("batch worker %s: serving %s failed", self.instance_id, job.request_id)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            self._jobs.pop(job.lease_id, None)
            self._wake.set()

    async def _generate(self, job: _Job) -> str:
        """Run the request on the backend; returns its finish reason ("rejected" when the backend refused it)."""
        r = job.lease.request
        if len(job.tokens) >= r.max_tokens:  # returned with its last token: nothing left to generate
            del job.tokens[r.max_tokens:]
            return "length"
        if job.evict_reason is not None:  # evicted before it reached the backend
            return "evicted"
        br = BackendRequest(r.request_id, tuple(r.prompt_token_ids), int(r.max_tokens), tuple(r.resume_token_ids),
                            ignore_eos=r.ignore_eos, stream_interval=_BATCH_STREAM_INTERVAL)
        job.submitted = True
        try:
            async for out in self.backend.generate(br):
                if out.token_ids:
                    if len(job.tokens) == job.resumed:
                        job.ttft_ms = (out.time_s - job.started_s) * 1e3
                    job.tokens.extend(out.token_ids)
                if out.finish_reason is not None:
                    return out.finish_reason
        except RequestRejected as e:
            self.rejected += 1
            log.warning("batch worker %s: engine refused %s (%s: %s); returning it to the queue", self.instance_id,
                        r.request_id, e.code, e)
            return "rejected"
        return "abort"

    async def _renew_loop(self, job: _Job) -> None:
        assert self._stub is not None
        interval = self.lease_timeout_s / 3
        timeout_ms = max(1, round(self.lease_timeout_s * 1e3))
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                await self._stub.Renew(queue_pb2.RenewRequest(request_id=job.request_id, lease_id=job.lease_id,
                                                              lease_timeout_ms=timeout_ms),
                                       timeout=min(self.rpc_timeout_s, interval))
                self.renewed += 1
                delay = interval
            except grpc.aio.AioRpcError as e:
                if e.code() in _FINAL:
                    self.lost += 1
                    job.lease_lost = True
                    log.warning("batch worker %s: lease of %s lost (%s: %s); stopping it", self.instance_id,
                                job.request_id, e.code().name, e.details())
                    with contextlib.suppress(Exception):
                        await self.backend.evict(job.request_id)
                    return
                self.queue_errors += 1
                delay = interval / 3  # still time before expiry: try again sooner
                log.warning("batch worker %s: renewing the lease of %s failed (%s); retrying in %.2f s",
                            self.instance_id, job.request_id, e.code().name, delay)

    async def _settle(self, what: str, call: Any, request: Any, job: _Job) -> bool:
        """``Ack`` or ``Return`` with retries: True once the queue took it; False when it refused for good."""
        backoff = _MIN_BACKOFF_S
        while True:
            try:
                await call(request, timeout=self.rpc_timeout_s)
                return True
            except grpc.aio.AioRpcError as e:
                if e.code() in _FINAL:
                    self.lost += 1
                    job.lease_lost = True
                    log.warning("batch worker %s: %s of %s refused (%s: %s); dropping it, the queue serves it elsewhere",
                                self.instance_id, what, job.request_id, e.code().name, e.details())
                    return False
                self.queue_errors += 1
                log.warning("batch worker %s: %s of %s failed (%s: %s); retrying in %.2f s", self.instance_id, what,
                            job.request_id, e.code().name, e.details(), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def _ack(self, job: _Job) -> None:
        assert self._stub is not None
        req = queue_pb2.AckRequest(request_id=job.request_id, lease_id=job.lease_id, output_tokens=len(job.tokens),
                                   ttft_ms=job.ttft_ms, output_token_ids=job.tokens)
        if await self._settle("ack", self._stub.Ack, req, job):
            self.acked += 1

    async def _return(self, job: _Job, reason: str) -> None:
        assert self._stub is not None
        tokens = job.tokens
        if job.progress is not None and len(job.progress.generated_token_ids) > len(tokens):
            tokens = list(job.progress.generated_token_ids)
        req = queue_pb2.ReturnRequest(request_id=job.request_id, lease_id=job.lease_id, generated_token_ids=tokens,
                                      reason=reason)
        if await self._settle("return", self._stub.Return, req, job):
            self.returned += 1
            log.info("batch worker %s returned %s to the queue with %d/%d tokens (%s)", self.instance_id,
                     job.request_id, len(tokens), job.lease.request.max_tokens, reason)

    # ---- eviction --------------------------------------------------------------------------
    async def _evict(self, job: _Job, reason: str) -> int:
        """Stop ``job`` on the backend; its serve task returns it to the queue. 1 if evicted, 0 if it finished."""
        job.evict_reason = reason
        if not job.submitted:
            return 1
        progress = await self.backend.evict(job.request_id)
        if progress is None:  # it finished meanwhile: its serve task acks it
            job.evict_reason = None
            return 0
        job.progress = progress
        return 1

    async def make_room(self, n: int) -> int:
        """MIXED instances: evict batch requests so that ``n`` more (interactive) requests, already counted in the
        agent's interactive requests waiting for their first token, get admitted now.

        Evicts up to ``n`` batch requests, as many as :func:`~services.engine.batch_rules.eviction_need` says (what
        the cap needs, or ``n`` while interactive requests queue below it), those with the least progress (fewest
        output tokens) first and leases not yet handed to the backend before any; they return to the queue with
        every token generated so far (reason "evicted for interactive load") and resume elsewhere. The returns run
        in the background (:meth:`drain` waits for them). Returns how many were evicted; 0 on a BATCH instance.
        """
        if self.role != types_pb2.INSTANCE_ROLE_MIXED or n <= 0 or self._stopping:
            return 0
        snap = self.backend.snapshot()
        unsubmitted = sum(1 for j in self._jobs.values() if not j.submitted and j.evict_reason is None)
        need = eviction_need(n, snap.max_batch_size, snap.num_running, snap.num_waiting + unsubmitted,
                             self._interactive_waiting() - n)
        if need <= 0:
            return 0
        victims = sorted((j for j in self._jobs.values() if j.evict_reason is None and not j.lease_lost),
                         key=lambda j: eviction_order(j.submitted, len(j.tokens), j.started_s))
        count = 0
        for job in victims:
            if count >= need:
                break
            count += await self._evict(job, EVICTED_FOR_INTERACTIVE)
        self.evicted += count
        if count:
            log.info("batch worker %s evicted %d batch request(s) for interactive load", self.instance_id, count)
        return count


__all__ = ["Agent", "BatchWorker"]
