"""``chiron chaos --quick``: a replicated local cluster (PostgreSQL, 3 etcd members, two replicas of every service)
under load through both gateways; a gateway, a router and an engine SIGKILLed in turn; every target checked.

Needs the etcd and PostgreSQL binaries (skipped without them, failed in CI). The run itself waits on readiness
(ports, health checks, etcd membership), never on fixed sleeps for correctness, and stops every process it
started in a ``finally`` (checked here: no process of its work folder is left)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.chaos import FAULTS, QUICK_FAULTS, ChaosConfig, run_chaos, targets_met
from services.common.etcd_server import find_etcd_binary
from services.common.pg_server import pg_bin

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"fault", "interactive_failed", "interactive_duplicated_tokens", "batch_lost", "batch_completed_twice",
            "recovery_s", "replica_back_s", "recovery_target_s"}


def _needs_binaries() -> None:
    missing = [what for what, ok in (("etcd", find_etcd_binary()), ("PostgreSQL (initdb, pg_ctl)", pg_bin())) if not ok]
    if missing:
        msg = f"chiron chaos needs {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def _processes_under(folder: Path) -> list[str]:
    """Command lines of running processes that name ``folder`` (the run's work folder)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(folder) in cmd:
                out.append(f"{d.name}: {cmd[:200]}")
    return out


def test_quick_chaos_meets_every_target(tmp_path):
    _needs_binaries()
    work = tmp_path / "work"
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, "-m", "services.cli", "chaos", "--quick", "--json", str(out),
                           "--work-dir", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=280)
    try:
        assert out.exists(), f"no report (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        report = json.loads(out.read_text())
        assert [r["fault"] for r in report["faults"]] == list(QUICK_FAULTS)
        for row in report["faults"]:
            assert ROW_KEYS <= row.keys(), row
            assert row["interactive_requests"] > 0, row
        gateway = next(r for r in report["faults"] if r["fault"] == "gateway")
        assert "gateway_connections_cut" in gateway
        assert {"interactive_failed", "batch_lost", "batch_completed_twice", "interactive_duplicated_tokens",
                "gateway_connections_cut"} <= report["totals"].keys()
        assert report["targets_missed"] == [], (f"{report['targets_missed']}\n{report['duplicated_requests']}\n"
                                                f"{proc.stdout[-4000:]}")
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        # The supervisor restarted what was killed, on its port.
        assert report["restarts"]["gateway-a"] >= 1 and report["restarts"]["router-a"] >= 1
    finally:
        assert _processes_under(work) == []


def test_targets_and_fault_names():
    cfg = ChaosConfig()
    assert cfg.recovery_target_s("freeze") == cfg.leader_ttl_s + 5 and cfg.recovery_target_s("router") == 5
    row = {"fault": "router", "interactive_failed": 0, "interactive_duplicated_tokens": 0, "batch_lost": 0,
           "batch_completed_twice": 0, "recovery_s": 1.0, "recovery_target_s": 5.0}
    assert targets_met({"faults": [row]}) == []
    assert targets_met({"faults": [{**row, "recovery_s": None}]}) != []
    assert targets_met({"faults": [{**row, "batch_lost": 1, "recovery_s": 6.0}]}) == [
        "router: batch_lost = 1", "router: recovery_s = 6.0 > 5"]
    assert set(QUICK_FAULTS) <= set(FAULTS)


async def test_unknown_fault_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="unknown fault 'disk'"):
        await run_chaos(ChaosConfig(faults=("disk",)))
