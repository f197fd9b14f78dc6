"""Kubernetes through KEDA: the scaler's desired counts served over KEDA's external-scaler contract.

In Kubernetes the engine agents of each role are a Deployment (``deploy/kubernetes/``), and one KEDA
``ScaledObject`` per role scales it with a trigger of type ``external`` whose ``metadata`` carries
``role: interactive|mixed|batch`` and ``scalerAddress: chiron-scaler:<port>``. KEDA calls the scaler's
``externalscaler.ExternalScaler`` service (vendored unchanged from KEDA: ``protos/chiron/keda/externalscaler.proto``,
Apache-2.0, stubs in ``chiron/keda/``) with that metadata as ``ScaledObjectRef.scalerMetadata``:

* ``GetMetricSpec`` → one metric, ``chiron-<role>-desired``, target size 1 [instances per pod];
* ``GetMetrics`` → that metric's value: the role's desired count [instances] in the scaler's latest decision
  (:func:`services.global_scaler.policy.decide`, the same decision ``GetDecision`` explains);
* ``IsActive`` → desired count > 0; ``StreamIsActive`` pushes it now and again whenever it changes;
* ``StreamMetricSpec`` (optional in KEDA) sends the spec once: it never changes.

KEDA hands the value to the HPA as an ``AverageValue`` external metric, so the HPA's replica count is
ceil(value / target) = the desired count, and KEDA scales the Deployment to zero while ``IsActive`` is false
(``minReplicaCount: 0``): a BATCH Deployment runs no pod while no request group needs one. The manifests turn
the HPA's own tolerance (10%), stabilization windows and rate limits off (``advanced.horizontalPodAutoscalerConfig``),
since the policy already paces scale-up and delays scale-down.

Errors: a ``role`` missing or not one of :data:`~services.global_scaler.policy.ROLES` → INVALID_ARGUMENT (the
message lists the valid roles); no decision computed yet → UNAVAILABLE (KEDA keeps the current replica count and
retries: a missing input is never read as zero).

:class:`KedaProvider` is the scaler's provider in Kubernetes (``chiron scaler --provider keda``): it launches
nothing. It records each role's desired count (what KEDA reads back through the service above) and reports what
runs from etcd membership: ``running`` = the role's serving instances, ``pending`` = desired − running (pods that
KEDA asked for and that have not registered yet), so the policy's "no BATCH added while earlier ones start" and
"never cancel starting instances" rules see Kubernetes' pods as they see local processes or Nomad allocations.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import grpc

from chiron.keda import externalscaler_pb2, externalscaler_pb2_grpc
from chiron.v1 import scaler_pb2
from services.global_scaler.providers import ROLES, InstanceCounts, InstanceProvider

SERVICE_NAME = externalscaler_pb2.DESCRIPTOR.services_by_name["ExternalScaler"].full_name  # "externalscaler.ExternalScaler"
ROLE_KEY = "role"  # the ScaledObject trigger's metadata key naming the role
TARGET_SIZE = 1  # instances per pod: the HPA's replica count is ceil(desired / 1) = desired


def metric_name(role: str) -> str:
    """The one metric of a role's ScaledObject (KEDA prefixes it with ``s<trigger index>-`` for the HPA and strips
    that prefix again before calling ``GetMetrics``)."""
    return f"chiron-{role}-desired"


class DecisionSource(Protocol):
    """What KEDA's service reads from the scaler (:class:`~services.global_scaler.server.ScalerService`)."""

    def latest_decision(self) -> scaler_pb2.ScalerDecision | None: ...

    async def wait_decision(self, after: scaler_pb2.ScalerDecision | None = None) -> scaler_pb2.ScalerDecision: ...


class KedaExternalScaler(externalscaler_pb2_grpc.ExternalScalerServicer):
    """``externalscaler.ExternalScaler`` over a :class:`~services.global_scaler.server.ScalerService`'s decisions
    (see the module docstring). Holds no state of its own: every answer reads the scaler's latest decision."""

    def __init__(self, scaler: DecisionSource) -> None:
        self.scaler = scaler

    # ---- helpers -------------------------------------------------------------------------------
    @staticmethod
    async def _role(ref: externalscaler_pb2.ScaledObjectRef, context) -> str:
        role = ref.scalerMetadata.get(ROLE_KEY, "").strip().lower()
        if role not in ROLES:
            got = f"{ROLE_KEY}={ref.scalerMetadata[ROLE_KEY]!r}" if ROLE_KEY in ref.scalerMetadata else f"no {ROLE_KEY!r} key"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"ScaledObject {ref.namespace}/{ref.name}: trigger metadata has {got}; set "
                                f"{ROLE_KEY} to one of {', '.join(ROLES)}")
        return role

    def _desired(self, role: str) -> int | None:
        """The role's desired count [instances] in the latest decision, None before the first one."""
        d = self.scaler.latest_decision()
        if d is None:
            return None
        return next(r.desired for r in d.roles if r.role == role)

    async def _desired_or_abort(self, role: str, context) -> int:
        desired = self._desired(role)
        if desired is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the scaler has computed no decision yet; retry after one scaling interval")
        return desired

    # ---- RPCs ------------------------------------------------------------------------------------
    async def IsActive(self, request, context):
        role = await self._role(request, context)
        return externalscaler_pb2.IsActiveResponse(result=await self._desired_or_abort(role, context) > 0)

    async def StreamIsActive(self, request, context):
        """Sends the role's activity once the scaler has a decision, then each time it flips."""
        role = await self._role(request, context)
        decision, sent = None, None
        while True:
            decision = await self.scaler.wait_decision(after=decision)
            active = next(r.desired for r in decision.roles if r.role == role) > 0
            if active != sent:
                sent = active
                yield externalscaler_pb2.IsActiveResponse(result=active)

    async def GetMetricSpec(self, request, context):
        role = await self._role(request, context)
        return self._spec(role)

    async def StreamMetricSpec(self, request, context):
        """The spec never changes: sent once, then the stream stays open until KEDA closes it."""
        role = await self._role(request, context)
        yield self._spec(role)
        await asyncio.Event().wait()

    async def GetMetrics(self, request, context):
        role = await self._role(request.scaledObjectRef, context)
        name = metric_name(role)
        if request.metricName and request.metricName != name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown metric {request.metricName!r} for role {role}; this ScaledObject's metric is {name!r}")
        desired = await self._desired_or_abort(role, context)
        return externalscaler_pb2.GetMetricsResponse(metricValues=[
            externalscaler_pb2.MetricValue(metricName=name, metricValue=desired, metricValueFloat=float(desired))])

    @staticmethod
    def _spec(role: str) -> externalscaler_pb2.GetMetricSpecResponse:
        return externalscaler_pb2.GetMetricSpecResponse(metricSpecs=[
            externalscaler_pb2.MetricSpec(metricName=metric_name(role), targetSize=TARGET_SIZE,
                                          targetSizeFloat=float(TARGET_SIZE))])


def add_to_server(scaler: DecisionSource, server: grpc.aio.Server) -> KedaExternalScaler:
    """Register ``externalscaler.ExternalScaler`` for ``scaler`` on ``server`` (before it starts)."""
    servicer = KedaExternalScaler(scaler)
    externalscaler_pb2_grpc.add_ExternalScalerServicer_to_server(servicer, server)
    return servicer


class KedaProvider(InstanceProvider):
    """The provider in Kubernetes: KEDA acts, this records (see the module docstring).

    ``membership``: an object with ``snapshot() -> dict[str, InstanceInfo]`` (the scaler's etcd watcher)."""

    name = "keda"

    def __init__(self, membership) -> None:
        self.membership = membership
        self.desired: dict[str, int] = {}  # role → the count last asked for [instances]

    async def set_count(self, role: str, count: int, reason: str = "") -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        if count < 0:
            raise ValueError(f"instance count must be >= 0, got {count}")
        self.desired[role] = count

    async def counts(self, role: str) -> InstanceCounts:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        running = sum(1 for m in self.membership.snapshot().values()
                      if m.role == role and getattr(m, "state", "serving") == "serving")
        return InstanceCounts(running=running, pending=max(0, self.desired.get(role, 0) - running))
