"""The router's gRPC contract from another language: examples/node/client.js (@grpc/grpc-js with the .proto files
loaded at run time) runs as a real subprocess against a test cluster like tests/test_router.py's: a real etcd for
membership, simulated engine agents on loopback registered there, the real queue service and the router."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from services.common.membership import MembershipWatcher
from services.queue.server import serve as serve_queue
from services.queue.store import QueueConfig
from services.router.routing import RouterConfig
from services.router.server import RouterService
from services.router.server import serve as serve_router
from tests.conftest import start_etcd, start_sim_engine

pytestmark = pytest.mark.timeout(120)
MODEL = "llama-3-8b"
ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "examples" / "node" / "client.js"
CLIENT_TIMEOUT_S = 60.0


def node_or_skip() -> str:
    """The node binary, with @grpc/grpc-js and @grpc/proto-loader installed (`npm ci`). Missing: skip, or fail in
    CI (``CI=true``)."""
    node = shutil.which("node")
    missing = [] if node else ["the `node` binary (apt-get install -y nodejs npm)"]
    missing += [f"node_modules/{pkg} (run `npm ci --no-audit --no-fund` at the repo root)"
                for pkg in ("@grpc/grpc-js", "@grpc/proto-loader") if not (ROOT / "node_modules" / pkg / "package.json").is_file()]
    if missing:
        message = "Node.js client test needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    assert node is not None
    return node




@pytest.fixture
async def cluster(tmp_path):
    """The router's address, once membership shows both engines and the router has served its first stats refresh."""
    node = node_or_skip()  # before starting anything
    etcd = start_etcd(tmp_path / "etcd")
    engines = [await start_sim_engine("inter-1", "interactive", cap=2, speedup=20.0, etcd=etcd.endpoint),
               await start_sim_engine("mixed-1", "mixed", cap=8, speedup=20.0, etcd=etcd.endpoint)]
    watcher = MembershipWatcher(etcd.endpoint)
    await watcher.start()
    await watcher.wait_for(lambda m: len(m) == 2, timeout_s=20)
    queue = await serve_queue(QueueConfig(db_path=str(tmp_path / "q.db")), port=0)
    router = await serve_router(RouterService(RouterConfig(), watcher, f"127.0.0.1:{queue.port}", stats_interval_s=0.1), port=0)
    yield node, f"127.0.0.1:{router.port}", router
    await router.stop()
    await queue.stop()
    await watcher.stop()
    for srv, reg in engines:
        await reg.close()
        await srv.stop(grace_s=1.0)
    etcd.stop()


async def run_client(node: str, *args: str) -> tuple[int, str, str]:
    """Run the Node.js client as a subprocess; the in-process servers keep serving on this event loop meanwhile."""
    env = {k: v for k, v in os.environ.items() if k != "CHIRON_MODEL"}
    proc = await asyncio.create_subprocess_exec(node, str(CLIENT), *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=CLIENT_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    stdout, stderr = out.decode(), err.decode()
    sys.stdout.write(stdout)  # shown by pytest on failure
    sys.stderr.write(stderr)
    assert proc.returncode is not None
    return proc.returncode, stdout, stderr


def summary(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "the client printed nothing"
    return json.loads(lines[-1])


async def test_node_client_generates_submits_and_gets_the_result(cluster):
    node, address, router = cluster
    rc, stdout, stderr = await run_client(node, address, "--model", MODEL, "--max-tokens", "24", "--prompt-tokens", "64",
                                          "--timeout-ms", "30000")
    assert rc == 0, stderr
    out = summary(stdout)
    assert out["generate_tokens"] == 24 and out["finish_reason"] == "FINISH_REASON_LENGTH"
    assert out["instance_id"] in ("inter-1", "mixed-1") and out["ttft_ms"] > 0
    assert out["submitted"].startswith("node-batch-") and out["group_id"].startswith(MODEL)
    assert out["state"] == "QUEUED_REQUEST_STATE_QUEUED" and out["position"] == 0
    assert "tokens:" in stdout and "first token after" in stdout  # streamed, not just summarised
    assert router.service.accepted == 1 and router.service.submitted == 1


async def test_node_client_reports_a_bad_request_with_its_status(cluster):
    node, address, router = cluster
    rc, stdout, stderr = await run_client(node, address, "--model", MODEL, "--max-tokens", "0")
    assert rc != 0
    assert "Generate failed: INVALID_ARGUMENT" in stderr and "max_tokens" in stderr
    out = summary(stdout)
    assert out["error"]["rpc"] == "Generate" and out["error"]["code"] == "INVALID_ARGUMENT"
    assert router.service.accepted == 0 and router.service.submitted == 0
