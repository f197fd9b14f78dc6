"""The PostgreSQL store's shared view for the estimator (services/queue/pg_store.py): the serving capacity read from
the served tokens in the database (the same whichever replica answers), and the per-group summary table kept by
triggers in the transactions that change the rows (always equal to a from-scratch aggregate). A real PostgreSQL
server (tests/conftest.py)."""

from __future__ import annotations

import random

import psycopg
import pytest

from services.queue.core import CapacityTracker
from services.queue.estimator import WaitingTimeEstimator
from services.queue.pg_store import PgQueueStore
from services.queue.server import QueueService
from services.queue.store import QueueConfig, QueueError


class Clock:
    def __init__(self, t: float = 10_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def service(store: PgQueueStore, clock: Clock) -> QueueService:
    return QueueService(store, WaitingTimeEstimator(), CapacityTracker(window_s=60.0), clock=clock)


def test_two_replicas_agree_on_capacity_after_acks_through_one(pg_url):
    clock = Clock()
    a = PgQueueStore(QueueConfig(db_path=pg_url), clock)
    b = PgQueueStore(QueueConfig(db_path=pg_url), clock)
    sa, sb = service(a, clock), service(b, clock)
    a.enqueue_many([(f"r{i}", "m", [1, 2, 3], 100, 600_000) for i in range(40)])
    assert sa.capacities() == sb.capacities() == {}  # nothing served yet, no prior
    served = 0
    for step in range(10):  # 30 s of acks through replica a only, 3 per second
        clock.t += 3.0
        for ls in a.lease("w", 3):
            sa.complete(ls.request_id, ls.lease_id, 50 + step)
            served += 50 + step
    leases = a.lease("w", 2)  # two leases out: two slots
    ca, cb = sa.capacities(), sb.capacities()
    assert ca == cb and set(ca) == {"m"}
    # the first ack at t0 + 3 s, now t0 + 30 s: the rate over the 27 s since the first served tokens
    assert ca["m"].throughput_tokens_per_s == pytest.approx(served / 27.0)
    assert ca["m"].slots == 2 and ca["m"].in_service
    # the same after the deltas and served tokens are folded (compact), from either replica
    assert b.compact()
    assert sa.capacities() == sb.capacities() == ca
    # a return with progress counts its new tokens, through replica b this time
    b.return_request(leases[0].request_id, leases[0].lease_id, [7] * 20)
    assert sa.capacities()["m"].throughput_tokens_per_s == pytest.approx((served + 20) / 27.0)
    # GetStats: the same groups, capacity and estimates whichever replica answers: the output lengths behind the
    # estimates are read back from the database, so b's estimator learnt the acks that went through a.
    stats_a, stats_b = sa.stats(), sb.stats()
    assert list(stats_a.capacity) == list(stats_b.capacity)
    assert sa.estimator.model("m").count == sb.estimator.model("m").count == 30
    assert list(stats_a.groups) == list(stats_b.groups)
    sb.stats()  # a second pull adds nothing (the acks seen are skipped)
    assert sb.estimator.model("m").count == 30
    # past the window only the last 60 s count; the per-second totals count the second across its start in part
    clock.t += 45.0
    a.compact()
    in_window = sum(3 * (50 + step) for step in range(10) if 10_000.0 + 3.0 * (step + 1) >= clock.t - 60.0) + 20
    assert sa.capacities()["m"].throughput_tokens_per_s == pytest.approx(in_window / 60.0)
    assert sa.capacities() == sb.capacities()


def test_capacity_prior_before_any_ack_and_the_sqlite_tracker_unchanged(pg_url, tmp_path):
    clock = Clock()
    a = PgQueueStore(QueueConfig(db_path=pg_url), clock)
    s = QueueService(a, WaitingTimeEstimator(), CapacityTracker(prior_throughput_tokens_per_s=500.0), clock=clock)
    a.enqueue("r", "m", [1], 10, 60_000)
    assert s.capacities()["m"].throughput_tokens_per_s == 500.0
    assert s.capacity.models() == set()  # nothing kept in memory over PostgreSQL


def _ops(rng: random.Random, stores: list[PgQueueStore], clock: Clock, n: int, state: dict) -> None:
    leased: list = state.setdefault("leased", [])
    k = state.get("k", 0)
    for _ in range(n):
        store = rng.choice(stores)
        op = rng.random()
        try:
            if op < 0.25:
                store.enqueue(f"r{k}", rng.choice("mn"), [1, 2], rng.randint(1, 50), rng.choice([60_000, 600_000, 3_600_000]))
                k += 1
            elif op < 0.35:
                m = rng.randint(1, 8)
                store.enqueue_many([(f"r{k + j}", rng.choice("mn"), [3], rng.randint(1, 50), rng.choice([60_000, 600_000]))
                                    for j in range(m)])
                k += m
            elif op < 0.55:
                leased += store.lease("w", rng.randint(1, 4), models=rng.choice([None, ["m"]]),
                                      lease_timeout_s=rng.choice([5.0, 60.0]))
            elif op < 0.68 and leased:
                ls = leased.pop(rng.randrange(len(leased)))
                store.ack_request(ls.request_id, ls.lease_id, rng.choice([3, [5] * rng.randint(1, 9)]))
            elif op < 0.76 and leased:
                ls = leased.pop(rng.randrange(len(leased)))
                store.return_request(ls.request_id, ls.lease_id, list(ls.resume_token_ids) + [9] * rng.randint(0, 3))
            elif op < 0.82 and k:
                store.cancel(f"r{rng.randrange(k)}")
            elif op < 0.88:
                clock.t += rng.choice([1.0, 10.0])  # some leases expire: the next lease returns them
                store.expire_leases()
            elif op < 0.92:
                store.purge_finished(clock.t)
            elif op < 0.96:
                store.compact()
            else:
                ls = leased[rng.randrange(len(leased))] if leased else None
                if ls is not None:
                    store.renew_lease(ls.request_id, ls.lease_id, 30.0)
        except QueueError as e:
            assert e.code in ("FAILED_PRECONDITION", "NOT_FOUND"), e  # stale leases (expired, cancelled)
        state["k"] = k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summary_equals_a_from_scratch_aggregate_after_random_operations(pg_url, seed):
    clock = Clock()
    stores = [PgQueueStore(QueueConfig(db_path=pg_url), clock) for _ in range(2)]
    rng = random.Random(seed)
    state: dict = {}
    for _ in range(6):
        _ops(rng, stores, clock, 60, state)
        want = stores[0].recount_groups()
        assert stores[0].groups() == stores[1].groups() == want
        counts = stores[1].counts()
        assert (counts["queued"], counts["leased"]) == (sum(g.queued for g in want), sum(g.leased for g in want))
    stores[0].compact()
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT count(*) FROM group_deltas").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM group_summary WHERE queued = 0 AND leased = 0").fetchone()[0] == 0
    assert stores[1].groups() == stores[0].recount_groups()


def test_a_version_1_database_is_migrated_with_its_summary_counted(pg_url):
    clock = Clock()
    s = PgQueueStore(QueueConfig(db_path=pg_url), clock)
    s.enqueue_many([(f"r{i}", "m", [1], 10, 60_000 * (1 + i % 3)) for i in range(30)])
    s.lease("w", 7)
    s.close()
    with psycopg.connect(pg_url, autocommit=True) as c:  # what version 1 left: no summary, no triggers
        c.execute("DROP TABLE group_summary, group_deltas, served, served_seconds, served_first")
        for t in ("insert", "update", "delete"):
            c.execute(f"DROP TRIGGER requests_group_{t} ON requests")
        c.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    s = PgQueueStore(QueueConfig(db_path=pg_url), clock)
    assert s.groups() == s.recount_groups() and s.counts()["queued"] == 23 and s.counts()["leased"] == 7
    s.lease("w", 5)
    assert s.groups() == s.recount_groups()


def test_groups_fold_a_large_backlog_of_deltas(pg_url, monkeypatch):
    monkeypatch.setattr("services.queue.pg_store._COMPACT_ROWS", 100)
    s = PgQueueStore(QueueConfig(db_path=pg_url), Clock())
    for j in range(300):
        s.enqueue(f"r{j}", "m", [1], 10, 60_000)
    assert s.groups() == s.recount_groups()  # read 300 deltas (> 100): folded them
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT count(*) FROM group_deltas").fetchone()[0] == 0
    assert s.groups() == s.recount_groups() and s.counts()["queued"] == 300
