"""``chiron soak`` (services/soak.py): the summary math on synthetic samples (pure), the /proc sampling, and a tiny
run of the command against a real local cluster (the real benchmark is ``--minutes 60``; see bench/results/soak_*)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from services.soak import (
    SERVICES,
    Sampler,
    default_edge_min,
    default_window_min,
    discover,
    read_rss_fds,
    summarize,
    summarize_process,
)

MB = 2**20


def _samples(t_s, rss, fds):
    return np.column_stack([t_s, rss, fds]).tolist()


def test_default_window_is_the_last_50_minutes_of_an_hour_and_scales_down():
    assert default_window_min(60) == 50
    assert default_window_min(120) == 50
    assert default_window_min(30) == 20
    assert default_window_min(20) == 10
    assert default_window_min(0.5) == 0.25  # at least half the run
    assert default_edge_min(50) == 5
    assert default_edge_min(10) == 5
    assert default_edge_min(0.25) == 0.125


def test_rss_growth_compares_medians_of_the_windows_first_and_final_edges():
    t = np.arange(0, 601.0)  # one sample a second, window [0, 600], edges of 60 s
    rss = 100 * MB + t / 600 * 10 * MB  # +10% linearly
    s = summarize_process(_samples(t, rss, np.full_like(t, 20)), 0.0, 600.0, 60.0)
    first, final = np.median(rss[t <= 60]), np.median(rss[t >= 540])
    assert s["covers_window"] and s["samples_in_window"] == 601
    assert s["rss_first_bytes"] == pytest.approx(first) and s["rss_final_bytes"] == pytest.approx(final)
    assert s["rss_growth_pct"] == pytest.approx(100 * (final - first) / first)
    assert s["rss_growth_pct"] == pytest.approx(9.0 / 100.5 * 100)  # medians at 30 s (100.5 MB) and 570 s (109.5 MB)
    assert s["fd_slope_per_min"] == pytest.approx(0.0, abs=1e-9) and s["fd_flat"] and s["fd_drift"] == pytest.approx(0, abs=1e-9)


def test_medians_ignore_spikes_and_samples_before_the_window_do_not_count():
    t = np.arange(0, 1201.0, 5.0)
    rss = np.full_like(t, 200 * MB)
    rss[t < 600] = 50 * MB  # warm-up, before the window: excluded
    rss[(t > 650) & (t < 660)] = 900 * MB  # one spike in the first edge: the median ignores it
    s = summarize_process(_samples(t, rss, np.full_like(t, 30)), 600.0, 1200.0, 300.0)
    assert s["rss_growth_pct"] == pytest.approx(0.0)
    assert s["samples_in_window"] == 121


def test_fd_slope_is_least_squares_and_flat_means_at_most_two_descriptors_over_the_window():
    t = np.arange(0, 601.0, 5.0)  # 10-minute window
    rng = np.random.default_rng(1)
    leaking = 20 + 0.5 * t / 60 + rng.normal(0, 0.3, len(t))  # +0.5 fd/min: 5 over the window
    s = summarize_process(_samples(t, np.full_like(t, MB), leaking), 0.0, 600.0, 120.0)
    assert s["fd_slope_per_min"] == pytest.approx(np.polyfit(t / 60, leaking, 1)[0])
    assert s["fd_slope_per_min"] == pytest.approx(0.5, abs=0.05)
    assert s["fd_drift"] == pytest.approx(abs(s["fd_slope_per_min"]) * 10)
    assert s["fd_flat"] is False
    steady = 20 + 0.15 * t / 60  # 1.5 over the window: flat
    assert summarize_process(_samples(t, np.full_like(t, MB), steady), 0.0, 600.0, 120.0)["fd_flat"] is True


def test_a_process_that_lived_part_of_the_window_is_measured_over_its_span_and_not_judged():
    t = np.arange(300, 481.0, 1.0)  # lived 3 of the window's 10 minutes
    rss = np.where(t < 390, 100 * MB, 104 * MB)
    fds = 10 + (t - 300) / 60  # +1 fd/min over 3 min: drift 3
    processes = {
        "engine:b (batch)[7]": {"pid": 7, "role": "engine", "name": "b (batch)", "samples": _samples(t, rss, fds)},
        "router:router[5]": {"pid": 5, "role": "router", "name": "router",
                             "samples": _samples(np.arange(0, 601.0), np.full(601, 50 * MB), np.full(601, 25))},
    }
    out = summarize(processes, run_end_s=600.0, window_min=10.0, edge_min=1.0)
    s = processes["engine:b (batch)[7]"]["summary"]
    assert not s["covers_window"] and s["span_min"] == pytest.approx(3.0)
    assert s["rss_growth_pct"] == pytest.approx(4.0)
    assert s["fd_drift"] == pytest.approx(3.0) and s["fd_flat"] is False
    assert out["targets"]["judged"] == ["router:router[5]"] and out["targets"]["met"] is True
    assert out["totals"]["processes"] == 2 and out["totals"]["processes_covering_window"] == 1
    assert out["window"] == {"start_s": 0.0, "end_s": 600.0, "minutes": 10.0, "edge_minutes": 1.0}


def test_targets_fail_on_rss_growth_over_5_percent_or_a_drifting_descriptor_count():
    t = np.arange(0, 601.0, 5.0)
    ok = _samples(t, np.full_like(t, 10 * MB), np.full_like(t, 20))
    grows = _samples(t, 10 * MB * (1 + 0.06 * t / 600), np.full_like(t, 20))
    leaks = _samples(t, np.full_like(t, 10 * MB), 20 + t / 60)
    processes = {k: {"pid": i, "role": k, "name": k, "samples": s}
                 for i, (k, s) in enumerate((("queue", ok), ("gateway", grows), ("scaler", leaks)))}
    out = summarize(processes, 600.0, 10.0, 1.0)
    assert out["targets"]["met"] is False
    assert sorted(out["targets"]["failing"]) == ["gateway", "scaler"]
    assert out["totals"]["max_rss_growth_pct"] == pytest.approx(processes["gateway"]["summary"]["rss_growth_pct"])
    assert 5 < out["totals"]["max_rss_growth_pct"] < 6


def test_empty_or_single_sample_processes_summarize_to_nothing():
    assert summarize_process([], 0, 60, 10)["rss_growth_pct"] is None
    s = summarize_process([[30.0, MB, 5]], 0, 60, 10)
    assert s["samples_in_window"] == 1 and s["fd_slope_per_min"] is None


def test_proc_sampling_reads_rss_and_descriptors_and_finds_children_by_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        rss, fds = read_rss_fds(os.getpid())
        assert rss > 10 * MB and fds >= 3
        found = discover({"test": os.getpid()}, None)
        assert found[os.getpid()] == ("test", "test")
        assert found[child.pid][0] == "child"
        sampler = Sampler(t0=0.0)
        assert sampler.sample(found, now=1.0) >= 2
        assert any(k.startswith("test:test[") for k in sampler.processes)
        child.kill()
        child.wait()
        assert read_rss_fds(child.pid) is None
        assert sampler.sample({child.pid: ("child", "x")}, now=2.0) == 0  # a process gone is skipped
    finally:
        child.kill()
        child.wait()


@pytest.mark.timeout(300)
def test_a_tiny_soak_run_samples_every_service_and_engine(tmp_path):
    from services import cli
    from services.common.etcd_server import EtcdNotFound, find_etcd_binary

    if find_etcd_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail(str(EtcdNotFound("no etcd binary")))
        pytest.skip("no etcd binary")
    path = tmp_path / "out" / "soak.json"
    r = CliRunner().invoke(cli.main, ["soak", "--minutes", "0.4", "--interval-s", "1", "--rate", "2",
                                      "--batch-rate", "0.2", "--json", str(path), "--work-dir", str(tmp_path / "work")])
    assert r.exit_code in (0, 1), r.output  # 1: a target missed (a 24-s run is noise, not a verdict)
    report = json.loads(path.read_text())
    assert (tmp_path / "out" / "soak.png").stat().st_size > 0
    for key in ("config", "processes", "window", "totals", "targets", "load", "run_end_s", "samples_taken"):
        assert key in report
    assert report["window"]["minutes"] == pytest.approx(0.2, abs=0.02)  # half of the run
    roles = {p["role"] for p in report["processes"].values()}
    assert set(SERVICES) <= roles and "engine" in roles, roles
    for p in report["processes"].values():
        assert p["samples"] and all(len(s) == 3 and s[1] > 0 and s[2] > 0 for s in p["samples"])
        assert {"rss_growth_pct", "fd_slope_per_min", "fd_flat", "covers_window"} <= set(p["summary"])
    services = [p for p in report["processes"].values() if p["role"] in SERVICES]
    assert all(p["summary"]["covers_window"] for p in services)
    assert report["samples_taken"] >= 20
    assert report["load"]["interactive"]["ok"] > 0 and report["load"]["batch"]["accepted"] > 0
    assert set(report["targets"]["judged"]) >= {k for k, p in report["processes"].items() if p["role"] in SERVICES}
