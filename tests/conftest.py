"""Shared fixtures: real gRPC servers on loopback, polled for readiness (never fixed sleeps)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import pytest

from services.common.etcd_server import EtcdNotFound, EtcdServer


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


# ----------------------------------------------------------------------------------------------
# PostgreSQL: one real server per test session, a fresh database per test
# ----------------------------------------------------------------------------------------------
def _pg_bin() -> str | None:
    """The folder of PostgreSQL's server binaries (initdb, pg_ctl): on PATH, or Debian's /usr/lib/postgresql/*/bin."""
    import glob
    import shutil

    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(found))
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
                    reverse=True):
        if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    return None


class PostgresServer:
    """A throw-away PostgreSQL cluster (initdb into a temporary folder, pg_ctl start on a free loopback port, no
    fsync: tests, not durability). As root (CI) the server runs as the ``postgres`` user, since PostgreSQL refuses root."""

    def __init__(self) -> None:
        import socket
        import subprocess
        import tempfile

        self.bin = _pg_bin()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; "
                                    "install them (Debian: apt-get install postgresql)")
        self.dir = tempfile.mkdtemp(prefix="chiron-pg-")
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            import pwd
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as e:
                raise FileNotFoundError("running as root needs a 'postgres' user to run PostgreSQL as") from e
            os.chmod(self.dir, 0o755)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.run_as = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        data = os.path.join(self.dir, "data")
        self._run = lambda *args: subprocess.run([*self.run_as, *args], check=True, capture_output=True, text=True, timeout=120)
        try:
            self._run(os.path.join(self.bin, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
            self._run(os.path.join(self.bin, "pg_ctl"), "-D", data, "-l", os.path.join(self.dir, "log"), "-w", "-t", "60",
                      "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200", "start")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"could not start PostgreSQL: {e.stderr or e.stdout}") from e
        self.data = data
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh empty database; returns its URL."""
        import uuid

        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.admin_url, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def stop(self) -> None:
        import shutil
        import subprocess

        try:
            self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL server for the whole session. No binaries: skip, or fail in CI (``CI=true``), where
    ``.ci/run`` installs Debian's postgresql."""
    try:
        server = PostgresServer()
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
