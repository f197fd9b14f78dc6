"""The ``chiron scaler`` service: observe, decide (:mod:`services.global_scaler.policy`), act, explain.

Every ``interval_s`` the scaler

1. reads engine membership from etcd (:class:`~services.common.membership.MembershipWatcher`; while etcd
   is unreachable the last known membership is used and a warning logged);
2. asks each serving instance for its stats (``Engine.GetStats``: max batch size, running, waiting,
   finished requests) and the queue for its per-group estimates (``Queue.GetStats``);
3. derives interactive load: in-flight requests (running + waiting at INTERACTIVE and MIXED instances) and
   the arrival rate λ, taken as the rate of finished interactive requests plus the growth of in-flight
   ones (in steady state, arrivals = completions); the arrival CV is configured (``arrival_cv``, 1 =
   Poisson) until the router reports arrivals;
4. runs the pure policy, and — unless ``advisory`` — asks the provider for each role's desired count;
5. records the decision (inputs, reasons, provider actions and errors), logs it and streams it to
   ``WatchDecisions`` clients. In advisory mode steps 1–3 and 5 are identical and no provider is called.

A provider error is reported in the decision and retried at the next interval (providers retry with
backoff inside one call).

The same gRPC server also serves KEDA's ``externalscaler.ExternalScaler`` (:mod:`services.global_scaler.keda`):
in Kubernetes, KEDA reads each role's desired count from the latest decision and scales that role's Deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, replace

import grpc

from chiron.v1 import engine_pb2, engine_pb2_grpc, queue_pb2, queue_pb2_grpc, scaler_pb2, scaler_pb2_grpc
from services.common.grpc_util import ChannelPool, create_server, mark_serving, settle_heap, timestamp
from services.common.metrics import ScalerMetrics
from services.global_scaler import keda
from services.global_scaler.policy import (
    ROLES,
    EngineLoad,
    GroupView,
    LoadSample,
    PolicyConfig,
    PolicyState,
    ScalerDecision,
    ScalerInputs,
    decide,
    observe,
)
from services.global_scaler.providers import InstanceProvider, ProviderError

log = logging.getLogger("chiron.scaler")


class ScalerService(scaler_pb2_grpc.GlobalScalerServicer):
    """Implements ``chiron.v1.Scaler`` and runs the control loop (see the module docstring).

    ``membership``: an object with ``snapshot() -> dict[str, InstanceInfo]`` (role, address, state);
    ``provider``: None or ignored in ``advisory`` mode; ``queue``: "host:port" of the queue or None.
    """

    def __init__(self, config: PolicyConfig, membership, provider: InstanceProvider | None, *, queue: str | None = None,
                 advisory: bool = False, arrival_cv: float = 1.0, clock=time.time) -> None:
        self.config = config.validate()
        if not advisory and provider is None:
            raise ValueError("an active scaler needs a provider (or run it with advisory=True)")
        self.membership = membership
        self.provider = provider
        self.queue = queue
        self.advisory = advisory
        self.arrival_cv = arrival_cv
        self.clock = clock
        self.state = PolicyState()
        self.decisions: deque[scaler_pb2.ScalerDecision] = deque(maxlen=1000)
        self._changed = asyncio.Condition()
        self._channels = ChannelPool()
        self._samples: dict[str, LoadSample] = {}
        self._task: asyncio.Task | None = None
        self.metrics = ScalerMetrics()

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scaler-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._channels.close()

    async def _loop(self) -> None:
        while True:
            try:
                await self.step()
            except Exception:
                log.exception("scaler step failed; retrying at the next interval")
            await asyncio.sleep(self.config.interval_s)

    # ---- observe ---------------------------------------------------------------------------------
    async def _engine_stats(self, address: str):
        try:
            resp = await engine_pb2_grpc.EngineStub(self._channels.get(address)).GetStats(engine_pb2.GetStatsRequest(), timeout=2.0)
            return resp.stats
        except grpc.aio.AioRpcError as e:
            log.warning("engine %s: GetStats failed (%s); counted without stats", address, e.code().name)
            return None

    async def _queue_groups(self, now: float) -> list[GroupView]:
        if not self.queue:
            return []
        try:
            stats = (await queue_pb2_grpc.QueueStub(self._channels.get(self.queue)).GetStats(
                queue_pb2.QueueGetStatsRequest(), timeout=2.0)).stats
        except grpc.aio.AioRpcError as e:
            log.warning("queue %s: GetStats failed (%s); no batch backpressure this interval", self.queue, e.code().name)
            return []
        return [GroupView(g.group_id, g.size, g.estimated_wait_p95_s if math.isfinite(g.estimated_wait_p95_s) else math.inf,
                          g.deadline.ToNanoseconds() / 1e9, leased=g.leased) for g in stats.groups]

    async def observe(self) -> ScalerInputs:
        now = self.clock()
        members = [m for m in self.membership.snapshot().values() if getattr(m, "state", "serving") == "serving"]
        stats = await asyncio.gather(*(self._engine_stats(m.address) for m in members))
        loads = [EngineLoad(m.instance_id, m.role, has_stats=False) if s is None else
                 EngineLoad(m.instance_id, m.role, s.max_batch_size, s.num_running, s.num_waiting,
                            s.finished_requests_total, batch_requests=s.num_batch_requests,
                            batch_finished_total=s.batch_finished_total)
                 for m, s in zip(members, stats, strict=True)]
        inputs = observe(now, loads, self._samples, self.arrival_cv, await self._queue_groups(now))
        if self.provider is not None and not self.advisory:
            pending = {}
            for role in ROLES:
                with contextlib.suppress(ProviderError):
                    pending[role] = (await self.provider.counts(role)).pending
            inputs = replace(inputs, pending=pending)
        return inputs

    # ---- decide and act -------------------------------------------------------------------------
    async def step(self) -> scaler_pb2.ScalerDecision:
        """One observe → decide → act round; returns the recorded decision."""
        inputs = await self.observe()
        self.state, d = decide(self.config, self.state, inputs)
        actions, errors = [], []
        if not self.advisory:
            for role in ROLES:
                want = d.desired(role)
                try:
                    counts = await self.provider.counts(role)
                    if counts.total != want:
                        await self.provider.set_count(role, want, d.roles[role].reason)
                        actions.append(f"{role}: {counts.total} -> {want}")
                except ProviderError as e:
                    errors.append(f"{role}: {e}")
                    self.metrics.provider_errors.labels(role).inc()
                    log.error("provider %s failed to scale %s to %d: %s", self.provider.name, role, want, e)
        msg = self._to_proto(d, actions, errors)
        self.decisions.append(msg)
        self.metrics.decision(d.roles.values(), d.theta, d.batch_backpressure)
        changed = any(r.desired != r.current for r in d.roles.values())
        (log.info if changed or actions else log.debug)(
            "decision%s: %s", " (advisory)" if self.advisory else "",
            "; ".join(f"{r}={d.roles[r].current}->{d.roles[r].desired} ({d.roles[r].reason})" for r in ROLES))
        async with self._changed:
            self._changed.notify_all()
        return msg

    def _to_proto(self, d: ScalerDecision, actions: list[str], errors: list[str]) -> scaler_pb2.ScalerDecision:
        return scaler_pb2.ScalerDecision(
            time=timestamp(d.now), theta=d.theta, batch_backpressure=d.batch_backpressure, inputs=dict(d.inputs),
            advisory=self.advisory, actions=actions, errors=errors,
            roles=[scaler_pb2.RoleDecision(role=r.role, current=r.current, wanted=r.wanted, desired=r.desired,
                                           reason=r.reason) for r in d.roles.values()])

    def latest_decision(self) -> scaler_pb2.ScalerDecision | None:
        """The latest recorded decision, None before the first step."""
        return self.decisions[-1] if self.decisions else None

    async def wait_decision(self, after: scaler_pb2.ScalerDecision | None = None) -> scaler_pb2.ScalerDecision:
        """The latest decision once it is not ``after`` (compared by identity): at once when one newer than
        ``after`` (or any, for None) is recorded, else after the next step."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self.decisions) and self.decisions[-1] is not after)
            return self.decisions[-1]

    # ---- RPCs -------------------------------------------------------------------------------------
    async def GetDecision(self, request, context):
        if not self.decisions:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no decision computed yet; retry after one scaling interval")
        return scaler_pb2.GetDecisionResponse(decision=self.decisions[-1])

    async def WatchDecisions(self, request, context):
        sent = None
        while True:
            if self.decisions and self.decisions[-1] is not sent:
                sent = self.decisions[-1]
                yield scaler_pb2.WatchDecisionsResponse(decision=sent)
            async with self._changed:
                await self._changed.wait()


@dataclass
class RunningScaler:
    server: grpc.aio.Server
    service: ScalerService
    port: int

    async def stop(self, grace_s: float = 1.0) -> None:
        await self.server.stop(grace_s)
        await self.service.stop()


async def serve(service: ScalerService, host: str = "127.0.0.1", port: int = 0) -> RunningScaler:
    """Serve ``chiron.v1.Scaler`` (health checking, reflection) and KEDA's ``externalscaler.ExternalScaler``
    (health checking) on one port, and start the control loop."""
    name = scaler_pb2.DESCRIPTOR.services_by_name["GlobalScaler"].full_name

    def add(s: grpc.aio.Server) -> None:
        scaler_pb2_grpc.add_GlobalScalerServicer_to_server(service, s)
        keda.add_to_server(service, s)

    server, health_servicer, bound = create_server(add, name, host, port)
    await server.start()
    await service.start()
    settle_heap()
    await mark_serving(health_servicer, name)
    await mark_serving(health_servicer, keda.SERVICE_NAME)
    log.info("scaler serving on %s:%d (%s)", host, bound, "advisory" if service.advisory else "active")
    return RunningScaler(server, service, bound)
