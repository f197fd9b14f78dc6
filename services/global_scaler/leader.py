"""One acting scaler among several: leader election through an etcd lease.

Several ``chiron scaler`` replicas may run for availability; only the **leader** calls the instance provider
(starts and stops engines), every replica computes, logs and serves decisions (``GetDecision``,
``WatchDecisions``, KEDA). The election is etcd's standard recipe, nothing hand-made beyond it (etcd
``client/v3/concurrency/election.go`` ``Campaign`` / ``Resign`` / ``Observe``, and the single-key form of it
that ``etcdctl lock`` and ``aetcd.Lock`` use; https://etcd.io/docs/v3.5/dev-guide/api_concurrency_reference_v3/):

1. **Campaign.** Grant a lease of ``ttl_s`` seconds, then in one transaction: if ``/chiron/scaler/leader``
   does not exist (``create_revision == 0``) put it, value = this replica's id, bound to the lease; else read
   it. Success makes this replica the leader.
2. **Stand by.** A replica that lost watches the key for its deletion (from the revision it read + 1) and
   campaigns again when it goes: when the leader resigns (revokes its lease: at once) or dies or is cut off
   from etcd (its lease expires: within ``ttl_s``). The watch is bounded (``ttl_s``) and re-armed, so a
   broken watch stream (etcd restarted) never leaves a replica waiting forever.
3. **Keep alive.** The leader refreshes its lease every ``ttl_s / 3`` and checks the key still carries its
   lease (someone deleting it by hand makes the leader step down at its next refresh).

**Stepping down before the TTL ends.** etcd deletes the key ``ttl_s`` after the last refresh *it* saw, and a
standby may win right then. The leader therefore treats its leadership as valid only until
``t_sent + TTL − margin_s``, where ``t_sent`` is the local monotonic time at which it *sent* the last
successful refresh (or grant): etcd applied it later, so etcd's expiry is later still. When refreshes fail
(etcd down, network partition) the leader keeps retrying, and :attr:`LeaderElection.is_leader` turns False at
that deadline whether or not a retry is still hanging: a cut-off leader stops acting at least ``margin_s``
before any other replica can be elected. A refresh answered "lease not found" steps down at once. The
margin (default ``max(0.5, ttl_s / 4)`` seconds) covers clock-rate differences between hosts and the time
one provider call takes after the leadership check (a call longer than that could overlap a successor's).

Errors: etcd failures are logged and retried with backoff, never raised; ``ValueError`` for bad arguments.
Client: ``aetcd``, a fresh connection after each failure, as in :mod:`services.common.membership`."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

import aetcd
import aetcd.exceptions
import aetcd.rtypes

from services.common.membership import EtcdTarget, _Backoff, _close_quietly, _describe, client_factory

log = logging.getLogger("chiron.scaler.leader")

LEADER_KEY = "/chiron/scaler/leader"
"""The etcd key the leader holds (value: its candidate id, UTF-8), bound to its lease."""

ChangeCallback = Callable[[bool], Awaitable[None] | None]


def default_candidate_id() -> str:
    """``<hostname>-<pid>-<4 random hex>``: unique per process, readable in logs and in etcd."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


class LeaderElection:
    """Campaigns for :data:`LEADER_KEY` in a background task and keeps the leadership alive (module docstring).

    ``target``: where etcd is (:data:`~services.common.membership.EtcdTarget`); ``candidate_id``: this
    replica's id (default :func:`default_candidate_id`); ``ttl_s``: lease TTL [s] (≥ 1; etcd may grant more);
    ``margin_s``: how long before etcd's earliest possible expiry leadership ends locally [s] (default
    ``max(0.5, ttl_s / 4)``, must be < ``ttl_s``); ``request_timeout_s``: deadline of each etcd call [s]
    (default ``min(5, ttl_s / 3)``); ``on_change``: optional callback ``(is_leader: bool)``, plain or async,
    called from the election task on every change (exceptions logged); ``clock``: monotonic seconds.
    """

    def __init__(self, target: EtcdTarget, candidate_id: str | None = None, *, ttl_s: int = 10,
                 key: str = LEADER_KEY, margin_s: float | None = None, request_timeout_s: float | None = None,
                 on_change: ChangeCallback | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if int(ttl_s) < 1:
            raise ValueError(f"ttl_s must be >= 1 s, not {ttl_s}")
        self.ttl_s = int(ttl_s)
        self.margin_s = max(0.5, self.ttl_s / 4) if margin_s is None else float(margin_s)
        if not 0 <= self.margin_s < self.ttl_s:
            raise ValueError(f"margin_s must be in [0, ttl_s) (got {self.margin_s} with ttl_s {self.ttl_s})")
        self.request_timeout_s = min(5.0, self.ttl_s / 3) if request_timeout_s is None else float(request_timeout_s)
        self.candidate_id = candidate_id or default_candidate_id()
        self.key = key
        self._factory = client_factory(target, request_timeout_s=self.request_timeout_s)
        self._listeners: list[ChangeCallback] = [on_change] if on_change is not None else []
        self._clock = clock
        self._client: aetcd.Client | None = None
        self._lease_id: int | None = None  # the lease of the current campaign or leadership
        self._leading = False
        self._valid_until = -float("inf")  # local monotonic deadline of the leadership [s]
        self._leader_id: str | None = None
        self._terms = 0
        self._decided = asyncio.Event()  # the first campaign has an answer (leader or standby)
        self._task: asyncio.Task | None = None
        self._closed = False

    # -- lifecycle --
    async def start(self, initial_timeout_s: float | None = 5.0) -> None:
        """Start campaigning; wait up to ``initial_timeout_s`` [s] (None: not at all) for the first answer
        (leader or standby). Never raises for etcd being unreachable: the replica stays a standby and keeps
        trying. RuntimeError if already started."""
        if self._task is not None:
            raise RuntimeError("election already started")
        self._task = asyncio.create_task(self._run(), name=f"scaler-election-{self.candidate_id}")
        if initial_timeout_s is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._decided.wait(), initial_timeout_s)

    async def close(self) -> None:
        """Resign: stop campaigning and revoke the lease, so a standby takes over at once. Idempotent; an
        unreachable etcd is logged (the key then expires within ``ttl_s``). After :meth:`abandon`: nothing."""
        if self._closed:
            return
        lease_id = self._lease_id
        await self._stop()
        if lease_id is not None:
            client = self._factory()
            try:
                await asyncio.wait_for(client.revoke_lease(lease_id), self.request_timeout_s)
                log.info("%s resigned (lease %x revoked)", self.candidate_id, lease_id)
            except Exception as e:
                log.warning("%s could not revoke its lease (%s); the key expires within %d s", self.candidate_id,
                            _describe(e), self.ttl_s)
            await _close_quietly(client)

    async def abandon(self) -> None:
        """Stop WITHOUT revoking, as if the process had died: the key stays until its lease expires (≤ TTL).
        For tests and for an exit that must not touch etcd. Idempotent."""
        await self._stop()

    async def _stop(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._set_leading(False, "stopped")
        await self._drop_client()

    # -- reading --
    @property
    def is_leader(self) -> bool:
        """True while this replica holds the key AND its lease is certainly alive in etcd: the local deadline
        ``t_sent + TTL − margin_s`` has not passed (module docstring). Check it right before acting."""
        return self._leading and self._clock() < self._valid_until

    def leadership_left_s(self) -> float:
        """Seconds of certain leadership left (0 when not leader)."""
        return max(0.0, self._valid_until - self._clock()) if self._leading else 0.0

    @property
    def leader_id(self) -> str | None:
        """The leader's candidate id as last read from etcd (this replica's own id while leading; None when
        unknown or vacant). May be stale while etcd is unreachable."""
        return self._leader_id

    @property
    def terms(self) -> int:
        """How many times this replica became leader."""
        return self._terms

    # -- internals --
    def _conn(self) -> aetcd.Client:
        if self._client is None:
            self._client = self._factory()
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        await _close_quietly(client)

    async def _set_leading(self, leading: bool, why: str) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        if leading:
            self._terms += 1
            self._leader_id = self.candidate_id
            log.info("%s is the scaler leader (lease %x, TTL %d s, margin %.1f s, term #%d)", self.candidate_id,
                     self._lease_id or 0, self.ttl_s, self.margin_s, self._terms)
        else:
            self._valid_until = -float("inf")
            if self._leader_id == self.candidate_id:
                self._leader_id = None
            log.warning("%s stepped down as scaler leader: %s", self.candidate_id, why)
        for listener in list(self._listeners):
            try:
                result = listener(leading)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("leadership change callback failed")

    def add_listener(self, callback: ChangeCallback) -> None:
        """Also call ``callback(is_leader)`` (plain or async) on every change, like ``on_change``."""
        self._listeners.append(callback)

    async def _call(self, coro):
        """One etcd call under the request deadline (aetcd's own deadline does not cover channel setup)."""
        return await asyncio.wait_for(coro, self.request_timeout_s)

    async def _revoke_stale_lease(self) -> None:
        """Best effort: revoke the lease of a lost campaign or leadership (its key, if still there, goes)."""
        lease_id, self._lease_id = self._lease_id, None
        if lease_id is not None:
            with contextlib.suppress(Exception):
                await self._call(self._conn().revoke_lease(lease_id))

    async def _campaign(self) -> int | None:
        """One campaign round. Returns None when this replica won, else the revision to watch from."""
        await self._revoke_stale_lease()
        client = self._conn()
        sent = self._clock()
        lease = await self._call(client.lease(self.ttl_s))
        self._lease_id = lease.id
        key = self.key.encode()
        won, responses = await self._call(client.transaction(
            compare=[client.transactions.create(key) == 0],
            success=[client.transactions.put(key, self.candidate_id.encode(), lease=lease.id)],
            failure=[client.transactions.get(key)]))
        if won:
            self._valid_until = sent + max(1, int(lease.ttl)) - self.margin_s
            await self._set_leading(True, "")
            return None
        await self._revoke_stale_lease()  # lost: this lease holds nothing
        kvs = responses[0] if responses else []
        if not kvs:  # the key went between the compare and the read: campaign again at once
            return -1
        value, meta = kvs[0]
        holder = value.decode(errors="replace")
        if holder != self._leader_id:
            log.info("%s stands by; the scaler leader is %s", self.candidate_id, holder)
        self._leader_id = holder
        return meta.header.revision + 1

    async def _wait_vacant(self, revision: int) -> None:
        """Until the key is deleted after ``revision``, or ``ttl_s`` passes (then the caller campaigns again,
        which also covers a watch stream lost to an etcd restart)."""
        client = self._conn()
        with contextlib.suppress(aetcd.exceptions.WatchTimeoutError, TimeoutError):
            event = await asyncio.wait_for(
                client.watch_once(self.key.encode(), timeout=self.ttl_s, start_revision=revision,
                                  kind=aetcd.rtypes.EventKind.DELETE),
                self.ttl_s + self.request_timeout_s)
            if isinstance(event, Exception):
                raise event
            log.info("%s: the scaler leader key was deleted; campaigning", self.candidate_id)

    async def _keep_alive(self) -> None:
        """While leading: refresh every TTL/3; step down on "lease gone", on a key no longer ours, or when no
        refresh succeeded before the local deadline."""
        backoff = _Backoff(0.05, max(0.1, self.ttl_s / 10))
        next_refresh = self._clock() + self.ttl_s / 3
        key = self.key.encode()
        while self._leading:
            now = self._clock()
            if now >= self._valid_until:
                await self._set_leading(False, f"no lease refresh succeeded in time (the lease may expire in "
                                               f"{self.margin_s:.1f} s)")
                return
            await asyncio.sleep(max(0.0, min(next_refresh, self._valid_until) - now))
            if self._clock() >= self._valid_until:
                continue
            sent = self._clock()
            try:
                client = self._conn()
                reply = await asyncio.wait_for(client.refresh_lease(self._lease_id),
                                               max(0.05, min(self.request_timeout_s, self._valid_until - sent)))
                if reply is None or reply.TTL <= 0:
                    await self._set_leading(False, f"lease {self._lease_id or 0:x} is gone in etcd")
                    return
                held = await asyncio.wait_for(client.get(key), max(0.05, self.request_timeout_s))
                if held is None or held.lease != self._lease_id:
                    await self._set_leading(False, "the leader key no longer carries this replica's lease")
                    return
                self._valid_until = sent + reply.TTL - self.margin_s
                backoff.reset()
                next_refresh = sent + self.ttl_s / 3
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("%s: lease refresh failed (%s); leadership ends in %.1f s unless a retry succeeds",
                            self.candidate_id, _describe(e), max(0.0, self._valid_until - self._clock()))
                await self._drop_client()
                next_refresh = self._clock() + backoff.next_delay()

    async def _run(self) -> None:
        backoff = _Backoff(0.1, max(0.2, self.ttl_s / 3))
        failing = False
        while not self._closed:
            try:
                revision = await self._campaign()
                self._decided.set()
                if failing:
                    log.info("%s: etcd reachable again", self.candidate_id)
                    failing = False
                backoff.reset()
                if revision is None:
                    await self._keep_alive()
                elif revision > 0:
                    await self._wait_vacant(revision)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not failing:
                    log.warning("%s: etcd unreachable for the scaler election (%s); retrying", self.candidate_id,
                                _describe(e))
                    failing = True
                await self._drop_client()
                self._decided.set()
                await asyncio.sleep(backoff.next_delay())
