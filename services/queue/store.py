"""Durable, grouped, lease-based global batch queue store (pure Python + stdlib ``sqlite3``; no gRPC, no asyncio).

The queue (``../shared/DESIGN.md`` §1, batch path) stores every accepted batch request durably, files it under
a *request group* and hands requests out by **lease**: an engine agent leases work, streams results back and
acks; a lease that expires (agent died) puts the work back. Only the holder of a request's *current* lease can
ack it, so nothing accepted is lost and nothing is completed twice.

**Groups and order.** ``deadline_s = arrival_s + ttft_slo_ms / 1000`` (seconds, the injected clock); the group
key is ``(model, bucket)`` with ``bucket = floor(deadline_s / group_granularity_s)``, the group id
``f"{model}/{bucket}"`` (split it with ``rsplit("/", 1)``: a model name may contain ``/``). Groups are served
earliest-deadline-first (by bucket, ties by model name), requests inside a group FIFO by enqueue sequence
``seq``; a returned or expired request keeps its ``seq``. A queued request's *position* (the estimator's
``requests_ahead``) counts the queued requests of its model served before it. A group's ``deadline_s`` is the start
of its bucket: a lower bound of its deadlines (by under one granularity), stable while it drains.

**Durability.** SQLite in WAL mode, ``synchronous=NORMAL``: every public mutating call is one transaction
committed before it returns, so it survives ``kill -9``; a power loss may lose the transactions since the last
WAL checkpoint (the database stays consistent). ``locking_mode=EXCLUSIVE``: one store owns a database file at a
time, because the per-group aggregates live in its memory; a second opener gets
``QueueError(FAILED_PRECONDITION)``. Opening rebuilds the aggregates (one scan of queued and leased rows); LEASED
requests come back to the queue when their lease expires (:meth:`QueueStore.expire_leases`, also run by every
:meth:`QueueStore.lease`).

**Cost.** Prompts and resume tokens live only in the database (int32 little-endian bytes); memory holds a few
numbers per group (:class:`_Group`) plus SQLite's page cache (``cache_size_kib``). :meth:`QueueStore.groups` is
``O(G)`` for ``G`` groups whatever the number of requests; :meth:`QueueStore.get` is an indexed lookup plus a
``COUNT`` over the shorter side of its group. Throughput and memory measured: ``docs/decisions/0042-queue-store.md``.

**Threads.** Use a store from the thread that created it (the queue server's asyncio loop); SQLite's
``check_same_thread`` raises ``sqlite3.ProgrammingError`` otherwise."""

from __future__ import annotations

import bisect
import math
import os
import sqlite3
import sys
import time
import uuid
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from services.queue.estimator import GroupSnapshot

__all__ = [
    "QueueConfig",
    "QueueError",
    "RequestState",
    "Lease",
    "RequestInfo",
    "GroupStats",
    "QueueStore",
]

_SCHEMA_VERSION = 1
_TOKEN_MAX = 2**31 - 1  # token ids are int32 in the protos (``repeated int32 prompt_token_ids``)
_TOKEN_CODE = next(code for code in "il" if array(code).itemsize == 4)  # a signed 32-bit array typecode
_LITTLE = sys.byteorder == "little"
_MAX_REQUEST_ID_CHARS = 512

# Request states as stored (small ints keep rows and the partial indexes small).
_QUEUED, _LEASED, _DONE, _CANCELLED = 0, 1, 2, 3


class RequestState(StrEnum):
    """Life cycle: QUEUED → LEASED → DONE, LEASED → QUEUED (return / lease expiry), QUEUED|LEASED → CANCELLED."""

    QUEUED = "QUEUED"
    LEASED = "LEASED"
    DONE = "DONE"
    CANCELLED = "CANCELLED"


_STATE_NAMES = (RequestState.QUEUED, RequestState.LEASED, RequestState.DONE, RequestState.CANCELLED)


# ----------------------------------------------------------------------------------------------
# Config and errors
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueueConfig:
    """Configuration of a :class:`QueueStore`.

    ``db_path``: SQLite file (created if missing; ``":memory:"`` for tests, not durable), or a PostgreSQL URL
    ``postgresql://user:password@host:port/dbname`` (:mod:`services.queue.pg_store`; open either with
    :func:`services.queue.pg_store.open_store`).
    ``group_granularity_s``: width of a deadline bucket (seconds, > 0); requests of one model whose deadlines
    fall in the same bucket form one group. Fixed for the life of a database file.
    ``capacity``: most requests QUEUED + LEASED at once (requests, ≥ 1); beyond it enqueue is refused.
    ``max_ttft_slo_ms``: largest accepted TTFT SLO (milliseconds; default 7 days).
    ``models``: accepted model names; empty = any model.
    ``max_prompt_tokens``: longest accepted prompt (tokens).
    ``lease_timeout_s``: default lease duration (seconds, > 0) when :meth:`QueueStore.lease` is not given one.
    ``cache_size_kib``: SQLite page cache (KiB, ≥ 1024; unused by PostgreSQL).
    """

    db_path: str | os.PathLike[str] = ":memory:"
    group_granularity_s: float = 60.0
    capacity: int = 2_000_000
    max_ttft_slo_ms: int = 7 * 24 * 3600 * 1000
    models: tuple[str, ...] = ()
    max_prompt_tokens: int = 32768
    lease_timeout_s: float = 60.0
    cache_size_kib: int = 65536

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and the accepted range."""
        if not str(os.fspath(self.db_path)):
            raise ValueError("db_path must be a file path or ':memory:'")
        if not (math.isfinite(self.group_granularity_s) and self.group_granularity_s > 0):
            raise ValueError(f"group_granularity_s must be a finite number of seconds > 0, got {self.group_granularity_s}")
        if int(self.capacity) != self.capacity or self.capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1 (requests), got {self.capacity}")
        if int(self.max_ttft_slo_ms) != self.max_ttft_slo_ms or self.max_ttft_slo_ms < 1:
            raise ValueError(f"max_ttft_slo_ms must be an integer >= 1 (ms), got {self.max_ttft_slo_ms}")
        if isinstance(self.models, str) or not all(isinstance(m, str) and m for m in self.models):
            raise ValueError(f"models must be a tuple of non-empty model names (empty tuple = any model), got {self.models!r}")
        if int(self.max_prompt_tokens) != self.max_prompt_tokens or self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be an integer >= 1 (tokens), got {self.max_prompt_tokens}")
        if not (math.isfinite(self.lease_timeout_s) and self.lease_timeout_s > 0):
            raise ValueError(f"lease_timeout_s must be a finite number of seconds > 0, got {self.lease_timeout_s}")
        if int(self.cache_size_kib) != self.cache_size_kib or self.cache_size_kib < 1024:
            raise ValueError(f"cache_size_kib must be an integer >= 1024 (KiB), got {self.cache_size_kib}")


class QueueError(Exception):
    """A refused queue operation. ``code`` is the gRPC status name the service maps it to:
    INVALID_ARGUMENT, ALREADY_EXISTS, RESOURCE_EXHAUSTED, NOT_FOUND, FAILED_PRECONDITION or (PostgreSQL store:
    the database is unreachable; retry) UNAVAILABLE."""

    CODES = frozenset({"INVALID_ARGUMENT", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "NOT_FOUND", "FAILED_PRECONDITION",
                       "UNAVAILABLE"})

    def __init__(self, code: str, message: str) -> None:
        if code not in self.CODES:
            raise ValueError(f"unknown QueueError code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Lease:
    """One leased request, everything an engine agent needs to serve it.

    ``prompt_token_ids``/``resume_token_ids``: token ids; ``resume_token_ids`` are the output tokens already
    generated in earlier leases (resume from ``prompt + resume``; empty on a first lease). ``max_tokens``: the
    request's total output budget (tokens, resume tokens included). ``ttft_slo_ms``: milliseconds;
    ``arrival_s``, ``deadline_s``, ``lease_expiry_s``: seconds on the store's clock. ``attempts``: how many
    times the request came back to the queue before this lease (return or expiry).
    """

    request_id: str
    lease_id: str
    model: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    resume_token_ids: tuple[int, ...]
    ttft_slo_ms: int
    arrival_s: float
    deadline_s: float
    group_id: str
    lease_expiry_s: float
    attempts: int
    worker_id: str


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """State of one request. ``position``: queued requests of the same model served before it (-1 unless
    QUEUED). ``resume_tokens``: output tokens generated so far (count). Times in seconds on the store's clock;
    ``lease_id``/``lease_expiry_s``/``worker_id`` are set while LEASED (and ``lease_id`` stays on a DONE request:
    the lease that completed it); ``output_tokens`` is set once DONE."""

    request_id: str
    model: str
    state: RequestState
    group_id: str
    position: int
    attempts: int
    resume_tokens: int
    max_tokens: int
    ttft_slo_ms: int
    arrival_s: float
    deadline_s: float
    lease_id: str | None
    lease_expiry_s: float | None
    worker_id: str | None
    output_tokens: int | None


@dataclass(frozen=True, slots=True)
class GroupStats:
    """Aggregates of one request group (no per-request data).

    ``deadline_s``: start of the group's deadline bucket (seconds), a lower bound of its requests' deadlines;
    ``deadline_end_s``: end of the bucket (every deadline is in ``[deadline_s, deadline_end_s)``).
    ``queued``/``leased``: requests in those states. ``oldest_arrival_s``: arrival (seconds) of the group's
    head, the queued request served next (the oldest one for a non-decreasing clock; returned requests keep
    their arrival); None when nothing is queued. ``queued_remaining_tokens``: sum over queued requests of
    ``max_tokens − resume tokens`` (an upper bound of the output tokens still to generate).
    """

    group_id: str
    model: str
    bucket: int
    deadline_s: float
    deadline_end_s: float
    queued: int
    leased: int
    oldest_arrival_s: float | None
    queued_remaining_tokens: int

    def snapshot(self) -> GroupSnapshot:
        """The estimator's view: ``GroupSnapshot(group_id, model, deadline_s, num_requests=queued)``."""
        return GroupSnapshot(self.group_id, self.model, self.deadline_s, self.queued)


class _Group:
    """In-memory aggregates of one group, updated on every committed state change (a few numbers per group)."""

    __slots__ = ("model", "bucket", "group_id", "queued", "leased", "remaining", "head_seq", "head_arrival_s", "tail_seq")

    def __init__(self, model: str, bucket: int) -> None:
        self.model = model
        self.bucket = bucket
        self.group_id = f"{model}/{bucket}"
        self.queued = 0
        self.leased = 0
        self.remaining = 0  # sum of max_tokens - n_resume over queued requests (tokens)
        self.head_seq: int | None = None  # smallest seq among queued requests (exact)
        self.head_arrival_s: float | None = None
        self.tail_seq = -1  # largest seq ever queued here: only a hint for get()'s count direction


# ----------------------------------------------------------------------------------------------
# Token encoding (int32 little-endian bytes)
# ----------------------------------------------------------------------------------------------
def encode_tokens(tokens: Any, what: str) -> tuple[bytes, int]:
    """(bytes, count) of a sequence of token ids in [0, 2^31) as int32 little-endian. Raises QueueError(INVALID_ARGUMENT)."""
    if isinstance(tokens, (str, bytes, bytearray, memoryview)):
        raise QueueError("INVALID_ARGUMENT", f"{what} must be a sequence of integer token ids, got {type(tokens).__name__}")
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
            raise QueueError("INVALID_ARGUMENT", f"{what} must be a 1-D integer array, got dtype {tokens.dtype} ndim {tokens.ndim}")
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > _TOKEN_MAX):
            raise QueueError("INVALID_ARGUMENT", f"{what}: token ids must be in [0, {_TOKEN_MAX}]")
        return tokens.astype("<i4").tobytes(), int(tokens.size)
    try:
        a = array(_TOKEN_CODE, tokens)  # signed 32-bit: ids beyond int32 raise OverflowError
    except (TypeError, OverflowError, ValueError) as e:
        raise QueueError("INVALID_ARGUMENT", f"{what} must be a sequence of integer token ids in [0, {_TOKEN_MAX}]: {e}") from None
    if not _LITTLE:
        a.byteswap()
    blob = a.tobytes()
    if not blob[3::4].isascii():  # a high byte >= 0x80 is a negative int32 (C-speed check, no per-item loop)
        raise QueueError("INVALID_ARGUMENT", f"{what}: token ids must be >= 0, got {min(a) if _LITTLE else 'a negative id'}")
    return blob, len(a)


def decode_tokens(blob: bytes | None) -> tuple[int, ...]:
    """Token ids from :func:`encode_tokens`'s bytes (``()`` for None or empty)."""
    if not blob:
        return ()
    a = array(_TOKEN_CODE)
    a.frombytes(blob)
    if not _LITTLE:
        a.byteswap()
    return tuple(a)


def output_tokens_arg(output_tokens: Any) -> tuple[bytes | None, int]:
    """``(blob or None, count)`` of an ack's ``output_tokens``: a count, or the token ids themselves."""
    blob = None
    if isinstance(output_tokens, int | np.integer) and not isinstance(output_tokens, bool):
        count = int(output_tokens)
    else:
        try:
            len(output_tokens)
        except TypeError:
            raise QueueError("INVALID_ARGUMENT", "output_tokens must be a token count or a sequence of token ids") from None
        blob, count = encode_tokens(output_tokens, "output_tokens")
    if count < 0:
        raise QueueError("INVALID_ARGUMENT", f"output_tokens must be >= 0, got {count}")
    return blob, count


def returned_tokens_arg(generated_token_ids: Any, resume: bytes | None, n_resume: int, max_tokens: int) -> tuple[bytes, int]:
    """``(blob, count)`` a return stores as the request's resume tokens: ``generated_token_ids`` (all the output
    tokens so far), or the stored ``resume`` / ``n_resume`` when it is empty (no new progress). Raises
    QueueError(INVALID_ARGUMENT) for bad ids, ids that do not start with the stored resume tokens, or more than
    ``max_tokens``."""
    blob, n = encode_tokens(generated_token_ids, "generated_token_ids")
    if n == 0:
        return resume, n_resume
    if resume and not blob.startswith(bytes(resume)):
        raise QueueError("INVALID_ARGUMENT", f"generated_token_ids must be all the tokens generated so far, starting "
                                             f"with the lease's {n_resume} resume_token_ids (not only the new ones)")
    if n > max_tokens:
        raise QueueError("INVALID_ARGUMENT", f"generated_token_ids has {n} tokens, more than max_tokens={max_tokens}")
    return blob, n


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise QueueError("INVALID_ARGUMENT", f"{what} must be an integer, got bool")
    try:
        return int(value.__index__())
    except (AttributeError, TypeError):
        raise QueueError("INVALID_ARGUMENT", f"{what} must be an integer, got {type(value).__name__} {value!r}") from None


# ----------------------------------------------------------------------------------------------
# SQL
# ----------------------------------------------------------------------------------------------
# Blobs last: columns after a large (overflowing) blob would cost a walk of its overflow pages.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    seq            INTEGER PRIMARY KEY,  -- enqueue sequence: FIFO order inside a group
    request_id     TEXT    NOT NULL UNIQUE,
    model          TEXT    NOT NULL,
    bucket         INTEGER NOT NULL,     -- floor(deadline_s / group_granularity_s)
    state          INTEGER NOT NULL,     -- 0 QUEUED, 1 LEASED, 2 DONE, 3 CANCELLED
    max_tokens     INTEGER NOT NULL,
    ttft_slo_ms    INTEGER NOT NULL,
    arrival_s      REAL    NOT NULL,
    deadline_s     REAL    NOT NULL,
    n_prompt       INTEGER NOT NULL,
    n_resume       INTEGER NOT NULL DEFAULT 0,
    attempts       INTEGER NOT NULL DEFAULT 0,
    lease_id       TEXT,
    lease_expiry_s REAL,
    worker_id      TEXT,
    output_tokens  INTEGER,
    finished_s     REAL,
    first_leased_s REAL,                 -- when it was first handed to an engine: its start (batch TTFT)
    prompt         BLOB    NOT NULL,     -- int32 little-endian token ids
    resume         BLOB                  -- int32 little-endian output tokens generated so far (NULL = none)
);
CREATE INDEX IF NOT EXISTS requests_queued ON requests(model, bucket, seq) WHERE state = 0;
CREATE INDEX IF NOT EXISTS requests_leased ON requests(lease_expiry_s) WHERE state = 1;
"""

_INSERT = ("INSERT INTO requests (seq, request_id, model, bucket, state, max_tokens, ttft_slo_ms, arrival_s, deadline_s, "
           "n_prompt, prompt) VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?)")
_SELECT_EXISTING = "SELECT model, bucket, max_tokens, ttft_slo_ms, prompt FROM requests WHERE request_id = ?"
# ``state = 0`` must be a literal for the planner to use the partial index.
_SELECT_GROUP_HEAD = ("SELECT seq, request_id, max_tokens, ttft_slo_ms, arrival_s, deadline_s, attempts, n_resume, prompt, resume "
                      "FROM requests WHERE state = 0 AND model = ? AND bucket = ? ORDER BY seq LIMIT ?")
_SELECT_NEXT_HEAD = ("SELECT seq, arrival_s FROM requests WHERE state = 0 AND model = ? AND bucket = ? AND seq > ? "
                     "ORDER BY seq LIMIT 1")
_SET_LEASED = ("UPDATE requests SET state = 1, lease_id = ?, lease_expiry_s = ?, worker_id = ?, "
               "first_leased_s = COALESCE(first_leased_s, ?) WHERE seq = ?")
_SELECT_FOR_UPDATE = ("SELECT seq, model, bucket, state, lease_id, max_tokens, n_resume, arrival_s, output_tokens, resume "
                      "FROM requests WHERE request_id = ?")
_SET_QUEUED = ("UPDATE requests SET state = 0, lease_id = NULL, lease_expiry_s = NULL, worker_id = NULL, "
               "attempts = attempts + 1 WHERE seq = ?")


class QueueStore:
    """The durable grouped lease queue over one SQLite file (see the module docstring).

    ``QueueStore(config, clock=time.time)``: ``clock()`` returns the current time in seconds (arrivals,
    deadlines and lease expiries are on it). Raises ValueError for a bad config (or a database created with
    another ``group_granularity_s`` / a newer schema), QueueError(FAILED_PRECONDITION) when another process holds
    the database. Use from one thread; :meth:`close` (or ``with``) when done.
    """

    def __init__(self, config: QueueConfig, clock: Callable[[], float] = time.time) -> None:
        config.validate()
        self.config = config
        self._clock = clock
        self._g = float(config.group_granularity_s)
        self._models = frozenset(config.models)
        path = str(os.fspath(config.db_path))
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True, cached_statements=64)
        try:
            self._setup(path)
            self._groups: dict[tuple[str, int], _Group] = {}
            self._order: list[tuple[int, str]] = []  # (bucket, model) of every group, sorted: EDF order
            self._queued = 0
            self._leased = 0
            self._next_seq = 1
            self._next_expiry = math.inf  # lower bound of the earliest lease expiry (s)
            self._rebuild()
        except BaseException:
            self._conn.close()
            raise

    # -- open / recovery -----------------------------------------------------------------------
    def _setup(self, path: str) -> None:
        c = self._conn
        try:
            c.execute("PRAGMA busy_timeout = 0")
            c.execute("PRAGMA locking_mode = EXCLUSIVE")  # before WAL: no shared-memory index, one owner
            c.execute("PRAGMA journal_mode = WAL")
            c.execute("PRAGMA synchronous = NORMAL")
            c.execute("PRAGMA temp_store = MEMORY")
            c.execute(f"PRAGMA cache_size = -{int(self.config.cache_size_kib)}")
            c.execute("PRAGMA wal_autocheckpoint = 4096")  # pages (16 MiB of WAL between checkpoints)
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise ValueError(f"{path}: queue schema version {version} is newer than this code's {_SCHEMA_VERSION}")
            c.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                if "first_leased_s" not in {r[1] for r in c.execute("PRAGMA table_info(requests)")}:
                    c.execute("ALTER TABLE requests ADD COLUMN first_leased_s REAL")  # files from before the column
                row = c.execute("SELECT value FROM meta WHERE key = 'group_granularity_s'").fetchone()
                if row is None:
                    c.execute("INSERT INTO meta (key, value) VALUES ('group_granularity_s', ?)", (repr(self._g),))
                elif float(row[0]) != self._g:
                    raise ValueError(f"{path} was created with group_granularity_s={float(row[0])}, got {self._g}: "
                                     "use the same granularity or a new database file")
                c.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise QueueError("FAILED_PRECONDITION", f"{path} is in use by another queue store (one owner per file): {e}") from None
            raise

    def _rebuild(self) -> None:
        """Rebuild the in-memory aggregates from the database (at open; O(queued + leased rows))."""
        c = self._conn
        self._groups.clear()
        self._order.clear()
        for model, bucket, n, rem, head in c.execute(
                "SELECT model, bucket, count(*), sum(max_tokens - n_resume), min(seq) FROM requests WHERE state = 0 "
                "GROUP BY model, bucket"):
            g = self._group(model, bucket)
            g.queued, g.remaining, g.head_seq = n, rem, head
            g.head_arrival_s = c.execute("SELECT arrival_s FROM requests WHERE seq = ?", (head,)).fetchone()[0]
            g.tail_seq = c.execute("SELECT max(seq) FROM requests WHERE state = 0 AND model = ? AND bucket = ?",
                                   (model, bucket)).fetchone()[0]
            self._queued += n
        for model, bucket, n in c.execute("SELECT model, bucket, count(*) FROM requests WHERE state = 1 GROUP BY model, bucket"):
            self._group(model, bucket).leased = n
            self._leased += n
        self._next_seq = (c.execute("SELECT max(seq) FROM requests").fetchone()[0] or 0) + 1
        self._refresh_next_expiry()

    def _refresh_next_expiry(self) -> None:
        v = self._conn.execute("SELECT min(lease_expiry_s) FROM requests WHERE state = 1").fetchone()[0]
        self._next_expiry = math.inf if v is None else float(v)

    def close(self) -> None:
        """Close the database (checkpoints the WAL). The store cannot be used afterwards."""
        self._conn.close()

    def __enter__(self) -> QueueStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- in-memory aggregates ------------------------------------------------------------------
    def _group(self, model: str, bucket: int) -> _Group:
        key = (model, bucket)
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = _Group(model, bucket)
            bisect.insort(self._order, (bucket, model))
        return g

    def _drop_if_empty(self, g: _Group) -> None:
        if g.queued == 0 and g.leased == 0:
            del self._groups[(g.model, g.bucket)]
            i = bisect.bisect_left(self._order, (g.bucket, g.model))
            del self._order[i]

    def _add_queued(self, g: _Group, seq: int, arrival_s: float, remaining: int) -> None:
        """A request (new, returned or expired) became QUEUED in ``g``."""
        g.queued += 1
        g.remaining += remaining
        self._queued += 1
        if g.head_seq is None or seq < g.head_seq:
            g.head_seq, g.head_arrival_s = seq, arrival_s
        if seq > g.tail_seq:
            g.tail_seq = seq

    def _group_id(self, model: str, bucket: int) -> str:
        return f"{model}/{bucket}"

    # -- enqueue -------------------------------------------------------------------------------
    def _validate(self, request_id: Any, model: Any, prompt_token_ids: Any, max_tokens: Any, ttft_slo_ms: Any,
                  where: str = "") -> tuple[str, str, bytes, int, int, int]:
        if not isinstance(request_id, str) or not request_id or len(request_id) > _MAX_REQUEST_ID_CHARS:
            raise QueueError("INVALID_ARGUMENT", f"{where}request_id must be a non-empty string of at most "
                                                 f"{_MAX_REQUEST_ID_CHARS} characters, got {request_id!r:.80}")
        if not isinstance(model, str) or not model:
            raise QueueError("INVALID_ARGUMENT", f"{where}request {request_id}: model must be a non-empty string")
        if self._models and model not in self._models:
            raise QueueError("INVALID_ARGUMENT", f"{where}request {request_id}: unknown model {model!r}; "
                                                 f"this queue accepts {sorted(self._models)}")
        mt = _as_int(max_tokens, f"{where}request {request_id}: max_tokens")
        if mt <= 0:
            raise QueueError("INVALID_ARGUMENT", f"{where}request {request_id}: max_tokens must be > 0 tokens, got {mt}")
        slo = _as_int(ttft_slo_ms, f"{where}request {request_id}: ttft_slo_ms")
        if slo <= 0 or slo > self.config.max_ttft_slo_ms:
            raise QueueError("INVALID_ARGUMENT", f"{where}request {request_id}: ttft_slo_ms must be in "
                                                 f"[1, {self.config.max_ttft_slo_ms}] ms, got {slo}")
        try:
            n = len(prompt_token_ids)
        except TypeError:
            raise QueueError("INVALID_ARGUMENT", f"{where}request {request_id}: prompt_token_ids must be a sequence of "
                                                 f"token ids, got {type(prompt_token_ids).__name__}") from None
        if n == 0:
            raise QueueError("INVALID_ARGUMENT", f"{where}request {request_id}: prompt_token_ids is empty")
        if n > self.config.max_prompt_tokens:
            raise QueueError("INVALID_ARGUMENT", f"{where}request {request_id}: prompt of {n} tokens is longer than "
                                                 f"max_prompt_tokens={self.config.max_prompt_tokens}")
        blob, n = encode_tokens(prompt_token_ids, f"{where}request {request_id}: prompt_token_ids")
        return request_id, model, blob, n, mt, slo

    def _existing(self, request_id: str) -> tuple[str, int, int, int, bytes] | None:
        return self._conn.execute(_SELECT_EXISTING, (request_id,)).fetchone()

    def _idempotent(self, existing: tuple[str, int, int, int, bytes], v: tuple[str, str, bytes, int, int, int]) -> tuple[str, str]:
        """(request_id, group_id) of an already stored request with identical content, else ALREADY_EXISTS."""
        model, bucket, mt, slo, blob = existing
        if (model, mt, slo, bytes(blob)) != (v[1], v[4], v[5], v[2]):
            raise QueueError("ALREADY_EXISTS", f"request_id {v[0]!r} is already stored with different content "
                                               "(model, prompt, max_tokens or ttft_slo_ms): use a new request_id")
        return v[0], self._group_id(model, bucket)

    def enqueue(self, request_id: str, model: str, prompt_token_ids: Sequence[int], max_tokens: int,
                ttft_slo_ms: int) -> tuple[str, str]:
        """Store one request durably (committed on return) and file it under its group.

        ``prompt_token_ids``: token ids (ints in [0, 2^31)); ``max_tokens``: output budget (tokens, > 0);
        ``ttft_slo_ms``: TTFT SLO (milliseconds, 1..``max_ttft_slo_ms``); arrival = ``clock()``, deadline = arrival +
        SLO. Returns ``(request_id, group_id)``. A repeated ``request_id`` with identical content returns the stored
        request's ids and stores nothing (whatever its state). Raises QueueError: INVALID_ARGUMENT (bad field,
        unknown model, empty or too long prompt), ALREADY_EXISTS (same id, different content), RESOURCE_EXHAUSTED
        (``capacity`` requests already queued + leased; nothing stored).
        """
        v = self._validate(request_id, model, prompt_token_ids, max_tokens, ttft_slo_ms)
        if self._queued + self._leased >= self.config.capacity:
            existing = self._existing(request_id)
            if existing is not None:
                return self._idempotent(existing, v)
            raise self._exhausted(1)
        now = float(self._clock())
        deadline = now + v[5] / 1000.0
        bucket = math.floor(deadline / self._g)
        seq = self._next_seq
        try:
            # Autocommit mode: one INSERT statement is one committed transaction.
            self._conn.execute(_INSERT, (seq, request_id, model, bucket, v[4], v[5], now, deadline, v[3], v[2]))
        except sqlite3.IntegrityError:
            existing = self._existing(request_id)
            if existing is None:
                raise
            return self._idempotent(existing, v)
        self._next_seq = seq + 1
        self._add_queued(self._group(model, bucket), seq, now, v[4])
        return request_id, self._group_id(model, bucket)

    def _exhausted(self, n: int) -> QueueError:
        return QueueError("RESOURCE_EXHAUSTED", f"queue is full: {self._queued} queued + {self._leased} leased of capacity "
                                                f"{self.config.capacity}; cannot accept {n} more request(s): retry later")

    def enqueue_many(self, requests: Iterable[Sequence[Any] | Mapping[str, Any]]) -> list[tuple[str, str]]:
        """Enqueue a batch in ONE transaction (all or nothing); the fast path for throughput.

        Each item is a tuple ``(request_id, model, prompt_token_ids, max_tokens, ttft_slo_ms)`` or a mapping with
        those keys (same units as :meth:`enqueue`). Requests of a batch share one arrival time and keep the batch's
        order. Returns ``(request_id, group_id)`` per item, in order. Duplicates (of stored requests or inside the
        batch) with identical content are idempotent; the errors of :meth:`enqueue` are raised for the first bad
        item (message prefixed ``requests[i]``) and then nothing of the batch is stored; RESOURCE_EXHAUSTED when
        the new requests do not all fit.
        """
        return self._enqueue_validated(self._validate_many(requests))

    def _validate_many(self, requests: Iterable[Sequence[Any] | Mapping[str, Any]]) -> list[tuple[str, str, bytes, int, int, int]]:
        """:meth:`_validate` of every item of an :meth:`enqueue_many` batch (message prefixed ``requests[i]``)."""
        vs: list[tuple[str, str, bytes, int, int, int]] = []
        for i, item in enumerate(requests):
            where = f"requests[{i}]: "
            if isinstance(item, Mapping):
                try:
                    vs.append(self._validate(item["request_id"], item["model"], item["prompt_token_ids"], item["max_tokens"],
                                             item["ttft_slo_ms"], where))
                except KeyError as e:
                    raise QueueError("INVALID_ARGUMENT", f"{where}missing field {e}") from None
            else:
                if len(item) != 5:
                    raise QueueError("INVALID_ARGUMENT", f"{where}expected (request_id, model, prompt_token_ids, max_tokens, "
                                                         f"ttft_slo_ms), got {len(item)} fields")
                vs.append(self._validate(*item, where=where))
        return vs

    def _enqueue_validated(self, vs: list[tuple[str, str, bytes, int, int, int]]) -> list[tuple[str, str]]:
        """Store validated requests in one transaction (:meth:`enqueue_many`'s storage half)."""
        if not vs:
            return []
        now = float(self._clock())
        first: dict[str, tuple[str, str, bytes, int, int, int]] = {}
        new: list[tuple[str, str, bytes, int, int, int]] = []
        for v in vs:
            prev = first.get(v[0])
            if prev is None:
                first[v[0]] = v
                new.append(v)
            elif (prev[1], prev[2], prev[4], prev[5]) != (v[1], v[2], v[4], v[5]):
                raise QueueError("ALREADY_EXISTS", f"request_id {v[0]!r} appears twice in the batch with different content")
        free = self.config.capacity - self._queued - self._leased
        result: dict[str, tuple[str, str]] = {}
        rows = self._rows(new, now) if len(new) <= free else None
        if rows is not None and not self._insert_many(rows):
            rows = None
        if rows is None:  # slow path: some ids exist already, or the batch may not fit
            new = []
            for v in first.values():
                existing = self._existing(v[0])
                if existing is None:
                    new.append(v)
                else:
                    result[v[0]] = self._idempotent(existing, v)
            if len(new) > free:
                raise self._exhausted(len(new))
            rows = self._rows(new, now)
            if rows and not self._insert_many(rows):
                raise QueueError("FAILED_PRECONDITION", "conflicting insert of a request id during enqueue_many")
        for seq, rid, model, bucket, mt, *_ in rows:
            self._add_queued(self._group(model, bucket), seq, now, mt)
            result[rid] = (rid, self._group_id(model, bucket))
        if rows:
            self._next_seq = rows[-1][0] + 1
        return [result[v[0]] for v in vs]

    def _rows(self, vs: list[tuple[str, str, bytes, int, int, int]], now: float) -> list[tuple[Any, ...]]:
        rows = []
        seq = self._next_seq
        g = self._g
        for rid, model, blob, n, mt, slo in vs:
            deadline = now + slo / 1000.0
            rows.append((seq, rid, model, math.floor(deadline / g), mt, slo, now, deadline, n, blob))
            seq += 1
        return rows

    def _insert_many(self, rows: list[tuple[Any, ...]]) -> bool:
        """Insert in one transaction; False (rolled back) on a duplicate request_id."""
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany(_INSERT, rows)
            c.execute("COMMIT")
        except sqlite3.IntegrityError:
            c.execute("ROLLBACK")
            return False
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return True

    # -- lease / ack / return / cancel ---------------------------------------------------------
    def _lease_args(self, worker_id: str, max_requests: int, models: Iterable[str] | str | None,
                    lease_timeout_s: float | None) -> tuple[int, float, frozenset[str] | None]:
        """:meth:`lease`'s arguments checked: ``(max_requests, lease timeout [s], allowed models or None)``; raises
        QueueError INVALID_ARGUMENT as :meth:`lease` says."""
        if not isinstance(worker_id, str) or not worker_id:
            raise QueueError("INVALID_ARGUMENT", "worker_id must be a non-empty string")
        n = _as_int(max_requests, "max_requests")
        if n < 1:
            raise QueueError("INVALID_ARGUMENT", f"max_requests must be >= 1, got {n}")
        timeout = self.config.lease_timeout_s if lease_timeout_s is None else float(lease_timeout_s)
        if not (math.isfinite(timeout) and timeout > 0):
            raise QueueError("INVALID_ARGUMENT", f"lease_timeout_s must be a finite number of seconds > 0, got {lease_timeout_s}")
        allowed = None
        if models is not None:
            allowed = frozenset([models] if isinstance(models, str) else models) or None
        return n, timeout, allowed

    def lease(self, worker_id: str, max_requests: int, models: Iterable[str] | None = None,
              lease_timeout_s: float | None = None) -> list[Lease]:
        """Lease up to ``max_requests`` queued requests to ``worker_id`` (one transaction, after
        :meth:`expire_leases`): earliest-deadline group first (only ``models`` if given: a name or an iterable of
        names; None or empty = every model), FIFO inside a group.

        ``lease_timeout_s``: seconds until the lease expires (default ``config.lease_timeout_s``); renew it with
        :meth:`renew_lease`. Returns the leases in serving order (possibly empty). Raises QueueError
        INVALID_ARGUMENT for an empty worker_id, ``max_requests`` < 1 or a timeout ≤ 0.
        """
        n, timeout, allowed = self._lease_args(worker_id, max_requests, models, lease_timeout_s)
        self.expire_leases()
        if self._queued == 0:
            return []
        now = float(self._clock())
        expiry = now + timeout
        c = self._conn
        out: list[Lease] = []
        taken: list[tuple[_Group, int, int, int | None, float | None]] = []  # group, count, tokens, new head
        c.execute("BEGIN IMMEDIATE")
        try:
            for bucket, model in self._order:
                g = self._groups[(model, bucket)]
                if g.queued == 0 or (allowed is not None and model not in allowed):
                    continue
                rows = c.execute(_SELECT_GROUP_HEAD, (model, bucket, n - len(out))).fetchall()
                if not rows:
                    continue
                updates = []
                tokens = 0
                group_id = g.group_id
                for seq, rid, mt, slo, arrival, deadline, attempts, n_resume, prompt, resume in rows:
                    lease_id = uuid.uuid4().hex
                    updates.append((lease_id, expiry, worker_id, now, seq))
                    tokens += mt - n_resume
                    out.append(Lease(rid, lease_id, model, decode_tokens(prompt), mt, decode_tokens(resume), slo,
                                     arrival, deadline, group_id, expiry, attempts, worker_id))
                c.executemany(_SET_LEASED, updates)
                head: tuple[int, float] | None = None
                if len(rows) < g.queued:
                    head = c.execute(_SELECT_NEXT_HEAD, (model, bucket, rows[-1][0])).fetchone()
                taken.append((g, len(rows), tokens, None if head is None else head[0], None if head is None else head[1]))
                if len(out) >= n:
                    break
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        for g, k, tokens, head_seq, head_arrival in taken:
            g.queued -= k
            g.leased += k
            g.remaining -= tokens
            g.head_seq, g.head_arrival_s = head_seq, head_arrival
            self._queued -= k
            self._leased += k
        if out and expiry < self._next_expiry:
            self._next_expiry = expiry
        return out

    def _leased_row(self, request_id: str, lease_id: str, action: str) -> tuple[Any, ...]:
        """The row of a request leased under ``lease_id``; raises NOT_FOUND / FAILED_PRECONDITION otherwise."""
        return self._check_leased(self._conn.execute(_SELECT_FOR_UPDATE, (request_id,)).fetchone(),
                                  request_id, lease_id, action)

    @staticmethod
    def _check_leased(row: tuple[Any, ...] | None, request_id: str, lease_id: str, action: str) -> tuple[Any, ...]:
        """``row`` (a ``_SELECT_FOR_UPDATE`` result, None for no such request) when the request is leased under
        ``lease_id``; raises NOT_FOUND / FAILED_PRECONDITION otherwise."""
        if row is None:
            raise QueueError("NOT_FOUND", f"no request {request_id!r} in the queue")
        state, current = row[3], row[4]
        if state == _LEASED and current == lease_id:
            return row
        if state == _DONE:
            why = "it is already DONE"
        elif state == _CANCELLED:
            why = "it was cancelled"
        elif state == _QUEUED:
            why = "its lease expired or was returned and it is queued again"
        else:
            why = "it is leased under another lease (this lease expired)"
        raise QueueError("FAILED_PRECONDITION", f"cannot {action} request {request_id!r} with lease {lease_id!r}: {why}; "
                                                "drop the work, the queue serves it elsewhere")

    def ack(self, request_id: str, lease_id: str, output_tokens: int | Sequence[int]) -> int:
        """:meth:`ack_request`, returning the output token count alone."""
        return self.ack_request(request_id, lease_id, output_tokens)[0]

    def ack_request(self, request_id: str, lease_id: str, output_tokens: int | Sequence[int]) -> tuple[int, str, int]:
        """Mark a leased request DONE (committed on return); only its current lease holder may.

        ``output_tokens``: the total number of output tokens generated for the request (resumed tokens included),
        or the output token ids themselves (stored, and returned by :meth:`get_tokens` as the second element).
        Returns ``(count, model, resumed tokens before this ack)`` from one read of the row (the ack path of
        every finished batch request: :meth:`QueueService.complete`). Acking a DONE request again
        with the lease that completed it is idempotent (returns the stored count). A lease past its expiry that has
        not been swept back yet is still accepted (nobody else holds the request). Raises QueueError NOT_FOUND
        (unknown id), FAILED_PRECONDITION (not the current lease: expired and re-queued or re-leased, cancelled,
        or DONE by another lease), INVALID_ARGUMENT (negative count or bad ids).
        """
        blob, count = output_tokens_arg(output_tokens)
        row = self._conn.execute(_SELECT_FOR_UPDATE, (request_id,)).fetchone()
        if row is not None and row[3] == _DONE and row[4] == lease_id:
            return int(row[8]), row[1], int(row[6])
        seq, model, bucket, *_ = self._check_leased(row, request_id, lease_id, "ack")
        if blob is None:
            self._conn.execute("UPDATE requests SET state = 2, output_tokens = ?, lease_expiry_s = NULL, finished_s = ? WHERE seq = ?",
                               (count, float(self._clock()), seq))
        else:  # the output itself is kept (resume column: every token generated), for the client to fetch
            self._conn.execute("UPDATE requests SET state = 2, output_tokens = ?, lease_expiry_s = NULL, finished_s = ?, "
                               "resume = ?, n_resume = ? WHERE seq = ?", (count, float(self._clock()), blob, count, seq))
        g = self._groups[(model, bucket)]
        g.leased -= 1
        self._leased -= 1
        self._drop_if_empty(g)
        return count, model, int(row[6])

    def return_request(self, request_id: str, lease_id: str, generated_token_ids: Sequence[int] = ()) -> int:
        """Give a leased request back (e.g. evicted by interactive work): it is QUEUED again at its original place
        in its group (the next served there), with ``attempts`` + 1 (committed on return).

        ``generated_token_ids``: ALL output tokens generated for the request so far, in total (the lease's
        ``resume_token_ids`` followed by this lease's new tokens); they replace the stored resume tokens, so the
        next lease resumes from ``prompt + generated_token_ids``. It must start with the lease's resume tokens and
        hold at most ``max_tokens`` tokens; empty (the default) is accepted as "no new progress" and keeps the
        stored tokens. Returns the resume token count. Raises QueueError NOT_FOUND, FAILED_PRECONDITION (not the
        current lease), INVALID_ARGUMENT (bad tokens, not extending the resume tokens, longer than max_tokens).
        """
        seq, model, bucket, _, _, mt, n_resume, arrival, _, resume = self._leased_row(request_id, lease_id, "return")
        blob, n = returned_tokens_arg(generated_token_ids, resume, n_resume, mt)
        self._conn.execute("UPDATE requests SET state = 0, lease_id = NULL, lease_expiry_s = NULL, worker_id = NULL, "
                           "attempts = attempts + 1, resume = ?, n_resume = ? WHERE seq = ?", (blob, n, seq))
        g = self._groups[(model, bucket)]
        g.leased -= 1
        self._leased -= 1
        self._add_queued(g, seq, arrival, mt - n)
        return n

    def renew_lease(self, request_id: str, lease_id: str, lease_timeout_s: float | None = None) -> float:
        """Extend a lease to ``clock() + lease_timeout_s`` (seconds; default ``config.lease_timeout_s``); agents serving
        long requests call it before expiry. Returns the new expiry (seconds). Raises QueueError NOT_FOUND,
        FAILED_PRECONDITION (not the current lease), INVALID_ARGUMENT (timeout ≤ 0)."""
        timeout = self.config.lease_timeout_s if lease_timeout_s is None else float(lease_timeout_s)
        if not (math.isfinite(timeout) and timeout > 0):
            raise QueueError("INVALID_ARGUMENT", f"lease_timeout_s must be a finite number of seconds > 0, got {lease_timeout_s}")
        seq = self._leased_row(request_id, lease_id, "renew the lease of")[0]
        expiry = float(self._clock()) + timeout
        self._conn.execute("UPDATE requests SET lease_expiry_s = ? WHERE seq = ?", (expiry, seq))
        self._next_expiry = min(self._next_expiry, expiry)
        return expiry

    def cancel(self, request_id: str) -> bool:
        """Cancel a QUEUED or LEASED request (committed on return): True if it was cancelled now, False if it was
        already DONE or CANCELLED. A later ack/return of its lease raises FAILED_PRECONDITION. Raises QueueError
        NOT_FOUND for an unknown id."""
        c = self._conn
        row = c.execute(_SELECT_FOR_UPDATE, (request_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"no request {request_id!r} in the queue")
        seq, model, bucket, state, _, mt, n_resume = row[:7]
        if state in (_DONE, _CANCELLED):
            return False
        g = self._groups[(model, bucket)]
        head: tuple[int, float] | None = None
        if state == _QUEUED and seq == g.head_seq and g.queued > 1:
            head = c.execute(_SELECT_NEXT_HEAD, (model, bucket, seq)).fetchone()
        c.execute("UPDATE requests SET state = 3, lease_expiry_s = NULL, finished_s = ? WHERE seq = ?", (float(self._clock()), seq))
        if state == _QUEUED:
            g.queued -= 1
            g.remaining -= mt - n_resume
            self._queued -= 1
            if g.queued == 0:
                g.head_seq = g.head_arrival_s = None
            elif head is not None:
                g.head_seq, g.head_arrival_s = head
        else:
            g.leased -= 1
            self._leased -= 1
        self._drop_if_empty(g)
        return True

    def expire_leases(self) -> int:
        """Put every lease whose expiry is before ``clock()`` back to QUEUED at its original place (no new progress,
        ``attempts`` + 1), in one transaction. Returns how many. O(1) when no lease can have expired."""
        now = float(self._clock())
        if now <= self._next_expiry:
            return 0
        c = self._conn
        rows = c.execute("SELECT seq, model, bucket, max_tokens, n_resume, arrival_s FROM requests "
                         "WHERE state = 1 AND lease_expiry_s < ?", (now,)).fetchall()
        if rows:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany(_SET_QUEUED, [(r[0],) for r in rows])
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        for seq, model, bucket, mt, n_resume, arrival in rows:
            g = self._groups[(model, bucket)]
            g.leased -= 1
            self._leased -= 1
            self._add_queued(g, seq, arrival, mt - n_resume)
        self._refresh_next_expiry()
        return len(rows)

    def purge_finished(self, finished_before_s: float) -> int:
        """Delete DONE and CANCELLED requests finished before ``finished_before_s`` (seconds on the clock), so the
        file does not grow forever. Their ids become unknown (a later enqueue of the same id is a new request).
        Returns how many were deleted. A maintenance call: scans the table."""
        cur = self._conn.execute("DELETE FROM requests WHERE state IN (2, 3) AND finished_s < ?", (float(finished_before_s),))
        return cur.rowcount

    # -- queries -------------------------------------------------------------------------------
    def get(self, request_id: str) -> RequestInfo:
        """State of one request, with its ``position`` (queued requests of its model served before it; -1 unless
        QUEUED). Cost: one indexed lookup, O(G) over the groups and an indexed count over the shorter side of its
        group. Raises QueueError NOT_FOUND."""
        c = self._conn
        row = c.execute("SELECT seq, model, bucket, state, attempts, n_resume, max_tokens, ttft_slo_ms, arrival_s, deadline_s, "
                        "lease_id, lease_expiry_s, worker_id, output_tokens FROM requests WHERE request_id = ?",
                        (request_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"no request {request_id!r} in the queue")
        seq, model, bucket, state, attempts, n_resume, mt, slo, arrival, deadline, lease_id, expiry, worker, out = row
        position = -1
        if state == _QUEUED:
            g = self._groups[(model, bucket)]
            ahead = sum(o.queued for o in self._groups.values() if o.model == model and o.bucket < bucket)
            if g.head_seq is not None and seq - g.head_seq <= g.tail_seq - seq:
                inside = c.execute("SELECT count(*) FROM requests WHERE state = 0 AND model = ? AND bucket = ? AND seq < ?",
                                   (model, bucket, seq)).fetchone()[0]
            else:
                behind = c.execute("SELECT count(*) FROM requests WHERE state = 0 AND model = ? AND bucket = ? AND seq > ?",
                                   (model, bucket, seq)).fetchone()[0]
                inside = g.queued - 1 - behind
            position = ahead + inside
        return RequestInfo(request_id, model, _STATE_NAMES[state], self._group_id(model, bucket), position, attempts, n_resume,
                           mt, slo, arrival, deadline, lease_id, expiry, worker, out)

    def model_and_resume(self, request_id: str) -> tuple[str, int]:
        """``(model, resume_tokens)`` of a stored request: one primary-key lookup, for callers that need no
        position (the ack path). Raises QueueError NOT_FOUND."""
        row = self._conn.execute("SELECT model, n_resume FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"no request {request_id!r} in the queue")
        return row[0], int(row[1])

    def times_s(self, request_id: str) -> tuple[float, float | None, float | None]:
        """``(arrival_s, first_leased_s, finished_s)`` of a request (seconds on the store's clock; None until it
        happens). ``first_leased_s − arrival_s`` is its batch TTFT up to the engine's first token. Raises
        QueueError NOT_FOUND."""
        row = self._conn.execute("SELECT arrival_s, first_leased_s, finished_s FROM requests WHERE request_id = ?",
                                 (request_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"request {request_id!r} is not in the queue")
        return float(row[0]), row[1], row[2]

    def deadline_s(self, request_id: str) -> float:
        """A request's TTFT deadline (arrival + TTFT SLO, seconds on the store's clock): one primary-key lookup,
        no position count. Raises QueueError NOT_FOUND for an unknown id."""
        row = self._conn.execute("SELECT deadline_s FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"request {request_id!r} is not in the queue")
        return float(row[0])

    def get_tokens(self, request_id: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(prompt_token_ids, resume_token_ids)`` of a stored request. Raises QueueError NOT_FOUND."""
        row = self._conn.execute("SELECT prompt, resume FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            raise QueueError("NOT_FOUND", f"no request {request_id!r} in the queue")
        return decode_tokens(row[0]), decode_tokens(row[1])

    def _stats(self, g: _Group) -> GroupStats:
        start = g.bucket * self._g
        return GroupStats(g.group_id, g.model, g.bucket, start, start + self._g, g.queued, g.leased, g.head_arrival_s, g.remaining)

    def groups(self) -> list[GroupStats]:
        """Aggregates of every group with queued or leased requests, in EDF order (bucket, then model). O(G) from
        memory; no database access."""
        groups = self._groups
        return [self._stats(groups[(model, bucket)]) for bucket, model in self._order]

    def group_snapshots(self) -> list[GroupSnapshot]:
        """The groups with queued requests as the estimator's :class:`GroupSnapshot` (``deadline_s`` = bucket start,
        ``num_requests`` = queued), in EDF order; feed them to ``WaitingTimeEstimator.refresh``. O(G)."""
        groups = self._groups
        out = []
        for bucket, model in self._order:
            g = groups[(model, bucket)]
            if g.queued:
                out.append(GroupSnapshot(g.group_id, model, bucket * self._g, g.queued))
        return out

    def counts(self) -> dict[str, int]:
        """``{"queued": n, "leased": n, "capacity": n}`` (requests), from memory."""
        return {"queued": self._queued, "leased": self._leased, "capacity": int(self.config.capacity)}

    def recount_groups(self) -> list[GroupStats]:
        """The group aggregates recomputed from the database (O(rows): for checks and tests), same form and order
        as :meth:`groups`; equal to it unless the store is broken."""
        c = self._conn
        acc: dict[tuple[str, int], dict[str, Any]] = {}
        for model, bucket, n, rem, head in c.execute(
                "SELECT model, bucket, count(*), sum(max_tokens - n_resume), min(seq) FROM requests WHERE state = 0 "
                "GROUP BY model, bucket"):
            arrival = c.execute("SELECT arrival_s FROM requests WHERE seq = ?", (head,)).fetchone()[0]
            acc[(model, bucket)] = {"queued": n, "remaining": rem, "arrival": arrival, "leased": 0}
        for model, bucket, n in c.execute("SELECT model, bucket, count(*) FROM requests WHERE state = 1 GROUP BY model, bucket"):
            acc.setdefault((model, bucket), {"queued": 0, "remaining": 0, "arrival": None, "leased": 0})["leased"] = n
        out = []
        for model, bucket in sorted(acc, key=lambda k: (k[1], k[0])):
            a = acc[(model, bucket)]
            start = bucket * self._g
            out.append(GroupStats(self._group_id(model, bucket), model, bucket, start, start + self._g, a["queued"], a["leased"],
                                  a["arrival"], a["remaining"]))
        return out
