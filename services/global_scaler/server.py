"""The ``chiron scaler`` service: observe, decide (:mod:`services.global_scaler.policy`), act, explain.

Every ``interval_s`` the scaler

1. reads engine membership from etcd (:class:`~services.common.membership.MembershipWatcher`; while etcd is
   unreachable the last known membership is used and a warning logged);
2. asks each serving instance for ``Engine.GetStats`` and the queue for its per-group estimates
   (``Queue.GetStats``), and builds the policy's inputs with :func:`~services.global_scaler.policy.observe`
   (the same builder the simulator uses; the arrival CV from its own past arrival rates,
   :class:`~services.global_scaler.policy.ArrivalRates`, unless ``arrival_cv`` fixes it);
3. runs the pure policy and, unless ``advisory`` or a standby, asks the provider for each role's count;
4. records the decision (inputs, reasons, provider actions and errors), logs it and streams it to
   ``WatchDecisions`` clients. Advisory mode does all but call the provider.

**No input reads as zero.** An input that could not be read (queue or engine stats, membership while etcd is
unreachable, a provider's counts) is not replaced by zero: the decision *holds*. The policy still runs (so
justified scale-ups happen), but no role goes below what it has (serving + starting), every reason says
``holding: <input> unavailable (<gRPC code>)``, ``inputs["inputs_unavailable"]`` counts the missing inputs and
queue-derived inputs read NaN. Reading a down queue as empty would drain BATCH engines still holding
unacknowledged results. The delay window records the held count, so once inputs return a scale-down still waits
one full ``scale_down_delay_s`` of complete observations.

**One acting replica.** With an election (:class:`~services.global_scaler.leader.LeaderElection`) only the
leader calls the provider (checked right before each call); every replica computes, logs and serves decisions.
``inputs["leader"]`` is 1 in the leader's decisions and 0 in a standby's; winning the election wakes the loop
at once. A provider error is reported in the decision and retried at the next interval.

The same gRPC server serves KEDA's ``externalscaler.ExternalScaler`` (:mod:`services.global_scaler.keda`): in
Kubernetes, KEDA reads each role's desired count from the latest decision and scales its Deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field, replace

import grpc
from grpc_health.v1 import health_pb2

from chiron.v1 import engine_pb2, engine_pb2_grpc, queue_pb2, queue_pb2_grpc, scaler_pb2, scaler_pb2_grpc
from services.common.grpc_util import ChannelPool, timestamp
from services.common.metrics import ScalerMetrics
from services.common.serving import RunningService, start_server
from services.global_scaler import keda
from services.global_scaler.leader import LeaderElection
from services.global_scaler.policy import (
    ROLES,
    ArrivalRates,
    GroupView,
    LoadSample,
    PolicyConfig,
    PolicyState,
    ScalerDecision,
    ScalerInputs,
    decide,
    engine_load,
    group_view,
    hold_in_window,
    observe,
)
from services.global_scaler.providers import InstanceCounts, InstanceProvider, ProviderError

log = logging.getLogger("chiron.scaler")


class _Channels(ChannelPool):
    """A :class:`ChannelPool` that forgets an address's channel after a failed call, so a server that comes
    back (queue or engine restarted) is reached at the next interval, not after gRPC's reconnect backoff
    (which grows to 120 s while the server is down)."""

    async def discard(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()


@dataclass
class Observation:
    """What one round read: the policy's ``inputs``; ``unavailable``: one line per input that could not be read
    (e.g. ``"queue stats unavailable (UNAVAILABLE)"``); ``counts``: the provider's counts per role (None: not
    read, advisory, or the read failed)."""

    inputs: ScalerInputs
    unavailable: list[str] = field(default_factory=list)
    counts: dict[str, InstanceCounts | None] = field(default_factory=dict)
    queue_missing: bool = False


class ScalerService(scaler_pb2_grpc.GlobalScalerServicer):
    """Implements ``chiron.v1.Scaler`` and runs the control loop (see the module docstring).

    ``membership``: an object with ``snapshot() -> dict[str, InstanceInfo]`` (role, address, state) and
    optionally ``healthy`` (False: the snapshot may be stale); ``provider``: None or ignored in ``advisory``
    mode; ``queue``: "host:port" of the queue or None; ``election``: None (this replica always acts) or a
    :class:`~services.global_scaler.leader.LeaderElection`, started and resigned with the service (only the
    leader acts). ValueError for an active scaler without a provider or an advisory one with an election.
    """

    def __init__(self, config: PolicyConfig, membership, provider: InstanceProvider | None, *, queue: str | None = None,
                 advisory: bool = False, arrival_cv: float | None = None, clock=time.time,
                 election: LeaderElection | None = None) -> None:
        self.config = config.validate()
        if not advisory and provider is None:
            raise ValueError("an active scaler needs a provider (or run it with advisory=True)")
        if advisory and election is not None:
            raise ValueError("an advisory scaler never acts: it must not take part in the leader election")
        self.membership = membership
        self.provider = provider
        self.queue = queue
        self.advisory = advisory
        self._arrivals = ArrivalRates(self.config.arrival_cv_window_s, arrival_cv)  # None: measured
        self.clock = clock
        self.election = election
        self.state = PolicyState()
        self.decisions: deque[scaler_pb2.ScalerDecision] = deque(maxlen=1000)
        self._changed = asyncio.Condition()
        self._channels = _Channels()
        self._samples: dict[str, LoadSample] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.metrics = ScalerMetrics()

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.election is not None:
            # A new leader acts at once, not one interval later.
            self.election.add_listener(lambda leading: self._wake.set() if leading else None)
            await self.election.start()
        self._task = asyncio.create_task(self._loop(), name="scaler-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.election is not None:
            await self.election.close()  # resign: a standby takes over at once
        await self._channels.close()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.step()
            except Exception:
                log.exception("scaler step failed; retrying at the next interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.interval_s)

    @property
    def acting(self) -> bool:
        """True when this replica may call the provider now: active (not advisory) and, with an election, the
        leader with its lease certainly alive."""
        return not self.advisory and (self.election is None or self.election.is_leader)

    # ---- observe ---------------------------------------------------------------------------------
    async def _engine_stats(self, address: str):
        """An engine's ``EngineStats``, or the gRPC status code name (str) when the call failed (2 s deadline)."""
        try:
            resp = await engine_pb2_grpc.EngineStub(self._channels.get(address)).GetStats(engine_pb2.GetStatsRequest(), timeout=2.0)
            return resp.stats
        except grpc.aio.AioRpcError as e:
            log.warning("engine %s: GetStats failed (%s); its load is unknown this interval", address, e.code().name)
            await self._channels.discard(address)
            return e.code().name

    async def _queue_groups(self, now: float) -> tuple[list[GroupView], str | None]:
        """The queue's request groups, and None; or ``([], code)`` when ``Queue.GetStats`` failed (2 s deadline):
        an unreadable queue is not an empty one. No queue configured: ``([], None)``."""
        if not self.queue:
            return [], None
        try:
            stats = (await queue_pb2_grpc.QueueStub(self._channels.get(self.queue)).GetStats(
                queue_pb2.QueueGetStatsRequest(), timeout=2.0)).stats
        except grpc.aio.AioRpcError as e:
            log.warning("queue %s: GetStats failed (%s); batch inputs unknown, holding scale-downs", self.queue,
                        e.code().name)
            await self._channels.discard(self.queue)
            return [], e.code().name
        return [group_view(g.group_id, g.size, g.estimated_wait_p95_s, g.deadline.ToNanoseconds() / 1e9, g.leased)
                for g in stats.groups], None

    async def observe(self) -> ScalerInputs:
        """The policy's inputs for this round (see :meth:`gather` for what could not be read)."""
        return (await self.gather()).inputs

    async def gather(self) -> Observation:
        """Read membership, engine stats, queue stats and provider counts; never raises for an unreachable
        input (it is listed in ``unavailable`` instead)."""
        now = self.clock()
        unavailable: list[str] = []
        if not getattr(self.membership, "healthy", True):
            unavailable.append("instance membership unavailable (etcd unreachable; last known list used)")
        members = [m for m in self.membership.snapshot().values() if getattr(m, "state", "serving") == "serving"]
        stats = await asyncio.gather(*(self._engine_stats(m.address) for m in members))
        failed = [f"{m.instance_id} ({s})" for m, s in zip(members, stats, strict=True) if isinstance(s, str)]
        if failed:
            shown = ", ".join(failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
            unavailable.append(f"engine stats unavailable: {shown}")
        loads = [engine_load(m.instance_id, m.role, None if isinstance(s, str) else s)
                 for m, s in zip(members, stats, strict=True)]
        groups, queue_error = await self._queue_groups(now)
        if queue_error is not None:
            unavailable.append(f"queue stats unavailable ({queue_error})")
        inputs = observe(now, loads, self._samples, self._arrivals.cv(now), groups)
        self._arrivals.add(now, inputs.arrivals.rate_per_s)
        counts: dict[str, InstanceCounts | None] = {}
        if self.provider is not None and not self.advisory:
            pending = {}
            # Starting = what the provider has placed minus what serves: Nomad reports an allocation "running" once
            # its process starts, while the engine still loads and has not registered. Counted as neither current
            # nor starting, a scale-down to the serving count would skip the delay window and stop engines seconds
            # after starting them.
            serving = {role: sum(1 for m in members if m.role == role) for role in ROLES}
            for role in ROLES:
                try:
                    counts[role] = await self.provider.counts(role)
                    pending[role] = max(counts[role].pending, counts[role].total - serving[role])
                except ProviderError as e:
                    counts[role] = None
                    unavailable.append(f"{role} instance counts unavailable ({self.provider.name}: {e})")
            inputs = replace(inputs, pending=pending)
        return Observation(inputs, unavailable, counts, queue_missing=queue_error is not None)

    # ---- decide and act -------------------------------------------------------------------------
    def _hold(self, d: ScalerDecision, obs: Observation) -> ScalerDecision:
        """Apply "no input reads as zero" (module docstring): no role below what it has, reasons say why."""
        why = "; ".join(obs.unavailable)
        roles = {}
        for role, rd in d.roles.items():
            # What the role has is what the provider has placed, when it says: an engine that died but is still
            # listed in membership (its lease not expired) is in ``current`` and maybe in ``pending`` too, and
            # holding at their sum would start one more instance every interval until the lease expires.
            counts = obs.counts.get(role)
            have = counts.total if counts is not None else rd.current + int(obs.inputs.pending.get(role, 0))
            if rd.desired < have:
                roles[role] = replace(rd, desired=have, code="scale_down_delay",
                                      reason=f"holding: {why}; kept at {have} (no scale-down while an input is "
                                             f"unavailable; the policy without it said {rd.desired})")
                self.state = hold_in_window(self.state, role, have)
            else:
                roles[role] = replace(rd, reason=f"{rd.reason}; holding scale-downs: {why}")
        inputs = dict(d.inputs, inputs_unavailable=float(len(obs.unavailable)))
        if obs.queue_missing:
            for name in ("queued_requests", "in_service_requests", "groups", "worst_group_ratio"):
                inputs[name] = math.nan
        return replace(d, roles=roles, inputs=inputs,
                       batch_backpressure=math.nan if obs.queue_missing else d.batch_backpressure)

    async def step(self) -> scaler_pb2.ScalerDecision:
        """One observe → decide → act round; returns the recorded decision."""
        obs = await self.gather()
        self.state, d = decide(self.config, self.state, obs.inputs)
        if obs.unavailable:
            d = self._hold(d, obs)
            log.warning("holding scale-downs: %s", "; ".join(obs.unavailable))
        actions, errors = [], []
        standby = False
        if not self.advisory:
            for role in ROLES:
                want = d.desired(role)
                counts = obs.counts.get(role)
                if counts is None:
                    errors.append(f"{role}: instance counts unavailable; not scaled this interval")
                    continue
                if counts.total == want:
                    continue
                if not self.acting:  # checked right before each call: leadership may lapse mid-round
                    standby = True
                    continue
                try:
                    await self.provider.set_count(role, want, d.roles[role].reason)
                    actions.append(f"{role}: {counts.total} -> {want}")
                except ProviderError as e:
                    errors.append(f"{role}: {e}")
                    self.metrics.provider_errors.labels(role).inc()
                    log.error("provider %s failed to scale %s to %d: %s", self.provider.name, role, want, e)
        leader = None
        if self.election is not None:
            leader = not standby and self.acting
            d = replace(d, inputs=dict(d.inputs, leader=1.0 if leader else 0.0))
        msg = self._to_proto(d, actions, errors)
        self.decisions.append(msg)
        self.metrics.decision(d.roles.values(), d.theta, d.batch_backpressure)
        changed = any(r.desired != r.current for r in d.roles.values())
        mode = (" (advisory)" if self.advisory else
                f" (standby; leader: {self.election.leader_id or 'none'})" if leader is False else "")
        (log.info if changed or actions else log.debug)(
            "decision%s: %s", mode,
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
class RunningScaler(RunningService):
    service: ScalerService
    keda_health: asyncio.Task | None = None

    async def stop(self, grace_s: float = 1.0) -> None:
        if self.keda_health is not None:
            self.keda_health.cancel()
        await super().stop(grace_s)


async def _keda_health(service: ScalerService, health_servicer, period_s: float = 0.5) -> None:
    """KEDA's service health follows this replica's right to act: SERVING on the acting replica (the leader, or the
    only one without an election), NOT_SERVING on a standby or an advisory one. The Kubernetes readiness probe asks
    this status, so the scaler Service sends KEDA's connections to the leader, whose counts are the ones applied.
    Checked every ``period_s`` [s]."""
    last = None
    while True:
        acting = service.acting
        if acting != last:
            await health_servicer.set(keda.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING if acting
                                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            last = acting
        await asyncio.sleep(period_s)


async def serve(service: ScalerService, host: str = "127.0.0.1", port: int = 0) -> RunningScaler:
    """Serve ``chiron.v1.Scaler`` (health checking, reflection) and KEDA's ``externalscaler.ExternalScaler``
    (health checking) on one port, and start the control loop."""
    name = scaler_pb2.DESCRIPTOR.services_by_name["GlobalScaler"].full_name

    def add(s: grpc.aio.Server) -> None:
        scaler_pb2_grpc.add_GlobalScalerServicer_to_server(service, s)
        keda.add_to_server(service, s)

    server, health_servicer, bound = await start_server(add, name, host, port, after_start=service.start)
    task = asyncio.create_task(_keda_health(service, health_servicer))
    log.info("scaler serving on %s:%d (%s)", host, bound, "advisory" if service.advisory else "active")
    return RunningScaler(server, service, bound, task)
