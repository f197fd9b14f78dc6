"""Shared fixtures: real gRPC servers on loopback, polled for readiness (never fixed sleeps)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aetcd
import pytest

from services.common.etcd_server import EtcdNotFound, EtcdServer
from services.common.membership import parse_endpoint
from services.common.pg_server import PostgresServer


async def eventually(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 20.0, interval_s: float = 0.02) -> None:
    """Poll ``predicate`` until it returns True; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not reached within {timeout_s} s")
        await asyncio.sleep(interval_s)


def start_etcd(tmp_path) -> EtcdServer:
    """A running real etcd (``services.common.etcd_server``). No etcd binary: skip the test, or fail it in CI
    (``CI=true``), where ``.ci/run`` installs Debian's etcd-server."""
    try:
        server = EtcdServer(tmp_path)
    except EtcdNotFound as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    server.start()
    return server


async def start_sim_engine(instance_id: str, role: str, *, cap: int = 16, speedup: float = 50.0,
                           queue_address: str | None = None, etcd: str | None = None, model: str = "llama-3-8b"):
    """A simulated engine agent of ``role`` (interactive, mixed, batch) served on loopback: a static batch cap of
    ``cap`` (no local autoscaling), leasing batch work from ``queue_address`` when given (polling every 50 ms),
    registered in ``etcd`` when given. Returns ``(server, registration or None)``; stop both."""
    from chiron.v1 import types_pb2
    from services.common.membership import InstanceInfo, Registration
    from services.engine.backend import SimulatedBackend
    from services.engine.core import EngineConfig
    from services.engine.local_autoscaler import LocalAutoscalerConfig
    from services.engine.server import AgentConfig, EngineAgent, serve

    agent = EngineAgent(SimulatedBackend(model, EngineConfig(max_num_seqs=cap), speedup=speedup),
                        AgentConfig(instance_id=instance_id, role=types_pb2.InstanceRole.Value(f"INSTANCE_ROLE_{role.upper()}"),
                                    autoscale=False, queue_address=queue_address, queue_poll_interval_s=0.05,
                                    autoscaler=LocalAutoscalerConfig(initial_batch_size=cap)))
    server = await serve(agent, port=0)
    registration = None
    if etcd is not None:
        registration = await Registration.create(etcd, InstanceInfo(instance_id=instance_id, role=role, model=model,
                                                                    address=f"127.0.0.1:{server.port}"))
    return server, registration


# ---- one etcd per test module (membership and self-healing tests) ---------------------------------------------------


@pytest.fixture(scope="module")
def etcd_module(tmp_path_factory) -> EtcdServer:
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


@pytest.fixture
def etcd(etcd_module: EtcdServer) -> EtcdServer:
    """The module's etcd, started again if a test stopped it (a failed restart test must not take the following
    tests down with it). A test module may define its own ``etcd`` fixture instead."""
    if not etcd_module.running:
        etcd_module.start()
    return etcd_module


@pytest.fixture
def prefix() -> str:
    """A fresh instances prefix per test, so tests sharing one etcd never see each other's keys."""
    return f"/chiron-test/{uuid.uuid4().hex[:8]}/instances/"


@contextlib.asynccontextmanager
async def admin_client(server: EtcdServer) -> AsyncIterator[aetcd.Client]:
    """A fresh client (a new channel: one that saw etcd restart may sit in gRPC's reconnect backoff)."""
    host, port = parse_endpoint(server.endpoint)
    async with aetcd.Client(host=host, port=port, timeout=5) as client:
        yield client


# ----------------------------------------------------------------------------------------------
# PostgreSQL: one real server per test session, a fresh database per test
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the whole session. No binaries: skip, or fail in CI (``CI=true``), where
    ``.ci/run`` installs Debian's postgresql."""
    try:
        server = PostgresServer().start()
    except FileNotFoundError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server):
    """The URL of a fresh database on the session's PostgreSQL server, dropped after the test."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


# ---- `make test-fast`: the unit tests only ------------------------------------------------------------------------
# A test is an integration test when its module starts real parts (etcd, PostgreSQL, gRPC servers on ports,
# subprocesses, a local cluster, vLLM) or when it runs against PostgreSQL (a store test's "postgres" parameter).
# `make test-fast` deselects them (`-m "not integration"`); `make test` runs everything.
INTEGRATION_MODULES = frozenset({
    "test_batch_api", "test_batch_worker", "test_chaos", "test_cli_papercuts", "test_deploy_rehearse",
    "test_engine_agent", "test_engine_crash", "test_failover", "test_gateway", "test_gateway_batch",
    "test_gateway_workers", "test_grpc_defaults", "test_keda", "test_membership", "test_metrics", "test_node_client",
    "test_nomad", "test_queue_pg", "test_queue_pg_capacity", "test_queue_service", "test_replay", "test_router",
    "test_scaler", "test_scaler_inputs", "test_scaler_leader", "test_scaler_starting", "test_security",
    "test_self_healing", "test_soak", "test_supervision", "test_tracing", "test_vllm_backend",
})


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (module in INTEGRATION_MODULES or "postgres" in params.values()
                or {"pg_url", "pg_server"} & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.integration)
