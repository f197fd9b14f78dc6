"""The Batch API's durable state (services/queue/batches.py) over both real queue stores: a SQLite file and a
fresh database on the session's PostgreSQL server (``tests/conftest.py``)."""

from __future__ import annotations

import pytest

from services.queue.batches import BatchStore, LineError
from services.queue.pg_store import open_store
from services.queue.store import QueueConfig, QueueError


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def items(n: int, model: str = "llama-3-8b") -> list[tuple[int, str, str, list[int], int]]:
    return [(i + 1, f"req-{i}", model, [1, 2, 3], 5) for i in range(n)]


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    """A SQLite file, or the URL of a fresh PostgreSQL database."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return str(tmp_path / "q.db")


@pytest.fixture
def stores(db):
    clock = Clock()
    store = open_store(QueueConfig(db_path=db, models=("llama-3-8b",)), clock)
    yield store, BatchStore(store, max_file_bytes=1000, clock=clock), clock
    store.close()


def test_batch_lifecycle_counts_status_and_results(stores):
    store, batches, clock = stores
    f = batches.create_file("in.jsonl", "batch", b"{}\n")
    b = batches.create_batch(f.file_id, "/v1/completions", 3600, {"team": "a"}, items(3),
                             [LineError(4, "bad", "invalid_json", "line 4 is not JSON")])
    assert (b.status, b.total, b.completed, b.failed, b.pending) == ("in_progress", 4, 0, 1, 3)
    assert b.error_file_id and not b.output_file_id and b.metadata == {"team": "a"}
    assert len(b.group_ids) == 1 and store.groups()[0].queued == 3
    # The requests are ordinary batch requests: the completion window is their TTFT SLO.
    assert store.get(f"{b.batch_id}-1").ttft_slo_ms == 3_600_000
    leases = store.lease("w", 3)
    clock.t += 5
    for ls in leases:
        store.ack(ls.request_id, ls.lease_id, [7, 8])
    done = batches.get_batch(b.batch_id)
    assert (done.status, done.completed, done.failed, done.pending) == ("completed", 3, 1, 0)
    assert done.output_file_id == b.batch_id + "-output" and done.completed_s == clock.t
    rec, results, errors = batches.results(b.batch_id)
    assert [r.custom_id for r in results] == ["req-0", "req-1", "req-2"]
    assert all(r.output_token_ids == (7, 8) and r.num_prompt_tokens == 3 for r in results)
    assert errors == [LineError(4, "bad", "invalid_json", "line 4 is not JSON")]


def test_lines_the_queue_refuses_become_line_errors_and_the_rest_run(stores):
    store, batches, _ = stores
    f = batches.create_file("in.jsonl", "batch", b"x")
    b = batches.create_batch(f.file_id, "/v1/completions", 60, {}, items(2) +
                             [(3, "other", "gpt-unknown", [1], 5)], [])
    assert (b.total, b.failed, b.pending) == (3, 1, 2)
    _, _, errors = batches.results(b.batch_id)
    assert errors[0].line == 3 and "unknown model" in errors[0].message


def test_cancel_keeps_finished_outputs_and_cancels_the_rest(stores):
    store, batches, _ = stores
    f = batches.create_file("in.jsonl", "batch", b"x")
    b = batches.create_batch(f.file_id, "/v1/chat/completions", 60, {}, items(3), [])
    first = store.lease("w", 1)[0]
    store.ack(first.request_id, first.lease_id, [9])
    running = store.lease("w", 1)[0]
    c = batches.cancel_batch(b.batch_id)
    assert (c.status, c.completed, c.failed, c.pending) == ("cancelled", 1, 2, 0)
    assert c.output_file_id and c.error_file_id and c.cancelled_s is not None
    with pytest.raises(QueueError) as e:
        store.ack(running.request_id, running.lease_id, [1])
    assert e.value.code == "FAILED_PRECONDITION"
    assert batches.cancel_batch(b.batch_id) == batches.get_batch(b.batch_id)  # idempotent


def test_files_and_batches_survive_a_restart(db):
    clock = Clock()
    cfg = QueueConfig(db_path=db)
    store = open_store(cfg, clock)
    batches = BatchStore(store, clock=clock)
    f = batches.create_file("in.jsonl", "batch", b"line\n")
    b = batches.create_batch(f.file_id, "/v1/completions", 60, {}, items(2), [])
    store.close()
    store = open_store(cfg, clock)
    batches = BatchStore(store, clock=clock)
    assert batches.file_content(f.file_id) == b"line\n"
    assert batches.get_batch(b.batch_id).pending == 2
    assert [x.batch_id for x in batches.list_batches()] == [b.batch_id]
    store.close()


def test_bad_input_is_refused_with_a_status_and_nothing_stored(stores):
    store, batches, _ = stores
    with pytest.raises(QueueError, match="purpose must be 'batch'"):
        batches.create_file("x", "fine-tune", b"x")
    with pytest.raises(QueueError) as e:
        batches.create_file("x", "batch", b"x" * 1001)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(QueueError) as e:
        batches.create_batch("file-nope", "/v1/completions", 60, {}, items(1), [])
    assert e.value.code == "NOT_FOUND"
    f = batches.create_file("x", "batch", b"x")
    with pytest.raises(QueueError, match="custom_id"):
        twice = [(1, "a", "llama-3-8b", [1], 2), (2, "a", "llama-3-8b", [1], 2)]
        batches.create_batch(f.file_id, "/v1/completions", 60, {}, twice, [])
    with pytest.raises(QueueError, match="completion window"):
        batches.create_batch(f.file_id, "/v1/completions", 0, {}, items(1), [])
    assert store.counts()["queued"] == 0 and batches.list_batches() == []
    with pytest.raises(QueueError) as e:
        batches.get_batch("batch_nope")
    assert e.value.code == "NOT_FOUND"


def test_a_batch_that_does_not_fit_the_queue_stores_nothing(db):
    store = open_store(QueueConfig(db_path=db, capacity=2))
    batches = BatchStore(store)
    f = batches.create_file("x", "batch", b"x")
    with pytest.raises(QueueError) as e:
        batches.create_batch(f.file_id, "/v1/completions", 60, {}, items(3), [])
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert batches.list_batches() == [] and store.counts()["queued"] == 0
