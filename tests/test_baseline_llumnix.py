"""Llumnix's decisions (simulator.baselines.llumnix) on hand-built fleet snapshots."""

from __future__ import annotations

import math

import pytest

from simulator.baselines.llumnix import (
    LlumnixConfig,
    LlumnixState,
    RunningRequest,
    dispatch,
    freeness,
    gateway_demand,
    migrate_out_request,
    migration_freeness,
    migration_pairs,
    scale,
)
from simulator.baselines.snapshot import FleetSnapshot, InstanceSnapshot

NO_WM = LlumnixConfig(watermark_fraction=0.0)


def inst(iid: str, order: int, *, running: int = 0, waiting: int = 0, free: int = 1000, total: int = 1000,
         waiting_blocks: float = 0.0, head: float = 0.0, preempted: int = 0, cap: int = 256,
         state: str = "serving") -> InstanceSnapshot:
    return InstanceSnapshot(iid, state, order, running, waiting, cap, free, total, waiting_blocks, head, preempted)


def snap(*insts: InstanceSnapshot, gateway_interactive: int = 0, gateway_batch: int = 0,
         budget: int = 50) -> FleetSnapshot:
    return FleetSnapshot(0.0, tuple(insts), gateway_interactive, gateway_batch, budget, 16)


# ---- freeness ------------------------------------------------------------------------------------------------
def test_freeness_is_infinite_without_requests_and_blocks_per_request_otherwise():
    cfg = LlumnixConfig()  # watermark 1% of the blocks
    empty = inst("a", 0, free=700)
    assert freeness(cfg, empty) == math.inf
    assert migration_freeness(cfg, empty) == math.inf
    busy = inst("b", 1, running=3, waiting=2, free=500, waiting_blocks=120, head=40)
    assert freeness(cfg, busy) == pytest.approx((500 - 10 - 120) / 5)
    # migration form: only the head-of-line waiting request, counted as one request
    assert migration_freeness(cfg, busy) == pytest.approx((500 - 10 - 40) / 4)


# ---- dispatch ------------------------------------------------------------------------------------------------
def test_dispatch_picks_the_freest_serving_instance_not_the_fewest_requests():
    a = inst("a", 0, running=4, free=800)  # 200 blocks per request
    b = inst("b", 1, running=1, free=100)  # fewer requests, 100 per request
    c = inst("c", 2, state="loading")  # empty (infinite freeness) but not serving
    assert dispatch(NO_WM, snap(a, b, c)) == "a"
    assert dispatch(NO_WM, snap(a, b, c), among=["b", "c"]) == "b"
    assert dispatch(NO_WM, snap(a, b, c), among=["c"]) is None
    # an idle serving instance is the freest of all; ties go to the earliest started
    d, e = inst("d", 4), inst("e", 3)
    assert dispatch(NO_WM, snap(a, b, d, e)) == "e"


# ---- migration -----------------------------------------------------------------------------------------------
def test_preempted_instance_is_a_migration_source_and_never_a_destination():
    a = inst("a", 0, running=2, free=900, preempted=1)  # free (450/request) but a request was preempted
    b = inst("b", 1, running=2, free=800)  # 400/request: a destination
    c = inst("c", 2, preempted=1)  # idle (infinite freeness) with a preempted request
    pairs = migration_pairs(NO_WM, snap(a, b, c))
    assert pairs == [("a", "b")]
    assert all(dst not in ("a", "c") for _, dst in pairs)
    # without the preempted request, a is a destination and nothing is overloaded: no migration at all
    assert migration_pairs(NO_WM, snap(inst("a", 0, running=2, free=900), b)) == []


def test_migration_pairs_the_least_free_sources_with_the_freest_destinations():
    s1 = inst("s1", 0, running=10, free=25)  # 2.5 blocks/request
    s2 = inst("s2", 1, running=10, free=5)  # 0.5: the most loaded
    d1 = inst("d1", 2, running=2, free=100)  # 50
    d2 = inst("d2", 3, running=1, free=900)  # 900: the freest
    full = inst("d3", 4, running=1, free=1000, cap=1)  # free, but at its batch cap
    assert migration_pairs(NO_WM, snap(s1, s2, d1, d2, full)) == [("s2", "d2"), ("s1", "d1")]
    assert migration_pairs(LlumnixConfig(watermark_fraction=0.0, enable_migration=False), snap(s1, s2, d1, d2)) == []


def test_shortest_decoding_request_migrates():
    running = [RunningRequest("long", 900), RunningRequest("prefilling", 10, decoding=False), RunningRequest("short", 300)]
    assert migrate_out_request(NO_WM, running) == "short"
    assert migrate_out_request(LlumnixConfig(request_migration_policy="LR"), running) == "long"
    assert migrate_out_request(NO_WM, [RunningRequest("p", 5, decoding=False)]) is None


# ---- scaling -------------------------------------------------------------------------------------------------
def test_scale_up_when_pooled_freeness_falls_below_the_threshold():
    # pooled: (600 + 400 - 0) / 100 = 10.0: not below 10
    a = inst("a", 0, running=50, free=600)
    b = inst("b", 1, running=50, free=400)
    _, delta, _ = scale(NO_WM, LlumnixState(), snap(a, b))
    assert delta == 0
    # one block less: 9.99 < 10 → one instance (the phantom has infinite blocks: never more than one)
    b2 = inst("b", 1, running=50, free=399)
    state, delta, reason = scale(NO_WM, LlumnixState(), snap(a, b2))
    assert delta == 1 and "9.99" in reason and state.checks == 1
    assert state.last_up == pytest.approx(9.99)
    # at the GPU budget nothing is added
    _, delta, _ = scale(NO_WM, LlumnixState(), snap(a, b2, budget=2))
    assert delta == 0
    # loading instances are not yet known to the scheduler: the pooled freeness ignores them
    _, delta, _ = scale(NO_WM, LlumnixState(), snap(a, b2, inst("c", 2, state="loading")))
    assert delta == 1


def test_scale_down_pools_the_last_instance_into_the_others_instead_of_dropping_it():
    a = inst("a", 0, running=1, free=900)  # light
    b = inst("b", 1, running=9, free=500, waiting=2, waiting_blocks=50)  # the last: 500 blocks used
    # Dropping b (and its requests) would leave a alone at 900 blocks/request > 60: remove an instance.
    assert freeness(NO_WM, a) > NO_WM.scale_down_threshold
    # Upstream pools b's 11 requests and its used + waiting blocks into a: (900 + 500 - 1000 - 50) / 12 ≈ 29.2.
    state, delta, _ = scale(NO_WM, LlumnixState(), snap(a, b))
    assert delta == 0
    assert state.last_down == pytest.approx((900 + 500 - 1000 - 50) / 12)
    # b almost idle: (900 + 990 - 1000) / 2 = 445 > 60 → remove one
    _, delta, reason = scale(NO_WM, LlumnixState(), snap(a, inst("b", 1, running=1, free=990)))
    assert delta == -1 and "445" in reason


def test_scale_down_removes_the_newest_instance_and_floors_free_blocks_at_zero():
    heavy = inst("h", 0, running=9, free=100)  # 900 blocks used
    light = inst("l", 1, running=1, free=900)
    # newest = light (order 1): (100 + 900 - 1000) / 10 = 0 → keep
    s, delta, _ = scale(NO_WM, LlumnixState(), snap(heavy, light))
    assert delta == 0 and s.last_down == 0
    # newest = heavy (order 1): (900 + 100 - 1000) / 10 = 0 as well; make the newest heavier than the rest's room
    heavier = inst("h", 1, running=9, free=0)
    s, delta, _ = scale(NO_WM, LlumnixState(), snap(inst("l", 0, running=1, free=900), heavier))
    assert delta == 0 and s.last_down == 0  # 900 - 1000 < 0 floored at 0
    # the order, not the position in the snapshot, picks the instance removed
    lightest_last = snap(inst("l", 1, running=1, free=999), inst("h", 0, running=1, free=200))
    s, delta, _ = scale(NO_WM, LlumnixState(), lightest_last)
    assert s.last_down == pytest.approx((999 + 200 - 1000) / 2) and delta == -1


def test_idle_fleet_scales_down_but_never_below_one_instance():
    a, b = inst("a", 0), inst("b", 1)
    state, delta, _ = scale(NO_WM, LlumnixState(), snap(a, b))
    assert delta == -1 and state.last_up == math.inf and state.last_down == math.inf
    assert scale(NO_WM, LlumnixState(), snap(a))[1] == 0
    assert scale(NO_WM, LlumnixState(), snap())[1] == 0


def test_gateway_queue_counts_as_waiting_demand():
    a = inst("a", 0, running=10, free=800, waiting=2, waiting_blocks=40)  # 20 blocks per waiting request
    cfg = NO_WM
    assert gateway_demand(cfg, snap(a)) == (0, 0.0)
    assert gateway_demand(cfg, snap(a, gateway_interactive=3, gateway_batch=7)) == (10, 200.0)
    # alone: (800 - 40) / 12 ≈ 63 (no scale-up); with 30 queued requests of 20 blocks: (800 - 640) / 42 ≈ 3.8
    assert scale(cfg, LlumnixState(), snap(a))[1] == 0
    assert scale(cfg, LlumnixState(), snap(a, gateway_batch=30))[1] == 1
    # no engine-waiting request to estimate from: the configured mean prompt (320 tokens = 20 blocks of 16)
    idle_queue = snap(inst("a", 0, running=10, free=800), gateway_batch=4)
    assert gateway_demand(LlumnixConfig(gateway_prompt_tokens=320.0), idle_queue) == (4, 80.0)
    assert gateway_demand(LlumnixConfig(), idle_queue) == (4, 0.0)


def test_config_rejects_inverted_thresholds_and_unknown_policies():
    with pytest.raises(ValueError, match="scale_down_threshold"):
        LlumnixConfig(scale_up_threshold=60, scale_down_threshold=10).validate()
    with pytest.raises(ValueError, match="scaling_policy"):
        LlumnixConfig(scaling_policy="mean").validate()
    with pytest.raises(ValueError, match="request_migration_policy"):
        LlumnixConfig(request_migration_policy="XX").validate()
    assert LlumnixConfig().validate().scale_up_threshold == 10.0


def test_max_load_policy_scales_on_the_least_free_instance():
    cfg = LlumnixConfig(watermark_fraction=0.0, scaling_policy="max_load")
    a = inst("a", 0, running=1, free=900)  # 900
    b = inst("b", 1, running=100, free=500)  # 5 < 10 → up under max_load; pooled (avg_load) 1400/101 ≈ 13.9 → no
    assert scale(cfg, LlumnixState(), snap(a, b))[1] == 1
    assert scale(NO_WM, LlumnixState(), snap(a, b))[1] == 0

