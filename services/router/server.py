"""The ``chiron.v1.Router`` gRPC service: the cluster's front door.

* Interactive requests (:func:`services.router.routing.classify`) stream through ``Generate`` from the
  instance :func:`~services.router.routing.choose_instance` picks, using etcd membership and engine stats
  that a background task refreshes every ``stats_interval_s`` (with the requests this router has in flight at
  each instance as a lower bound of its load, so a burst does not pile onto one instance between refreshes).
  The client's deadline is passed on to the engine call. ``GenerateMany`` serves the same requests, many on one
  long-lived stream (the gateway's way: a message each way per request instead of a call; see router.proto).
* An engine that dies under a request (its stream fails as :func:`engine_failed` tells: UNAVAILABLE, CANCELLED by
  the engine's side, a reset connection) does not end the request: the router sends it, with the same request id,
  to another instance (at most ``max_failovers`` others, the dead one left out of routing until a stats refresh
  reaches it again). Before its first token it simply starts there; after tokens were streamed it *resumes* there
  the way batch eviction resumes (``InferenceRequest.resume_token_ids`` = every token the client already has,
  ``max_tokens`` unchanged since it counts them), so the client's stream goes on with the next token: no error,
  no token twice, ``num_generated_tokens`` continuing. The first message from the new instance names it
  (``instance_id``) and carries no TTFT (its ``itl_ms`` is the gap the client saw, per token). No instance to
  take it over ends the request UNAVAILABLE with a message naming the dead engine; the client's own cancel and
  deadline (DEADLINE_EXCEEDED) are never retried.
* Batch requests go to the queue (``Submit``); ``GetResult`` / ``StreamResult`` / ``Cancel`` read and act on
  them there, so a client need not hold a stream open for hours. A queue that does not answer is UNAVAILABLE
  with a message naming the queue and its address, and trailing metadata ``chiron-dependency: queue``.
* Dependencies are reported through the standard gRPC health service: besides ``""`` and ``chiron.v1.Router``
  (this router serves), ``chiron.dependency.queue`` (the queue's own health check answers SERVING) and
  ``chiron.dependency.membership`` (the etcd membership watch is established) are SERVING or NOT_SERVING,
  re-checked every ``dependency_interval_s``. The gateway's ``/health`` reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chiron.v1 import batch_pb2_grpc, engine_pb2, engine_pb2_grpc, queue_pb2, queue_pb2_grpc, router_pb2, router_pb2_grpc, types_pb2
from services.common.failover import FailoverChannel
from services.common.grpc_util import ChannelPool, status_code
from services.common.metrics import RouterMetrics, outcome_of
from services.common.serving import RunningService, start_server
from services.router.routing import (
    Classified,
    InstanceLoad,
    Rejected,
    RouterConfig,
    choose_instance,
    classify,
    instance_load,
)

log = logging.getLogger("chiron.router")

_FINAL = (queue_pb2.QUEUED_REQUEST_STATE_DONE, queue_pb2.QUEUED_REQUEST_STATE_CANCELLED)

DEPENDENCY_QUEUE = "chiron.dependency.queue"
"""Health-service name of the router's view of the queue (SERVING: its health check answers SERVING)."""
DEPENDENCY_MEMBERSHIP = "chiron.dependency.membership"
"""Health-service name of the router's view of etcd membership (SERVING: its watch is established)."""
DEPENDENCY_METADATA_KEY = "chiron-dependency"
"""Trailing-metadata key of an error caused by a dependency of the router; its value names it (``queue``)."""
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
MAX_FAILOVERS = 2
"""Other instances an interactive request is sent to, at most, after the engine serving it died (requests)."""
# Words in the details of an INTERNAL / UNKNOWN status that gRPC gives a call whose connection went away.
_CONNECTION_LOST = ("rst_stream", "connection reset", "socket closed", "broken pipe", "stream removed", "goaway")


def _resumed(fwd: types_pb2.InferenceRequest, streamed: list[int]) -> types_pb2.InferenceRequest:
    """``fwd`` to resume after the tokens the client already has (as an evicted batch request resumes), or
    ``fwd`` itself when it has none."""
    if not streamed:
        return fwd
    send = types_pb2.InferenceRequest()
    send.CopyFrom(fwd)
    send.resume_token_ids.extend(streamed)
    return send


def _length_finish(fwd: types_pb2.InferenceRequest, generated: int) -> engine_pb2.GenerateResponse:
    """The final chunk of a request whose every token reached the client but whose finish was lost with its
    engine: no tokens, finish reason LENGTH."""
    return engine_pb2.GenerateResponse(request_id=fwd.request_id, num_generated_tokens=generated,
                                       num_prompt_tokens=len(fwd.prompt_token_ids),
                                       finish_reason=types_pb2.FINISH_REASON_LENGTH)


def _relayed(chunk: engine_pb2.GenerateResponse, timer, streamed: list[int], resumed_here: bool, last_chunk_s: float) -> float:
    """Count ``chunk``'s tokens into ``streamed`` (the client's, in order) and the request's stream ``timer``; the
    first tokens of a stream resumed on another instance (``resumed_here``) get no second TTFT, and their ITL runs
    from the client's last chunk. Returns when the client got its last chunk with tokens (``time.monotonic()`` s)."""
    if not chunk.token_ids:
        return last_chunk_s
    timer.chunk()
    now_s = time.monotonic()
    if resumed_here:
        chunk.ttft_ms = 0.0
        chunk.itl_ms = (now_s - last_chunk_s) * 1e3 / len(chunk.token_ids)
    streamed.extend(chunk.token_ids)
    return now_s


def engine_failed(e: grpc.aio.AioRpcError) -> bool:
    """Whether an engine call ended because the engine (process, host or connection) went away, so the request
    should go on elsewhere: UNAVAILABLE (a SIGKILLed engine: "Stream removed (Socket closed)"; an unreachable one;
    a draining one, which takes no new request), CANCELLED (from the engine's side: a cancel of the router's
    own ends the call with ``asyncio.CancelledError``, never with a status), or INTERNAL / UNKNOWN whose details
    say the connection was reset. DEADLINE_EXCEEDED (the client's deadline) and every status the engine answers
    on purpose (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) are the request's own end."""
    code = e.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return True
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        details = (e.details() or "").lower()
        return any(w in details for w in _CONNECTION_LOST)
    return False


async def _abort_for_queue(context, queue_address: str, e: grpc.aio.AioRpcError):
    """End an RPC with the error of a queue call: an unreachable queue (UNAVAILABLE, DEADLINE_EXCEEDED) is
    UNAVAILABLE naming the queue (trailing metadata ``chiron-dependency: queue``), anything else the queue's own
    status and message."""
    code = e.code()
    if code in _UNREACHABLE:
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"the queue at {queue_address} did not answer ({code.name}: {e.details()}); batch requests "
                            f"cannot be taken or read until it is back; retry later",
                            trailing_metadata=((DEPENDENCY_METADATA_KEY, "queue"),))
    await context.abort(code, e.details())


class RouterStatus(Exception):
    """How an interactive request ends when not with its last token: a gRPC status code and a message for
    the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RouterService(router_pb2_grpc.RouterServicer):
    """See the module docstring. ``membership``: ``snapshot() -> dict[str, InstanceInfo]`` (and ``healthy``, when
    it can tell; a :class:`~services.common.membership.MembershipWatcher`); ``queue``: "host:port" of the queue
    service; ``stats_interval_s``: period of the engine-stats refresh [s]; ``dependency_interval_s``: period of
    the queue and membership checks reported through the health service [s]; ``max_failovers``: other instances
    an interactive request is sent to, at most, after its engine died (requests, ≥ 0; 0 = none)."""

    def __init__(self, config: RouterConfig, membership, queue: str, *, stats_interval_s: float = 0.25,
                 result_poll_s: float = 0.5, dependency_interval_s: float = 1.0,
                 max_failovers: int = MAX_FAILOVERS) -> None:
        if max_failovers < 0:
            raise ValueError(f"max_failovers must be >= 0 (got {max_failovers})")
        self.config = config.validate()
        self.membership = membership
        # Queue replicas over one database are interchangeable: "a:1,b:2" fails over between them (an Enqueue
        # repeated at another replica is idempotent for the same content).
        self.queue_channel = FailoverChannel(queue)
        self.queue_address = str(self.queue_channel)
        self.stats_interval_s = stats_interval_s
        self.result_poll_s = result_poll_s
        self._channels = ChannelPool()
        self._loads: dict[str, InstanceLoad] = {}
        self._inflight: dict[str, int] = defaultdict(int)  # streams this router has open per instance
        self._task: asyncio.Task | None = None
        self.dependency_interval_s = dependency_interval_s
        self._dependency_task: asyncio.Task | None = None
        self._health: health.aio.HealthServicer | None = None
        self.dependencies: dict[str, bool] = {}  # DEPENDENCY_* name -> up at the last check
        self.accepted = 0  # interactive requests streamed to an engine
        self.submitted = 0  # batch requests handed to the queue
        self.max_failovers = max_failovers
        self.failovers = 0  # interactive requests sent to another instance after their engine died
        self.resumed = 0  # ... of them, those that had streamed tokens and resumed after them
        self.metrics = RouterMetrics()

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop(), name="router-stats")
        self._dependency_task = asyncio.create_task(self._dependency_loop(), name="router-dependencies")

    async def stop(self) -> None:
        for task in (self._task, self._dependency_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._channels.close()
        await self.queue_channel.close()

    def attach_health(self, servicer: health.aio.HealthServicer) -> None:
        """Report dependencies through ``servicer`` (the server's health service), from the next check on."""
        self._health = servicer

    async def check_dependencies(self) -> dict[str, bool]:
        """Check the queue (its health service, 1 s deadline) and the membership watch (``healthy``; a membership
        without that property counts as up), publish both on the attached health service, and return them."""
        try:
            resp = await health_pb2_grpc.HealthStub(self.queue_channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            queue_up = resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            queue_up = False
        status = {DEPENDENCY_QUEUE: queue_up, DEPENDENCY_MEMBERSHIP: bool(getattr(self.membership, "healthy", True))}
        for name, up in status.items():
            if self.dependencies.get(name) != up and name in self.dependencies:
                log.log(logging.INFO if up else logging.WARNING, "router dependency %s is %s", name.rsplit(".", 1)[-1],
                        "back" if up else "down" + (f" ({self.queue_address})" if name == DEPENDENCY_QUEUE else ""))
            if self._health is not None:
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING if up
                                       else health_pb2.HealthCheckResponse.NOT_SERVING)
        self.dependencies = status
        return status

    async def _dependency_loop(self) -> None:
        while True:
            try:
                await self.check_dependencies()
            except Exception:
                log.exception("router dependency check failed")
            await asyncio.sleep(self.dependency_interval_s)

    @property
    def _queue(self) -> queue_pb2_grpc.QueueStub:
        return queue_pb2_grpc.QueueStub(self.queue_channel)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.stats_interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("router stats refresh failed")

    async def refresh(self) -> None:
        """Re-read membership and every interactive/mixed instance's stats."""
        members = [m for m in self.membership.snapshot().values()
                   if m.state == "serving" and m.role in ("interactive", "mixed")]

        async def one(m):
            try:
                s = (await engine_pb2_grpc.EngineStub(self._channels.get(m.address)).GetStats(
                    engine_pb2.GetStatsRequest(), timeout=1.0)).stats
            except grpc.aio.AioRpcError:
                return None
            return instance_load(m.instance_id, m.role, m.address, m.model, s)

        loads = await asyncio.gather(*(one(m) for m in members))
        self._loads = {ld.instance_id: ld for ld in loads if ld is not None}

    def _unseen_members(self, model: str, exclude: Collection[str] = ()) -> bool:
        """Whether a serving interactive/mixed instance of ``model`` (not in ``exclude``, instance ids) is in
        membership but has no stats yet (it registered after the last refresh: a cluster that just started, or a
        scale-up; or an engine that did not answer the last refresh)."""
        return any(m.state == "serving" and m.role in ("interactive", "mixed") and m.model == model
                   and m.instance_id not in self._loads and m.instance_id not in exclude
                   for m in self.membership.snapshot().values())

    def loads(self) -> list[InstanceLoad]:
        """Instances with their last stats; ``pending`` = this router's open streams there beyond what the stats
        already count (stats lag a dispatch by up to one refresh), so load = max(stats, own in-flight)."""
        return [replace(ld, pending=max(0, self._inflight.get(ld.instance_id, 0) - ld.num_running - ld.num_waiting))
                for ld in self._loads.values()]

    # ---- helpers --------------------------------------------------------------------------------------
    @staticmethod
    async def _abort(context, code: str, message: str):
        await context.abort(status_code(code), message)

    def _check(self, r: types_pb2.InferenceRequest) -> None:
        if not r.model:
            raise Rejected("model is required")
        if not r.prompt_token_ids:
            raise Rejected("prompt is empty: set prompt_token_ids" if not r.prompt else
                           "text prompts need a tokenizer at the gateway; send prompt_token_ids")
        if len(r.prompt_token_ids) > self.config.max_prompt_tokens:
            raise Rejected(f"prompt of {len(r.prompt_token_ids)} tokens exceeds the router's limit of "
                           f"{self.config.max_prompt_tokens}")
        if any(t < 0 for t in r.prompt_token_ids):
            raise Rejected("token ids must be >= 0")
        if r.max_tokens <= 0:
            raise Rejected(f"max_tokens must be > 0 (got {r.max_tokens})")
        if r.resume_token_ids:
            raise Rejected("resume_token_ids is for engines and the queue, not for clients")

    def _classify(self, r: types_pb2.InferenceRequest) -> Classified:
        """Validate and classify a client request. Raises :class:`Rejected`."""
        self._check(r)
        return classify(self.config, slo_class=r.slo.slo_class, ttft_ms=r.slo.ttft_ms, itl_ms=r.slo.itl_ms,
                        request_class=r.request_class)

    @staticmethod
    def _forwarded(r: types_pb2.InferenceRequest, c: Classified, request_class: int,
                   default_id: str) -> types_pb2.InferenceRequest:
        """The request as the engine or queue gets it: an id, its class, and the SLOs that apply."""
        fwd = types_pb2.InferenceRequest()
        fwd.CopyFrom(r)
        fwd.request_id = r.request_id or default_id
        fwd.request_class = request_class
        fwd.slo.ttft_ms, fwd.slo.itl_ms = c.ttft_ms, c.itl_ms
        return fwd

    async def _choose(self, model: str, ttft_ms: float, exclude: Collection[str] = ()) -> InstanceLoad:
        """:func:`choose_instance` over the instances with stats, less ``exclude`` (instance ids); when none fits
        and a serving instance of ``model`` (not excluded) has no stats yet, after reading them at once. Raises
        :class:`Rejected` as ``choose_instance`` does."""
        try:
            return choose_instance([ld for ld in self.loads() if ld.instance_id not in exclude], model, ttft_ms)
        except Rejected:
            if not self._unseen_members(model, exclude):
                raise
        await self.refresh()  # an instance registered since the last stats refresh: read its stats now
        return choose_instance([ld for ld in self.loads() if ld.instance_id not in exclude], model, ttft_ms)

    async def _failover(self, fwd: types_pb2.InferenceRequest, failed: list[str], streamed: int,
                        error: grpc.aio.AioRpcError) -> InstanceLoad:
        """The instance a request goes on at after the engine serving it died (the last of ``failed``, the
        instances that died under it; ``streamed``: tokens the client already has; ``error``: how the call
        failed). Any instance serving the model other than those will do, whatever its projected TTFT: the
        request was already accepted (and may be half answered), so late beats refused. Raises
        :class:`RouterStatus` UNAVAILABLE after ``max_failovers`` moves or when no other instance serves the
        model."""
        dead = failed[-1]
        what = (f"engine {dead} failed ({error.code().name}: {error.details()}) after streaming {streamed} of "
                f"{fwd.max_tokens} tokens of request {fwd.request_id}")
        if len(failed) > self.max_failovers:
            raise RouterStatus(grpc.StatusCode.UNAVAILABLE,
                               f"{what}; {len(failed)} engines failed under it ({', '.join(failed)}), more than the "
                               f"router moves a request ({self.max_failovers}); retry later")
        try:
            target = await self._choose(fwd.model, math.inf, failed)
        except Rejected as e:
            raise RouterStatus(grpc.StatusCode.UNAVAILABLE,
                               f"{what}, and no other instance can take it over ({e}); retry later") from None
        self.failovers += 1
        self.resumed += streamed > 0
        log.warning("%s; %s on %s", what, "resuming it" if streamed else "sending it again", target.instance_id)
        return target

    async def _admit(self, r: types_pb2.InferenceRequest) -> tuple[Classified, InstanceLoad]:
        """Classify an interactive request and choose its instance; :class:`RouterStatus` (counted as rejected)
        for a batch-class request (FAILED_PRECONDITION: use Submit) or a rejection by classification or routing."""
        c = None
        try:
            c = self._classify(r)
            if c.request_class == "batch":
                raise Rejected(f"a TTFT SLO of {c.ttft_ms} ms makes this a batch request: use Submit", "FAILED_PRECONDITION")
            return c, await self._choose(r.model, c.ttft_ms)
        except Rejected as e:
            self.metrics.count(c.request_class if c is not None else "interactive", "rejected")
            raise RouterStatus(status_code(e.code), str(e)) from None

    # ---- RPCs -------------------------------------------------------------------------------------------
    async def _generate(self, r: types_pb2.InferenceRequest, timeout_s: float | None,
                        on_call: Callable[[grpc.aio.Call], None] | None = None
                        ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        """One interactive request, as ``Generate`` and ``GenerateMany`` serve it: checked, classified, routed,
        and the chosen engine's chunks relayed (``instance_id`` on the first, and on the first from each instance
        the request moves to). An engine that dies under it (:func:`engine_failed`) hands it to another instance
        (:meth:`_failover`): started afresh there when the client had no token yet, resumed after the tokens the
        client has otherwise (module docstring). ``timeout_s``: the request's deadline, seconds from now (None:
        none), shared by every engine call it makes. ``on_call`` gets each engine call once it starts. Raises
        :class:`RouterStatus` with the status the request ends with (INVALID_ARGUMENT, FAILED_PRECONDITION,
        RESOURCE_EXHAUSTED, UNAVAILABLE when its engine died and no other could take it over,
        DEADLINE_EXCEEDED, or the engine's)."""
        start_s = time.monotonic()
        deadline_s = None if timeout_s is None else start_s + timeout_s
        c, target = await self._admit(r)
        fwd = self._forwarded(r, c, types_pb2.REQUEST_CLASS_INTERACTIVE, f"req-{uuid.uuid4().hex[:12]}")
        self.accepted += 1
        timer = self.metrics.stream(start_s, c.ttft_ms / 1e3, c.itl_ms / 1e3)
        outcome = "error"
        streamed: list[int] = []  # output tokens the client has, in order
        failed: list[str] = []  # instances that died under this request, in order
        last_chunk_s = start_s  # when the client got its last chunk with tokens (time.monotonic() seconds)
        try:
            while True:
                send = _resumed(fwd, streamed)
                remaining_s = None if deadline_s is None else deadline_s - time.monotonic()
                if remaining_s is not None and remaining_s <= 0:
                    outcome = outcome_of(grpc.StatusCode.DEADLINE_EXCEEDED)
                    raise RouterStatus(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"the deadline passed while the request moved off engine {failed[-1]}")
                self._inflight[target.instance_id] += 1
                call = None
                died = None
                first_here = True  # no message from this instance yet
                finished = False  # the client has the finish chunk
                try:
                    call = engine_pb2_grpc.EngineStub(self._channels.get(target.address)).Generate(
                        engine_pb2.GenerateRequest(request=send), timeout=remaining_s)
                    if on_call is not None:
                        on_call(call)
                    async for chunk in call:
                        if finished:  # nothing follows a finish chunk to the client
                            continue
                        last_chunk_s = _relayed(chunk, timer, streamed, first_here and bool(streamed), last_chunk_s)
                        yield router_pb2.RouterGenerateResponse(chunk=chunk,
                                                                instance_id=target.instance_id if first_here else "")
                        first_here = False
                        # Read on to the stream's end (the engine closes it after the finish chunk), so the call's
                        # tracing span ends with it, not when the garbage collector frees the suspended iterator.
                        finished = bool(chunk.finish_reason)
                    outcome = "ok"
                    return
                except grpc.aio.AioRpcError as e:
                    if finished:  # the client has the end: what befalls the call now is moot
                        outcome = "ok"
                        return
                    if not engine_failed(e):
                        outcome = outcome_of(e.code())
                        raise RouterStatus(e.code(), f"engine {target.instance_id}: {e.details()}") from None
                    died = e
                finally:
                    if call is not None:
                        call.cancel()  # no-op once the call has ended
                    self._inflight[target.instance_id] -= 1
                failed.append(target.instance_id)
                self._loads.pop(target.instance_id, None)  # out of routing until a stats refresh reaches it again
                if len(streamed) >= fwd.max_tokens:  # every token out, only the finish lost with the engine
                    yield router_pb2.RouterGenerateResponse(chunk=_length_finish(fwd, len(streamed)))
                    outcome = "ok"
                    return
                try:
                    target = await self._failover(fwd, failed, len(streamed), died)
                except RouterStatus as e:
                    outcome = outcome_of(e.code)
                    raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            outcome = "cancelled"
            raise
        finally:
            timer.finish(outcome)

    async def Generate(self, request: router_pb2.RouterGenerateRequest, context):
        # A client that goes away while this generator waits at its yield does not always reach the request's
        # cleanup (the generator is just never resumed): cancel the engine call when the RPC ends, whatever way.
        chunks = self._generate(request.request, context.time_remaining(),
                                lambda call: context.add_done_callback(lambda _ctx: call.cancel()))
        try:
            async for response in chunks:
                yield response
        except RouterStatus as e:
            await context.abort(e.code, e.message)
        finally:
            await chunks.aclose()

    async def GenerateMany(self, request_iterator, context):
        """See router.proto: each request runs :meth:`_generate` in a task of its own, whose messages (tagged
        with its ``stream_id``) go out in the order they are produced."""
        out: asyncio.Queue[router_pb2.GenerateManyResponse | None] = asyncio.Queue()
        running: dict[int, asyncio.Task] = {}
        reading = True

        def end(sid: int, code: grpc.StatusCode = grpc.StatusCode.OK, message: str = "") -> None:
            out.put_nowait(router_pb2.GenerateManyResponse(stream_id=sid, end=True, code=code.value[0], message=message))

        def close_if_idle() -> None:  # the client has closed its side and every request has ended
            if not reading and not running:
                out.put_nowait(None)

        def on_done(sid: int, task: asyncio.Task) -> None:
            if running.get(sid) is task:
                del running[sid]
            close_if_idle()

        async def serve(sid: int, r: types_pb2.InferenceRequest, timeout_s: float | None) -> None:
            ended = False  # the client has the request's end
            code, message = grpc.StatusCode.OK, ""
            try:
                async for response in self._generate(r, timeout_s):
                    # The chunk with the finish reason is the engine's last: it ends the request for the client at
                    # once, and the engine call's own end (read next) only closes the books here.
                    ended = bool(response.chunk.finish_reason)
                    out.put_nowait(router_pb2.GenerateManyResponse(stream_id=sid, response=response, end=ended))
            except RouterStatus as e:
                code, message = e.code, e.message
            except Exception as e:  # a bug: the request must still end for its client
                log.exception("request %d of a GenerateMany stream failed", sid)
                code, message = grpc.StatusCode.INTERNAL, f"internal error in the router ({type(e).__name__}); see its log"
            if not ended:
                end(sid, code, message)

        async def read() -> None:
            nonlocal reading
            async for m in request_iterator:
                if m.cancel:
                    task = running.pop(m.stream_id, None)
                    if task is not None:
                        task.cancel()
                elif m.stream_id in running:
                    end(m.stream_id, grpc.StatusCode.INVALID_ARGUMENT,
                        f"stream_id {m.stream_id} is already running on this stream")
                else:
                    task = asyncio.ensure_future(serve(m.stream_id, m.generate.request, m.timeout_s or None))
                    running[m.stream_id] = task
                    task.add_done_callback(lambda t, sid=m.stream_id: on_done(sid, t))
            reading = False
            close_if_idle()

        reader = asyncio.ensure_future(read())
        # A failed read (not a cancelled one) ends the response stream too; awaiting the reader then raises its error.
        reader.add_done_callback(lambda t: None if t.cancelled() or t.exception() is None else out.put_nowait(None))
        try:
            while (m := await out.get()) is not None:
                yield m
            await reader  # its errors, if any
        finally:
            reader.cancel()
            for task in running.values():
                task.cancel()

    async def Submit(self, request: router_pb2.SubmitRequest, context):
        r = request.request
        try:
            c = self._classify(r)
        except Rejected as e:
            self.metrics.count("batch", "rejected")
            await self._abort(context, e.code, str(e))
        fwd = self._forwarded(r, c, types_pb2.REQUEST_CLASS_BATCH, f"batch-{uuid.uuid4().hex}")
        try:
            resp = await self._queue.Enqueue(queue_pb2.EnqueueRequest(request=fwd), timeout=context.time_remaining())
        except grpc.aio.AioRpcError as e:
            self.metrics.count("batch", outcome_of(e.code()))
            await _abort_for_queue(context, self.queue_address, e)
        self.submitted += 1
        return router_pb2.SubmitResponse(request_id=resp.request_id, group_id=resp.group_id)

    async def _get(self, request_id: str, context) -> queue_pb2.GetRequestResponse:
        try:
            return await self._queue.GetRequest(queue_pb2.GetRequestRequest(request_id=request_id), timeout=5.0)
        except grpc.aio.AioRpcError as e:
            await _abort_for_queue(context, self.queue_address, e)

    async def GetResult(self, request: router_pb2.GetResultRequest, context):
        return router_pb2.GetResultResponse(result=await self._get(request.request_id, context))

    async def StreamResult(self, request: router_pb2.StreamResultRequest, context):
        last = None
        while True:
            res = await self._get(request.request_id, context)
            key = (res.state, res.position, res.attempts)
            if key != last:
                yield router_pb2.StreamResultResponse(result=res)
                last = key
            if res.state in _FINAL:
                return
            await asyncio.sleep(self.result_poll_s)

    async def Cancel(self, request: router_pb2.RouterCancelRequest, context):
        try:
            resp = await self._queue.Cancel(queue_pb2.CancelRequest(request_id=request.request_id), timeout=5.0)
        except grpc.aio.AioRpcError as e:
            await _abort_for_queue(context, self.queue_address, e)
        return router_pb2.RouterCancelResponse(cancelled=resp.cancelled)

    async def ListModels(self, request: router_pb2.ListModelsRequest, context):
        by_model: dict[str, router_pb2.ModelInfo] = {}
        for m in self.membership.snapshot().values():
            if m.state != "serving":
                continue
            info = by_model.setdefault(m.model, router_pb2.ModelInfo(model=m.model))
            field = f"{m.role}_instances"
            setattr(info, field, getattr(info, field) + 1)
        return router_pb2.ListModelsResponse(models=[by_model[k] for k in sorted(by_model)])


def _forward(method: str):
    async def call(self, request, context):
        stub = batch_pb2_grpc.BatchApiStub(self.channel)
        try:
            return await getattr(stub, method)(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            await _abort_for_queue(context, self.queue_address, e)
    call.__name__ = method
    return call


class BatchApiForwarder(batch_pb2_grpc.BatchApiServicer):
    """``chiron.v1.BatchApi`` on the router: every call goes unchanged to the queue, which owns files and batches
    (so clients need only the router's address). Errors are the queue's; an unreachable queue is UNAVAILABLE."""

    def __init__(self, channel: FailoverChannel, timeout_s: float = 30.0) -> None:
        self.channel = channel  # the queue replicas' addresses
        self.queue_address = str(channel)
        self.timeout_s = timeout_s

    CreateFile = _forward("CreateFile")
    GetFile = _forward("GetFile")
    GetFileContent = _forward("GetFileContent")
    CreateBatch = _forward("CreateBatch")
    GetBatch = _forward("GetBatch")
    ListBatches = _forward("ListBatches")
    CancelBatch = _forward("CancelBatch")
    GetBatchResults = _forward("GetBatchResults")


class RunningRouter(RunningService):
    service: RouterService

    async def stop(self, grace_s: float = 5.0) -> None:
        await super().stop(grace_s)


async def serve(service: RouterService, host: str = "127.0.0.1", port: int = 0) -> RunningRouter:
    """Serve ``chiron.v1.Router`` and the forwarded ``chiron.v1.BatchApi`` (health checking, reflection) after a
    first stats refresh. The Router is the client-facing server: with ``CHIRON_AUTH_TOKENS`` set, both services
    refuse calls without an accepted bearer token (UNAUTHENTICATED); see :mod:`services.common.security`."""
    await service.start()
    name = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
    forwarder = BatchApiForwarder(service.queue_channel)

    def add(s: grpc.aio.Server) -> None:
        router_pb2_grpc.add_RouterServicer_to_server(service, s)
        batch_pb2_grpc.add_BatchApiServicer_to_server(forwarder, s)

    async def check_dependencies(health_servicer) -> None:
        service.attach_health(health_servicer)
        await service.check_dependencies()

    server, _health, bound = await start_server(add, name, host, port, client_facing=True,
                                                before_start=check_dependencies)
    log.info("router serving on %s:%d", host, bound)
    return RunningRouter(server, service, bound)
