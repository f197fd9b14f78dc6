"""The queue store over PostgreSQL (psycopg 3): several interchangeable queue replicas over one database.

``chiron queue --db postgresql://user:password@host:port/dbname`` selects it (:func:`open_store`); a path keeps
the embedded SQLite store (:class:`~services.queue.store.QueueStore`). Both keep one contract (methods, results,
errors, order, positions; ``tests/test_queue_store.py`` and ``tests/test_batch_store.py`` run against both). Apart:

* **No per-process state**: every answer comes from the database, so it is the same whichever replica answers.
  Group aggregates come from a per-group summary: statement-level triggers on ``requests`` append one
  ``group_deltas`` row per (statement, group) in the changing transaction, whatever the path;
  :meth:`PgQueueStore.compact` (the maintenance round, or ``groups()`` past a few thousand deltas) folds them into
  ``group_summary``. Deltas are append-only, so concurrent enqueues into one group share no hot row; ``groups()``
  is O(groups) (:meth:`PgQueueStore.recount_groups` is the from-scratch aggregate it always equals). Served
  tokens (:class:`~services.queue.core.CapacityTracker`'s input) are written to ``served`` in each ack's and
  return's transaction and summed by :meth:`PgQueueStore.served_window`: each replica measures the whole fleet.
* **Leases**: ``SELECT … ORDER BY bucket, model, seq LIMIT n FOR UPDATE SKIP LOCKED`` (the SQLite order; replicas
  leasing at once get disjoint requests). Ack / return / renew / cancel lock their row and check the current
  lease id in the same transaction. ``seq`` is an identity column: FIFO is commit order within a replica.
* **Capacity** is checked against an outstanding count at most one second old (recounted near the limit):
  concurrent enqueues through several replicas can overshoot it by what they insert at the same moment.
* **Clock**: times are each replica's; keep their clocks in sync (NTP): lease expiry compares across replicas.
* **Loss of the database**: a call raises ``QueueError("UNAVAILABLE")`` (gRPC UNAVAILABLE) and the next call
  reconnects; PostgreSQL rolls back a cut transaction. At start-up an unreachable URL, another schema version or
  another ``group_granularity_s`` stops the queue with the URL (password hidden) and the fix; a version-1 database
  is upgraded in place by the first replica (under the setup lock).

High availability is PostgreSQL's: point ``--db`` at the primary's endpoint or a proxy that follows it (HAProxy
over Patroni; PgBouncer in session mode, or transaction mode from 1.21 with ``max_prepared_statements`` set);
replicas reconnect after a fail-over. Threads: one store object per thread (the server's event loop); a call
blocks for one database round trip or a few."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from services.queue.estimator import GroupSnapshot
from services.queue.store import (
    _DONE,
    _QUEUED,
    _STATE_NAMES,
    GroupStats,
    Lease,
    QueueConfig,
    QueueError,
    QueueStore,
    RequestInfo,
    decode_tokens,
    output_tokens_arg,
    returned_tokens_arg,
)

__all__ = ["PgQueueStore", "is_postgres_url", "open_store", "redact_url", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2
_SERVED_KEEP_S = 3600.0  # per-second served-token totals kept this long (longer than any capacity window)
_COMPACT_ROWS = 5000  # groups() folds the deltas into the summary when it read more than this many
_COMPACT_LOCK = 0x63686973  # advisory lock key: one replica compacts at a time (the others skip)
_CONNECT_TIMEOUT_S = 5
_SETUP_LOCK = 0x63686972  # advisory lock key ("chir"): replicas starting together create the schema once

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id     TEXT             NOT NULL UNIQUE,
    model          TEXT             NOT NULL,
    bucket         BIGINT           NOT NULL,
    state          SMALLINT         NOT NULL,
    max_tokens     INTEGER          NOT NULL,
    ttft_slo_ms    BIGINT           NOT NULL,
    arrival_s      DOUBLE PRECISION NOT NULL,
    deadline_s     DOUBLE PRECISION NOT NULL,
    n_prompt       INTEGER          NOT NULL,
    n_resume       INTEGER          NOT NULL DEFAULT 0,
    attempts       INTEGER          NOT NULL DEFAULT 0,
    lease_id       TEXT,
    lease_expiry_s DOUBLE PRECISION,
    worker_id      TEXT,
    output_tokens  INTEGER,
    finished_s     DOUBLE PRECISION,
    first_leased_s DOUBLE PRECISION,
    prompt         BYTEA            NOT NULL,
    resume         BYTEA
);
CREATE INDEX IF NOT EXISTS requests_queued ON requests (bucket, model, seq) WHERE state = 0;
CREATE INDEX IF NOT EXISTS requests_leased ON requests (lease_expiry_s) WHERE state = 1;
CREATE INDEX IF NOT EXISTS requests_finished ON requests (finished_s) WHERE state IN (2, 3);
-- Per-group aggregates of the outstanding rows: group_summary plus the not yet folded group_deltas. The triggers
-- below append one delta row per (statement, group) in the transaction that changes the rows (append-only: no hot
-- row for concurrent enqueues to queue behind); compact() folds them into group_summary.
CREATE TABLE IF NOT EXISTS group_summary (
    bucket    BIGINT NOT NULL,
    model     TEXT   NOT NULL,
    queued    BIGINT NOT NULL,
    leased    BIGINT NOT NULL,
    remaining BIGINT NOT NULL,
    PRIMARY KEY (bucket, model)
);
CREATE TABLE IF NOT EXISTS group_deltas (
    bucket    BIGINT NOT NULL,
    model     TEXT   NOT NULL,
    queued    BIGINT NOT NULL,
    leased    BIGINT NOT NULL,
    remaining BIGINT NOT NULL
);
-- Output tokens served (acked, or returned with progress), written in the ack / return transaction: the
-- measured serving capacity, the same on every replica. compact() folds them into per-second totals.
CREATE TABLE IF NOT EXISTS served (model TEXT NOT NULL, t_s DOUBLE PRECISION NOT NULL, tokens BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS served_seconds (
    model  TEXT   NOT NULL,
    second BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    PRIMARY KEY (model, second)
);
CREATE TABLE IF NOT EXISTS served_first (model TEXT PRIMARY KEY, first_s DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    file_id    TEXT PRIMARY KEY,
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    created_s  DOUBLE PRECISION NOT NULL,
    size_bytes BIGINT NOT NULL,
    content    BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id      TEXT PRIMARY KEY,
    input_file_id TEXT NOT NULL,
    endpoint      TEXT NOT NULL,
    window_s      BIGINT NOT NULL,
    created_s     DOUBLE PRECISION NOT NULL,
    cancelled_s   DOUBLE PRECISION,
    state         TEXT NOT NULL,
    metadata      TEXT NOT NULL,
    errors        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_created ON batches (created_s);
CREATE TABLE IF NOT EXISTS batch_items (
    batch_id   TEXT    NOT NULL,
    line       INTEGER NOT NULL,
    custom_id  TEXT    NOT NULL,
    request_id TEXT    NOT NULL,
    PRIMARY KEY (batch_id, line)
);
"""

_INSERT = ("INSERT INTO requests (request_id, model, bucket, state, max_tokens, ttft_slo_ms, arrival_s, deadline_s, "
           "n_prompt, prompt) VALUES (%s, %s, %s, 0, %s, %s, %s, %s, %s, %s)")
_SELECT_FOR_UPDATE = ("SELECT seq, model, bucket, state, lease_id, max_tokens, n_resume, arrival_s, output_tokens, resume "
                      "FROM requests WHERE request_id = %s FOR UPDATE")
_EXPIRE = ("UPDATE requests SET state = 0, lease_id = NULL, lease_expiry_s = NULL, worker_id = NULL, attempts = attempts + 1 "
           "WHERE state = 1 AND lease_expiry_s < %s")
# Ack in one auto-committed statement (one round trip): lock the row, complete it if leased under this lease, and
# record its new output tokens (served, for the capacity) in the same transaction; the row as it was comes back, so
# a refused ack is explained (or an ack repeated after success answered) as before.
_ACK = """
WITH cur AS (SELECT seq, model, bucket, state, lease_id, max_tokens, n_resume, arrival_s, output_tokens
             FROM requests WHERE request_id = %(rid)s FOR UPDATE),
upd AS (UPDATE requests r SET state = 2, output_tokens = %(count)s, lease_expiry_s = NULL, finished_s = %(now)s{resume}
        FROM cur WHERE r.seq = cur.seq AND cur.state = 1 AND cur.lease_id = %(lease)s RETURNING r.seq),
srv AS (INSERT INTO served (model, t_s, tokens) SELECT cur.model, %(now)s, greatest(0, %(count)s - cur.n_resume) FROM cur, upd)
SELECT cur.*, (SELECT count(*) FROM upd) FROM cur
"""
_ACK_COUNT = _ACK.format(resume="")
_ACK_TOKENS = _ACK.format(resume=", resume = %(blob)s, n_resume = %(count)s")
# A whole upload in one INSERT (one statement: the group-summary trigger fires once, one delta row per group);
# rows get their seq in the arrays' order.
_INSERT_MANY = ("INSERT INTO requests (request_id, model, bucket, state, max_tokens, ttft_slo_ms, arrival_s, deadline_s, "
                "n_prompt, prompt) SELECT rid, model, bucket, 0, mt, slo, arrival, deadline, n, prompt FROM unnest("
                "%b::text[], %b::text[], %b::bigint[], %b::int[], %b::bigint[], %b::float8[], %b::float8[], %b::int[], "
                "%b::bytea[]) AS u(rid, model, bucket, mt, slo, arrival, deadline, n, prompt)")  # %b: binary, no escaping
_LEASE = """
WITH picked AS (
    SELECT seq FROM requests WHERE state = 0 {models} ORDER BY bucket, model, seq LIMIT %(n)s FOR UPDATE SKIP LOCKED
)
UPDATE requests r SET state = 1, lease_id = replace(gen_random_uuid()::text, '-', ''), lease_expiry_s = %(expiry)s,
    worker_id = %(worker)s, first_leased_s = COALESCE(r.first_leased_s, %(now)s)
FROM picked WHERE r.seq = picked.seq
RETURNING r.bucket, r.model, r.seq, r.request_id, r.lease_id, r.max_tokens, r.ttft_slo_ms, r.arrival_s, r.deadline_s,
    r.attempts, r.prompt, r.resume
"""
# A row's contribution to its group: queued / leased (0 or 1) and remaining tokens (max_tokens - n_resume if queued).
_CONTRIB = ("bucket, model, (state = 0)::int AS q, (state = 1)::int AS l, "
            "CASE WHEN state = 0 THEN max_tokens - n_resume ELSE 0 END AS rem")
_TRIGGERS = f"""
CREATE OR REPLACE FUNCTION chiron_group_deltas_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO group_deltas (bucket, model, queued, leased, remaining)
    SELECT bucket, model, sum(q), sum(l), sum(rem) FROM (SELECT {_CONTRIB} FROM new_rows) x
    GROUP BY bucket, model HAVING sum(q) <> 0 OR sum(l) <> 0;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION chiron_group_deltas_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO group_deltas (bucket, model, queued, leased, remaining)
    SELECT bucket, model, sum(q), sum(l), sum(rem) FROM (
        SELECT {_CONTRIB} FROM new_rows
        UNION ALL SELECT bucket, model, -q, -l, -rem FROM (SELECT {_CONTRIB} FROM old_rows) o) x
    GROUP BY bucket, model HAVING sum(q) <> 0 OR sum(l) <> 0 OR sum(rem) <> 0;
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION chiron_group_deltas_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO group_deltas (bucket, model, queued, leased, remaining)
    SELECT bucket, model, -sum(q), -sum(l), -sum(rem) FROM (SELECT {_CONTRIB} FROM old_rows) x
    GROUP BY bucket, model HAVING sum(q) <> 0 OR sum(l) <> 0;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS requests_group_insert ON requests;
DROP TRIGGER IF EXISTS requests_group_update ON requests;
DROP TRIGGER IF EXISTS requests_group_delete ON requests;
CREATE TRIGGER requests_group_insert AFTER INSERT ON requests REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chiron_group_deltas_insert();
CREATE TRIGGER requests_group_update AFTER UPDATE ON requests REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chiron_group_deltas_update();
CREATE TRIGGER requests_group_delete AFTER DELETE ON requests REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION chiron_group_deltas_delete();
DROP INDEX IF EXISTS requests_leased_groups;
"""
# The summary of every group from scratch (a new or migrated database; recount_groups()).
_RECOUNT = """
SELECT model, bucket, count(*) FILTER (WHERE state = 0), count(*) FILTER (WHERE state = 1),
    COALESCE(sum(max_tokens - n_resume) FILTER (WHERE state = 0), 0),
    (array_agg(arrival_s ORDER BY seq) FILTER (WHERE state = 0))[1]
FROM requests WHERE state IN (0, 1) GROUP BY bucket, model ORDER BY bucket, model
"""
_REBUILD_SUMMARY = """
DELETE FROM group_deltas;
DELETE FROM group_summary;
INSERT INTO group_summary (bucket, model, queued, leased, remaining)
SELECT bucket, model, count(*) FILTER (WHERE state = 0), count(*) FILTER (WHERE state = 1),
    COALESCE(sum(max_tokens - n_resume) FILTER (WHERE state = 0), 0)
FROM requests WHERE state IN (0, 1) GROUP BY bucket, model;
"""
# groups(): the summary plus the pending deltas (one snapshot), and each group's head arrival by one index probe.
_GROUPS = """
SELECT s.model, s.bucket, s.q, s.l, s.rem,
    (SELECT r.arrival_s FROM requests r WHERE r.state = 0 AND r.bucket = s.bucket AND r.model = s.model
     ORDER BY r.seq LIMIT 1), s.n
FROM (SELECT bucket, model, sum(queued) AS q, sum(leased) AS l, sum(remaining) AS rem, count(*) AS n
      FROM (SELECT bucket, model, queued, leased, remaining FROM group_summary
            UNION ALL SELECT bucket, model, queued, leased, remaining FROM group_deltas) u
      GROUP BY bucket, model) s
WHERE s.q <> 0 OR s.l <> 0 ORDER BY s.bucket, s.model
"""
_COUNTS = """
SELECT COALESCE(sum(queued), 0), COALESCE(sum(leased), 0) FROM (
    SELECT queued, leased FROM group_summary UNION ALL SELECT queued, leased FROM group_deltas) u
"""
_COMPACT = """
WITH d AS (DELETE FROM group_deltas RETURNING bucket, model, queued, leased, remaining)
INSERT INTO group_summary AS s (bucket, model, queued, leased, remaining)
SELECT bucket, model, sum(queued), sum(leased), sum(remaining) FROM d GROUP BY bucket, model
ON CONFLICT (bucket, model) DO UPDATE SET queued = s.queued + excluded.queued, leased = s.leased + excluded.leased,
    remaining = s.remaining + excluded.remaining
"""
_COMPACT_SERVED = """
WITH d AS (DELETE FROM served RETURNING model, t_s, tokens),
first AS (INSERT INTO served_first AS f (model, first_s) SELECT model, min(t_s) FROM d GROUP BY model
          ON CONFLICT (model) DO UPDATE SET first_s = least(f.first_s, excluded.first_s))
INSERT INTO served_seconds AS s (model, second, tokens)
SELECT model, floor(t_s)::bigint, sum(tokens) FROM d GROUP BY 1, 2
ON CONFLICT (model, second) DO UPDATE SET tokens = s.tokens + excluded.tokens
"""
# Output tokens served per model since %(lo)s (per-second totals; the one second across the window's start counts
# in proportion), and the model's first served time ever.
_SERVED = """
SELECT model, sum(tokens), min(first_s) FROM (
    SELECT model, tokens::float8 AS tokens, NULL::float8 AS first_s FROM served WHERE t_s >= %(lo)s
    UNION ALL SELECT model, 0, min(t_s) FROM served GROUP BY model
    UNION ALL SELECT model, CASE WHEN second >= %(lo)s THEN tokens::float8 ELSE tokens * (second + 1 - %(lo)s) END, NULL
        FROM served_seconds WHERE second > %(lo)s - 1
    UNION ALL SELECT model, 0, first_s FROM served_first) u
GROUP BY model
"""


def is_postgres_url(db: Any) -> bool:
    """True when ``db`` (``QueueConfig.db_path``) names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "<unparsable database URL>"


def open_store(config: QueueConfig, clock: Callable[[], float] = time.time) -> QueueStore:
    """The store ``config.db_path`` names: :class:`PgQueueStore` for a PostgreSQL URL, else the SQLite
    :class:`~services.queue.store.QueueStore`."""
    if is_postgres_url(config.db_path):
        return PgQueueStore(config, clock)
    return QueueStore(config, clock)


def _unavailable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a lost or refused database connection into ``QueueError("UNAVAILABLE")``; the next call reconnects."""

    @functools.wraps(fn)
    def wrapper(self: PgQueueStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except self._pg.OperationalError as e:
            raise self._lost(e) from None
        except self._pg.InterfaceError as e:  # the connection was closed under us
            raise self._lost(e) from None

    return wrapper


class _PgDb:
    """The Batch API's view of the database (:class:`~services.queue.batches.BatchStore`): the same SQL as on
    SQLite (``?`` placeholders become ``%s``), the same transaction seam, errors mapped to UNAVAILABLE."""

    def __init__(self, store: PgQueueStore) -> None:
        self.store = store

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.store._execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.store._executemany(sql.replace("?", "%s"), rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.store._transaction():
            yield

    def setup(self) -> None:
        """Schema: created with the queue's tables (:data:`_SCHEMA`)."""

    def recover_creating(self, message_json: str) -> None:
        """Batches a replica left in ``creating`` (it stopped between storing the batch and enqueueing its
        requests) finish as cancelled; only those older than 10 minutes, as another replica may be creating one now."""
        self.execute("UPDATE batches SET state = 'open', cancelled_s = created_s, errors = ? "
                     "WHERE state = 'creating' AND created_s < ?", (message_json, float(self.store._clock()) - 600.0))


class PgQueueStore(QueueStore):
    """:class:`~services.queue.store.QueueStore`'s contract over PostgreSQL (see the module docstring).

    ``PgQueueStore(config, clock=time.time)`` with ``config.db_path`` a ``postgresql://`` URL. Raises ValueError
    at start-up for an unreachable database, another schema version or another ``group_granularity_s``; the
    message names the URL (password hidden) and the fix.
    """

    def __init__(self, config: QueueConfig, clock: Callable[[], float] = time.time) -> None:  # noqa: D107
        config.validate()
        try:
            import psycopg
        except ImportError as e:  # pragma: no cover - a dependency of the project
            raise ValueError("a postgresql:// queue database needs psycopg 3: pip install 'psycopg[binary]>=3'") from e
        self._pg = psycopg
        self.config = config
        self._clock = clock
        self._g = float(config.group_granularity_s)
        self._models = frozenset(config.models)
        self._url = str(config.db_path)
        self.url = redact_url(self._url)
        self._conn: Any = None
        self._tx: Any = None  # the connection while a transaction is open on it (never reconnect inside one)
        self._active: tuple[float, int] | None = None  # (monotonic time, QUEUED + LEASED rows) for the capacity check
        self._last_deadline: tuple[str, float] | None = None  # (request_id, deadline_s) of the last single enqueue
        try:
            self._conn = self._connect()
        except psycopg.Error as e:
            why = str(e).strip().rstrip(".")
            password = urlsplit(self._url).password
            if password:
                why = why.replace(password, "***")
            raise ValueError(
                f"cannot reach the queue database {self.url}: {why}. Fix: start PostgreSQL there or correct "
                "--db (postgresql://user:password@host:port/dbname; the database must exist: createdb dbname), and "
                "check the user, password and pg_hba.conf") from None
        try:
            self._setup()
        except BaseException:
            self._conn.close()
            raise

    # -- connection ------------------------------------------------------------------------------
    def _connect(self) -> Any:
        return self._pg.connect(self._url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S,
                                application_name="chiron-queue")

    def _c(self) -> Any:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            self._conn = None
            self._conn = conn = self._connect()
        return conn

    def _lost(self, e: Exception) -> QueueError:
        conn = self._conn
        if conn is not None and (conn.closed or conn.broken):
            with contextlib.suppress(Exception):
                conn.close()
            self._conn = None
        return QueueError("UNAVAILABLE", f"the queue database {self.url} is unavailable ({str(e).strip() or type(e).__name__}); "
                                         "retry: this replica reconnects by itself when it returns")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        if self._tx is not None:  # nested (a Batch API transaction around a store call): one transaction
            yield self._tx
            return
        try:
            conn = self._c()
            with conn.transaction():
                self._tx = conn
                try:
                    yield conn
                finally:
                    self._tx = None
        except (self._pg.OperationalError, self._pg.InterfaceError) as e:
            raise self._lost(e) from None

    def _execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        try:
            return (self._tx or self._c()).execute(sql, params)
        except (self._pg.OperationalError, self._pg.InterfaceError) as e:
            raise self._lost(e) from None

    def _executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            (self._tx or self._c()).cursor().executemany(sql, list(rows))
        except (self._pg.OperationalError, self._pg.InterfaceError) as e:
            raise self._lost(e) from None

    def batch_db(self) -> _PgDb:
        """The database seam :class:`~services.queue.batches.BatchStore` uses."""
        return _PgDb(self)

    def _setup(self) -> None:
        with self._conn.transaction():
            c = self._conn
            c.execute("SELECT pg_advisory_xact_lock(%s)", (_SETUP_LOCK,))
            c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
            version = meta.get("schema_version")
            if version is not None and int(version) not in (1, SCHEMA_VERSION):  # 1: migrated below
                raise ValueError(
                    f"the queue database {self.url} has schema version {version}, this code uses {SCHEMA_VERSION}. Fix: "
                    f"run the chiron version that created it, or point --db at a new database (createdb), "
                    f"or drop this one's tables if its queue may be discarded")
            if version is None and c.execute("SELECT to_regclass('requests') IS NOT NULL").fetchone()[0]:
                raise ValueError(
                    f"the queue database {self.url} has a 'requests' table but no chiron schema version: it belongs to "
                    "something else. Fix: point --db at a database of its own (createdb chiron_queue)")
            c.execute(_SCHEMA)
            if version is None or int(version) != SCHEMA_VERSION:
                # new, or version 1 (no group summary, no served tokens): add the triggers, count the summary once
                c.execute(_TRIGGERS)
                c.execute(_REBUILD_SUMMARY)
                c.execute("INSERT INTO meta (key, value) VALUES ('schema_version', %s) ON CONFLICT (key) DO UPDATE "
                          "SET value = excluded.value", (str(SCHEMA_VERSION),))
            g = meta.get("group_granularity_s")
            if g is None:
                c.execute("INSERT INTO meta (key, value) VALUES ('group_granularity_s', %s)", (repr(self._g),))
            elif float(g) != self._g:
                raise ValueError(f"the queue database {self.url} was created with group_granularity_s={float(g)}, got "
                                 f"{self._g}. Fix: use the same granularity (--group-granularity-s {float(g)}) or a new database")

    def close(self) -> None:
        """Close the connection. The store cannot be used afterwards."""
        if self._conn is not None:
            self._conn.close()

    # -- enqueue ---------------------------------------------------------------------------------
    def _outstanding(self, c: Any, adding: int) -> int:
        """QUEUED + LEASED rows, at most one second old; recounted when ``adding`` more could reach the capacity."""
        now = time.monotonic()
        cached = self._active
        if cached is None or now - cached[0] > 1.0 or cached[1] + adding >= 0.9 * self.config.capacity:
            q, le = c.execute(_COUNTS).fetchone()
            n = int(q) + int(le)
            self._active = cached = (now, n)
        return cached[1]

    def _exhausted_n(self, active: int, n: int) -> QueueError:
        return QueueError("RESOURCE_EXHAUSTED", f"queue is full: {active} queued or leased of capacity {self.config.capacity}; "
                                                f"cannot accept {n} more request(s): retry later")

    def _existing(self, request_id: str) -> tuple[str, int, int, int, bytes] | None:
        return self._execute("SELECT model, bucket, max_tokens, ttft_slo_ms, prompt FROM requests WHERE request_id = %s",
                             (request_id,)).fetchone()

    @_unavailable
    def enqueue(self, request_id: str, model: str, prompt_token_ids: Sequence[int], max_tokens: int,
                ttft_slo_ms: int) -> tuple[str, str]:
        v = self._validate(request_id, model, prompt_token_ids, max_tokens, ttft_slo_ms)
        conn = self._c()
        active = self._outstanding(conn, 1)
        if active + 1 > self.config.capacity:  # full: only a retry of a stored request succeeds
            existing = self._existing(v[0])
            if existing is None:
                raise self._exhausted_n(active, 1)
            return self._idempotent(existing, v)
        # One auto-committed statement (one round trip): a duplicate id inserts nothing and is compared below.
        now = float(self._clock())
        deadline = now + v[5] / 1000.0
        bucket = math.floor(deadline / self._g)
        row = conn.execute(_INSERT + " ON CONFLICT (request_id) DO NOTHING RETURNING seq",
                           (v[0], v[1], bucket, v[4], v[5], now, deadline, v[3], v[2])).fetchone()
        if row is None:
            existing = self._existing(v[0])
            if existing is None:  # deleted in between (purge): store it as new
                return self._enqueue_validated([v])[0]
            return self._idempotent(existing, v)
        self._active = (self._active[0], self._active[1] + 1) if self._active is not None else None
        self._last_deadline = (v[0], deadline)  # the Enqueue RPC asks for it next: saves a round trip
        return v[0], self._group_id(v[1], bucket)

    @_unavailable
    def _enqueue_validated(self, vs: list[tuple[str, str, bytes, int, int, int]]) -> list[tuple[str, str]]:
        if not vs:
            return []
        first: dict[str, tuple[str, str, bytes, int, int, int]] = {}
        for v in vs:
            prev = first.get(v[0])
            if prev is None:
                first[v[0]] = v
            elif (prev[1], prev[2], prev[4], prev[5]) != (v[1], v[2], v[4], v[5]):
                raise QueueError("ALREADY_EXISTS", f"request_id {v[0]!r} appears twice in the batch with different content")
        for attempt in range(3):
            try:
                return self._insert_batch(vs, first)
            except self._pg.errors.UniqueViolation:
                if attempt == 2:  # another replica keeps inserting the same ids
                    raise QueueError("FAILED_PRECONDITION", "conflicting insert of a request id during enqueue") from None
        raise AssertionError("unreachable")

    def _insert_batch(self, vs: list[tuple[str, str, bytes, int, int, int]],
                      first: dict[str, tuple[str, str, bytes, int, int, int]]) -> list[tuple[str, str]]:
        result: dict[str, tuple[str, str]] = {}
        now = float(self._clock())
        g = self._g

        def columns(rows: Iterable[tuple[str, str, bytes, int, int, int]]) -> tuple[list, ...]:
            cols: tuple[list, ...] = ([], [], [], [], [], [], [], [], [])
            for rid, model, blob, n, mt, slo in rows:
                deadline = now + slo / 1000.0
                bucket = math.floor(deadline / g)
                for col, x in zip(cols, (rid, model, bucket, mt, slo, now, deadline, n, blob), strict=True):
                    col.append(x)
                result[rid] = (rid, self._group_id(model, bucket))
            return cols

        def compare_existing(c: Any, ids: list[str]) -> None:
            for model, bucket, mt, slo, blob, rid in c.execute(
                    "SELECT model, bucket, max_tokens, ttft_slo_ms, prompt, request_id FROM requests WHERE request_id = ANY(%s)",
                    (ids,), binary=True).fetchall():
                result[rid] = self._idempotent((model, bucket, mt, slo, blob), first[rid])

        with self._transaction() as c:
            active = self._outstanding(c, len(first))
            if active + len(first) <= self.config.capacity:
                # Room for all: insert them in one statement, skipping ids already stored, then compare those (an
                # id stored with other content raises ALREADY_EXISTS and rolls the whole upload back).
                inserted = {r[0] for r in c.execute(_INSERT_MANY + " ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
                                                    columns(first.values()), binary=True).fetchall()}
                stored = [rid for rid in first if rid not in inserted]
                if stored:
                    for rid in stored:
                        del result[rid]
                    compare_existing(c, stored)
                    if len(result) != len(first):  # a stored request was purged in between: insert it again
                        raise self._pg.errors.UniqueViolation("request purged during enqueue")
                added = len(inserted)
            else:  # near the capacity: count only the new requests against it
                compare_existing(c, list(first))
                new = [v for rid, v in first.items() if rid not in result]
                if new and active + len(new) > self.config.capacity:
                    raise self._exhausted_n(active, len(new))
                if new:
                    c.execute(_INSERT_MANY, columns(new))
                added = len(new)
        if added and self._active is not None:
            self._active = (self._active[0], self._active[1] + added)
        return [result[v[0]] for v in vs]

    # -- lease / ack / return / cancel -----------------------------------------------------------
    @_unavailable
    def lease(self, worker_id: str, max_requests: int, models: Iterable[str] | None = None,
              lease_timeout_s: float | None = None) -> list[Lease]:
        n, timeout, models_set = self._lease_args(worker_id, max_requests, models, lease_timeout_s)
        allowed = sorted(models_set) if models_set else None
        self.expire_leases()
        now = float(self._clock())
        expiry = now + timeout
        params: dict[str, Any] = {"n": n, "expiry": expiry, "worker": worker_id, "now": now, "models": allowed}
        sql = _LEASE.format(models="" if allowed is None else "AND model = ANY(%(models)s)")
        rows = self._execute(sql, params).fetchall()  # one auto-committed statement
        rows.sort(key=lambda r: (r[0], r[1], r[2]))
        return [Lease(rid, lease_id, model, decode_tokens(prompt), mt, decode_tokens(resume), slo, arrival, deadline,
                      self._group_id(model, bucket), expiry, attempts, worker_id)
                for bucket, model, _seq, rid, lease_id, mt, slo, arrival, deadline, attempts, prompt, resume in rows]

    @_unavailable
    def ack_request(self, request_id: str, lease_id: str, output_tokens: int | Sequence[int]) -> tuple[int, str, int]:
        blob, count = output_tokens_arg(output_tokens)
        params = {"rid": request_id, "lease": lease_id, "count": count, "now": float(self._clock()), "blob": blob}
        row = self._execute(_ACK_COUNT if blob is None else _ACK_TOKENS, params).fetchone()
        if row is not None and row[9]:
            return count, row[1], int(row[6])
        if row is not None and row[3] == _DONE and row[4] == lease_id:  # acked before (a retry): same answer
            return int(row[8]), row[1], int(row[6])
        self._check_leased(row, request_id, lease_id, "ack")
        raise AssertionError("unreachable: the row was leased under this lease but not updated")

    @_unavailable
    def return_request(self, request_id: str, lease_id: str, generated_token_ids: Sequence[int] = ()) -> int:
        with self._transaction() as c:
            row = self._check_leased(c.execute(_SELECT_FOR_UPDATE, (request_id,)).fetchone(), request_id, lease_id, "return")
            seq, mt, n_resume, resume = row[0], row[5], row[6], row[9]
            blob, n = returned_tokens_arg(generated_token_ids, resume, n_resume, mt)
            c.execute("UPDATE requests SET state = 0, lease_id = NULL, lease_expiry_s = NULL, worker_id = NULL, "
                      "attempts = attempts + 1, resume = %s, n_resume = %s WHERE seq = %s", (blob, n, seq))
            self._served(c, row[1], n - int(n_resume), float(self._clock()))
        return n

    def _served(self, c: Any, model: str, tokens: int, now: float) -> None:
        """Record ``tokens`` new output tokens of ``model`` served at ``now`` in the open transaction (what
        :class:`~services.queue.core.CapacityTracker` records in memory on SQLite)."""
        c.execute("INSERT INTO served (model, t_s, tokens) VALUES (%s, %s, %s)", (model, now, max(0, tokens)))

    @_unavailable
    def renew_lease(self, request_id: str, lease_id: str, lease_timeout_s: float | None = None) -> float:
        timeout = self.config.lease_timeout_s if lease_timeout_s is None else float(lease_timeout_s)
        if not (math.isfinite(timeout) and timeout > 0):
            raise QueueError("INVALID_ARGUMENT", f"lease_timeout_s must be a finite number of seconds > 0, got {lease_timeout_s}")
        with self._transaction() as c:
            seq = self._check_leased(c.execute(_SELECT_FOR_UPDATE, (request_id,)).fetchone(), request_id, lease_id,
                                     "renew the lease of")[0]
            expiry = float(self._clock()) + timeout
            c.execute("UPDATE requests SET lease_expiry_s = %s WHERE seq = %s", (expiry, seq))
        return expiry

    @_unavailable
    def cancel(self, request_id: str) -> bool:
        with self._transaction() as c:
            row = c.execute("UPDATE requests SET state = 3, lease_expiry_s = NULL, finished_s = %s "
                            "WHERE request_id = %s AND state IN (0, 1) RETURNING seq", (float(self._clock()), request_id)).fetchone()
            if row is None and c.execute("SELECT 1 FROM requests WHERE request_id = %s", (request_id,)).fetchone() is None:
                raise QueueError("NOT_FOUND", f"no request {request_id!r} in the queue")
        return row is not None

    @_unavailable
    def expire_leases(self) -> int:
        """Put every lease whose expiry is before ``clock()`` back to QUEUED (one statement; replicas expiring at
        once each re-queue a row at most once: the row lock serializes them and the second finds it QUEUED)."""
        return self._execute(_EXPIRE, (float(self._clock()),)).rowcount

    @_unavailable
    def purge_finished(self, finished_before_s: float) -> int:
        return self._execute("DELETE FROM requests WHERE state IN (2, 3) AND finished_s < %s", (float(finished_before_s),)).rowcount

    # -- queries ---------------------------------------------------------------------------------
    @_unavailable
    def get(self, request_id: str) -> RequestInfo:
        """As :meth:`QueueStore.get`; the position is an indexed count over the model's queued rows ahead of it."""
        row = self._execute("SELECT seq, model, bucket, state, attempts, n_resume, max_tokens, ttft_slo_ms, arrival_s, deadline_s, "
                            "lease_id, lease_expiry_s, worker_id, output_tokens FROM requests WHERE request_id = %s",
                            (request_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"no request {request_id!r} in the queue")
        seq, model, bucket, state, attempts, n_resume, mt, slo, arrival, deadline, lease_id, expiry, worker, out = row
        position = -1
        if state == _QUEUED:
            position = int(self._execute(
                "SELECT count(*) FROM requests WHERE state = 0 AND model = %s AND (bucket < %s OR (bucket = %s AND seq < %s))",
                (model, bucket, bucket, seq)).fetchone()[0])
        return RequestInfo(request_id, model, _STATE_NAMES[state], self._group_id(model, bucket), position, attempts, n_resume,
                           mt, slo, arrival, deadline, lease_id, expiry, worker, out)

    @_unavailable
    def model_and_resume(self, request_id: str) -> tuple[str, int]:
        row = self._execute("SELECT model, n_resume FROM requests WHERE request_id = %s", (request_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"no request {request_id!r} in the queue")
        return row[0], int(row[1])

    @_unavailable
    def times_s(self, request_id: str) -> tuple[float, float | None, float | None]:
        row = self._execute("SELECT arrival_s, first_leased_s, finished_s FROM requests WHERE request_id = %s",
                            (request_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"request {request_id!r} is not in the queue")
        return float(row[0]), row[1], row[2]

    @_unavailable
    def deadline_s(self, request_id: str) -> float:
        last, self._last_deadline = self._last_deadline, None  # one-shot: right after this replica stored it
        if last is not None and last[0] == request_id:
            return last[1]
        row = self._execute("SELECT deadline_s FROM requests WHERE request_id = %s", (request_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"request {request_id!r} is not in the queue")
        return float(row[0])

    @_unavailable
    def get_tokens(self, request_id: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        row = self._execute("SELECT prompt, resume FROM requests WHERE request_id = %s", (request_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"no request {request_id!r} in the queue")
        return decode_tokens(row[0]), decode_tokens(row[1])

    @_unavailable
    def groups(self) -> list[GroupStats]:
        """Every group with queued or leased requests, in EDF order, the same on every replica: the per-group
        summary (``group_summary`` plus the deltas the triggers appended since the last :meth:`compact`, read in
        one snapshot) and one index probe per group for its head's arrival; O(groups), not O(requests). Folds the
        deltas into the summary when it read more than a few thousand of them."""
        g = self._g
        rows = self._execute(_GROUPS).fetchall()
        if sum(r[6] for r in rows) > len(rows) + _COMPACT_ROWS:
            self.compact()
        return [GroupStats(self._group_id(model, bucket), model, int(bucket), bucket * g, bucket * g + g, int(q), int(le),
                           head, int(rem))
                for model, bucket, q, le, rem, head, _n in rows]

    def group_snapshots(self) -> list[GroupSnapshot]:
        return [s.snapshot() for s in self.groups() if s.queued]

    @_unavailable
    def counts(self) -> dict[str, int]:
        q, le = self._execute(_COUNTS).fetchone()
        return {"queued": int(q), "leased": int(le), "capacity": int(self.config.capacity)}

    @_unavailable
    def recount_groups(self) -> list[GroupStats]:
        """:meth:`groups` recounted from scratch from the rows (an aggregate over every outstanding request): what
        the summary must always equal."""
        g = self._g
        return [GroupStats(self._group_id(model, bucket), model, int(bucket), bucket * g, bucket * g + g, int(q), int(le),
                           head, int(rem))
                for model, bucket, q, le, rem, head in self._execute(_RECOUNT).fetchall()]

    @_unavailable
    def compact(self) -> bool:
        """Fold the pending group deltas into ``group_summary`` and the served tokens into per-second totals (one
        short transaction; kept :data:`_SERVED_KEEP_S`). One replica at a time: returns False without waiting when
        another is compacting. The queue service's maintenance task calls it every second."""
        with self._transaction() as c:
            if not c.execute("SELECT pg_try_advisory_xact_lock(%s)", (_COMPACT_LOCK,)).fetchone()[0]:
                return False
            c.execute(_COMPACT)
            c.execute("DELETE FROM group_summary WHERE queued = 0 AND leased = 0")
            c.execute(_COMPACT_SERVED)
            c.execute("DELETE FROM served_seconds WHERE second < %s", (float(self._clock()) - _SERVED_KEEP_S,))
        return True

    @_unavailable
    def completed_since(self, since_s: float) -> list[tuple[str, str, int, float]]:
        """Requests acked through any replica with ``finished_s > since_s`` [s]: ``(request_id, model, output tokens,
        finished_s)``, oldest first. Every replica's estimator learns output lengths from these
        (:class:`~services.queue.core.QueueCore`), so its view does not depend on which replica saw the ack."""
        return self._execute("SELECT request_id, model, output_tokens, finished_s FROM requests WHERE state = 2 "
                             "AND finished_s > %s ORDER BY finished_s, seq", (float(since_s),)).fetchall()

    def served_window(self, window_s: float, now: float) -> dict[str, tuple[float, float]]:
        """Per model: (output tokens served — acked or returned with progress, through any replica — since
        ``now - window_s``, time of the model's first served tokens ever) [tokens, s]. Per-second resolution for
        what :meth:`compact` folded: the second across the window's start counts in proportion."""
        return {model: (float(tokens or 0.0), float(first)) for model, tokens, first in
                self._execute(_SERVED, {"lo": float(now) - float(window_s)}).fetchall() if first is not None}


def check_database(config: QueueConfig) -> None:
    """Open and close the PostgreSQL store once (creating its schema if new), so that a command fails at start-up
    with the URL (password hidden) and the fix: raises ValueError for an unreachable database, another schema
    version or another ``group_granularity_s``."""
    PgQueueStore(config).close()
