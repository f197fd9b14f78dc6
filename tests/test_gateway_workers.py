"""``chiron gateway --workers N``: worker processes on one port, metrics summed over them, restarted when one dies,
stopped with the command. Real subprocesses on loopback; no router is needed for ``/livez`` and ``/metrics``
(the router address is a closed port: ``/v1/models`` answers 503)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.cluster import spawn_chiron
from services.engine.demo import stop_process, wait_port_file
from tests.conftest import eventually

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio]


def _count(text: str, endpoint: str, status: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == "chiron_gateway_requests":
            for s in family.samples:
                if s.name.endswith("_total") and s.labels == {"endpoint": endpoint, "status": status}:
                    return s.value
    return 0.0


async def _start(tmp_path, workers: int):
    proc, port_file = spawn_chiron(tmp_path, "gateway", ["gateway", "--router", "127.0.0.1:9", "--workers", str(workers)])
    try:
        port = await wait_port_file(port_file, proc, timeout_s=60)
        url = f"http://127.0.0.1:{port}"
        await _wait_live(url, proc)
    except BaseException:  # a start that fails its test must not leave the gateway (and its workers) running
        stop_process(proc)
        raise
    return proc, url


async def _wait_live(url: str, proc) -> None:
    """Until ``GET /livez`` answers 200 (``/health`` is 503 here: no router behind these gateways)."""
    async def live() -> bool:
        assert proc.poll() is None, f"the gateway exited with status {proc.returncode}"
        try:
            async with httpx.AsyncClient(base_url=url) as c:
                return (await c.get("/livez")).status_code == 200
        except httpx.TransportError:
            return False

    await eventually(live, timeout_s=60, interval_s=0.1)


def _workers(proc) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children()


async def _new_connections(url: str, n: int, path: str) -> None:
    """``n`` requests, each on a connection of its own (so the kernel may hand them to any worker)."""
    for _ in range(n):
        async with httpx.AsyncClient(base_url=url) as c:
            assert (await c.get(path)).status_code in (200, 503)


async def test_workers_share_the_port_and_metrics_survive_a_worker_restart(tmp_path):
    proc, url = await _start(tmp_path, workers=2)
    try:
        first = _workers(proc)
        assert len(first) == 2
        await _new_connections(url, 20, "/v1/models")
        async with httpx.AsyncClient(base_url=url) as c:
            assert _count((await c.get("/metrics")).text, "/v1/models", "503") == 20

            # Kill both workers: the command starts others, and the counts of the dead ones stay in /metrics
            # (one process's registry would start again from zero).
            for w in first:
                w.send_signal(signal.SIGKILL)

            async def restarted() -> bool:
                now = [w.pid for w in _workers(proc)]
                if len(now) != 2 or {w.pid for w in first} & set(now):
                    return False
                try:
                    async with httpx.AsyncClient(base_url=url) as fresh:
                        return (await fresh.get("/livez")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(restarted, timeout_s=30)
            await _new_connections(url, 5, "/v1/models")
            async with httpx.AsyncClient(base_url=url) as fresh:
                assert _count((await fresh.get("/metrics")).text, "/v1/models", "503") == 25
        assert proc.poll() is None
    finally:
        assert stop_process(proc) == 0


def _gone(workers: list[psutil.Process]) -> bool:
    return not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


async def test_sigterm_stops_every_worker_and_workers_outlive_no_dead_parent(tmp_path):
    proc, url = await _start(tmp_path, workers=3)
    workers = _workers(proc)
    assert len(workers) == 3
    assert stop_process(proc) == 0
    assert _gone(workers)  # the command returns once its workers have exited
    # A command killed outright (no chance to stop its workers): they notice, stop by themselves and remove the
    # directory the command shared with them.
    proc, url = await _start(tmp_path, workers=2)
    workers = _workers(proc)
    assert len(workers) == 2
    args = workers[0].cmdline()
    shared = Path(args[args.index("--worker-dir") + 1])  # the command's directory for its workers
    assert shared.is_dir()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    async def gone() -> bool:
        return _gone(workers) and not shared.exists()

    await eventually(gone, timeout_s=15)


async def test_one_worker_serves_in_the_command_itself(tmp_path):
    proc, url = await _start(tmp_path, workers=1)
    try:
        assert _workers(proc) == []
        async with httpx.AsyncClient(base_url=url) as c:
            assert (await c.get("/livez")).status_code == 200
    finally:
        assert stop_process(proc) == 0
