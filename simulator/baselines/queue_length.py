"""KEDA + Kubernetes HPA on a queue-depth metric: vLLM production-stack's autoscaling (baselines.md §4).

Sources: vllm-project/production-stack @ a6c01db0 ``helm/templates/scaledobject-vllm.yaml`` (trigger
``vllm:num_requests_waiting``, threshold 5, an HPA AverageValue target); Kubernetes
``pkg/controller/podautoscaler/replica_calculator.go`` (external AverageValue metric: ``ceil(metric /
target)`` outside a 10% tolerance around ``metric / (target × current replicas)``) and
``pkg/apis/autoscaling/v2/defaults.go`` @ 1adaa753 (scale-up: no stabilization, at most max(+4 pods, +100%)
per 15 s; scale-down: the highest recommendation of the last 300 s, at most −100% per 15 s); HPA sync
period 15 s.

The metric is every waiting request: ``sum(num_requests_waiting)`` over the engines (the chart's query
summed, since KEDA's Prometheus scaler fails on several series) plus, in the ``gateway-queue`` variant, the
gateway queue's depth, which is what a ScaledObject on that queue reads.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from simulator.baselines.snapshot import FleetSnapshot


@dataclass(frozen=True)
class QueueLengthConfig:
    """``threshold``: target waiting requests per replica (AverageValue); ``sync_s``: HPA sync period;
    ``stabilization_s``: scale-down stabilization window; ``tolerance``: HPA's; ``min_replicas`` 1 (a
    ScaledObject's ``minReplicaCount`` in the chart's examples)."""

    threshold: float = 5.0
    sync_s: float = 15.0
    stabilization_s: float = 300.0
    tolerance: float = 0.1
    min_replicas: int = 1

    def validate(self) -> QueueLengthConfig:
        if not self.threshold > 0 or not self.sync_s > 0 or self.stabilization_s < 0 or self.min_replicas < 1:
            raise ValueError("queue-length: need threshold > 0, sync_s > 0, stabilization_s >= 0, min_replicas >= 1")
        return self


@dataclass
class QueueLengthState:
    recommendations: deque = field(default_factory=deque)  # (time s, recommended replicas)


def decide(cfg: QueueLengthConfig, state: QueueLengthState, snap: FleetSnapshot) -> tuple[QueueLengthState, int, str]:
    """One HPA sync: (state, desired replicas, reason). Replicas = instances loading or serving."""
    n = len(snap.active())
    metric = snap.engine_waiting + snap.gateway_queued
    ratio = metric / (cfg.threshold * max(n, 1))
    rec = n if n > 0 and abs(ratio - 1) <= cfg.tolerance else math.ceil(metric / cfg.threshold)
    rec = max(cfg.min_replicas, min(rec, snap.budget_instances))
    state.recommendations.append((snap.now, rec))
    while state.recommendations and state.recommendations[0][0] < snap.now - cfg.stabilization_s:
        state.recommendations.popleft()
    if rec > n:
        desired = min(rec, max(n + 4, 2 * n))
    else:
        desired = min(n, max(r for _, r in state.recommendations))
    return state, desired, f"waiting {metric} / target {cfg.threshold:g} per replica"
