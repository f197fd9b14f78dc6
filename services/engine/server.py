"""The engine agent: the ``chiron.v1.Engine`` gRPC service over a backend, with the local autoscaler.

A thin shell: requests are validated and handed to the backend; every ``control_interval_s`` the agent
feeds the last interval's ITL quantile and throughput into the pure local autoscaler
(:mod:`services.engine.local_autoscaler`) and applies its max batch size to the backend.

BATCH and MIXED agents given a queue (``AgentConfig.queue_address`` or :meth:`EngineAgent.attach_batch_worker`)
also serve batch work leased from the global queue (:mod:`services.engine.batch_worker`); a MIXED agent at its cap
evicts batch work to admit an interactive request, and stopping the agent returns its batch work to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2

from chiron.v1 import engine_pb2, engine_pb2_grpc, types_pb2
from services.common.grpc_util import status_code, timestamp
from services.common.metrics import EngineMetrics
from services.common.serving import every_interval, start_server
from services.engine.backend import Backend, BackendRequest
from services.engine.batch_worker import BatchWorker
from services.engine.core import RequestRejected
from services.engine.local_autoscaler import (
    Decision,
    LocalAutoscalerConfig,
    decide,
    initial_state,
    observation,
)
from services.engine.stats import LatencyWindow, RateWindow

log = logging.getLogger("chiron.engine")

LATE_CONTROL_FACTOR = 3.0  # a control step this many intervals (and at least 1 s) after the previous one is late

ROLE_NAMES = {
    "interactive": types_pb2.INSTANCE_ROLE_INTERACTIVE,
    "mixed": types_pb2.INSTANCE_ROLE_MIXED,
    "batch": types_pb2.INSTANCE_ROLE_BATCH,
}
FINISH = {
    "length": types_pb2.FINISH_REASON_LENGTH,
    "stop": types_pb2.FINISH_REASON_STOP,
    "abort": types_pb2.FINISH_REASON_ABORT,
    "evicted": types_pb2.FINISH_REASON_EVICTED,
}


@dataclass
class AgentConfig:
    """Engine agent settings. ``itl_slo_ms`` is the ITL SLO the local autoscaler holds on this instance.

    ``queue_address``: ``host:port`` of the ``chiron.v1.Queue`` service; set on a BATCH or MIXED agent, it serves
    batch requests leased from there (a :class:`~services.engine.batch_worker.BatchWorker`); None = no batch work
    (an INTERACTIVE agent must leave it None). ``lease_batch``: most requests per Lease call; ``lease_timeout_s``:
    lease visibility timeout [s], renewed every third of it; ``queue_poll_interval_s``: how often an idle worker
    polls an empty queue [s].
    """

    instance_id: str = ""
    role: int = types_pb2.INSTANCE_ROLE_INTERACTIVE
    autoscaler: LocalAutoscalerConfig = LocalAutoscalerConfig()
    autoscale: bool = True
    stats_window_s: float = 10.0
    queue_address: str | None = None
    lease_batch: int = 8
    lease_timeout_s: float = 60.0
    queue_poll_interval_s: float = 0.2


class EngineAgent(engine_pb2_grpc.EngineServicer):
    """Implements ``chiron.v1.Engine`` over a :class:`~services.engine.backend.Backend`."""

    def __init__(self, backend: Backend, config: AgentConfig | None = None) -> None:
        self.backend = backend
        self.config = cfg = config or AgentConfig()
        if not cfg.instance_id:
            cfg.instance_id = f"engine-{uuid.uuid4().hex[:8]}"
        cfg.autoscaler.validate()
        self.itl = LatencyWindow(cfg.stats_window_s)
        self.ttft = LatencyWindow(cfg.stats_window_s)
        self.prompts = LatencyWindow(cfg.stats_window_s)  # prompt tokens of accepted interactive requests
        self.tokens = RateWindow(cfg.stats_window_s)
        self._ctl_itl = LatencyWindow(max(cfg.autoscaler.control_interval_s * 4, 1.0))
        self._ctl_decode_itl = LatencyWindow(self._ctl_itl.horizon_s)  # of decode-only steps
        self._ctl_tokens = 0
        self._ctl_last_s: float | None = None
        self.late_control_steps = 0  # control steps that came over LATE_CONTROL_FACTOR intervals (and 1 s) late
        self._saturated = False
        self._state = initial_state(cfg.autoscaler)
        self.last_decision: Decision | None = None
        self.decisions: deque[Decision] = deque(maxlen=1000)  # recent decisions (bounded)
        self.draining = False
        self.active_streams = 0  # Generate streams in progress
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task] = []
        # Interactive Generate requests not yet producing tokens (a MIXED batch worker leases only while 0).
        self.interactive_waiting = 0
        self.batch_worker: BatchWorker | None = None
        self.metrics = EngineMetrics(self.stats)
        backend.add_step_listener(self._on_step)
        if cfg.queue_address:
            self.attach_batch_worker(BatchWorker(
                self, cfg.queue_address, cfg.instance_id, backend.model_name, cfg.role, lease_batch=cfg.lease_batch,
                lease_timeout_s=cfg.lease_timeout_s, poll_interval_s=cfg.queue_poll_interval_s))

    def attach_batch_worker(self, worker: BatchWorker) -> BatchWorker:
        """Serve batch work through ``worker`` (before :meth:`start`; BATCH or MIXED agents only). Raises ValueError."""
        if self.config.role not in (types_pb2.INSTANCE_ROLE_BATCH, types_pb2.INSTANCE_ROLE_MIXED):
            raise ValueError(f"batch work needs a BATCH or MIXED agent; this one is "
                             f"{types_pb2.InstanceRole.Name(self.config.role)}")
        if worker.role != self.config.role:
            raise ValueError("the batch worker's role must be the agent's role")
        if self.batch_worker is not None:
            raise ValueError("this agent already has a batch worker")
        self.batch_worker = worker
        return worker

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start()
        # The initial (or, without the autoscaler, the static) max batch size.
        await self.backend.set_max_batch_size(self.config.autoscaler.initial_batch_size)
        if self.config.autoscale:
            self._tasks.append(asyncio.create_task(self._control_loop(), name="local-autoscaler"))
        if self.batch_worker is not None:
            await self.batch_worker.start()

    async def drain_batch(self) -> None:
        """Stop leasing batch work and return what runs here to the queue with its progress (idempotent)."""
        if self.batch_worker is not None:
            await self.batch_worker.drain()

    async def stop(self) -> None:
        await self.drain_batch()
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.backend.stop()

    # ---- statistics ------------------------------------------------------------------------
    def _on_step(self, s) -> None:
        for lat, count in s.itl_ms:
            self.itl.add(s.time_s, lat, count)
            self._ctl_itl.add(s.time_s, lat, count)
            if s.num_prefill_tokens == 0:
                self._ctl_decode_itl.add(s.time_s, lat, count)
        for t in s.ttft_ms:
            self.ttft.add(s.time_s, t)
        self.tokens.add(s.time_s, s.num_generation_tokens)
        self._ctl_tokens += s.num_generation_tokens
        self._saturated = s.saturated

    async def _control_loop(self) -> None:
        cfg = self.config.autoscaler
        self._ctl_last_s = self.backend.now()
        while True:
            await asyncio.sleep(cfg.control_interval_s / self.backend.speedup)
            await self.control_step()

    async def control_step(self) -> Decision:
        """One local-autoscaler decision from the stats since the previous one, applied to the backend."""
        cfg = self.config.autoscaler
        now = self.backend.now()
        first = self._ctl_last_s is None
        last = now - cfg.control_interval_s if first else self._ctl_last_s
        snap = self.backend.snapshot()
        q = self._ctl_itl.statistic(cfg.itl_quantile, now, since_s=last)
        obs = observation(now, q, self._ctl_tokens, now - last, snap.saturated or self._saturated, snap.num_running,
                          decode_itl_ms=self._ctl_decode_itl.statistic(None, now, since_s=last))
        self._ctl_tokens = 0
        self._ctl_last_s = now
        self._state, decision = decide(cfg, self._state, obs)
        if not first:
            self._check_late(now - last, snap.max_batch_size)
        applied = await self.backend.set_max_batch_size(decision.max_batch_size)
        self.last_decision = decision
        self.decisions.append(decision)
        if decision.action != "hold":
            log.info("local autoscaler: %s → max batch size %d (%s)", decision.action, applied, decision.reason)
        return decision

    def _check_late(self, engine_gap_s: float, held_cap: int) -> None:
        """Warn when this control step comes long after the previous one (``engine_gap_s`` of the backend's clock,
        which runs ``speedup`` times the wall clock): the batch size stayed at ``held_cap`` meanwhile whatever the
        load did (a stalled event loop or engine)."""
        speedup = self.backend.speedup
        wall_gap_s = engine_gap_s / speedup
        interval_wall_s = self.config.autoscaler.control_interval_s / speedup
        if wall_gap_s <= max(LATE_CONTROL_FACTOR * interval_wall_s, 1.0):
            return
        self.late_control_steps += 1
        log.warning("local autoscaler: %.1f s since the previous control step (one every %.2f s; %.1f s of engine "
                    "time): the agent's event loop or the engine stalled, and the max batch size stayed at %d",
                    wall_gap_s, interval_wall_s, engine_gap_s, held_cap)

    def stats(self) -> types_pb2.EngineStats:
        """Current statistics (windowed over ``stats_window_s``)."""
        now = self.backend.now()
        snap = self.backend.snapshot()
        d = self.last_decision

        def nz(x: float) -> float:
            return 0.0 if math.isnan(x) else x

        return types_pb2.EngineStats(
            instance_id=self.config.instance_id, role=self.config.role, model=self.backend.model_name,
            backend=self.backend.name, time=timestamp(time.time()),
            num_running=snap.num_running, num_waiting=snap.num_waiting, max_batch_size=snap.max_batch_size,
            kv_cache_usage=snap.kv_cache_usage, kv_cache_capacity_tokens=snap.kv_cache_capacity_tokens,
            itl_p50_ms=nz(self.itl.quantile(0.5, now)), itl_p95_ms=nz(self.itl.quantile(0.95, now)),
            ttft_p50_ms=nz(self.ttft.quantile(0.5, now)),
            throughput_tokens_per_s=self.tokens.rate(now),
            num_preemptions_total=snap.num_preemptions_total,
            generated_tokens_total=snap.generated_tokens_total,
            finished_requests_total=snap.finished_requests_total,
            num_batch_requests=self.batch_worker.active if self.batch_worker is not None else 0,
            batch_finished_total=self.batch_worker.acked if self.batch_worker is not None else 0,
            latency_backpressure=d.latency_backpressure if d else 0.0,
            throughput_backpressure=d.throughput_backpressure if d else 0.0,
            itl_slo_ms=int(self.config.autoscaler.itl_slo_ms),
            late_control_steps_total=self.late_control_steps,
            interactive_prompt_tokens_mean=nz(self.prompts.statistic(None, now)),
        )

    # ---- request validation ----------------------------------------------------------------
    def _to_backend(self, req: types_pb2.InferenceRequest) -> BackendRequest:
        if req.request_class not in (types_pb2.REQUEST_CLASS_UNSPECIFIED, types_pb2.REQUEST_CLASS_INTERACTIVE,
                                     types_pb2.REQUEST_CLASS_BATCH):
            raise RequestRejected(f"unknown request_class {req.request_class}: use INTERACTIVE or BATCH")
        if req.slo.ttft_ms < 0 or req.slo.itl_ms < 0:
            raise RequestRejected(f"SLO bounds must be >= 0 (ttft_ms={req.slo.ttft_ms}, itl_ms={req.slo.itl_ms})")
        if req.model and req.model != self.backend.model_name:
            raise RequestRejected(f"model {req.model!r} is not served here; this engine serves "
                                  f"{self.backend.model_name!r}")
        if not req.prompt_token_ids:
            raise RequestRejected("prompt is empty: set prompt_token_ids (the simulated backend has no tokenizer)"
                                  if req.prompt == "" else "text prompts need a backend with a tokenizer; "
                                  "send prompt_token_ids")
        rid = req.request_id or f"req-{uuid.uuid4().hex[:12]}"
        interactive = req.request_class != types_pb2.REQUEST_CLASS_BATCH
        br = BackendRequest(rid, tuple(req.prompt_token_ids), int(req.max_tokens), tuple(req.resume_token_ids),
                            ignore_eos=req.ignore_eos,
                            priority=interactive and self.config.role == types_pb2.INSTANCE_ROLE_MIXED,
                            stream_interval=max(1, int(req.stream_interval)))
        self.backend.validate(br)
        return br

    # ---- RPCs --------------------------------------------------------------------------------
    async def Generate(self, request: engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        """The backend's outputs as ``GenerateResponse`` chunks: the first token at once, then chunks of at least
        ``stream_interval`` tokens (a backend that does not coalesce itself is coalesced here), and whatever is
        left with the finish. ``itl_ms`` is the chunk's time since the previous chunk per token.

        One generator from the backend's outputs to gRPC: the per-chunk work is the agent's cost per streamed
        token on top of the engine (``chiron bench engine-overhead``)."""
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine is draining; send the request elsewhere")
        try:
            br = self._to_backend(request.request)
        except RequestRejected as e:
            await context.abort(status_code(e.code), str(e))
        interactive = request.request.request_class in (types_pb2.REQUEST_CLASS_UNSPECIFIED,
                                                        types_pb2.REQUEST_CLASS_INTERACTIVE)
        waiting = interactive
        if interactive:
            self.interactive_waiting += 1
        self.active_streams += 1
        self._idle.clear()
        backend = self.backend
        rid, n_prompt, interval = br.request_id, len(br.prompt_token_ids), br.stream_interval
        start_s = backend.now()
        if interactive and n_prompt:
            self.prompts.add(start_s, n_prompt)
        # Backend-clock seconds -> wall-clock seconds since the epoch, fixed for the request's life.
        wall_at_zero_s, per_s = time.time() - start_s / backend.speedup, 1.0 / backend.speedup
        prev_s: float | None = None
        pending: list[int] = []
        try:
            worker = self.batch_worker
            if interactive and worker is not None and self.config.role == types_pb2.INSTANCE_ROLE_MIXED:
                await worker.make_room(1)  # at the cap, or behind a queue of interactive requests below it
            async for out in backend.generate(br):
                if interval > 1 and out.finish_reason is None and prev_s is not None:
                    pending.extend(out.token_ids)
                    if len(pending) < interval:
                        continue
                    token_ids, pending = pending, []
                elif pending:
                    token_ids, pending = [*pending, *out.token_ids], []
                else:
                    token_ids = out.token_ids
                resp = engine_pb2.GenerateResponse(
                    request_id=rid, token_ids=token_ids, num_generated_tokens=out.num_generated,
                    num_prompt_tokens=n_prompt)
                if out.finish_reason is not None:
                    resp.finish_reason = FINISH.get(out.finish_reason, types_pb2.FINISH_REASON_UNSPECIFIED)
                resp.emitted_time.FromNanoseconds(int((wall_at_zero_s + out.time_s * per_s) * 1e9))
                if token_ids:
                    if prev_s is None:
                        resp.ttft_ms = (out.time_s - start_s) * 1e3
                    else:
                        resp.itl_ms = (out.time_s - prev_s) * 1e3 / len(token_ids)
                    prev_s = out.time_s
                    if waiting:
                        waiting = False
                        self._interactive_admitted()
                yield resp
        except RequestRejected as e:
            await context.abort(status_code(e.code), str(e))
        finally:
            if waiting:
                self._interactive_admitted()
            self.active_streams -= 1
            if self.active_streams == 0:
                self._idle.set()

    def _interactive_admitted(self) -> None:
        self.interactive_waiting -= 1
        if self.batch_worker is not None and self.interactive_waiting == 0:
            self.batch_worker.wake()

    async def Evict(self, request: engine_pb2.EvictRequest, context: grpc.aio.ServicerContext):
        progress = await self.backend.evict(request.request_id)
        if progress is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request {request.request_id!r} is not on this engine")
        return engine_pb2.EvictResponse(progress=types_pb2.RequestProgress(
            request_id=progress.request_id, generated_token_ids=list(progress.generated_token_ids),
            num_prompt_tokens=progress.num_prompt_tokens, kv_offloaded_tokens=progress.kv_offloaded_tokens,
            kv_offload_ms=progress.kv_offload_ms))

    async def GetStats(self, request, context):
        return engine_pb2.GetStatsResponse(stats=self.stats())

    async def WatchStats(self, request: engine_pb2.WatchStatsRequest, context):
        async for msg in every_interval(lambda: engine_pb2.WatchStatsResponse(stats=self.stats()), request.interval_ms):
            yield msg


@dataclass
class RunningServer:
    server: grpc.aio.Server
    agent: EngineAgent
    health: health.aio.HealthServicer
    port: int

    async def stop(self, grace_s: float = 5.0) -> None:
        """Drain: refuse new requests, return leased batch work to the queue (with its progress), let in-flight
        streams finish for up to ``grace_s``, then stop."""
        self.agent.draining = True
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        await self.agent.drain_batch()  # leased batch work goes back to the queue with its progress
        # In-flight streams finish while the server still answers new requests with UNAVAILABLE ("draining")
        # rather than gRPC's CANCELLED for calls arriving during server.stop().
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.agent._idle.wait(), timeout=max(0.0, deadline - loop.time()))
        await self.server.stop(max(0.0, deadline - loop.time()))
        await self.agent.stop()


async def serve(agent: EngineAgent, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Start the gRPC server (health checking and reflection on). ``port`` 0 picks a free port."""
    name = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name
    server, health_servicer, bound = await start_server(
        lambda s: engine_pb2_grpc.add_EngineServicer_to_server(agent, s), name, host, port,
        before_start=lambda _health: agent.start())
    log.info("engine agent %s serving on %s:%d", agent.config.instance_id, host, bound)
    return RunningServer(server, agent, health_servicer, bound)
