"""The queue's PostgreSQL store beyond the shared contract (``tests/test_queue_store.py`` runs that against both
stores): several replicas over one database, start-up errors, a lost database. A real PostgreSQL server
(``tests/conftest.py``: one per session, a fresh database per test)."""

from __future__ import annotations

import socket
import threading

import grpc
import psycopg
import pytest
from click.testing import CliRunner

from chiron.v1 import queue_pb2, queue_pb2_grpc, types_pb2
from services.queue.pg_store import PgQueueStore, redact_url
from services.queue.server import serve
from services.queue.store import QueueConfig, QueueError, RequestState


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate_backends(url: str) -> int:
    """Cut every other connection to ``url``'s database (what a database restart or fail-over does to a replica)."""
    with psycopg.connect(url, autocommit=True) as c:
        return len(c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall())


def test_two_replicas_lease_disjoint_requests_and_only_the_holder_acks(pg_url):
    clock = Clock()
    a = PgQueueStore(QueueConfig(db_path=pg_url), clock)
    b = PgQueueStore(QueueConfig(db_path=pg_url), clock)
    # three groups (deadline buckets), enqueued through both replicas
    a.enqueue_many([(f"r{i}", "m", [i + 1], 8, 60_000 * (1 + i % 3)) for i in range(0, 300, 2)])
    b.enqueue_many([(f"r{i}", "m", [i + 1], 8, 60_000 * (1 + i % 3)) for i in range(1, 300, 2)])
    assert a.groups() == b.groups() and sum(g.queued for g in a.groups()) == 300  # one view, whichever replica
    assert a.group_snapshots() == b.group_snapshots()

    leased: dict[str, list] = {"a": [], "b": []}
    batches: list[list] = []
    start = threading.Barrier(2)

    def worker(name: str, store: PgQueueStore) -> None:
        start.wait()
        while batch := store.lease(f"w-{name}", 7):
            leased[name].extend(batch)
            batches.append(batch)

    threads = [threading.Thread(target=worker, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids_a = [le.request_id for le in leased["a"]]
    ids_b = [le.request_id for le in leased["b"]]
    assert ids_a and ids_b, "both replicas leased concurrently"
    assert not set(ids_a) & set(ids_b) and len(ids_a) + len(ids_b) == 300 == len(set(ids_a) | set(ids_b))
    # every lease call hands out its requests in EDF order (bucket), FIFO inside a group (enqueue order: the
    # even ids through a, then the odd ones through b)
    for batch in batches:
        keys = [(int(le.group_id.rsplit("/", 1)[1]), int(le.request_id[1:]) % 2, int(le.request_id[1:])) for le in batch]
        assert keys == sorted(keys)
    assert a.counts() == b.counts() == {"queued": 0, "leased": 300, "capacity": a.config.capacity}

    mine = leased["a"][0]
    with pytest.raises(QueueError) as e:  # the other replica's worker presents a lease it does not hold
        b.ack(mine.request_id, leased["b"][0].lease_id, 3)
    assert e.value.code == "FAILED_PRECONDITION"
    with pytest.raises(QueueError) as e:
        b.return_request(mine.request_id, "not-the-lease")
    assert e.value.code == "FAILED_PRECONDITION"
    assert b.ack(mine.request_id, mine.lease_id, 3) == 3  # the holder's ack, through either replica
    assert a.get(mine.request_id).state is RequestState.DONE
    assert a.ack(mine.request_id, mine.lease_id, 3) == 3  # idempotent for the lease that completed it
    a.close()
    b.close()


def test_lease_order_is_edf_then_fifo_across_replicas(pg_url):
    clock = Clock()
    a = PgQueueStore(QueueConfig(db_path=pg_url), clock)
    b = PgQueueStore(QueueConfig(db_path=pg_url), clock)
    a.enqueue("late", "m", [1], 4, 600_000)
    b.enqueue("early1", "m", [1], 4, 60_000)
    a.enqueue("early2", "m", [1], 4, 60_000)
    assert [le.request_id for le in b.lease("w", 2)] == ["early1", "early2"]
    assert a.get("late").position == 0
    (le,) = a.lease("w", 1)
    assert le.request_id == "late"
    b.return_request("late", le.lease_id, [9])
    assert a.get("late").state is RequestState.QUEUED and a.get_tokens("late")[1] == (9,)
    a.close()
    b.close()


def test_unreachable_database_stops_start_up_with_the_url_and_the_fix():
    url = f"postgresql://chiron:s3cret@127.0.0.1:{closed_port()}/queue"
    with pytest.raises(ValueError) as e:
        PgQueueStore(QueueConfig(db_path=url))
    msg = str(e.value)
    assert "s3cret" not in msg and redact_url(url) in msg and "chiron:***@127.0.0.1" in msg
    assert "cannot reach the queue database" in msg and "Fix:" in msg


def test_cli_refuses_an_unreachable_database_at_start_up():
    from services.cli import main

    url = f"postgresql://chiron:s3cret@127.0.0.1:{closed_port()}/queue"
    result = CliRunner().invoke(main, ["queue", "--db", url, "--port", "0"])
    assert result.exit_code == 2, result.output
    assert "cannot reach the queue database" in result.output and "chiron:***@" in result.output
    assert "s3cret" not in result.output


def test_a_schema_from_another_version_or_granularity_stops_start_up(pg_url):
    PgQueueStore(QueueConfig(db_path=pg_url)).close()
    with pytest.raises(ValueError, match="group_granularity_s"):
        PgQueueStore(QueueConfig(db_path=pg_url, group_granularity_s=30))
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(ValueError) as e:
        PgQueueStore(QueueConfig(db_path=pg_url))
    assert "schema version 99" in str(e.value) and "Fix:" in str(e.value)


def test_a_foreign_requests_table_is_refused(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("CREATE TABLE requests (id int)")
    with pytest.raises(ValueError, match="belongs to something else"):
        PgQueueStore(QueueConfig(db_path=pg_url))


def test_a_lost_connection_answers_unavailable_then_recovers(pg_url):
    s = PgQueueStore(QueueConfig(db_path=pg_url), Clock())
    s.enqueue("r", "m", [1], 4, 60_000)
    assert terminate_backends(pg_url) >= 1
    with pytest.raises(QueueError) as e:
        s.lease("w", 1)
    assert e.value.code == "UNAVAILABLE" and "***" not in e.value.message and "reconnects" in e.value.message
    (le,) = s.lease("w", 1)  # the next call reconnects
    assert s.ack("r", le.lease_id, 2) == 2
    s.close()


async def test_grpc_queue_over_postgres_answers_unavailable_and_recovers(pg_url):
    srv = await serve(QueueConfig(db_path=pg_url))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = queue_pb2_grpc.QueueStub(ch)
            await stub.Enqueue(queue_pb2.EnqueueRequest(request=types_pb2.InferenceRequest(
                request_id="r1", model="m", prompt_token_ids=[1, 2], max_tokens=4, slo=types_pb2.SLO(ttft_ms=60_000))))
            terminate_backends(pg_url)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Lease(queue_pb2.LeaseRequest(worker_id="w", max_requests=1))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            resp = await stub.Lease(queue_pb2.LeaseRequest(worker_id="w", max_requests=1))
            assert [le.request.request_id for le in resp.leases] == ["r1"]
            stats = (await stub.GetStats(queue_pb2.QueueGetStatsRequest())).stats
            assert stats is not None
    finally:
        await srv.stop()


async def test_two_grpc_replicas_report_the_same_capacity_after_acks_through_one(pg_url):
    """Two ``chiron queue`` servers over one database: acks through replica a only; GetStats through b reports the
    same measured throughput, queued and leased counts (the capacity is read from the database, not per replica)."""
    a = await serve(QueueConfig(db_path=pg_url))
    b = await serve(QueueConfig(db_path=pg_url))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as cha, grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as chb:
            sa, sb = queue_pb2_grpc.QueueStub(cha), queue_pb2_grpc.QueueStub(chb)
            for i in range(6):
                await (sa if i % 2 else sb).Enqueue(queue_pb2.EnqueueRequest(request=types_pb2.InferenceRequest(
                    request_id=f"r{i}", model="m", prompt_token_ids=[1, 2], max_tokens=40, slo=types_pb2.SLO(ttft_ms=600_000))))
            leases = (await sa.Lease(queue_pb2.LeaseRequest(worker_id="w", max_requests=4))).leases
            for le in leases[:3]:
                await sa.Ack(queue_pb2.AckRequest(request_id=le.request.request_id, lease_id=le.lease_id, output_tokens=30))
            st_a = (await sa.GetStats(queue_pb2.QueueGetStatsRequest())).stats
            st_b = (await sb.GetStats(queue_pb2.QueueGetStatsRequest())).stats
            assert (st_a.queued, st_a.leased) == (st_b.queued, st_b.leased) == (2, 1)
            cap_a = {c.model: (c.throughput_tokens_per_s, c.slots) for c in st_a.capacity}
            cap_b = {c.model: (c.throughput_tokens_per_s, c.slots) for c in st_b.capacity}
            # b saw no ack (a per-replica tracker would report no capacity at all); the rate is 90 tokens over the
            # time since the first ack (at least 1 s), read a moment apart through a and b
            assert cap_b["m"][1] == 1 and 0 < cap_b["m"][0] <= 90.0 and cap_b["m"][0] == pytest.approx(cap_a["m"][0], rel=0.25)
    finally:
        await a.stop()
        await b.stop()
