"""Unit tests of the queue's domain core (``services/queue/core.py``) on an in-memory SQLite store with a fake
clock (seconds): what the ``chiron.v1.Queue`` service serves and the fleet simulator drives, without gRPC."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.queue.core import CapacityTracker, QueueCore
from services.queue.estimator import WaitingTimeEstimator
from services.queue.store import QueueConfig, QueueError, QueueStore


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def core(clock: Clock, **tracker) -> QueueCore:
    store = QueueStore(QueueConfig(":memory:", lease_timeout_s=30.0), clock=clock)
    return QueueCore(store, WaitingTimeEstimator(), CapacityTracker(**tracker), clock=clock)


def test_completions_feed_the_estimator_and_the_measured_capacity():
    clock = Clock()
    q = core(clock, window_s=60.0)
    q.store.enqueue_many([(f"r{i}", "m", [1, 2], 100, 600_000) for i in range(4)])
    assert q.capacities() == {}  # nothing served yet, no prior
    a, b = q.store.lease("w", 2)
    clock.t += 10.0
    assert q.complete(a.request_id, a.lease_id, 40) == 40
    assert q.estimator.model("m").count == 1
    assert q.give_back(b.request_id, b.lease_id, [7] * 20) == "m"  # its 20 tokens count as served
    cap = q.capacities()["m"]
    assert cap.throughput_tokens_per_s == pytest.approx(60 / 1.0)  # first served just now: span floored at 1 s
    assert cap.slots == 1 and not cap.in_service  # no lease out: one slot, idle
    clock.t += 30.0
    assert q.capacities()["m"].throughput_tokens_per_s == pytest.approx(60 / 30.0)
    with pytest.raises(QueueError):
        q.complete(a.request_id, a.lease_id + "x", 1)


def test_prior_capacity_and_group_estimates():
    clock = Clock()
    q = core(clock, prior_throughput_tokens_per_s=500.0)
    q.store.enqueue_many([(f"r{i}", "m", [1], 10, 60_000) for i in range(3)])
    groups, estimates, caps = q.group_estimates()
    assert [g.queued for g in groups] == [3] and caps["m"].throughput_tokens_per_s == 500.0
    assert len(estimates) == 1 and estimates[0].group_id == groups[0].group_id


def test_maintain_returns_expired_leases():
    clock = Clock()
    q = core(clock)
    q.store.enqueue("r", "m", [1], 10, 60_000)
    q.store.lease("w", 1)
    assert q.maintain() == 0
    clock.t += 31.0
    assert q.maintain() == 1
    assert q.store.get("r").state == "QUEUED"


def test_the_cores_import_no_transport():
    code = ("import sys, services.queue.core, services.engine.batch_rules, services.engine.core\n"
            "bad = [m for m in sys.modules if m == 'grpc' or m.startswith(('chiron.v1', 'prometheus_client'))]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
