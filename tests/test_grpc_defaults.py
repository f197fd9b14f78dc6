"""The gRPC default every Chiron process sets (services/__init__.py): grpc accepts it, a user's setting wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import services

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter: import the services package first (as `chiron` and `python -m services.cli` do), then
# grpc, and run one health-checked call over loopback so grpc has loaded its experiments and used both paths
# (client and listener).
PROBE = """
import asyncio, os, services, grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    await server.stop(None)
    print(os.environ["GRPC_EXPERIMENTS"] + "|" + health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

asyncio.run(main())
"""


def _probe(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def _env_without_experiments() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}


def test_services_set_grpcs_posix_io_path_and_grpc_knows_its_experiments():
    done = _probe(_env_without_experiments())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{services.GRPC_EXPERIMENTS_DEFAULT}|SERVING"
    # grpc logs an unknown experiment name instead of failing: a grpc release that drops these names must
    # fail here, not quietly fall back to the slower path.
    assert "Unknown experiment" not in done.stderr


def test_a_users_grpc_experiments_wins_even_when_empty():
    for value in ("", "-event_engine_client"):
        done = _probe({**_env_without_experiments(), "GRPC_EXPERIMENTS": value})
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"{value}|SERVING"
