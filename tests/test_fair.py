"""The fair suite (simulator/fair.py, ``chiron experiments --suite fair``) and the baselines' fair variants
(gateway queue, priority scheduling) and pure decision modules (simulator/baselines/). Tiny workloads only:
what is checked is behaviour (keys, matching rule, conservation, errors), never numbers copied from a run."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest
from click.testing import CliRunner

from services.cli import main
from simulator import fair
from simulator.baselines import kpa, oracle, queue_length
from simulator.baselines.snapshot import FleetSnapshot, InstanceSnapshot
from simulator.fleet import Fleet, SimConfig
from simulator.policies import make_policy
from simulator.workloads import make_workload

ROW_KEYS = ("workload", "slo_level", "policy", "variant", "params", "seed", "gpu_hours", "interactive_attainment",
            "batch_attainment", "rejected", "lost_requests")
HEADLINE_KEYS = ("chiron_gpu_hours", "chiron_interactive_attainment", "chiron_batch_attainment", "best_baseline",
                 "best_baseline_variant", "best_baseline_gpu_hours", "gpu_ratio", "matched", "attainment_gain",
                 "oracle_gpu_hours")
ABLATION_KEYS = ("workload", "removed", "gpu_hours", "interactive_attainment", "batch_attainment")


def _snap(now: float = 0.0, insts: tuple = (), gi: int = 0, gb: int = 0, budget: int = 50) -> FleetSnapshot:
    return FleetSnapshot(now, tuple(insts), gi, gb, budget)


def _inst(k: int, running: int = 0, waiting: int = 0, state: str = "serving") -> InstanceSnapshot:
    return InstanceSnapshot(f"uniform-{k}", state, k, running, waiting, 256, 1000, 2000)


# ---- pure decision modules ---------------------------------------------------------------------------
def test_queue_length_counts_gateway_depth_and_paces_scale_up():
    cfg, st = queue_length.QueueLengthConfig(threshold=5), queue_length.QueueLengthState()
    # 2 replicas, 100 requests in the gateway: ceil(100 / 5) = 20 wanted, HPA allows max(+4, 2x) = 6 now.
    st, desired, _ = queue_length.decide(cfg, st, _snap(0, (_inst(1), _inst(2)), gb=100))
    assert desired == 6
    # The queue empties: the 300-s stabilization window keeps the highest recommendation (20, so all 6 stay).
    st, desired, _ = queue_length.decide(cfg, st, _snap(15, tuple(_inst(k) for k in range(1, 7))))
    assert desired == 6
    st, desired, _ = queue_length.decide(cfg, st, _snap(400, tuple(_inst(k) for k in range(1, 7))))
    assert desired == 1


def test_queue_length_tolerance_keeps_the_count():
    cfg, st = queue_length.QueueLengthConfig(threshold=5), queue_length.QueueLengthState()
    # 4 replicas, 21 waiting: 21 / 20 = 1.05 is inside HPA's 10% tolerance.
    _, desired, _ = queue_length.decide(cfg, st, _snap(0, tuple(_inst(k, waiting=5 + (k == 1)) for k in range(1, 5))))
    assert desired == 4


def test_kpa_panics_on_a_burst_and_never_scales_down_in_panic():
    cfg, st = kpa.KpaConfig(target=10), kpa.KpaState()
    insts = (_inst(1),)
    for t in range(60):
        st = kpa.observe(cfg, st, _snap(t, insts, gi=5))
    st, desired, _ = kpa.decide(cfg, st, _snap(60, insts))
    assert desired == 1 and st.panic_since is None
    for t in range(60, 66):
        st = kpa.observe(cfg, st, _snap(t, insts, gi=200))
    st, desired, _ = kpa.decide(cfg, st, _snap(66, insts))
    assert st.panic_since == 66 and desired >= 20  # panic window 6 s averages 200 → 20 pods
    st = kpa.observe(cfg, st, _snap(67, insts, gi=0))
    st, desired2, _ = kpa.decide(cfg, st, _snap(68, insts))
    assert desired2 >= desired  # panic holds the episode's highest count


def test_oracle_need_covers_future_concurrency():
    arrival = [0.0, 0.5, 10.0]
    service = [5.0, 5.0, 1.0]
    import numpy as np

    grid, need = oracle.interactive_need(np.array(arrival), np.array(service), slots_per_instance=1, margin=0.0)
    assert need[int(np.searchsorted(grid, 2.0))] == 2
    sched = oracle.OracleSchedule(grid, need, 0)
    assert sched.interactive_at(8.0, 11.0) == 1 and sched.interactive_at(100.0, 200.0) == 0
    assert oracle.batch_instances(3600.0, 1800.0, 30.0, 0.0) == 3
    assert oracle.batch_instances(0.0, 1800.0, 30.0, 0.0) == 0


def test_oracle_prefill_need_counts_prompt_tokens_per_second():
    import numpy as np

    grid = np.arange(0.0, 10.0)
    # 10,000 prompt tokens arriving at t=1 must be prefilled within a 5-s window at 1,000 tokens/s per instance.
    need = oracle.prefill_need(np.array([1.0]), np.array([10_000]), grid, 5.0, 1_000.0, 0.0)
    assert need[0] == 2 and need[1] == 2 and need[2] == 0


# ---- fair variants in the fleet ---------------------------------------------------------------------
def _wl():
    return make_workload("poisson", rate_per_s=2, duration_s=60, batch_requests=300, batch_ttft_s=600, seed=0)


def test_gateway_queue_holds_what_has_no_room_and_loses_nothing():
    wl = _wl()
    pol = make_policy("queue-length", wl, SimConfig(), variant="gateway-queue", max_batch_size=8)
    fleet = Fleet(wl, pol, SimConfig())
    rep = fleet.run()
    assert rep["lost_requests"] == 0 and rep["interactive"]["rejected"] == 0
    assert rep["interactive"]["done"] == rep["interactive"]["count"] and rep["batch"]["done"] == rep["batch"]["count"]
    assert max(r["gateway_queued"] for r in rep["timeseries"]) > 0  # the backlog waited in front of the fleet
    assert all(i.num_running + i.num_waiting <= 8 for i in fleet.instances)


def test_gateway_queue_serves_interactive_band_first():
    from simulator.fleet import GatewayQueue

    gw = GatewayQueue()
    gw.push("b0")
    gw.push("b1")
    gw.push("i0")
    assert gw.pop() == ("i0", 0) and gw.pop() == ("b0", 0) and len(gw) == 1


def test_priority_variant_puts_interactive_ahead_in_the_engine():
    wl = _wl()
    fleet = Fleet(wl, make_policy("kpa", wl, SimConfig(), variant="priority"), SimConfig())
    fleet.policy.setup(fleet)
    inst = fleet.instances[0]
    fleet.submit(inst, "b0")
    fleet.submit(inst, "i0")
    assert inst.core.waiting[0].request_id == "i0"


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="gateway-queue"):
        make_policy("kpa", _wl(), SimConfig(), variant="fifo")


# ---- matching rule ------------------------------------------------------------------------------------
def _row(policy, variant, gpu, ia, ba, seed=0, params=None):
    return {"workload": "mixed", "slo_level": "standard", "policy": policy, "variant": variant, "params": params or {},
            "seed": seed, "gpu_hours": gpu, "interactive_attainment": ia, "batch_attainment": ba, "rejected": 0,
            "lower_bound_gpu_hours": 0.5}


def test_headline_takes_the_cheapest_matching_configuration():
    rows = [_row("chiron", "", 1.0, 0.99, 1.0), _row("oracle", "", 0.8, 1.0, 1.0),
            _row("kpa", "gateway-queue", 3.0, 0.995, 1.0, params={"target": 35}),
            _row("kpa", "gateway-queue", 2.0, 0.9895, 1.0, params={"target": 70}),  # within 0.1 pp: matches
            _row("queue-length", "priority", 0.5, 0.95, 1.0)]  # cheaper, but misses the bar
    h = fair._headline(rows, "mixed", "standard")
    assert h["matched"] and h["best_baseline"] == "kpa" and h["best_baseline_params"] == {"target": 70}
    assert h["gpu_ratio"] == pytest.approx(0.5) and h["oracle_gpu_hours"] == 0.8


def test_headline_without_a_match_reports_the_attainment_gain():
    rows = [_row("chiron", "", 1.0, 0.99, 1.0), _row("oracle", "", 0.8, 1.0, 1.0),
            _row("kpa", "gateway-queue", 3.0, 0.97, 0.90), _row("queue-length", "priority", 0.5, 0.95, 0.5)]
    h = fair._headline(rows, "mixed", "standard")
    assert not h["matched"] and h["best_baseline"] == "kpa"
    assert h["attainment_gain"] == pytest.approx(0.99 - 0.90)


def test_only_configurations_run_on_every_seed_are_comparators():
    rows = [_row("chiron", "", 1.0, 0.99, 1.0, seed=s) for s in (0, 1)]
    rows += [_row("oracle", "", 0.8, 1.0, 1.0, seed=s) for s in (0, 1)]
    rows += [_row("kpa", "gateway-queue", 0.1, 1.0, 1.0, seed=0)]  # first seed only
    rows += [_row("kpa", "priority", 2.0, 1.0, 1.0, seed=s) for s in (0, 1)]
    h = fair._headline(rows, "mixed", "standard")
    assert h["best_baseline_variant"] == "priority"


# ---- the suite end to end (tiny) ----------------------------------------------------------------------
@pytest.fixture
def tiny_suite(monkeypatch):
    tiny = {
        "mixed": fair.SuiteWorkload("mixed", "poisson", {}, {"rate_per_s": 2.0, "duration_s": 60, "batch_requests": 150},
                                    "tune", True, "tiny"),
        "gamma-cv4": fair.SuiteWorkload("gamma-cv4", "gamma", {}, {"rate_per_s": 2.0, "cv": 4.0, "duration_s": 60},
                                        "validate", False, "tiny"),
    }
    monkeypatch.setattr(fair, "SUITE", tiny)
    monkeypatch.setattr(fair, "QUICK_GRIDS", {"queue-length": {"threshold": (5.0,)},
                                               "kpa": {"target": (70.0,), "engine": ((64, 2048),)}})
    monkeypatch.setattr(fair, "ABLATIONS", ("over-provisioning",))
    return tiny


def test_tiny_fair_suite_writes_every_key(tiny_suite, tmp_path):
    data = fair.run_fair(tmp_path, quick=True, slo_levels=("standard",), seeds=(0, 1), workers=1)
    saved = json.loads((tmp_path / "fair.json").read_text())
    assert saved["headline"] and saved["rows"] and saved["ablation"]
    for r in saved["rows"]:
        assert all(k in r for k in ROW_KEYS) and r["lost_requests"] == 0
    for h in saved["headline"]:
        assert all(k in h for k in HEADLINE_KEYS)
    assert {a["workload"] for a in saved["ablation"]} == {"mixed", "gamma-cv4"}
    assert all(all(k in a for k in ABLATION_KEYS) for a in saved["ablation"])
    assert (tmp_path / "frontier_mixed.png").stat().st_size > 0 and (tmp_path / "frontier_gamma-cv4.png").exists()
    report = (tmp_path / "report.md").read_text()
    assert "## Headline" in report and "## Targets" in report
    # Both seeds of chiron, and every variant of the baselines on the batch workload.
    assert {r["seed"] for r in data["rows"] if r["policy"] == "chiron"} == {0, 1}
    assert {r["variant"] for r in data["rows"] if r["workload"] == "mixed" and r["policy"] == "kpa"} == \
        {"engine-queue", "gateway-queue", "priority"}
    assert not any(math.isnan(h["chiron_gpu_hours"]) for h in data["headline"])


def test_rebuild_from_the_rows_gives_the_same_headline(tiny_suite, tmp_path):
    data = fair.run_fair(tmp_path, quick=True, workloads=("gamma-cv4",), slo_levels=("standard",), seeds=(0,), workers=1)
    again = fair.rebuild(tmp_path)
    assert json.dumps(again["headline"], default=str) == json.dumps(data["headline"], default=str)
    # Dropping Chiron's rows leaves a cell without its reference: rebuilding must say so, not invent one.
    with pytest.raises(ValueError, match="no chiron run"):
        fair.rebuild(tmp_path, [r for r in data["rows"] if r["policy"] != "chiron"])


def test_a_run_that_loses_requests_fails_the_suite_with_ids(tiny_suite, tmp_path, monkeypatch):
    real = fair._run_job

    def losing(args):
        row = real(args)
        if row["policy"] == "kpa":
            row.update(lost_requests=2, lost_request_ids=["i3", "b7"])
        return row
    monkeypatch.setattr(fair, "_run_job", losing)
    with pytest.raises(fair.LostRequests, match="i3, b7"):
        fair.run_fair(tmp_path, quick=True, workloads=("gamma-cv4",), slo_levels=("standard",), seeds=(0,), workers=1)


def test_unknown_suite_workload_and_level_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid: mixed"):
        fair.run_fair(tmp_path, workloads=("nope",))
    with pytest.raises(ValueError, match="standard, chat"):
        fair.run_fair(tmp_path, slo_levels=("fast",))
    res = CliRunner().invoke(main, ["experiments", "--suite", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "paper, fair" in res.output
    res = CliRunner().invoke(main, ["experiments", "--suite", "fair", "--workloads", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "conversation" in res.output


def test_ablation_keeps_deadlines_blind_only_when_asked():
    from services.global_scaler.policy import GroupView

    wl = _wl()
    g = [GroupView("g", 10, 5.0, 1000.0)]
    abl = fair.ChironAblation(wl, SimConfig(), "batch backpressure")
    fleet = Fleet(wl, abl, SimConfig())
    assert abl.group_views(fleet, g)[0].deadline_s == fleet.now
    assert fair.ChironAblation(wl, SimConfig(), "over-provisioning").group_views(fleet, g) == g
    with pytest.raises(ValueError, match="valid"):
        fair.ChironAblation(wl, SimConfig(), "everything")


# ---- targets and the operator's own trace ------------------------------------------------------------
def _cell(matched: bool, ratio: float, gain: float, batch: bool = False) -> dict:
    return {"workload": "w", "slo_level": "standard", "batch": batch, "matched": matched, "gpu_ratio": ratio,
            "attainment_gain": gain, "oracle_interactive_attainment": 0.9, "chiron_interactive_attainment": 0.95,
            "chiron_over_oracle": 1.0}


def test_targets_count_matched_cells_only_and_mark_the_ones_beyond_the_frontier():
    (strict,) = [t for t in fair._targets([_cell(True, 0.9, 0.0)]) if "gpu_ratio" in t["target"]]
    assert strict["met"] and not strict["beyond_frontier"]
    # No baseline reaches Chiron's attainment, and Chiron is cheaper than the most attaining one: marked, not met.
    (beyond,) = [t for t in fair._targets([_cell(False, 0.6, 0.05, batch=True)]) if "gpu_ratio" in t["target"]]
    assert not beyond["met"] and beyond["beyond_frontier"] and "0.70" in beyond["target"]
    # Better but dearer than the target ratio: neither.
    (dear,) = [t for t in fair._targets([_cell(False, 1.2, 0.05)]) if "gpu_ratio" in t["target"]]
    assert not dear["met"] and not dear["beyond_frontier"]


def _trace_csv(path, n: int = 240, gap_s: float = 0.25) -> str:
    start = 1_700_000_000.0
    rows = [f"{dt.datetime.fromtimestamp(start + k * gap_s, dt.UTC):%Y-%m-%d %H:%M:%S.%f},"
            f"{200 + 37 * (k % 9)},{20 + 11 * (k % 7)}" for k in range(n)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    return str(path)


def test_the_operators_trace_runs_through_the_whole_comparison_in_worker_processes(tiny_suite, tmp_path):
    name = fair.add_trace_workload(_trace_csv(tmp_path / "my fleet.csv"), batch_requests=100)
    assert name == "trace-my-fleet" and fair.SUITE[name].split == "validate" and fair.SUITE[name].batch
    # workers=2: the registered workload must exist in the pool's processes too.
    data = fair.run_fair(tmp_path / "out", quick=True, workloads=(name,), slo_levels=("standard",), seeds=(0,),
                         workers=2)
    (h,) = data["headline"]
    assert h["workload"] == name and h["split"] == "validate" and h["best_baseline"] is not None
    assert {r["policy"] for r in data["rows"]} >= {"chiron", "oracle", "queue-length", "kpa"}
    assert all("error" not in r for r in data["rows"])
    assert (tmp_path / "out" / f"frontier_{name}.png").exists()
    again = fair.rebuild(tmp_path / "out")  # rebuilt from the plan, which names the workload's split
    assert again["headline"][0]["gpu_ratio"] == pytest.approx(h["gpu_ratio"])


def test_a_bad_trace_file_is_refused_before_anything_runs(tiny_suite, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:48.0,abc,5\n")
    res = CliRunner().invoke(main, ["experiments", "--suite", "fair", "--trace-file", str(bad), "--quick",
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "bad.csv:2" in res.output
    res = CliRunner().invoke(main, ["experiments", "--suite", "fair", "--batch-requests", "5", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--trace-file" in res.output
    assert not (tmp_path / "o").exists()


def test_confirmation_keeps_the_configuration_that_would_match_chiron(tiny_suite):
    # Six first-seed frontier points; the even spread of three takes targets 140, 50 and 5, but the one that clears
    # Chiron's 0.99 most cheaply is target 35: it must be confirmed too (with 50, the point just cheaper).
    rows = [_row("chiron", "", 2.5, 0.99, 1.0)]
    rows += [_row("kpa", "gateway-queue", g, ia, 1.0, params={"target": t})
             for g, ia, t in ((1.0, 0.90, 140.0), (1.5, 0.95, 70.0), (2.0, 0.98, 50.0), (2.2, 0.991, 35.0),
                              (3.0, 0.995, 20.0), (5.0, 0.999, 5.0))]

    def confirmed(rs):
        jobs = fair._confirm_jobs(rs, ("mixed",), ("standard",), (1,), True, 3)
        return sorted(dict(j.params)["target"] for j in jobs if j.policy == "kpa")
    assert confirmed(rows) == [5.0, 35.0, 50.0, 140.0]
    assert confirmed(rows[1:]) == [5.0, 50.0, 140.0]  # no Chiron run: the spread alone
