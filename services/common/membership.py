"""Engine-instance membership in etcd: who serves, in which role, at which address.

Every engine agent writes one key, ``/chiron/v1/instances/<instance_id>``, whose value is an
:class:`InstanceInfo` as JSON, under an etcd lease that it keeps alive (:class:`Registration`). When the
agent dies its keep-alive stops and etcd deletes the key one TTL later; when it shuts down cleanly it
revokes the lease and the key disappears at once. The global scaler and the router follow the prefix with a
:class:`MembershipWatcher`: one list, then a watch from the list's revision + 1.

Both survive etcd restarts and outages (client ``aetcd`` 1.0.0, see ``../shared/notes/infra.md``):

- an open watch fails with ``ConnectionFailedError: Stream removed`` when etcd goes away. The watcher keeps
  its last snapshot (``healthy`` turns False, one warning is logged), retries with exponential backoff and
  re-watches from the last revision it saw + 1, so the events of the outage (including deletions by lease
  expiry) are replayed in order. If that revision has been compacted meanwhile, or the store went back in
  time (etcd restored or wiped), it re-lists the prefix and replaces the snapshot.
- the registration refreshes its lease every TTL/3. When etcd cannot be reached it logs one warning (again
  every minute while it lasts) and retries with backoff (at most TTL/3 apart, so a restarted etcd sees a
  refresh in time), for as long as the process runs. When the lease is gone (it expired during a partition or
  a stall of the host, or etcd lost it), it grants a new lease and writes the key again; a new lease that
  expires before its first write (another stall) is replaced too. Its task never ends but by ``close()`` /
  ``abandon()``: a failure of any kind is retried, and a task that ended anyway is started again.

Every (re)connection uses a fresh gRPC channel: a channel that saw its server die would otherwise wait out
gRPC's own reconnect backoff (up to minutes) before trying again.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import aetcd
import aetcd.exceptions
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger("chiron.membership")

INSTANCES_PREFIX = "/chiron/v1/instances/"
"""etcd key prefix of instance records; the key of one instance is ``INSTANCES_PREFIX + instance_id``."""

Role = Literal["interactive", "mixed", "batch"]
State = Literal["serving", "draining"]

_STILL_FAILING_LOG_S = 60.0  # a registration failing this long [s] logs a warning again (and every as long after)

# gRPC channel options for every etcd client made from endpoints: a TCP keepalive ping every 10 s notices a
# silently dead connection (etcd's default --grpc-keepalive-min-time is 5 s, so this is not a ping flood).
_CHANNEL_OPTIONS = {"grpc.keepalive_time_ms": 10_000, "grpc.keepalive_timeout_ms": 5_000}


class MembershipError(Exception):
    """etcd could not be reached (or refused the operation) within the time allowed."""


class InstanceInfo(BaseModel):
    """One engine instance's record in etcd (immutable; derive a changed copy with :meth:`with_changes`).

    ``instance_id``: unique id, also the last key segment (no ``/``); ``role``: interactive, mixed or batch;
    ``model``: the model it serves; ``address``: ``host:port`` of the engine agent's gRPC server;
    ``backend``: e.g. ``simulated`` or ``vllm``; ``state``: ``serving``, or ``draining`` (takes no new work);
    ``started_at``: process start, Unix time [s]; ``pid``: OS process id, if local; ``labels``: free-form
    string tags (node, GPU type, ...). Unknown JSON fields are ignored so that newer writers stay readable.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    instance_id: str = Field(min_length=1)
    role: Role
    model: str
    address: str
    backend: str = "simulated"
    state: State = "serving"
    started_at: float = Field(default_factory=time.time)
    pid: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("instance_id")
    @classmethod
    def _no_slash(cls, v: str) -> str:
        if "/" in v:
            raise ValueError(f"instance_id {v!r} must not contain '/' (it is the last segment of an etcd key)")
        return v

    @field_validator("address")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address {v!r} must be 'host:port' with a port in 1..65535")
        return v

    def to_json(self) -> bytes:
        """The value stored in etcd (UTF-8 JSON)."""
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> InstanceInfo:
        """Parse a stored value; raises ``pydantic.ValidationError`` when it is not a valid record."""
        return cls.model_validate_json(data)

    def with_changes(self, **changes) -> InstanceInfo:
        """A validated copy with ``changes`` applied; raises ``pydantic.ValidationError`` on bad values."""
        return type(self).model_validate({**self.model_dump(), **changes})


# ---- connecting -----------------------------------------------------------------------------------------

ClientFactory = Callable[[], aetcd.Client]
EtcdTarget = str | Sequence[str] | ClientFactory
"""Where etcd is: ``"host:port"``, ``"host1:port1,host2:port2"``, a sequence of ``"host:port"``, or a
callable returning a NEW, unconnected :class:`aetcd.Client` at each call (it is closed after use)."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``"host:port"`` (an ``http://`` prefix is accepted) → ``(host, port)``; raises ValueError otherwise."""
    text = endpoint.strip()
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r} must be 'host:port'")
    return host.strip("[]"), int(port)


def client_factory(target: EtcdTarget, *, request_timeout_s: float = 5.0) -> ClientFactory:
    """A factory of fresh :class:`aetcd.Client` objects for ``target`` (see :data:`EtcdTarget`).

    With several endpoints each new client goes to the next one (round robin), so a retry after a failure
    tries another member. ``request_timeout_s``: deadline of each unary etcd call [s]. Raises ValueError for a
    malformed endpoint or an empty list.
    """
    if callable(target):
        return target
    parts = [p for p in (target.split(",") if isinstance(target, str) else list(target)) if p.strip()]
    if not parts:
        raise ValueError("no etcd endpoint given")
    endpoints = [parse_endpoint(p) for p in parts]
    cycle = itertools.cycle(endpoints)

    def make() -> aetcd.Client:
        host, port = next(cycle)
        return aetcd.Client(host=host, port=port, timeout=request_timeout_s, options=dict(_CHANNEL_OPTIONS))

    return make


async def _close_quietly(client: aetcd.Client | None, timeout_s: float = 2.0) -> None:
    """Close an etcd client, waiting at most ``timeout_s`` [s]; errors are ignored. Not ``wait_for``: on its
    deadline that cancels the close and then waits, without bound, for the cancelled close to finish (a watcher's
    ``stop()`` once hung past a test's 90-s limit, most likely there: it awaits this in its task's ``finally``)."""
    if client is None:
        return
    task = asyncio.ensure_future(client.close())
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if done:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            task.result()
    else:
        log.warning("closing an etcd client took over %.0f s; left to finish in the background", timeout_s)
        task.cancel()


class _Backoff:
    """Exponential backoff with ±20 % jitter: ``initial_s``, doubling up to ``max_s`` [s]."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s, self.max_s = initial_s, max(max_s, initial_s)
        self._next = initial_s

    def reset(self) -> None:
        self._next = self.initial_s

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2.0, self.max_s)
        return delay * random.uniform(0.8, 1.2)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# ---- registration ---------------------------------------------------------------------------------------


class Registration:
    """An engine instance's key in etcd, kept alive by a background task. Build with :meth:`create`.

    Properties: ``info`` (the record last asked for), ``key``, ``lease_id`` (None while unregistered),
    ``registered`` (the key was written under the current lease; the last known answer while etcd is down),
    ``healthy`` (the last keep-alive succeeded), ``registrations`` (how many times a lease was granted and the
    key written: 1 normally, more after lost leases), ``ttl_s`` (granted TTL [s]).
    """

    def __init__(self, target: EtcdTarget, info: InstanceInfo, *, ttl_s: int = 10, prefix: str = INSTANCES_PREFIX,
                 request_timeout_s: float = 5.0, backoff_initial_s: float = 0.1, backoff_max_s: float | None = None) -> None:
        """Prefer :meth:`create`, which also registers. Raises ValueError for ``ttl_s`` < 1 or a bad target."""
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1 s, not {ttl_s}")
        self._factory = client_factory(target, request_timeout_s=request_timeout_s)
        self._info = info
        self._prefix = prefix
        self._ttl_s = int(ttl_s)
        self._granted_ttl_s = int(ttl_s)
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._client: aetcd.Client | None = None
        self._lease_id: int | None = None
        self._written = False  # the current info is stored under the current lease
        self._new_lease = False  # a lease was granted and its first write has not happened yet
        self._registrations = 0
        self._lock = asyncio.Lock()  # serialises writes (update vs. the keep-alive task's re-registration)
        self._wake = asyncio.Event()
        self._first = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._healthy = False

    # -- construction / teardown --
    @classmethod
    async def create(cls, target: EtcdTarget, info: InstanceInfo, ttl_s: int = 10, *, prefix: str = INSTANCES_PREFIX,
                     initial_timeout_s: float | None = 10.0, request_timeout_s: float = 5.0, backoff_initial_s: float = 0.1,
                     backoff_max_s: float | None = None) -> Registration:
        """Register ``info`` under ``prefix + info.instance_id`` with a lease of ``ttl_s`` [s] and keep it alive.

        ``target``: see :data:`EtcdTarget`. ``initial_timeout_s``: how long to retry the first registration [s];
        None returns at once and registers in the background (the key appears when etcd is reachable).
        ``backoff_initial_s`` / ``backoff_max_s``: retry delays while etcd is unreachable [s]; the maximum is
        capped at TTL/3 (default TTL/3). ``request_timeout_s``: deadline of each etcd call [s].
        Raises :class:`MembershipError` when the first registration did not succeed within ``initial_timeout_s``
        (the background task is stopped then), ValueError for bad arguments.
        """
        reg = cls(target, info, ttl_s=ttl_s, prefix=prefix, request_timeout_s=request_timeout_s,
                  backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s)
        reg._start_task()
        if initial_timeout_s is not None:
            try:
                await asyncio.wait_for(reg._first.wait(), initial_timeout_s)
            except TimeoutError:
                await reg.abandon()
                raise MembershipError(f"could not register {reg.key} in etcd within {initial_timeout_s} s "
                                      "(is etcd running and reachable?)") from None
        return reg

    async def close(self) -> None:
        """Stop the keep-alive and revoke the lease, so the key disappears at once. Idempotent.

        If etcd is unreachable the revoke is skipped with a warning; the key then expires one TTL later.
        Never raises for etcd errors.
        """
        if self._closed:
            return
        await self._stop_task()
        lease_id, self._lease_id, self._written = self._lease_id, None, False
        if lease_id is not None:
            client = self._client or self._factory()
            try:
                await client.revoke_lease(lease_id)
                log.info("deregistered %s (lease %x revoked)", self.key, lease_id)
            except Exception as e:
                log.warning("could not revoke the lease of %s (%s); the key expires within %d s",
                            self.key, _describe(e), self._granted_ttl_s)
            if client is not self._client:
                await _close_quietly(client)
        await _close_quietly(self._client)
        self._client = None

    async def abandon(self) -> None:
        """Stop the keep-alive WITHOUT revoking the lease, as if the process had crashed: the key stays until
        its TTL runs out. For tests and for a process that must exit without touching etcd. Idempotent."""
        if self._closed:
            return
        await self._stop_task()
        await _close_quietly(self._client)
        self._client = None

    async def _stop_task(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> Registration:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- properties --
    @property
    def info(self) -> InstanceInfo:
        return self._info

    @property
    def key(self) -> str:
        return self._prefix + self._info.instance_id

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    @property
    def registered(self) -> bool:
        return self._lease_id is not None and self._written

    @property
    def registrations(self) -> int:
        return self._registrations

    @property
    def healthy(self) -> bool:
        """True while the keep-alive succeeds (False while etcd is unreachable and before the first refresh)."""
        return self._healthy and not self._closed

    @property
    def ttl_s(self) -> int:
        """The lease TTL etcd granted [s] (etcd raises TTLs below its minimum, about 2 s by default)."""
        return self._granted_ttl_s

    # -- updates --
    async def update(self, **changes) -> bool:
        """Change fields of the record (e.g. ``state="draining"``) and rewrite the key under the same lease.

        Returns True when written now, False when etcd is unreachable: the keep-alive task then writes the new
        record as soon as etcd is back. Raises ``pydantic.ValidationError`` for bad values, ValueError when
        ``instance_id`` is changed, RuntimeError after :meth:`close`.
        """
        if self._closed:
            raise RuntimeError(f"registration {self.key} is closed")
        new = self._info.with_changes(**changes)
        if new.instance_id != self._info.instance_id:
            raise ValueError("instance_id cannot change; close this registration and create another")
        async with self._lock:
            self._info = new
            self._written = False
            if self._lease_id is None:
                self._wake.set()
                return False
            try:
                await self._conn().put(self.key.encode(), new.to_json(), lease=self._lease_id)
            except Exception as e:
                log.warning("could not write the update of %s (%s); retrying in the background", self.key, _describe(e))
                await self._drop_client()
                self._wake.set()
                return False
            self._written = True
            return True

    # -- background task --
    def _conn(self) -> aetcd.Client:
        if self._client is None:
            self._client = self._factory()
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        await _close_quietly(client)

    async def _ensure_registered(self) -> None:
        """Grant a lease if there is none and write the record if it is not written; raises etcd errors.

        A write refused with "lease not found" drops the lease, whether it was just granted or not: a lease granted
        right before a stall of the host (or of this event loop) can expire before its first write, and every
        later write under it would fail the same way. The next attempt (here at once, else the keep-alive loop's
        next retry) grants a new one.
        """
        async with self._lock:
            client = self._conn()
            for _ in range(2):
                if self._lease_id is None:
                    lease = await client.lease(self._ttl_s)
                    self._lease_id, self._granted_ttl_s = lease.id, max(1, int(lease.ttl))
                    self._written, self._new_lease = False, True
                if self._written:
                    return
                try:
                    await client.put(self.key.encode(), self._info.to_json(), lease=self._lease_id)
                except aetcd.exceptions.ClientError as e:
                    if "lease not found" not in str(e):
                        raise
                    # the lease expired before (or since) its write: start over with a new lease
                    log.warning("lease %x of %s expired before the key was written%s; registering again with a new "
                                "lease", self._lease_id, self.key, " (granted just before)" if self._new_lease else "")
                    self._lease_id, self._written, self._new_lease = None, False, False
                    continue
                self._written = True
                if self._new_lease:
                    self._new_lease = False
                    self._registrations += 1
                    log.info("registered %s (lease %x, TTL %d s, registration #%d)", self.key, self._lease_id,
                             self._granted_ttl_s, self._registrations)
                return
            raise MembershipError(f"the leases granted for {self.key} expired before the key could be written")

    def _start_task(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"etcd-registration-{self._info.instance_id}")
        self._task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task) -> None:
        """The keep-alive task must run until :meth:`close` / :meth:`abandon`: if it ends any other way (a bug, an
        error that is not an ``Exception``), say so and start it again, so the key comes back."""
        if self._closed or task is not self._task:
            return
        error = None if task.cancelled() else task.exception()
        log.error("the etcd keep-alive of %s ended unexpectedly (%s); starting it again", self.key,
                  _describe(error) if error is not None else "cancelled" if task.cancelled() else "returned")
        self._healthy = False
        self._start_task()

    async def _run(self) -> None:
        """Keep the key registered until cancelled: refresh the lease every TTL/3; on any failure (etcd
        unreachable, lease gone, a write refused) retry with backoff, forever; never returns by itself."""
        interval = max(0.2, self._ttl_s / 3)
        backoff = _Backoff(self._backoff_initial_s, min(self._backoff_max_s or interval, interval))
        failing_since: float | None = None
        last_warning = 0.0
        while True:
            try:
                self._wake.clear()
                await self._ensure_registered()
                self._first.set()
                interval = max(0.2, self._granted_ttl_s / 3)
                backoff.max_s = min(self._backoff_max_s or interval, interval)
                reply = await self._conn().refresh_lease(self._lease_id)
                if reply is None or reply.TTL <= 0:
                    # etcd no longer knows the lease (expired during an outage or a partition, or the store was
                    # wiped): the key went with it. Register again at once under a new lease.
                    log.warning("lease %x of %s is gone; registering again with a new lease", self._lease_id or 0, self.key)
                    self._lease_id, self._written = None, False
                    continue
                if failing_since is not None:
                    log.info("etcd reachable again after %.1f s; %s is registered", time.monotonic() - failing_since, self.key)
                    failing_since = None
                self._healthy = True
                backoff.reset()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), interval)
            except asyncio.CancelledError as e:
                current = asyncio.current_task()
                if self._closed or (current is not None and current.cancelling()):
                    raise  # close() / abandon() / the loop shutting down
                # grpc.aio raises CancelledError in a call whose channel was closed under it (update() drops the
                # shared client when a write fails): a failed call like any other, not the end of this task.
                failing_since, last_warning = self._failed(e, failing_since, last_warning, backoff.max_s)
                await self._drop_client()
                await asyncio.sleep(backoff.next_delay())
            except Exception as e:
                failing_since, last_warning = self._failed(e, failing_since, last_warning, backoff.max_s)
                await self._drop_client()
                await asyncio.sleep(backoff.next_delay())

    def _failed(self, e: BaseException, failing_since: float | None, last_warning: float,
                max_delay_s: float) -> tuple[float, float]:
        """Log one failed keep-alive step: a warning on the first, then one every ``_STILL_FAILING_LOG_S`` [s]
        (the process keeps trying, and says so), debug in between. Returns ``(failing_since, last_warning)``."""
        self._healthy = False
        now = time.monotonic()
        if failing_since is None:
            log.warning("cannot keep %s registered in etcd (%s); retrying with backoff up to %.1f s until it succeeds",
                        self.key, _describe(e), max_delay_s)
            return now, now
        if now - last_warning >= _STILL_FAILING_LOG_S:
            log.warning("%s still not kept alive in etcd after %.0f s (%s); still retrying", self.key,
                        now - failing_since, _describe(e))
            return failing_since, now
        log.debug("keep-alive of %s still failing: %s", self.key, _describe(e))
        return failing_since, last_warning


# ---- watching -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MembershipChange:
    """One change of the membership. ``kind``: ``added``, ``updated`` or ``removed``; ``info``: the new record
    (the last known one for ``removed``); ``revision``: etcd revision of the change (of the re-list that found
    it, after a re-list)."""

    kind: Literal["added", "updated", "removed"]
    instance_id: str
    info: InstanceInfo
    revision: int


ChangeCallback = Callable[[MembershipChange], Awaitable[None] | None]


class MembershipWatcher:
    """Follows ``prefix`` in etcd and keeps the last known membership (see the module docstring).

    ``target``: see :data:`EtcdTarget`; ``on_change``: optional callback (plain or async) called for every
    change, in order, from the watcher's task (exceptions are logged, not raised). ``backoff_initial_s`` /
    ``backoff_max_s``: retry delays while etcd is unreachable [s]; ``request_timeout_s``: deadline of each
    etcd call and of a watch creation [s].
    """

    def __init__(self, target: EtcdTarget, *, prefix: str = INSTANCES_PREFIX, on_change: ChangeCallback | None = None,
                 backoff_initial_s: float = 0.1, backoff_max_s: float = 5.0, request_timeout_s: float = 5.0) -> None:
        self._factory = client_factory(target, request_timeout_s=request_timeout_s)
        self._prefix = prefix
        self._on_change = on_change
        self._backoff = _Backoff(backoff_initial_s, backoff_max_s)
        self._members: dict[str, InstanceInfo] = {}
        self._revision = 0  # last etcd revision reflected in the snapshot
        self._cluster_id: int | None = None
        self._listed = asyncio.Event()
        self._healthy = False
        self._changed = asyncio.Event()
        self._subscribers: list[asyncio.Queue[MembershipChange]] = []
        self._task: asyncio.Task | None = None
        self._resyncs = 0

    # -- lifecycle --
    async def start(self, initial_timeout_s: float | None = 10.0) -> None:
        """List the prefix, then watch it in a background task.

        Waits up to ``initial_timeout_s`` [s] for the first list (None: return at once; ``snapshot()`` is empty
        and ``healthy`` False until etcd answers). Raises :class:`MembershipError` on timeout (the task is
        stopped), RuntimeError if already started.
        """
        if self._task is not None:
            raise RuntimeError("watcher already started")
        self._task = asyncio.create_task(self._run(), name=f"etcd-membership-watch {self._prefix}")
        if initial_timeout_s is not None:
            try:
                await asyncio.wait_for(self._listed.wait(), initial_timeout_s)
            except TimeoutError:
                await self.stop()
                raise MembershipError(f"could not list {self._prefix} in etcd within {initial_timeout_s} s "
                                      "(is etcd running and reachable?)") from None

    async def stop(self) -> None:
        """Stop watching (the snapshot stays readable). Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set_healthy(False)

    async def __aenter__(self) -> MembershipWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- reading --
    def snapshot(self) -> dict[str, InstanceInfo]:
        """The last known membership, ``instance_id → InstanceInfo`` (a copy; kept while etcd is down)."""
        return dict(self._members)

    @property
    def healthy(self) -> bool:
        """True while a watch on etcd is established (the snapshot is current up to watch delivery delay)."""
        return self._healthy

    @property
    def revision(self) -> int:
        """The etcd revision the snapshot reflects (0 before the first list)."""
        return self._revision

    @property
    def resyncs(self) -> int:
        """How many full re-lists replaced the snapshot after the first list (compaction, store reset)."""
        return self._resyncs

    async def wait_for(self, predicate: Callable[[dict[str, InstanceInfo]], bool],
                       timeout_s: float | None = None) -> dict[str, InstanceInfo]:
        """Wait until ``predicate(snapshot)`` is true and return that snapshot; no polling, woken by changes.

        E.g. ``await watcher.wait_for(lambda m: "engine-3" in m, timeout_s=30)``. Raises TimeoutError after
        ``timeout_s`` [s] (None: wait forever).
        """
        async with asyncio.timeout(timeout_s):
            while True:
                snap = self.snapshot()
                if predicate(snap):
                    return snap
                await self._changed.wait()

    def changes(self) -> AsyncIterator[MembershipChange]:
        """Async iterator over the changes made after this call (subscribed at once; unbounded buffer).

        Unsubscribe by closing it (``await it.aclose()``, or leaving an ``async for`` over it).
        """
        queue: asyncio.Queue[MembershipChange] = asyncio.Queue()
        self._subscribers.append(queue)
        return self._drain(queue)

    async def _drain(self, queue: asyncio.Queue[MembershipChange]) -> AsyncIterator[MembershipChange]:
        try:
            while True:
                yield await queue.get()
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(queue)

    # -- internals --
    def _key_to_id(self, key: bytes) -> str:
        return key.decode(errors="replace")[len(self._prefix):]

    def _parse(self, key: bytes, value: bytes) -> InstanceInfo | None:
        instance_id = self._key_to_id(key)
        try:
            info = InstanceInfo.from_json(value)
        except (ValidationError, ValueError) as e:
            log.warning("skipping %s: not a valid instance record (%s)", key.decode(errors="replace"),
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None
        if info.instance_id != instance_id:
            log.warning("skipping %s: its record names instance %r", key.decode(errors="replace"), info.instance_id)
            return None
        return info

    def _set_healthy(self, healthy: bool) -> None:
        if healthy == self._healthy:
            return
        self._healthy = healthy
        self._notify()

    def _notify(self) -> None:
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    async def _emit(self, changes: list[MembershipChange]) -> None:
        if not changes:
            return
        self._notify()
        for ch in changes:
            for q in self._subscribers:
                q.put_nowait(ch)
            if self._on_change is not None:
                try:
                    res = self._on_change(ch)
                    if inspect.isawaitable(res):
                        await res
                except Exception:
                    log.exception("membership change callback failed for %s", ch)

    async def _relist(self, client: aetcd.Client) -> None:
        resp = await client.get_prefix(self._prefix.encode())
        members: dict[str, InstanceInfo] = {}
        for kv in resp:
            info = self._parse(kv.key, kv.value)
            if info is not None:
                members[info.instance_id] = info
        rev = resp.header.revision
        changes = [MembershipChange("removed", iid, old, rev) for iid, old in self._members.items() if iid not in members]
        for iid, info in members.items():
            old = self._members.get(iid)
            if old is None:
                changes.append(MembershipChange("added", iid, info, rev))
            elif old != info:
                changes.append(MembershipChange("updated", iid, info, rev))
        if self._listed.is_set():
            self._resyncs += 1
        self._members, self._revision, self._cluster_id = members, rev, resp.header.cluster_id
        self._listed.set()
        await self._emit(changes)

    async def _apply(self, event) -> None:
        iid = self._key_to_id(event.kv.key)
        self._revision = max(self._revision, event.kv.mod_revision)
        old = self._members.get(iid)
        info = self._parse(event.kv.key, event.kv.value) if event.kind == "PUT" else None
        if info is None:  # a deletion, or an invalid value (treated as gone: the old record is stale)
            if old is None:
                return
            del self._members[iid]
            await self._emit([MembershipChange("removed", iid, old, event.kv.mod_revision)])
        elif old != info:
            self._members[iid] = info
            await self._emit([MembershipChange("added" if old is None else "updated", iid, info, event.kv.mod_revision)])

    async def _needs_relist(self, client: aetcd.Client) -> bool:
        """On reconnection: has the store gone back in time or been replaced (restore, wipe)?"""
        resp = await client.get_prefix(self._prefix.encode(), keys_only=True)
        if resp.header.cluster_id != self._cluster_id or resp.header.revision < self._revision:
            log.warning("etcd store changed under the watcher (cluster %x rev %d, was %x rev %d); re-listing %s",
                        resp.header.cluster_id, resp.header.revision, self._cluster_id or 0, self._revision, self._prefix)
            return True
        return False

    async def _run(self) -> None:
        relist = True
        failing_since: float | None = None
        while True:
            client = self._factory()
            try:
                if relist or await self._needs_relist(client):
                    await self._relist(client)
                    relist = False
                watch = await client.watch_prefix(self._prefix.encode(), start_revision=self._revision + 1)
                self._set_healthy(True)
                if failing_since is not None:
                    log.info("etcd watch on %s re-established after %.1f s, from revision %d", self._prefix,
                             time.monotonic() - failing_since, self._revision + 1)
                    failing_since = None
                self._backoff.reset()
                async for event in watch:
                    await self._apply(event)
                raise aetcd.exceptions.ConnectionFailedError("watch stream ended")
            except asyncio.CancelledError:
                raise
            except aetcd.exceptions.RevisionCompactedError as e:
                log.warning("etcd compacted past revision %d (%s); re-listing %s", self._revision + 1, e, self._prefix)
                relist = True
            except Exception as e:
                if isinstance(e, aetcd.exceptions.WatchTimeoutError):
                    relist = True  # aetcd can time out a watch create that etcd refused for compaction
                self._set_healthy(False)
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("etcd watch on %s failed (%s); keeping the last membership (%d instances) and "
                                "retrying with backoff", self._prefix, _describe(e), len(self._members))
                else:
                    log.debug("etcd watch on %s still failing: %s", self._prefix, _describe(e))
                await _close_quietly(client)
                client = None
                await asyncio.sleep(self._backoff.next_delay())
            finally:
                await _close_quietly(client)
