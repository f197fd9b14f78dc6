"""Engine membership in a REAL etcd (tests/etcd_server.py): registration, watching, expiry, etcd restarts.

One etcd serves the module; every test works under its own key prefix. All waits are readiness-based
(``eventually`` polls, ``MembershipWatcher.wait_for`` is woken by changes); the only timing assertion is the
window of lease expiry. etcd is stopped and started in a worker thread so that the clients under test keep
running (and notice the outage) meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator

import aetcd
import pytest

from services.common.etcd_server import EtcdServer
from services.common.membership import (
    InstanceInfo,
    MembershipChange,
    MembershipError,
    MembershipWatcher,
    Registration,
    parse_endpoint,
)
from tests.conftest import admin_client, eventually

pytestmark = pytest.mark.timeout(120)






def make_info(instance_id: str, **kw) -> InstanceInfo:
    fields = {"role": "interactive", "model": "llama-3-8b", "address": "127.0.0.1:50051", "backend": "simulated",
              "pid": 4242, "labels": {"node": "test"}, "started_at": 1_700_000_000.5} | kw
    return InstanceInfo(instance_id=instance_id, **fields)


@contextlib.asynccontextmanager
async def watching(server: EtcdServer, prefix: str, **kw) -> AsyncIterator[MembershipWatcher]:
    kw.setdefault("backoff_initial_s", 0.05)
    kw.setdefault("backoff_max_s", 0.5)
    watcher = MembershipWatcher(server.endpoint, prefix=prefix, **kw)
    await watcher.start()
    try:
        yield watcher
    finally:
        await watcher.stop()


async def register(server: EtcdServer, prefix: str, info: InstanceInfo, ttl_s: int = 10) -> Registration:
    return await Registration.create(server.endpoint, info, ttl_s, prefix=prefix, backoff_initial_s=0.05)


# ---- the record ---------------------------------------------------------------------------------------------


def test_instance_info_round_trip_and_validation() -> None:
    info = make_info("e-1", state="draining")
    assert InstanceInfo.from_json(info.to_json()) == info
    assert InstanceInfo.from_json(json.dumps({**json.loads(info.to_json()), "future_field": 1})) == info
    assert info.with_changes(state="serving").state == "serving"
    for bad in ({"role": "gpu"}, {"address": "no-port"}, {"address": "h:0"}, {"state": "dead"}, {"instance_id": "a/b"},
                {"instance_id": ""}):
        with pytest.raises(ValueError):  # pydantic.ValidationError is a ValueError
            InstanceInfo(**(info.model_dump() | bad))
    assert parse_endpoint("http://10.0.0.1:2379") == ("10.0.0.1", 2379)


# ---- registration and watching -----------------------------------------------------------------------------


async def test_register_update_close(etcd: EtcdServer, prefix: str) -> None:
    async with watching(etcd, prefix) as watcher:
        changes: list[MembershipChange] = []
        stream = watcher.changes()  # subscribed from here on

        async def collect() -> None:
            async for ch in stream:
                changes.append(ch)

        collector = asyncio.create_task(collect())
        info = make_info("e-1")
        reg = await register(etcd, prefix, info)
        assert reg.registered and reg.registrations == 1 and reg.key == prefix + "e-1"

        snap = await watcher.wait_for(lambda m: "e-1" in m, timeout_s=10)
        assert snap["e-1"] == info  # every field, started_at and labels included
        assert watcher.healthy

        async with admin_client(etcd) as admin:  # the key is bound to the registration's lease
            lease_info = await admin.get_lease_info(reg.lease_id)
            assert [bytes(k) for k in lease_info.keys] == [reg.key.encode()]
            assert 0 < lease_info.TTL <= 10

        assert await reg.update(state="draining") is True
        snap = await watcher.wait_for(lambda m: m.get("e-1") is not None and m["e-1"].state == "draining", timeout_s=10)
        assert snap["e-1"] == info.with_changes(state="draining")
        assert reg.registrations == 1  # an update rewrites under the same lease

        await reg.close()
        async with admin_client(etcd) as admin:  # revoked before close() returned: gone at once, not after the TTL
            assert await admin.get(reg.key.encode()) is None
        await watcher.wait_for(lambda m: "e-1" not in m, timeout_s=2)
        with pytest.raises(RuntimeError):
            await reg.update(state="serving")

        await eventually(lambda: _true(len(changes) >= 3), timeout_s=5)
        collector.cancel()
        assert [(c.kind, c.instance_id, c.info.state) for c in changes] == [
            ("added", "e-1", "serving"), ("updated", "e-1", "draining"), ("removed", "e-1", "draining")]
        assert changes[0].revision < changes[1].revision < changes[2].revision


async def _true(value: bool) -> bool:
    return value


async def test_watcher_lists_existing_members_and_calls_back(etcd: EtcdServer, prefix: str) -> None:
    regs = [await register(etcd, prefix, make_info(f"e-{i}", role=role))
            for i, role in enumerate(("interactive", "mixed", "batch"))]
    seen: list[str] = []

    async def on_change(ch: MembershipChange) -> None:
        seen.append(f"{ch.kind}:{ch.instance_id}")

    async with watching(etcd, prefix, on_change=on_change) as watcher:
        # start() returns after the first list: the existing members are there without waiting
        assert {k: v.role for k, v in watcher.snapshot().items()} == {"e-0": "interactive", "e-1": "mixed", "e-2": "batch"}
        assert sorted(seen) == ["added:e-0", "added:e-1", "added:e-2"]
        await regs[1].close()
        await watcher.wait_for(lambda m: "e-1" not in m, timeout_s=5)
        assert seen[-1] == "removed:e-1"
    for reg in regs:
        await reg.close()


async def test_crashed_agent_expires_after_ttl(etcd: EtcdServer, prefix: str) -> None:
    async with watching(etcd, prefix) as watcher:
        reg = await register(etcd, prefix, make_info("crashy"), ttl_s=2)
        await watcher.wait_for(lambda m: "crashy" in m, timeout_s=5)
        await reg.abandon()  # keep-alive cancelled, lease not revoked: what a SIGKILLed agent leaves behind
        t0 = time.monotonic()
        assert "crashy" in watcher.snapshot()
        await watcher.wait_for(lambda m: "crashy" not in m, timeout_s=10)
        elapsed = time.monotonic() - t0
        # etcd expires leases on its own schedule; the last refresh was up to TTL/3 before abandon()
        assert 2 * 2 / 3 - 0.5 <= elapsed <= 2 + 3.0, elapsed


async def test_invalid_values_are_skipped(etcd: EtcdServer, prefix: str, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="chiron.membership")
    async with admin_client(etcd) as admin:
        await admin.put((prefix + "garbage").encode(), b"{not json")
        await admin.put((prefix + "wrong-id").encode(), make_info("someone-else").to_json())
        async with watching(etcd, prefix) as watcher:
            assert watcher.snapshot() == {}  # the list skipped both
            reg = await register(etcd, prefix, make_info("good"))
            await admin.put((prefix + "later").encode(), b'{"instance_id": "later", "role": "nope"}')
            await admin.put((prefix + "good2").encode(), make_info("good2").to_json())
            await watcher.wait_for(lambda m: "good2" in m, timeout_s=5)  # events after the bad one still arrive
            assert set(watcher.snapshot()) == {"good", "good2"}
            assert watcher.healthy
            # a valid record overwritten with garbage is dropped, not kept stale
            await admin.put((prefix + "good2").encode(), b"\xff\xfe")
            await watcher.wait_for(lambda m: "good2" not in m, timeout_s=5)
            await reg.close()
        await admin.delete_prefix(prefix.encode())
    assert "skipping" in caplog.text and "garbage" in caplog.text


async def test_unreachable_etcd_raises_membership_error() -> None:
    dead = f"127.0.0.1:{_dead_port()}"
    with pytest.raises(MembershipError):
        await Registration.create(dead, make_info("nobody"), initial_timeout_s=0.5)
    with pytest.raises(MembershipError):
        await MembershipWatcher(dead).start(initial_timeout_s=0.5)


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- etcd restarts --------------------------------------------------------------------------------------------


async def test_watcher_and_registration_survive_etcd_restart(etcd: EtcdServer, prefix: str) -> None:
    async with watching(etcd, prefix) as watcher:
        before = await register(etcd, prefix, make_info("before"), ttl_s=3)
        await watcher.wait_for(lambda m: "before" in m, timeout_s=5)
        assert watcher.healthy

        await asyncio.to_thread(etcd.stop)
        await eventually(lambda: _true(not watcher.healthy), timeout_s=10)
        assert set(watcher.snapshot()) == {"before"}  # the last known membership while etcd is down
        assert await before.update(state="draining") is False  # deferred: written when etcd is back

        await asyncio.to_thread(etcd.start)
        await eventually(lambda: _true(watcher.healthy), timeout_s=15)
        after = await register(etcd, prefix, make_info("after"))
        snap = await watcher.wait_for(lambda m: "after" in m and m.get("before", make_info("x")).state == "draining",
                                      timeout_s=10)
        assert set(snap) == {"before", "after"}
        assert watcher.resyncs == 0  # resumed from its revision, no re-list
        # etcd extends leases when it comes back, so the same lease carried on
        await eventually(lambda: _true(before.registrations == 1 and before.registered), timeout_s=10)
        await before.close()
        await after.close()
        await watcher.wait_for(lambda m: not m, timeout_s=5)


async def test_registration_reregisters_when_its_lease_is_lost(etcd: EtcdServer, prefix: str) -> None:
    async with watching(etcd, prefix) as watcher:
        reg = await register(etcd, prefix, make_info("phoenix"), ttl_s=2)
        old_lease = reg.lease_id
        await watcher.wait_for(lambda m: "phoenix" in m, timeout_s=5)

        await asyncio.to_thread(etcd.kill)
        await eventually(lambda: _true(not watcher.healthy), timeout_s=10)
        await asyncio.to_thread(etcd.start)
        # The lease is lost while the agent is cut off (here: revoked, as an expiry during a partition would):
        async with admin_client(etcd) as admin:
            await admin.revoke_lease(old_lease)
        await eventually(lambda: _true(reg.registrations == 2 and reg.registered), timeout_s=10)
        assert reg.lease_id != old_lease
        async with admin_client(etcd) as admin:
            assert await admin.get(reg.key.encode()) is not None
            assert [bytes(k) for k in (await admin.get_lease_info(reg.lease_id)).keys] == [reg.key.encode()]
        await watcher.wait_for(lambda m: "phoenix" in m, timeout_s=10)
        await reg.close()


async def test_watcher_relists_after_compaction(etcd: EtcdServer, prefix: str) -> None:
    """The watcher is cut off while members change and etcd compacts its history: it re-lists."""
    host, port = parse_endpoint(etcd.endpoint)
    dead_port = _dead_port()
    cut_off = False

    def factory() -> aetcd.Client:  # while cut off, the watcher's connections go to a port nobody listens on
        return aetcd.Client(host=host, port=dead_port if cut_off else port, timeout=5)

    watcher = MembershipWatcher(factory, prefix=prefix, backoff_initial_s=0.05, backoff_max_s=0.3)
    async with admin_client(etcd) as admin:
        await admin.put((prefix + "gone").encode(), make_info("gone").to_json())
        await admin.put((prefix + "stays").encode(), make_info("stays").to_json())
    await watcher.start()
    try:
        assert set(watcher.snapshot()) == {"gone", "stays"}
        cut_off = True
        await asyncio.to_thread(etcd.restart)  # breaks the open watch; reconnection attempts now fail
        await eventually(lambda: _true(not watcher.healthy), timeout_s=10)
        async with admin_client(etcd) as admin:
            await admin.delete((prefix + "gone").encode())
            await admin.put((prefix + "new").encode(), make_info("new").to_json())
            put = await admin.put(b"/chiron-test/unrelated", b"x")
            await admin.compact(put.header.revision, physical=True)
        assert set(watcher.snapshot()) == {"gone", "stays"}  # stale but kept
        cut_off = False
        snap = await watcher.wait_for(lambda m: set(m) == {"stays", "new"}, timeout_s=10)
        assert snap["new"] == make_info("new")
        await eventually(lambda: _true(watcher.healthy), timeout_s=5)
        assert watcher.resyncs == 1
        assert watcher.revision >= put.header.revision
    finally:
        await watcher.stop()


async def test_recovery_from_an_etcd_that_lost_its_data(etcd: EtcdServer, prefix: str) -> None:
    """etcd comes back empty (wiped or restored from an old backup): the lease is unknown, the revision went
    back. The registration registers again; the watcher notices the older store, re-lists and drops the rest."""
    async with watching(etcd, prefix) as watcher:
        reg = await register(etcd, prefix, make_info("survivor"), ttl_s=2)
        async with admin_client(etcd) as admin:
            await admin.put((prefix + "orphan").encode(), make_info("orphan").to_json())
        for i in range(5):  # move the watcher's revision well past what the empty store will reach
            await reg.update(labels={"round": str(i)})
        await watcher.wait_for(lambda m: set(m) == {"survivor", "orphan"} and m["survivor"].labels == {"round": "4"},
                               timeout_s=5)

        await asyncio.to_thread(etcd.stop)
        await asyncio.to_thread(shutil.rmtree, etcd.data_dir)
        await asyncio.to_thread(etcd.start)
        await eventually(lambda: _true(reg.registrations == 2 and reg.registered), timeout_s=10)
        await watcher.wait_for(lambda m: set(m) == {"survivor"}, timeout_s=10)
        assert watcher.resyncs == 1
        await eventually(lambda: _true(watcher.healthy), timeout_s=5)
        await reg.close()
        await watcher.wait_for(lambda m: not m, timeout_s=5)


async def test_closing_an_etcd_client_that_ignores_cancellation_is_bounded():
    """``_close_quietly`` gives up after its timeout even when the client's close ignores cancellation (a
    ``wait_for`` there waits for the cancelled close without bound, and a watcher's ``stop()`` with it)."""
    from services.common.membership import _close_quietly

    release = asyncio.Event()

    class StuckClient:
        async def close(self) -> None:
            while not release.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await release.wait()

    t0 = time.monotonic()
    await asyncio.wait_for(_close_quietly(StuckClient(), timeout_s=0.2), 5.0)
    assert time.monotonic() - t0 < 2.0
    release.set()  # let the background close finish before the loop ends
    await asyncio.sleep(0)
