"""Self-healing after faults, over real etcd, gRPC servers and the gateway's HTTP app:

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
import json
from collections.abc import AsyncIterator

import aetcd
import pytest

from services.common.etcd_server import EtcdServer
from services.common.membership import InstanceInfo, Registration, client_factory
from tests.conftest import admin_client, eventually

pytestmark = pytest.mark.timeout(120)






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


# ---- 2. and 3.: the gateway over a real router, queue and etcd ---------------------------------------------------

MODEL = "llama-3-8b"


@contextlib.asynccontextmanager
async def gateway_stack(tmp_path, etcd: EtcdServer, **gateway_kw) -> AsyncIterator[dict]:
    """etcd membership, the real queue and router (dependencies re-checked every 0.1 s) and a gateway on loopback;
    no engine. Yields the parts by name; whatever a test stopped already is not stopped twice."""
    from services.common.membership import MembershipWatcher
    from services.common.security import SecuritySettings
    from services.gateway.app import GatewayConfig, GatewayServer
    from services.queue.server import serve as serve_queue
    from services.queue.store import QueueConfig
    from services.router.routing import RouterConfig
    from services.router.server import RouterService
    from services.router.server import serve as serve_router

    queue = await serve_queue(QueueConfig(db_path=str(tmp_path / "q.db")), port=0)
    watcher = MembershipWatcher(etcd.endpoint, backoff_initial_s=0.05, backoff_max_s=0.5)
    await watcher.start()
    router = await serve_router(RouterService(RouterConfig(), watcher, f"127.0.0.1:{queue.port}", stats_interval_s=0.1,
                                              dependency_interval_s=0.1), port=0)
    gateways = {}
    for name, kw in {"gw": gateway_kw, "strict": {**gateway_kw, "health_requires": "router,queue"}}.items():
        gateways[name] = GatewayServer(GatewayConfig(router=f"127.0.0.1:{router.port}", port=0, models_ttl_s=0.2, **kw),
                                       security=SecuritySettings(auth_tokens=[]))
        await gateways[name].start()
    parts = {"queue": queue, "router": router, "watcher": watcher, **gateways, "stopped": set()}
    try:
        yield parts
    finally:
        for gw in gateways.values():
            await gw.stop()
        if "router" not in parts["stopped"]:
            await router.stop(grace_s=0.5)
        await watcher.stop()
        if "queue" not in parts["stopped"]:
            await queue.stop()


def chat(model: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4, **kw}


async def test_a_known_model_without_an_engine_is_503_with_retry_after_and_an_unknown_one_404(
        tmp_path, etcd: EtcdServer, prefix: str) -> None:
    import httpx

    from tests.conftest import start_sim_engine

    async with gateway_stack(tmp_path, etcd, models=MODEL) as s, httpx.AsyncClient(timeout=30) as http:
        url = s["gw"].url
        # No engine has registered yet: the configured model is unavailable for now, another one does not exist.
        r = await http.post(f"{url}/v1/chat/completions", json=chat(MODEL))
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "model_unavailable" and err["param"] == "model" and MODEL in err["message"]
        assert int(r.headers["Retry-After"]) >= 1
        r = await http.get(f"{url}/v1/models/{MODEL}")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable" and "Retry-After" in r.headers
        for r in (await http.post(f"{url}/v1/chat/completions", json=chat("gpt-nope")),
                  await http.get(f"{url}/v1/models/gpt-nope")):
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text

        # A model is known too once it has been served: the strict gateway was configured with it, this one was
        # not; after its only engine goes away, it answers 503, not 404.
        from services.common.security import SecuritySettings
        from services.gateway.app import GatewayConfig, GatewayServer

        bare = GatewayServer(GatewayConfig(router=f"127.0.0.1:{s['router'].port}", port=0, models_ttl_s=0.2),
                             security=SecuritySettings(auth_tokens=[]))
        await bare.start()
        try:
            r = await http.post(f"{bare.url}/v1/chat/completions", json=chat(MODEL))
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"  # never known here
            server, reg = await start_sim_engine("only-engine", "interactive", etcd=etcd.endpoint)
            try:
                async def served() -> bool:
                    return (await http.post(f"{bare.url}/v1/chat/completions", json=chat(MODEL))).status_code == 200
                await eventually(served, timeout_s=20, interval_s=0.1)
            finally:
                await reg.close()
                await server.stop(grace_s=0.5)

            async def unavailable() -> bool:
                r = await http.post(f"{bare.url}/v1/chat/completions", json=chat(MODEL))
                return r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
            await eventually(unavailable, timeout_s=20, interval_s=0.1)
            r = await http.post(f"{bare.url}/v1/chat/completions", json=chat("gpt-nope"))
            assert r.status_code == 404 and MODEL in r.json()["error"]["message"]  # listed among the known models
        finally:
            await bare.stop()

        # The Batch API takes lines for a known model without an engine (the queue holds them until one comes);
        # a line for a model never known is a line error.
        lines = [{"custom_id": "known", "method": "POST", "url": "/v1/chat/completions", "body": chat(MODEL)},
                 {"custom_id": "unknown", "method": "POST", "url": "/v1/chat/completions", "body": chat("gpt-nope")}]
        content = "\n".join(json.dumps(x) for x in lines).encode()
        f = (await http.post(f"{url}/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})).json()
        r = await http.post(f"{url}/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions"})
        assert r.status_code == 200, r.text
        assert (r.json()["request_counts"]["total"], r.json()["request_counts"]["failed"]) == (2, 1)
        errors = (await http.get(f"{url}/v1/files/{r.json()['error_file_id']}/content")).text.splitlines()
        assert [json.loads(e)["custom_id"] for e in errors] == ["unknown"]
        assert json.loads(errors[0])["error"]["code"] == "model_not_found"


async def test_health_reports_each_dependency_and_errors_name_the_one_that_is_down(tmp_path, etcd: EtcdServer) -> None:
    import httpx

    async with gateway_stack(tmp_path, etcd, models=MODEL) as s, httpx.AsyncClient(timeout=30) as http:
        url, strict = s["gw"].url, s["strict"].url

        async def health(base: str) -> tuple[int, dict]:
            r = await http.get(f"{base}/health")
            return r.status_code, r.json()

        # Ready once the router's checks have seen the queue and its etcd watch established (a loaded host takes a
        # while to get there: wait for it, then hold it to the full answer).
        async def all_ok() -> bool:
            return (await health(url))[1]["status"] == "ok"
        await eventually(all_ok, timeout_s=15, interval_s=0.1)
        code, body = await health(url)
        assert code == 200 and body["status"] == "ok", body
        assert {n: d["status"] for n, d in body["dependencies"].items()} == {"router": "ok", "queue": "ok",
                                                                             "membership": "ok"}

        # The queue goes away: /health names it (degraded for the default gateway, 503 for one that requires it),
        # and a request that needs it fails with a message about the queue, not the router.
        await s["queue"].stop()
        s["stopped"].add("queue")

        async def queue_down() -> bool:
            return (await health(url))[1]["dependencies"]["queue"]["status"] == "down"
        await eventually(queue_down, timeout_s=10, interval_s=0.1)
        code, body = await health(url)
        assert code == 200 and body["status"] == "degraded" and body["dependencies"]["router"]["status"] == "ok"
        assert "queue" in body["dependencies"]["queue"]["message"]
        code, body = await health(strict)
        assert code == 503 and body["status"] == "unavailable" and body["dependencies"]["queue"]["status"] == "down"
        for r in (await http.post(f"{url}/v1/chat/completions", json=chat(MODEL, slo_class="batch")),
                  await http.get(f"{url}/v1/batches")):
            assert r.status_code == 503, r.text
            message = r.json()["error"]["message"]
            assert "queue" in message and "router is unreachable" not in message, message

        # etcd goes away: the router's membership watch is down.
        await asyncio.to_thread(etcd.stop)
        try:
            async def membership_down() -> bool:
                return (await health(url))[1]["dependencies"]["membership"]["status"] == "down"
            await eventually(membership_down, timeout_s=15, interval_s=0.1)
        finally:
            await asyncio.to_thread(etcd.start)

        # The router goes away: 503, the router named; its dependencies are unknown; requests blame the router.
        await s["router"].stop(grace_s=0.5)
        s["stopped"].add("router")
        code, body = await health(url)
        assert code == 503 and body["status"] == "unavailable", body
        assert (await http.get(f"{url}/livez")).status_code == 200  # alive: nothing to restart it for
        assert body["dependencies"]["router"]["status"] == "down" and "router" in body["dependencies"]["router"]["message"]
        assert body["dependencies"]["queue"]["status"] == "unknown"
        # Within its model list's TTL (0.2 s) the gateway still answers from the list ("known, no engine now", a
        # 503 of its own); past it, it asks the router and names it.
        async def blames_router() -> bool:
            r = await http.post(f"{url}/v1/chat/completions", json=chat(MODEL))
            assert r.status_code == 503, r.text
            return "router is unreachable" in r.json()["error"]["message"]
        await eventually(blames_router, timeout_s=5, interval_s=0.1)
