"""The replay report's reconciliation (pure) and ``chiron demo`` end to end (real processes, short)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from chiron.v1 import queue_pb2, types_pb2
from services.replay import ReplayConfig, _Batch, _Interactive, build_report

LENGTH = types_pb2.FINISH_REASON_LENGTH


def test_every_accepted_request_is_reconciled_against_its_outcome():
    cfg = ReplayConfig(interactive_ttft_ms=1000, interactive_itl_ms=50, batch_ttft_s=60)
    inter = [
        _Interactive("ok", 10, 5, accepted=True, status="OK", ttft_ms=200, itls=[20, 30], tokens=5, finish=LENGTH),
        _Interactive("slow", 10, 5, accepted=True, status="OK", ttft_ms=5000, itls=[20], tokens=5, finish=LENGTH),
        _Interactive("refused", 10, 5, accepted=False, status="RESOURCE_EXHAUSTED"),  # never accepted: not lost
        _Interactive("cut", 10, 5, accepted=True, status="UNAVAILABLE", ttft_ms=100, tokens=2),  # accepted, then failed
        _Interactive("short", 10, 5, accepted=True, status="OK", ttft_ms=100, tokens=4, finish=LENGTH),  # a token missing
    ]
    batch = [
        _Batch("done", 7, accepted=True, status="OK", state=queue_pb2.QUEUED_REQUEST_STATE_DONE, ttft_s=10, tokens=7),
        _Batch("late", 7, accepted=True, status="OK", state=queue_pb2.QUEUED_REQUEST_STATE_DONE, ttft_s=90, tokens=7),
        _Batch("waiting", 7, accepted=True, state=queue_pb2.QUEUED_REQUEST_STATE_QUEUED),  # still held: unfinished
        _Batch("gone", 7, accepted=True, status="NOT_FOUND"),  # the queue lost it
        _Batch("bad", 7, accepted=False, status="INVALID_ARGUMENT"),
    ]
    timeline = [{"t_s": 0.0, "interactive": 1, "mixed": 0, "batch": 0},
                {"t_s": 10.0, "interactive": 2, "mixed": 0, "batch": 1},
                {"t_s": 30.0, "interactive": 2, "mixed": 0, "batch": 1}]
    r = build_report(cfg, "t", inter, batch, timeline, [], wall_s=10.0)
    assert r["lost_requests"] == 3 and set(r["lost_request_ids"]) == {"cut", "short", "gone"}
    assert r["interactive"]["accepted"] == 4 and r["interactive"]["rejected"] == 1
    assert r["interactive"]["slo_attainment"] == pytest.approx(1 / 5)
    assert r["batch"]["done"] == 2 and r["batch"]["unfinished"] == 1
    assert r["batch"]["slo_attainment"] == pytest.approx(1 / 5)
    assert r["instance_seconds_by_role"] == {"interactive": 10 + 40, "mixed": 0, "batch": 20}
    assert r["gpu_seconds"] == 70
    assert [(e["role"], e["from"], e["to"]) for e in r["scale_events"]] == [("interactive", 1, 2), ("batch", 0, 1)]
    for key in ("policy", "trace", "requests", "slo_attainment", "throughput_tokens_per_s", "wall_seconds"):
        assert key in r
    assert math.isfinite(r["interactive"]["ttft_p99_ms"])


@pytest.mark.timeout(300)
def test_chiron_demo_runs_the_whole_system_and_loses_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--minutes", "0.25", "--speedup", "2",
                          "--batch-rate", "1", "--json", str(tmp_path / "demo.json"), "--plot", str(tmp_path / "demo.png")],
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads((tmp_path / "demo.json").read_text())
    assert r["lost_requests"] == 0
    assert r["interactive"]["count"] > 20 and r["interactive"]["accepted"] >= 0.9 * r["interactive"]["count"]
    assert r["batch"]["count"] > 0 and r["batch"]["done"] + r["batch"]["unfinished"] == r["batch"]["accepted"]
    assert r["gpu_seconds"] > 0 and (tmp_path / "demo.png").stat().st_size > 10_000
    assert "lost_requests: 0" in out.stdout
