"""Self-healing after faults (issue 29, part 5), over real etcd, gRPC servers and the gateway's HTTP app:

* an engine's registration comes back whatever happened to its lease: lost between grant and first write (a host
  stall), lost while etcd was down for seconds, or its keep-alive's gRPC call cancelled under it;
* a model the gateway knows but no engine serves right now is 503 ``model_unavailable`` with ``Retry-After``;
  a model never known stays 404 ``model_not_found`` (completions, ``GET /v1/models/{model}``, Batch API lines);
* ``/health`` names each dependency (router, queue, etcd membership) with its state, 503 when one needed to serve
  is down, and an error caused by a dependency names that dependency (queue down: the queue, not the router).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import aetcd
import pytest

from services.common.etcd_server import EtcdServer
from services.common.membership import InstanceInfo, Registration, client_factory, parse_endpoint
from tests.conftest import eventually, start_etcd

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def etcd_module(tmp_path_factory) -> EtcdServer:
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


@pytest.fixture
def etcd(etcd_module: EtcdServer) -> EtcdServer:
    if not etcd_module.running:
        etcd_module.start()
    return etcd_module


@pytest.fixture
def prefix() -> str:
    return f"/chiron-test/{uuid.uuid4().hex[:8]}/instances/"


@contextlib.asynccontextmanager
async def admin_client(server: EtcdServer) -> AsyncIterator[aetcd.Client]:
    host, port = parse_endpoint(server.endpoint)
    async with aetcd.Client(host=host, port=port, timeout=5) as client:
        yield client


async def key_present(server: EtcdServer, key: str) -> bool:
    try:
        async with admin_client(server) as admin:
            return await admin.get(key.encode()) is not None
    except aetcd.exceptions.ClientError:
        return False


def info(instance_id: str) -> InstanceInfo:
    return InstanceInfo(instance_id=instance_id, role="interactive", model="llama-3-8b", address="127.0.0.1:50051")


# ---- 1. the engine's registration comes back ------------------------------------------------------------------


async def test_registration_recovers_when_its_new_lease_expires_before_the_first_write(etcd: EtcdServer,
                                                                                       prefix: str) -> None:
    """The production fault: after a host stall the engine logged "lease gone; registering again" and never came
    back. A lease granted right before a stall expires before the key is written under it; every later write under
    it fails with "lease not found", and the registration must then grant another, not retry the dead one."""
    make = client_factory(etcd.endpoint)
    state = {"grants": 0}

    class StallingClient(aetcd.Client):
        async def lease(self, ttl, lease_id=None):
            lease = await super().lease(ttl, lease_id)
            state["grants"] += 1
            if state["grants"] == 2:  # the re-registration's lease expires before its write (a stall)
                async with admin_client(etcd) as admin:
                    await admin.revoke_lease(lease.id)
            return lease

    def factory() -> aetcd.Client:
        base = make()
        return StallingClient(host=base._host, port=base._port, timeout=5)

    reg = await Registration.create(factory, info("stalled"), 2, prefix=prefix, backoff_initial_s=0.05)
    try:
        async with admin_client(etcd) as admin:
            await admin.revoke_lease(reg.lease_id)  # the first lease is lost too (expired during the stall)
        await eventually(lambda: key_present(etcd, reg.key), timeout_s=10)
        await eventually(lambda: _true(reg.registered and reg.healthy), timeout_s=10)
        assert state["grants"] >= 3
    finally:
        await reg.close()


async def test_registration_survives_a_keepalive_call_cancelled_under_it(etcd: EtcdServer, prefix: str) -> None:
    """grpc.aio raises CancelledError in a call whose channel is closed under it (``update`` drops the shared
    client when a write fails): the keep-alive task must not take that for its own cancellation and end."""
    make = client_factory(etcd.endpoint)
    state = {"cancelled": 0}

    class CancellingClient(aetcd.Client):
        async def refresh_lease(self, lease_id):
            if state["cancelled"] == 0:
                state["cancelled"] += 1
                raise asyncio.CancelledError()
            return await super().refresh_lease(lease_id)

    def factory() -> aetcd.Client:
        base = make()
        return CancellingClient(host=base._host, port=base._port, timeout=5)

    reg = await Registration.create(factory, info("cancelled"), 2, prefix=prefix, backoff_initial_s=0.05)
    try:
        await eventually(lambda: _true(state["cancelled"] == 1), timeout_s=5)
        old = reg.lease_id
        async with admin_client(etcd) as admin:
            await admin.revoke_lease(old)
        await eventually(lambda: _true(reg.registered and reg.lease_id != old), timeout_s=10)
        assert await key_present(etcd, reg.key)
    finally:
        await reg.close()


async def test_engine_reregisters_after_its_lease_is_lost_while_etcd_is_down(etcd: EtcdServer, prefix: str) -> None:
    """A real engine agent: its lease is revoked, then etcd is down for longer than the TTL; the key comes back
    within a bounded time once etcd is back, and again after a second revocation with etcd up."""
    from services.engine.backend import SimulatedBackend
    from services.engine.core import EngineConfig
    from services.engine.server import AgentConfig, EngineAgent, serve

    agent = EngineAgent(SimulatedBackend("llama-3-8b", EngineConfig(max_num_seqs=4), speedup=50.0),
                        AgentConfig(instance_id="phoenix", autoscale=False))
    server = await serve(agent, port=0)
    reg = await Registration.create(etcd.endpoint, info("phoenix").with_changes(address=f"127.0.0.1:{server.port}"), 2,
                                    prefix=prefix, backoff_initial_s=0.05)
    try:
        async with admin_client(etcd) as admin:
            await admin.revoke_lease(reg.lease_id)
        await asyncio.to_thread(etcd.stop)
        await eventually(lambda: _true(not reg.healthy), timeout_s=10)
        await asyncio.sleep(3.0)  # longer than the TTL: no lease survives on the engine's side either
        await asyncio.to_thread(etcd.start)
        await eventually(lambda: key_present(etcd, reg.key), timeout_s=15)
        await eventually(lambda: _true(reg.registered and reg.healthy), timeout_s=10)

        lease = reg.lease_id
        async with admin_client(etcd) as admin:
            await admin.revoke_lease(lease)
        await eventually(lambda: _true(reg.lease_id != lease and reg.registered), timeout_s=10)
        assert await key_present(etcd, reg.key)
    finally:
        await reg.close()
        await server.stop(grace_s=0.5)


async def _true(x: bool) -> bool:
    return x
