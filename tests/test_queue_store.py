"""Unit tests of the durable grouped lease queue store: the contract tests run against both stores, SQLite
(``services/queue/store.py``, real files under ``tmp_path``) and PostgreSQL (``services/queue/pg_store.py``, a
fresh database on the session's real server, ``tests/conftest.py``); a fake clock (a mutable float, seconds)."""

from __future__ import annotations

import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.queue.estimator import GroupSnapshot, ServingCapacity, WaitingTimeEstimator
from services.queue.pg_store import is_postgres_url
from services.queue.pg_store import open_store as open_any_store
from services.queue.store import GroupStats, QueueConfig, QueueError, QueueStore, RequestState

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """A settable clock (seconds)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path: Path) -> str:
    """The database of one test: a SQLite file, or the URL of a fresh PostgreSQL database."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return str(tmp_path / "queue.db")


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    """A SQLite file, for the tests of what only the SQLite store does (one owner per file, thread binding)."""
    return str(tmp_path / "queue.db")


def open_store(db: str, clock: FakeClock, **kw) -> QueueStore:
    return open_any_store(QueueConfig(db_path=db, **kw), clock=clock)


def db_query(db: str, sql: str) -> int:
    """The first column of the first row of ``sql`` over the (closed) database, read with a separate connection."""
    if is_postgres_url(db):
        import psycopg

        with psycopg.connect(db) as c:
            return c.execute(sql).fetchone()[0]
    with sqlite3.connect(db) as c:
        return c.execute(sql).fetchone()[0]


def db_count(db: str, where: str = "1 = 1") -> int:
    """Rows of the (closed) database matching ``where``, read with a separate connection."""
    return db_query(db, f"SELECT count(*) FROM requests WHERE {where}")


def lease_all(store: QueueStore, worker: str = "w", **kw) -> list:
    out = []
    while batch := store.lease(worker, 1, **kw):
        out.extend(batch)
    return out


# ----------------------------------------------------------------------------------------------
# Order and groups
# ----------------------------------------------------------------------------------------------
def test_edf_across_groups_and_fifo_inside(db, clock):
    s = open_store(db, clock, group_granularity_s=60)
    # deadlines: 1000 + slo; buckets of 60 s
    s.enqueue("late1", "m", [1], 8, 600_000)  # deadline 1600 -> bucket 26
    s.enqueue("early1", "m", [1], 8, 30_000)  # deadline 1030 -> bucket 17
    s.enqueue("mid1", "m", [1], 8, 200_000)   # deadline 1200 -> bucket 20
    s.enqueue("early2", "m", [1], 8, 50_000)  # deadline 1050 -> bucket 17 (later deadline, same group: FIFO)
    clock.t += 5
    s.enqueue("early3", "m", [1], 8, 21_000)  # deadline 1026 -> bucket 17, earliest deadline but enqueued last
    s.enqueue("late2", "m", [1], 8, 600_000)
    got = [le.request_id for le in s.lease("w", 3)] + [le.request_id for le in lease_all(s)]
    assert got == ["early1", "early2", "early3", "mid1", "late1", "late2"]
    s.close()


def test_lease_across_models_and_model_filter(db, clock):
    s = open_store(db, clock)
    s.enqueue("a-late", "a", [1], 8, 600_000)
    s.enqueue("b-early", "b", [1], 8, 30_000)
    s.enqueue("a-early", "a", [1], 8, 30_000)
    assert [le.request_id for le in s.lease("w", 1, models=["a"])] == ["a-early"]
    assert [le.request_id for le in s.lease("w", 5, models="b")] == ["b-early"]
    assert s.lease("w", 5, models=["c"]) == []
    assert [le.request_id for le in s.lease("w", 5)] == ["a-late"]
    s.close()


def test_grouping_by_granularity(db, clock):
    s = open_store(db, clock, group_granularity_s=60)
    assert s.enqueue("a", "m", [1], 8, 10_000) == ("a", "m/16")       # deadline 1010
    assert s.enqueue("b", "m", [1], 8, 19_999) == ("b", "m/16")       # 1019.999
    assert s.enqueue("c", "m", [1], 8, 20_000) == ("c", "m/17")       # 1020: next bucket
    assert s.enqueue("d", "org/m", [1], 8, 20_000) == ("d", "org/m/17")  # other model, own group
    g = {x.group_id: x for x in s.groups()}
    assert [x.group_id for x in s.groups()] == ["m/16", "m/17", "org/m/17"]
    assert g["m/16"] == GroupStats("m/16", "m", 16, 960.0, 1020.0, 2, 0, 1000.0, 16)
    assert g["m/17"].queued == 1 and g["m/17"].deadline_s == 1020.0
    assert s.get("b").deadline_s == pytest.approx(1019.999)
    # the deadline of a group is its bucket start: a lower bound of its requests' deadlines
    for x in s.groups():
        assert x.deadline_s <= min(s.get(r).deadline_s for r in "abcd" if s.get(r).group_id == x.group_id) < x.deadline_end_s
    assert s.group_snapshots() == [GroupSnapshot("m/16", "m", 960.0, 2), GroupSnapshot("m/17", "m", 1020.0, 1),
                                   GroupSnapshot("org/m/17", "org/m", 1020.0, 1)]
    s.close()


def test_group_snapshots_feed_the_estimator(db, clock):
    s = open_store(db, clock)
    s.enqueue_many([(f"r{i}", "m", [1, 2], 100, 600_000 + 60_000 * (i % 3)) for i in range(30)])
    est = WaitingTimeEstimator(draws=256, small_n_threshold=16)
    out = est.refresh(s.group_snapshots(), {"m": ServingCapacity(1000.0, 4)}, now=clock())
    assert [(e.group_id, e.num_requests, e.first_position) for e in out] == [("m/26", 10, 0), ("m/27", 10, 10), ("m/28", 10, 20)]
    s.close()


# ----------------------------------------------------------------------------------------------
# Enqueue: idempotency, validation, capacity
# ----------------------------------------------------------------------------------------------
def test_duplicate_is_idempotent_and_different_content_already_exists(db, clock):
    s = open_store(db, clock)
    first = s.enqueue("r", "m", [1, 2, 3], 8, 60_000)
    clock.t += 100  # a retry later lands in the same group: the stored request is returned
    assert s.enqueue("r", "m", (1, 2, 3), 8, 60_000) == first
    assert s.enqueue("r", "m", np.array([1, 2, 3]), 8, 60_000) == first
    assert s.counts()["queued"] == 1
    for change in [("r", "m2", [1, 2, 3], 8, 60_000), ("r", "m", [1, 2, 4], 8, 60_000), ("r", "m", [1, 2, 3], 9, 60_000),
                   ("r", "m", [1, 2, 3], 8, 60_001), ("r", "m", [1, 2], 8, 60_000)]:
        with pytest.raises(QueueError) as e:
            s.enqueue(*change)
        assert e.value.code == "ALREADY_EXISTS"
        with pytest.raises(QueueError) as e:
            s.enqueue_many([("new", "m", [1], 8, 1000), change])
        assert e.value.code == "ALREADY_EXISTS"
    # inside one batch: identical -> stored once; different -> refused
    assert s.enqueue_many([("x", "m", [5], 8, 1000), ("r", "m", [1, 2, 3], 8, 60_000), ("x", "m", [5], 8, 1000)]) == [
        ("x", "m/18"), first, ("x", "m/18")]
    with pytest.raises(QueueError) as e:
        s.enqueue_many([("y", "m", [5], 8, 1000), ("y", "m", [6], 8, 1000)])
    assert e.value.code == "ALREADY_EXISTS"
    # still idempotent once DONE (no second copy)
    (le,) = [le for le in lease_all(s) if le.request_id == "r"]
    s.ack("r", le.lease_id, 3)
    assert s.enqueue("r", "m", [1, 2, 3], 8, 60_000) == first
    assert s.get("r").state is RequestState.DONE
    s.close()
    assert db_count(db) == 2 and db_count(db, "request_id = 'y'") == 0


@pytest.mark.parametrize("args, fragment", [
    (("r", "other", [1], 8, 1000), "unknown model"),
    (("r", "m", [], 8, 1000), "empty"),
    (("r", "m", list(range(17)), 8, 1000), "max_prompt_tokens"),
    (("r", "m", [1], 0, 1000), "max_tokens"),
    (("r", "m", [1], -3, 1000), "max_tokens"),
    (("r", "m", [1], 8, 0), "ttft_slo_ms"),
    (("r", "m", [1], 8, -1), "ttft_slo_ms"),
    (("r", "m", [1], 8, 3_600_001), "ttft_slo_ms"),
    (("r", "m", [1], 8, 1.5), "ttft_slo_ms"),
    (("r", "m", [1], 2.0, 1000), "max_tokens"),
    (("r", "m", [1, -1], 8, 1000), "token ids"),
    (("r", "m", [1, 2**31], 8, 1000), "token ids"),
    (("r", "m", [1, -2**31], 8, 1000), "token ids"),
    (("r", "m", np.array([1, 2**31]), 8, 1000), "token ids"),
    (("r", "m", [1.0], 8, 1000), "token ids"),
    (("r", "m", "abc", 8, 1000), "token ids"),
    (("r", "m", np.array([0.5]), 8, 1000), "integer array"),
    (("", "m", [1], 8, 1000), "request_id"),
    ((7, "m", [1], 8, 1000), "request_id"),
    (("r", "", [1], 8, 1000), "model"),
])
def test_invalid_arguments(db, clock, args, fragment):
    s = open_store(db, clock, models=("m",), max_prompt_tokens=16, max_ttft_slo_ms=3_600_000)
    with pytest.raises(QueueError) as e:
        s.enqueue(*args)
    assert e.value.code == "INVALID_ARGUMENT" and fragment in str(e.value)
    with pytest.raises(QueueError) as e:
        s.enqueue_many([("ok", "m", [1], 8, 1000), args])
    assert e.value.code == "INVALID_ARGUMENT" and "requests[1]" in str(e.value)
    assert s.counts()["queued"] == 0 and s.groups() == []
    s.close()
    assert db_count(db) == 0


def test_capacity_resource_exhausted_nothing_partial(db, clock):
    s = open_store(db, clock, capacity=3)
    s.enqueue("a", "m", [1], 8, 1000)
    s.enqueue_many([("b", "m", [1], 8, 1000), ("c", "m", [1], 8, 1000)])
    with pytest.raises(QueueError) as e:
        s.enqueue("d", "m", [1], 8, 1000)
    assert e.value.code == "RESOURCE_EXHAUSTED" and "capacity 3" in str(e.value)
    assert s.enqueue("a", "m", [1], 8, 1000) == ("a", "m/16")  # a retry of a stored request still succeeds when full
    (le,) = s.lease("w", 1)
    s.ack(le.request_id, le.lease_id, 1)  # frees one place
    with pytest.raises(QueueError) as e:
        s.enqueue_many([("d", "m", [1], 8, 1000), ("e", "m", [1], 8, 1000)])
    assert e.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(QueueError):  # duplicates of stored requests do not count, but two new ones do not fit
        s.enqueue_many([("b", "m", [1], 8, 1000), ("d", "m", [1], 8, 1000), ("e", "m", [1], 8, 1000)])
    assert s.counts()["queued"] == 2
    assert s.enqueue_many([("b", "m", [1], 8, 1000), ("d", "m", [1], 8, 1000)]) == [("b", "m/16"), ("d", "m/16")]
    assert s.counts() == {"queued": 3, "leased": 0, "capacity": 3}
    s.close()
    assert db_count(db) == 4 and db_count(db, "request_id = 'e'") == 0


def test_enqueue_many_accepts_mappings_and_empty(db, clock):
    s = open_store(db, clock)
    assert s.enqueue_many([]) == []
    assert s.enqueue_many([{"request_id": "a", "model": "m", "prompt_token_ids": [3, 4], "max_tokens": 2, "ttft_slo_ms": 1000}]) == [
        ("a", "m/16")]
    with pytest.raises(QueueError) as e:
        s.enqueue_many([{"request_id": "b", "model": "m"}])
    assert e.value.code == "INVALID_ARGUMENT" and "missing field" in str(e.value)
    with pytest.raises(QueueError):
        s.enqueue_many([("b", "m", [1])])
    assert s.get_tokens("a") == ((3, 4), ())
    s.close()


# ----------------------------------------------------------------------------------------------
# Lease, ack, return, cancel, expiry
# ----------------------------------------------------------------------------------------------
def test_lease_and_ack(db, clock):
    s = open_store(db, clock)
    s.enqueue("r", "m", [10, 11, 12], 50, 60_000)
    (le,) = s.lease("w1", 4, lease_timeout_s=30)
    assert (le.request_id, le.model, le.prompt_token_ids, le.max_tokens, le.resume_token_ids, le.ttft_slo_ms) == (
        "r", "m", (10, 11, 12), 50, (), 60_000)
    assert (le.arrival_s, le.deadline_s, le.lease_expiry_s, le.attempts, le.worker_id, le.group_id) == (
        1000.0, 1060.0, 1030.0, 0, "w1", "m/17")
    info = s.get("r")
    assert (info.state, info.position, info.lease_id, info.worker_id) == (RequestState.LEASED, -1, le.lease_id, "w1")
    assert s.groups()[0].leased == 1 and s.groups()[0].queued == 0
    assert s.lease("w2", 4) == []
    with pytest.raises(QueueError) as e:
        s.ack("r", "not-my-lease", 5)
    assert e.value.code == "FAILED_PRECONDITION"
    with pytest.raises(QueueError) as e:
        s.ack("nope", le.lease_id, 5)
    assert e.value.code == "NOT_FOUND"
    with pytest.raises(QueueError) as e:
        s.ack("r", le.lease_id, -1)
    assert e.value.code == "INVALID_ARGUMENT"
    assert s.ack("r", le.lease_id, [1, 2, 3, 4, 5]) == 5
    assert s.ack("r", le.lease_id, 5) == 5  # idempotent retry of the same ack
    info = s.get("r")
    assert (info.state, info.output_tokens) == (RequestState.DONE, 5)
    assert s.groups() == [] and s.counts()["leased"] == 0
    clock.t += 1000
    assert s.expire_leases() == 0 and s.lease("w2", 1) == []  # a DONE request never comes back
    s.close()


def test_stale_lease_rejected_after_expiry(db, clock):
    s = open_store(db, clock)
    s.enqueue("r", "m", [1], 50, 600_000)
    (old,) = s.lease("w1", 1, lease_timeout_s=10)
    clock.t += 10
    assert s.expire_leases() == 0  # expiry < now is required: at exactly the expiry the lease holds
    clock.t += 1
    (new,) = s.lease("w2", 1)  # the expired lease is swept back at the start of lease()
    assert new.request_id == "r" and new.attempts == 1 and new.lease_id != old.lease_id
    for op in (lambda: s.ack("r", old.lease_id, 3), lambda: s.return_request("r", old.lease_id, [1]),
               lambda: s.renew_lease("r", old.lease_id)):
        with pytest.raises(QueueError) as e:
            op()
        assert e.value.code == "FAILED_PRECONDITION" and "another lease" in str(e.value)
    assert s.ack("r", new.lease_id, 3) == 3
    with pytest.raises(QueueError) as e:
        s.ack("r", old.lease_id, 3)
    assert e.value.code == "FAILED_PRECONDITION" and "DONE" in str(e.value)
    s.close()


def test_expired_lease_returns_request_to_its_place(db, clock):
    s = open_store(db, clock)
    s.enqueue_many([(r, "m", [1], 50, 600_000) for r in "abc"])
    (a,) = s.lease("w1", 1, lease_timeout_s=5)
    clock.t += 6
    assert s.get("b").position == 0
    assert s.expire_leases() == 1
    info = s.get("a")
    assert (info.state, info.position, info.attempts, info.lease_id) == (RequestState.QUEUED, 0, 1, None)
    assert s.get("b").position == 1
    with pytest.raises(QueueError) as e:
        s.ack("a", a.lease_id, 1)
    assert e.value.code == "FAILED_PRECONDITION" and "queued again" in str(e.value)
    assert [le.request_id for le in s.lease("w2", 3)] == ["a", "b", "c"]
    s.close()


def test_renew_lease_keeps_it(db, clock):
    s = open_store(db, clock)
    s.enqueue("r", "m", [1], 50, 600_000)
    (le,) = s.lease("w", 1, lease_timeout_s=10)
    clock.t += 8
    assert s.renew_lease("r", le.lease_id, 10) == 1018.0
    clock.t += 8
    assert s.expire_leases() == 0 and s.get("r").state is RequestState.LEASED
    clock.t += 3
    assert s.expire_leases() == 1
    with pytest.raises(QueueError) as e:
        s.renew_lease("r", le.lease_id, 0)
    assert e.value.code == "INVALID_ARGUMENT"
    s.close()


def test_return_request_keeps_position_and_progress(db, clock):
    s = open_store(db, clock)
    s.enqueue_many([(r, "m", [1, 2], 6, 600_000) for r in "abc"])
    a, b = s.lease("w", 2)
    assert s.return_request("b", b.lease_id, [7, 8]) == 2
    info = s.get("b")
    assert (info.state, info.position, info.attempts, info.resume_tokens) == (RequestState.QUEUED, 0, 1, 2)
    assert s.get("c").position == 1
    g = s.groups()[0]
    assert (g.queued, g.leased, g.queued_remaining_tokens, g.oldest_arrival_s) == (2, 1, (6 - 2) + 6, 1000.0)
    (b2,) = s.lease("w2", 1)
    assert (b2.request_id, b2.resume_token_ids, b2.attempts) == ("b", (7, 8), 1)
    with pytest.raises(QueueError) as e:  # only the new tokens: must be the total so far
        s.return_request("b", b2.lease_id, [9])
    assert e.value.code == "INVALID_ARGUMENT" and "starting" in str(e.value)
    with pytest.raises(QueueError) as e:
        s.return_request("b", b2.lease_id, [7, 8, 9, 10, 11, 12, 13])
    assert e.value.code == "INVALID_ARGUMENT" and "max_tokens" in str(e.value)
    assert s.return_request("b", b2.lease_id) == 2  # no new progress keeps the stored tokens
    (b3,) = s.lease("w2", 1)
    assert s.return_request("b", b3.lease_id, np.array([7, 8, 9])) == 3
    assert s.get_tokens("b") == ((1, 2), (7, 8, 9))
    assert s.get("b").attempts == 3
    with pytest.raises(QueueError) as e:
        s.return_request("b", b3.lease_id, [7, 8, 9])
    assert e.value.code == "FAILED_PRECONDITION"
    s.ack("a", a.lease_id, 6)
    assert s.groups() == s.recount_groups()
    s.close()


def test_cancel(db, clock):
    s = open_store(db, clock)
    s.enqueue_many([(r, "m", [1], 5, 600_000) for r in "abcd"])
    assert s.cancel("a") is True  # the head: the group's oldest arrival moves on
    assert s.get("a").state is RequestState.CANCELLED and s.get("a").position == -1
    assert s.cancel("a") is False
    assert s.get("b").position == 0
    (b,) = s.lease("w", 1)
    assert s.cancel("b") is True
    with pytest.raises(QueueError) as e:
        s.ack("b", b.lease_id, 1)
    assert e.value.code == "FAILED_PRECONDITION" and "cancelled" in str(e.value)
    with pytest.raises(QueueError) as e:
        s.cancel("zzz")
    assert e.value.code == "NOT_FOUND"
    clock.t += 3600
    assert s.expire_leases() == 0
    assert [le.request_id for le in s.lease("w", 10)] == ["c", "d"]
    assert s.lease("w", 1) == []
    assert s.groups() == s.recount_groups()
    s.close()


def test_purge_finished(db, clock):
    s = open_store(db, clock)
    s.enqueue_many([(r, "m", [1], 5, 600_000) for r in "abc"])
    le = s.lease("w", 1)[0]
    s.ack(le.request_id, le.lease_id, 2)
    s.cancel("b")
    clock.t += 10
    assert s.purge_finished(clock.t - 20) == 0
    assert s.purge_finished(clock.t) == 2
    with pytest.raises(QueueError):
        s.get("a")
    assert s.get("c").state is RequestState.QUEUED
    s.close()


# ----------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------
def test_positions_after_mixed_operations(db, clock):
    rng = np.random.default_rng(3)
    s = open_store(db, clock, group_granularity_s=30)
    slos = [40_000, 70_000, 100_000, 160_000]
    ids = []
    for i in range(120):
        rid = f"r{i}"
        s.enqueue(rid, ["a", "b"][i % 2], [i], 10, int(rng.choice(slos)))
        ids.append(rid)
        if i % 17 == 0:
            clock.t += 7
    leases = s.lease("w", 25)
    for le in leases[:10]:
        s.ack(le.request_id, le.lease_id, 1)
    for le in leases[10:18]:
        s.return_request(le.request_id, le.lease_id, [1, 2])
    for rid in ids[::9]:
        s.cancel(rid)
    s.lease("w", 7, models=["b"])
    # reference: queued requests of the same model ordered by (bucket, enqueue order)
    infos = {rid: s.get(rid) for rid in ids}
    queued = sorted((i for i in infos.values() if i.state is RequestState.QUEUED),
                    key=lambda i: (math.floor(i.deadline_s / 30), int(i.request_id[1:])))
    for model in ("a", "b"):
        order = [i.request_id for i in queued if i.model == model]
        assert [infos[r].position for r in order] == list(range(len(order)))
    assert all(i.position == -1 for i in infos.values() if i.state is not RequestState.QUEUED)
    assert s.groups() == s.recount_groups()
    s.close()


# ----------------------------------------------------------------------------------------------
# Durability and recovery
# ----------------------------------------------------------------------------------------------
def test_reopen_keeps_everything_once_and_leases_come_back(db, clock):
    s = open_store(db, clock)
    s.enqueue_many([(f"r{i}", "m" if i % 3 else "n", list(range(i + 1)), 20, 120_000 + 1000 * i) for i in range(40)])
    leases = s.lease("w", 12, lease_timeout_s=30)
    for le in leases[:4]:
        s.ack(le.request_id, le.lease_id, 7)
    s.return_request(leases[4].request_id, leases[4].lease_id, [3, 3])
    s.cancel("r39")
    before = s.groups()
    positions = {f"r{i}": s.get(f"r{i}").position for i in range(40)}
    s.close()

    clock.t += 5
    s = open_store(db, clock)
    assert s.groups() == before == s.recount_groups()
    assert {f"r{i}": s.get(f"r{i}").position for i in range(40)} == positions
    assert s.counts()["queued"] == 40 - 12 + 1 - 1 and s.counts()["leased"] == 7
    assert {s.get(le.request_id).state for le in leases[:4]} == {RequestState.DONE}
    assert s.get_tokens(leases[4].request_id)[1] == (3, 3)
    still = leases[5:]
    assert all(s.get(le.request_id).state is RequestState.LEASED for le in still)
    assert s.ack(still[0].request_id, still[0].lease_id, 2) == 2  # the lease survives the restart
    clock.t += 30
    s.close()
    s = open_store(db, clock)
    assert s.expire_leases() == len(still) - 1
    served = [le.request_id for le in lease_all(s)]
    assert len(served) == len(set(served)) == 40 - 4 - 1 - 1  # every request not DONE/cancelled, once
    s.close()
    assert db_count(db) == 40
    assert db_query(db, "SELECT count(DISTINCT request_id) FROM requests") == 40


def test_kill9_keeps_committed_requests(tmp_path):
    db = str(tmp_path / "killed.db")
    script = textwrap.dedent(f"""
        import os, signal
        from services.queue.store import QueueConfig, QueueStore
        s = QueueStore(QueueConfig(db_path={db!r}), clock=lambda: 1000.0)
        for i in range(50):
            s.enqueue(f"r{{i}}", "m", [i, i + 1], 10, 60_000)
        s.enqueue_many([(f"b{{i}}", "m", [i], 10, 60_000) for i in range(50)])
        leases = s.lease("w", 10, lease_timeout_s=5)
        s.ack(leases[0].request_id, leases[0].lease_id, 4)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert os.path.exists(db + "-wal")  # the WAL was not checkpointed: recovery replays it
    clock = FakeClock(1000.0)
    s = open_store(db, clock)
    assert s.counts()["queued"] == 90 and s.counts()["leased"] == 9
    assert s.get("r0").state is RequestState.DONE and s.get("r1").state is RequestState.LEASED
    clock.t += 6
    served = [le.request_id for le in lease_all(s)]
    assert len(served) == len(set(served)) == 99
    assert [(g.queued, g.leased) for g in s.groups()] == [(0, 99)]
    assert s.groups() == s.recount_groups()
    s.close()


def test_one_owner_per_file_and_fixed_granularity(sqlite_db, clock):
    db = sqlite_db
    s = open_store(db, clock)
    s.enqueue("r", "m", [1], 5, 1000)
    with pytest.raises(QueueError) as e:
        open_store(db, clock)
    assert e.value.code == "FAILED_PRECONDITION" and "another queue store" in str(e.value)
    s.close()
    with pytest.raises(ValueError, match="group_granularity_s"):
        open_store(db, clock, group_granularity_s=30)
    with open_store(db, clock) as s2:
        assert s2.get("r").state is RequestState.QUEUED


def test_store_is_bound_to_its_thread(sqlite_db, clock):
    s = open_store(sqlite_db, clock)
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(sqlite3.ProgrammingError, s.get, "r")))
    t.start()
    t.join()
    assert errors and errors[0].type is sqlite3.ProgrammingError
    s.close()


@pytest.mark.parametrize("kw", [{"group_granularity_s": 0}, {"capacity": 0}, {"max_ttft_slo_ms": 0}, {"models": "m"},
                                {"models": ("",)}, {"max_prompt_tokens": 0}, {"lease_timeout_s": -1}, {"db_path": ""},
                                {"group_granularity_s": math.inf}])
def test_config_validate(kw):
    with pytest.raises(ValueError):
        QueueConfig(**kw).validate()


def test_lease_argument_errors(db, clock):
    s = open_store(db, clock)
    for args, kw in [(("", 1), {}), (("w", 0), {}), (("w", 1), {"lease_timeout_s": 0}), (("w", 1), {"lease_timeout_s": math.nan})]:
        with pytest.raises(QueueError) as e:
            s.lease(*args, **kw)
        assert e.value.code == "INVALID_ARGUMENT"
    s.close()


# ----------------------------------------------------------------------------------------------
# Property test: random operations + restarts against a reference model
# ----------------------------------------------------------------------------------------------
class QueueMachine(RuleBasedStateMachine):
    """Random enqueue / lease / ack / return / cancel / expire / clock / reopen against a plain-Python model:
    lease order, positions and ack outcomes must match it; the in-memory aggregates must always equal a recount
    from the database; no request is ever completed twice."""

    G = 30.0
    CAPACITY = 14

    pg_server = None  # set: run against a fresh database on this PostgreSQL server (PgQueueMachine)

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="queue-store-")
        self.db = os.path.join(self.dir, "q.db") if self.pg_server is None else self.pg_server.create_database()
        self.clock = FakeClock(1000.0)
        self.store = self._open()
        self.ref: dict[str, dict] = {}  # request_id -> model, bucket, order, state, lease, expiry, mt, slo, prompt, resume
        self.order = 0
        self.leases: list[tuple[str, str]] = []  # every lease ever handed out (request_id, lease_id)
        self.acked: dict[str, int] = {}  # request_id -> successful (state-changing) acks

    def _open(self) -> QueueStore:
        return open_any_store(QueueConfig(db_path=self.db, group_granularity_s=self.G, capacity=self.CAPACITY), clock=self.clock)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.pg_server is not None:
            self.pg_server.drop_database(self.db)

    # -- reference helpers ---------------------------------------------------------------------
    def _active(self) -> int:
        return sum(r["state"] in ("QUEUED", "LEASED") for r in self.ref.values())

    def _ref_expire(self) -> int:
        n = 0
        for r in self.ref.values():
            if r["state"] == "LEASED" and r["expiry"] < self.clock.t:
                r.update(state="QUEUED", lease=None, expiry=None)
                n += 1
        return n

    def _queued_sorted(self) -> list[str]:
        q = [(r["bucket"], r["model"], r["order"], rid) for rid, r in self.ref.items() if r["state"] == "QUEUED"]
        return [x[3] for x in sorted(q)]

    # -- rules ---------------------------------------------------------------------------------
    @rule(model=st.sampled_from(["a", "b"]), slo=st.sampled_from([1_000, 45_000, 60_000, 200_000]),
          mt=st.integers(1, 5), prompt=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4))
    def enqueue(self, model, slo, mt, prompt) -> None:
        rid = f"r{len(self.ref)}"
        if self._active() >= self.CAPACITY:
            with pytest.raises(QueueError) as e:
                self.store.enqueue(rid, model, prompt, mt, slo)
            assert e.value.code == "RESOURCE_EXHAUSTED"
            return
        bucket = math.floor((self.clock.t + slo / 1000) / self.G)
        assert self.store.enqueue(rid, model, prompt, mt, slo) == (rid, f"{model}/{bucket}")
        self.ref[rid] = dict(model=model, bucket=bucket, order=self.order, state="QUEUED", lease=None, expiry=None, mt=mt,
                             slo=slo, prompt=prompt, resume=[])
        self.order += 1

    @rule(k=st.integers(1, 4), slo=st.sampled_from([30_000, 90_000]), dup=st.booleans())
    def enqueue_many(self, k, slo, dup) -> None:
        items = [(f"r{len(self.ref) + i}", "a", [i], 3, slo) for i in range(k)]
        if dup and self.ref:
            rid, r = next(iter(self.ref.items()))
            items.append((rid, r["model"], r["prompt"], r["mt"], r["slo"]))
        if self._active() + k > self.CAPACITY:
            with pytest.raises(QueueError) as e:
                self.store.enqueue_many(items)
            assert e.value.code == "RESOURCE_EXHAUSTED"
            return
        out = self.store.enqueue_many(items)
        assert [o[0] for o in out] == [i[0] for i in items]
        for rid, model, prompt, mt, slo_ in items[:k]:
            self.ref[rid] = dict(model=model, bucket=math.floor((self.clock.t + slo_ / 1000) / self.G), order=self.order,
                                 state="QUEUED", lease=None, expiry=None, mt=mt, slo=slo_, prompt=prompt, resume=[])
            self.order += 1

    @rule(n=st.integers(1, 4), models=st.sampled_from([None, ["a"], ["b"]]), timeout=st.sampled_from([5.0, 30.0]))
    def lease(self, n, models, timeout) -> None:
        self._ref_expire()
        expected = [rid for rid in self._queued_sorted() if models is None or self.ref[rid]["model"] in models][:n]
        got = self.store.lease("w", n, models=models, lease_timeout_s=timeout)
        assert [le.request_id for le in got] == expected
        for le in got:
            r = self.ref[le.request_id]
            assert le.resume_token_ids == tuple(r["resume"]) and le.prompt_token_ids == tuple(r["prompt"])
            r.update(state="LEASED", lease=le.lease_id, expiry=self.clock.t + timeout)
            self.leases.append((le.request_id, le.lease_id))

    @precondition(lambda self: self.leases)
    @rule(i=st.integers(0, 10**6), out=st.integers(0, 9))
    def ack(self, i, out) -> None:
        rid, lid = self.leases[i % len(self.leases)]
        r = self.ref[rid]
        if r["state"] == "LEASED" and r["lease"] == lid:
            assert self.store.ack(rid, lid, out) == out
            r.update(state="DONE", out=out)
            self.acked[rid] = self.acked.get(rid, 0) + 1
        elif r["state"] == "DONE" and r["lease"] == lid:
            assert self.store.ack(rid, lid, out) == r["out"]  # idempotent: the stored count
        else:
            with pytest.raises(QueueError) as e:
                self.store.ack(rid, lid, out)
            assert e.value.code == "FAILED_PRECONDITION"

    @precondition(lambda self: self.leases)
    @rule(i=st.integers(0, 10**6), new=st.integers(0, 2))
    def return_request(self, i, new) -> None:
        rid, lid = self.leases[i % len(self.leases)]
        r = self.ref[rid]
        total = r["resume"] + [9] * min(new, r["mt"] - len(r["resume"]))
        if r["state"] == "LEASED" and r["lease"] == lid:
            assert self.store.return_request(rid, lid, total) == len(total)
            r.update(state="QUEUED", lease=None, expiry=None, resume=total)
        else:
            with pytest.raises(QueueError) as e:
                self.store.return_request(rid, lid, total)
            assert e.value.code == "FAILED_PRECONDITION"

    @precondition(lambda self: self.ref)
    @rule(i=st.integers(0, 10**6))
    def cancel(self, i) -> None:
        rid = sorted(self.ref)[i % len(self.ref)]
        r = self.ref[rid]
        assert self.store.cancel(rid) is (r["state"] in ("QUEUED", "LEASED"))
        if r["state"] in ("QUEUED", "LEASED"):
            r["state"] = "CANCELLED"

    @rule(dt=st.sampled_from([0.5, 3.0, 10.0, 31.0]))
    def advance(self, dt) -> None:
        self.clock.t += dt

    @rule()
    def expire(self) -> None:
        assert self.store.expire_leases() == self._ref_expire()

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = self._open()

    @precondition(lambda self: self.ref)
    @rule(i=st.integers(0, 10**6))
    def position(self, i) -> None:
        rid = sorted(self.ref)[i % len(self.ref)]
        r = self.ref[rid]
        info = self.store.get(rid)
        assert info.state == r["state"]
        if r["state"] == "QUEUED":
            same = [x for x in self._queued_sorted() if self.ref[x]["model"] == r["model"]]
            assert info.position == same.index(rid)
        else:
            assert info.position == -1

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def aggregates_match_recount(self) -> None:
        assert self.store.groups() == self.store.recount_groups()
        c = self.store.counts()
        assert (c["queued"], c["leased"]) == (
            sum(r["state"] == "QUEUED" for r in self.ref.values()), sum(r["state"] == "LEASED" for r in self.ref.values()))

    @invariant()
    def never_done_twice(self) -> None:
        assert all(v == 1 for v in self.acked.values())


QueueMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=50, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_queue_state_machine = QueueMachine.TestCase


def test_queue_state_machine_postgres(pg_server):
    """The same random operations against the PostgreSQL store (fewer examples: a database per example)."""
    from hypothesis.stateful import run_state_machine_as_test

    class PgQueueMachine(QueueMachine):
        pass

    PgQueueMachine.pg_server = pg_server
    run_state_machine_as_test(PgQueueMachine, settings=settings(max_examples=20, stateful_step_count=40, deadline=None,
                                                                suppress_health_check=[HealthCheck.too_slow]))


def test_model_and_resume_is_the_ack_paths_light_lookup(db, clock):
    s = open_store(db, clock)
    s.enqueue("r", "m", [1, 2], 8, 60_000)
    (ls,) = s.lease("w", 1)
    assert s.model_and_resume("r") == ("m", 0)
    s.return_request("r", ls.lease_id, [5, 6, 7])
    assert s.model_and_resume("r") == ("m", 3)
    with pytest.raises(QueueError) as e:
        s.model_and_resume("nope")
    assert e.value.code == "NOT_FOUND"
    s.close()
