"""The Batch API's durable state: uploaded files and batches, in the queue's own database (SQLite or PostgreSQL).

A batch (OpenAI Batch API) is a set of batch requests that share a TTFT SLO, its *completion
window*: every parsed input line becomes one request in the global queue (request id
``<batch_id>-<line>``), filed under the request group of its deadline like any other batch request, so the
waiting-time estimator and the global scaler see it. Lines that could not become a request (bad JSON, unknown
model, ...) are kept as line errors for the batch's error file. Everything lives in the queue's database, in
the same file as the requests, so a restart of the queue loses neither files nor batches.

Status (OpenAI's names): ``in_progress`` while any request is queued or running; ``completed`` when all are
DONE or CANCELLED; after a cancel, ``cancelling`` until nothing is running any more, then ``cancelled``.
Requests past the completion window keep being served (nothing accepted is dropped); ``expires_at`` says when
the window closed.

Output and error files are not stored: their ids (``<batch_id>-output`` / ``<batch_id>-errors``) name a
rendering of :meth:`BatchStore.results`, which the HTTP gateway turns into JSONL (it holds the tokenizer).
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from services.queue.store import QueueError, QueueStore, decode_tokens

_BATCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    file_id    TEXT PRIMARY KEY,
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    created_s  REAL NOT NULL,
    size_bytes INTEGER NOT NULL,
    content    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id      TEXT PRIMARY KEY,
    input_file_id TEXT NOT NULL,
    endpoint      TEXT NOT NULL,
    window_s      INTEGER NOT NULL,
    created_s     REAL NOT NULL,
    cancelled_s   REAL,                 -- when a cancel was asked for
    state         TEXT NOT NULL,        -- 'creating' until its requests are enqueued, then 'open'
    metadata      TEXT NOT NULL,        -- JSON object
    errors        TEXT NOT NULL         -- JSON list of line errors
);
CREATE TABLE IF NOT EXISTS batch_items (
    batch_id   TEXT    NOT NULL,
    line       INTEGER NOT NULL,
    custom_id  TEXT    NOT NULL,
    request_id TEXT    NOT NULL,
    PRIMARY KEY (batch_id, line)
) WITHOUT ROWID;
"""

OUTPUT_SUFFIX = "-output"
ERRORS_SUFFIX = "-errors"
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass(frozen=True)
class FileRecord:
    """An uploaded file's metadata. ``created_s``: Unix time [s]; ``size_bytes``: its length [bytes]."""

    file_id: str
    filename: str
    purpose: str
    created_s: float
    size_bytes: int


@dataclass(frozen=True)
class LineError:
    """An input line that did not become a request; ``line`` is 1-based."""

    line: int
    custom_id: str
    code: str
    message: str


@dataclass(frozen=True)
class BatchRecord:
    """A batch and its counts (requests). ``total`` = input lines = completed + failed + pending; ``failed``
    counts line errors and cancelled requests. Times are Unix seconds (None until they happen)."""

    batch_id: str
    input_file_id: str
    endpoint: str
    window_s: int
    created_s: float
    status: str
    total: int
    completed: int
    failed: int
    pending: int
    completed_s: float | None
    cancelled_s: float | None
    metadata: dict[str, str] = field(default_factory=dict)
    group_ids: tuple[str, ...] = ()

    @property
    def expires_s(self) -> float:
        return self.created_s + self.window_s

    @property
    def final(self) -> bool:
        return self.status in ("completed", "cancelled")

    @property
    def output_file_id(self) -> str:
        """Set once the batch is final and at least one request finished."""
        return self.batch_id + OUTPUT_SUFFIX if self.final and self.completed else ""

    @property
    def error_file_id(self) -> str:
        """Set when any line failed (bad input now, or cancelled requests once final)."""
        return self.batch_id + ERRORS_SUFFIX if self.failed else ""


@dataclass(frozen=True)
class ItemResult:
    """One request of a batch: its state name (QUEUED, LEASED, DONE, CANCELLED) and, once DONE, its output."""

    line: int
    custom_id: str
    request_id: str
    model: str
    state: int
    num_prompt_tokens: int
    output_token_ids: tuple[int, ...]
    finished_s: float | None
    max_tokens: int


class _SqliteDb:
    """The Batch API's seam over the SQLite queue store's connection (``?`` placeholders, BEGIN IMMEDIATE)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.execute = conn.execute

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        self.conn.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def setup(self) -> None:
        for stmt in _BATCH_SCHEMA.split(";"):
            if stmt.strip():
                self.conn.execute(stmt)

    def recover_creating(self, message_json: str) -> None:
        self.conn.execute("UPDATE batches SET state = 'open', cancelled_s = created_s, errors = ? WHERE state = 'creating'",
                          (message_json,))


class BatchStore:
    """Files and batches over a :class:`QueueStore`'s database (SQLite: same file, same single owner; PostgreSQL
    (:class:`~services.queue.pg_store.PgQueueStore`): same database and SQL, any number of replicas).

    ``max_file_bytes``: largest accepted upload [bytes] (RESOURCE_EXHAUSTED beyond it); ``clock``: Unix time
    [s]. All methods raise :class:`QueueError` with a gRPC status name (INVALID_ARGUMENT, NOT_FOUND,
    RESOURCE_EXHAUSTED, FAILED_PRECONDITION).
    """

    def __init__(self, store: QueueStore, max_file_bytes: int = 64 * 2**20,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.max_file_bytes = int(max_file_bytes)
        self._clock = clock
        # One database: the queue store's (SQLite: its connection, one owner; PostgreSQL: its seam, same SQL).
        self._db = store.batch_db() if hasattr(store, "batch_db") else _SqliteDb(store._conn)
        with self._db.transaction():
            self._db.setup()
            # A queue that stopped between storing a batch and enqueueing its requests: the batch is kept (its
            # input file too) and finishes as cancelled, with every line in its error file, so it can be resent.
            self._db.recover_creating(json.dumps([{"line": 0, "custom_id": "", "code": "queue_restarted",
                                                   "message": "the queue stopped while creating this batch; create it again"}]))

    # -- files ---------------------------------------------------------------------------------
    def create_file(self, filename: str, purpose: str, content: bytes) -> FileRecord:
        """Store an upload (committed on return). ``purpose`` must be ``batch``. Raises INVALID_ARGUMENT (other
        purpose, empty content), RESOURCE_EXHAUSTED (over ``max_file_bytes``)."""
        if purpose != "batch":
            raise QueueError("INVALID_ARGUMENT", f"purpose must be 'batch' (the only one this server stores), got {purpose!r}")
        if not content:
            raise QueueError("INVALID_ARGUMENT", "the file is empty")
        if len(content) > self.max_file_bytes:
            raise QueueError("RESOURCE_EXHAUSTED", f"file of {len(content)} bytes exceeds the limit of "
                                                   f"{self.max_file_bytes} bytes; split it into several batches")
        rec = FileRecord(f"file-{uuid.uuid4().hex}", filename or "upload.jsonl", purpose, float(self._clock()), len(content))
        self._db.execute("INSERT INTO files (file_id, filename, purpose, created_s, size_bytes, content) VALUES (?,?,?,?,?,?)",
                           (rec.file_id, rec.filename, rec.purpose, rec.created_s, rec.size_bytes, bytes(content)))
        return rec

    def get_file(self, file_id: str) -> FileRecord:
        """An upload's metadata. Raises NOT_FOUND."""
        row = self._db.execute("SELECT file_id, filename, purpose, created_s, size_bytes FROM files WHERE file_id = ?",
                                 (file_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"no file {file_id!r}")
        return FileRecord(*row)

    def file_content(self, file_id: str) -> bytes:
        """An upload's bytes. Raises NOT_FOUND."""
        row = self._db.execute("SELECT content FROM files WHERE file_id = ?", (file_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"no file {file_id!r}")
        return bytes(row[0])

    # -- batches -------------------------------------------------------------------------------
    def create_batch(self, input_file_id: str, endpoint: str, window_s: int, metadata: Mapping[str, str],
                     items: Sequence[tuple[int, str, str, Sequence[int], int]], errors: Sequence[LineError]) -> BatchRecord:
        """Create a batch and enqueue its requests.

        ``items``: ``(line, custom_id, model, prompt_token_ids, max_tokens)`` per parsed input line (1-based
        lines); ``errors``: the lines that did not parse; ``window_s``: completion window = every request's TTFT
        SLO [s]. The batch row is committed first (state ``creating``), then all requests in one transaction
        (:meth:`QueueStore.enqueue_many`), then the batch opens. Raises NOT_FOUND (unknown input file),
        INVALID_ARGUMENT (no line at all, duplicate custom_id, bad window, bad request fields: nothing is stored),
        RESOURCE_EXHAUSTED (the queue cannot take every request: nothing is stored).
        """
        self.get_file(input_file_id)
        if not items and not errors:
            raise QueueError("INVALID_ARGUMENT", "the input file has no request lines")
        if not 1 <= int(window_s) <= self.store.config.max_ttft_slo_ms // 1000:
            raise QueueError("INVALID_ARGUMENT", f"completion window of {window_s} s is outside 1 s .. "
                                                 f"{self.store.config.max_ttft_slo_ms // 1000} s")
        seen: dict[str, int] = {}
        for line, cid, *_ in items:
            if cid in seen:
                raise QueueError("INVALID_ARGUMENT", f"line {line}: custom_id {cid!r} repeats line {seen[cid]}; "
                                                     "custom_id must be unique within a batch")
            seen[cid] = line
        batch_id = f"batch_{uuid.uuid4().hex}"
        # A line the queue would refuse (unknown model, prompt too long, ...) becomes a line error; the rest run.
        good, errors = [], list(errors)
        for line, cid, model, ids, mt in items:
            try:
                self.store._validate(f"{batch_id}-{line}", model, ids, mt, int(window_s) * 1000)
            except QueueError as e:
                errors.append(LineError(line, cid, "invalid_request", e.message))
            else:
                good.append((line, cid, model, ids, mt))
        items = good
        now = float(self._clock())
        db = self._db
        with db.transaction():
            db.execute("INSERT INTO batches (batch_id, input_file_id, endpoint, window_s, created_s, state, metadata, errors) "
                       "VALUES (?, ?, ?, ?, ?, 'creating', ?, ?)",
                       (batch_id, input_file_id, endpoint, int(window_s), now, json.dumps(dict(metadata)),
                        json.dumps([e.__dict__ for e in errors])))
            db.executemany("INSERT INTO batch_items (batch_id, line, custom_id, request_id) VALUES (?, ?, ?, ?)",
                           [(batch_id, line, cid, f"{batch_id}-{line}") for line, cid, *_ in items])
        try:
            self.store.enqueue_many([(f"{batch_id}-{line}", model, ids, mt, int(window_s) * 1000)
                                     for line, _, model, ids, mt in items])
        except BaseException:
            with db.transaction():
                db.execute("DELETE FROM batch_items WHERE batch_id = ?", (batch_id,))
                db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
            raise
        db.execute("UPDATE batches SET state = 'open' WHERE batch_id = ?", (batch_id,))
        return self.get_batch(batch_id)

    def get_batch(self, batch_id: str) -> BatchRecord:
        """A batch with its counts and status. Cost: one indexed pass over its requests. Raises NOT_FOUND."""
        c = self._db
        row = c.execute("SELECT input_file_id, endpoint, window_s, created_s, cancelled_s, metadata, errors FROM batches "
                        "WHERE batch_id = ?", (batch_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"no batch {batch_id!r}")
        input_file_id, endpoint, window_s, created_s, cancelled_s, metadata, errors = row
        counts = {0: 0, 1: 0, 2: 0, 3: 0}
        groups: set[str] = set()
        last_finished = None
        for state, model, bucket, n, fin in c.execute(
                "SELECT r.state, r.model, r.bucket, count(*), max(r.finished_s) FROM batch_items b "
                "JOIN requests r ON r.request_id = b.request_id WHERE b.batch_id = ? GROUP BY r.state, r.model, r.bucket",
                (batch_id,)):
            counts[state] += n
            if state in (0, 1):
                groups.add(self.store._group_id(model, bucket))
            if fin is not None:
                last_finished = fin if last_finished is None else max(last_finished, fin)
        n_errors = len(json.loads(errors))
        pending = counts[0] + counts[1]
        if pending:
            status = "cancelling" if cancelled_s is not None else "in_progress"
        else:
            status = "cancelled" if cancelled_s is not None else "completed"
        total = n_errors + sum(counts.values())
        return BatchRecord(batch_id, input_file_id, endpoint, int(window_s), float(created_s), status, total, counts[2],
                           n_errors + counts[3], pending, None if pending else (last_finished or created_s), cancelled_s,
                           json.loads(metadata), tuple(sorted(groups)))

    def list_batches(self, limit: int = 20) -> list[BatchRecord]:
        """The newest ``limit`` batches (1..100), newest first."""
        limit = min(max(int(limit) or 20, 1), 100)
        ids = [r[0] for r in self._db.execute("SELECT batch_id FROM batches ORDER BY created_s DESC LIMIT ?", (limit,))]
        return [self.get_batch(b) for b in ids]

    def cancel_batch(self, batch_id: str) -> BatchRecord:
        """Cancel every queued or running request of a batch (finished ones keep their output). Idempotent; a
        final batch comes back unchanged. Raises NOT_FOUND."""
        rec = self.get_batch(batch_id)
        if rec.final:
            return rec
        if rec.cancelled_s is None:
            self._db.execute("UPDATE batches SET cancelled_s = ? WHERE batch_id = ?", (float(self._clock()), batch_id))
        for (rid,) in self._db.execute(
                "SELECT b.request_id FROM batch_items b JOIN requests r ON r.request_id = b.request_id "
                "WHERE b.batch_id = ? AND r.state IN (0, 1)", (batch_id,)).fetchall():
            self.store.cancel(rid)
        return self.get_batch(batch_id)

    def results(self, batch_id: str) -> tuple[BatchRecord, list[ItemResult], list[LineError]]:
        """The batch, its requests in line order (with the output token ids of DONE ones) and its line errors.
        Raises NOT_FOUND."""
        rec = self.get_batch(batch_id)
        items = []
        for line, cid, rid, model, state, n_prompt, resume, fin, mt in self._db.execute(
                "SELECT b.line, b.custom_id, b.request_id, r.model, r.state, r.n_prompt, r.resume, r.finished_s, r.max_tokens "
                "FROM batch_items b JOIN requests r ON r.request_id = b.request_id WHERE b.batch_id = ? ORDER BY b.line",
                (batch_id,)):
            out = decode_tokens(resume) if state == 2 else ()
            items.append(ItemResult(line, cid, rid, model, state, n_prompt, out, fin, mt))
        return rec, items, self.line_errors(batch_id)

    def line_errors(self, batch_id: str) -> list[LineError]:
        """A batch's line errors (input lines that did not become requests): those the gateway found, then those
        the queue refused. Raises NOT_FOUND."""
        row = self._db.execute("SELECT errors FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"no batch {batch_id!r}")
        return [LineError(**e) for e in json.loads(row[0])]
