"""Unit tests of the global scaling policy (services/global_scaler/policy.py) with a fake clock."""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import pytest
from scipy.stats import norm

from services.global_scaler.policy import (
    ArrivalRates,
    ArrivalStats,
    EngineLoad,
    GroupView,
    InstanceView,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    ScalerInputs,
    decide,
    engine_load,
    group_view,
    group_views,
    hold_in_window,
    measured_arrival_cv,
    observe,
    overprovisioning_theta,
    smooth_prompt,
    ttft_concurrency,
    with_limits,
)
from services.router.routing import EngineStatsView
from services.slo import slo_met

CFG = PolicyConfig(model_load_time_s=60.0, scale_down_delay_s=30.0, default_instance_concurrency=50.0).validate()


def fleet(interactive=1, mixed=0, batch=0, cap=50, mixed_busy=0) -> list[InstanceView]:
    out = [InstanceView(f"i{k}", "interactive", cap) for k in range(interactive)]
    out += [InstanceView(f"m{k}", "mixed", cap, interactive_running=mixed_busy) for k in range(mixed)]
    out += [InstanceView(f"b{k}", "batch", 256) for k in range(batch)]
    return out


def test_theta_follows_burstiness_and_load():
    z = norm.ppf(0.99)
    # 10 req/s over a 60 s load time, Gamma arrivals with CV 3: Θ = z·CV/sqrt(λL).
    assert overprovisioning_theta(CFG, ArrivalStats(10.0, 3.0)) == pytest.approx(z * 3 / math.sqrt(600))
    # Smooth heavy traffic needs less headroom than bursty light traffic; bounded both ways.
    smooth = overprovisioning_theta(CFG, ArrivalStats(100.0, 1.0))
    bursty = overprovisioning_theta(CFG, ArrivalStats(0.1, 4.0))
    assert smooth == CFG.theta_min < bursty == CFG.theta_max
    assert overprovisioning_theta(CFG, ArrivalStats(0.0, 1.0)) == CFG.theta_max


def test_interactive_demand_and_mixed_headroom():
    arrivals = ArrivalStats(rate_per_s=10.0, cv=3.0, inflight=200.0)
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(4), arrivals))
    theta = overprovisioning_theta(CFG, arrivals)
    assert d.theta == pytest.approx(theta)
    assert d.desired("interactive") == 4  # 200 concurrent / 50 per instance
    assert d.desired("mixed") == math.ceil(200 * (1 + theta) / 50) - 4
    assert d.desired("batch") == 0 and d.batch_backpressure == -1.0
    assert "demand 200.0" in d.roles["interactive"].reason and "Θ=" in d.roles["mixed"].reason
    # The per-instance concurrency is what the local autoscalers settled on, not the default (the fleet of 4 it
    # found is held through the first delay window, then 2 apply).
    _, d2 = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(4, cap=100), arrivals))
    assert d2.roles["interactive"].wanted == 2 and d2.desired("interactive") == 4


def test_a_scaler_that_just_started_holds_the_fleet_it_found_for_one_window():
    # A new leader (or a restarted scaler) has no history: what it finds counts as the window's first count,
    # so a quiet first interval does not tear down the fleet before one window of observations.
    quiet = ArrivalStats(1.0, 1.0, inflight=10.0)
    st, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(6), quiet))
    assert d.desired("interactive") == 6 and "delay window" in d.roles["interactive"].reason
    st, d = decide(CFG, st, ScalerInputs(CFG.delay_s - 1, fleet(6), quiet))
    assert d.desired("interactive") == 6
    st, d = decide(CFG, st, ScalerInputs(CFG.delay_s + 1, fleet(6), quiet))
    assert d.desired("interactive") == CFG.limit("interactive").min_instances == 1
    # Growth is never held back.
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1), ArrivalStats(1.0, 1.0, inflight=400.0)))
    assert d.desired("interactive") == 8


def test_headroom_outlasts_a_burst_for_the_arrival_window():
    # A burst needs 6 instances, then nothing arrives. Θ·N alone would keep no headroom once the delay window
    # passes; the window's mean need and rate (N̄ = 6/21, λ̄ = 10/21 per s, CV 3) keep one MIXED instance up for
    # the next burst until the burst leaves the 300-s window.
    st, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(6), ArrivalStats(10.0, 3.0, inflight=300.0)))
    assert d.desired("interactive") == 6
    quiet = ArrivalStats(0.0, 3.0, inflight=0.0)
    for t in range(5, 105, 5):
        st, d = decide(CFG, st, ScalerInputs(float(t), fleet(1, mixed=1), quiet))
    assert d.desired("mixed") == 1 and "kept from the last 300 s" in d.roles["mixed"].reason
    assert d.roles["mixed"].wanted == pytest.approx(6 / 21 * overprovisioning_theta(CFG, ArrivalStats(10 / 21, 3.0)))
    for t in range(105, 405, 5):
        st, d = decide(CFG, st, ScalerInputs(float(t), fleet(1, mixed=1), quiet))
    assert d.desired("mixed") == 0


def test_the_fraction_goes_to_mixed_instances_only_when_one_holds_it():
    # Nine INTERACTIVE instances at 50 and a MIXED one at 50: C = 50, N = 115 / 50 = 2.3, and the 0.3 × 50 = 15
    # requests fit the MIXED instance: 2 INTERACTIVE. With the MIXED cap at 10 (batch prefills keep it small),
    # C = 46, N = 2.5, and 23 requests would queue there: 3 INTERACTIVE.
    arrivals = ArrivalStats(10.0, 1.0, inflight=115.0)
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, [*fleet(9), InstanceView("m0", "mixed", 50)], arrivals))
    assert d.roles["interactive"].wanted == 2
    small = [*fleet(9), InstanceView("m0", "mixed", 10)]
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, small, arrivals))
    assert d.inputs["instance_concurrency"] == 46 and d.roles["interactive"].wanted == 3
    # A whole number of instances' worth (138 / 46 = 3) leaves nothing to the MIXED instance.
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, small, ArrivalStats(10.0, 1.0, inflight=138.0)))
    assert d.roles["interactive"].wanted == 3


def test_the_interactive_minimum_serves_the_need_and_mixed_instances_hold_only_the_headroom():
    # N = 48 / 50 = 0.96 < 1: the one INTERACTIVE instance the minimum keeps serves it, so MIXED instances hold
    # the headroom H = Θ·N (Θ = 0.1 at 10 req/s, CV 1) alone: 1 + 1 instances, not 1 + ceil(N + H) = 1 + 2.
    arrivals = ArrivalStats(rate_per_s=10.0, cv=1.0, inflight=48.0)
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1), arrivals))
    head = 0.96 * overprovisioning_theta(CFG, arrivals)
    assert d.roles["mixed"].wanted == pytest.approx(head) and d.desired("mixed") == 1
    assert d.desired("interactive") == 1 and "INTERACTIVE instance(s) of the minimum" in d.roles["mixed"].reason
    # From N = 1.2 up the split is floor(N) INTERACTIVE and the rest plus H MIXED, as without a minimum.
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1), dataclasses.replace(arrivals, inflight=60.0)))
    assert d.roles["mixed"].wanted == pytest.approx(1.2 + 1.2 * overprovisioning_theta(CFG, arrivals) - 1)


def test_batch_backpressure_adds_capacity_in_proportion():
    groups = [GroupView("m/1", 500, wait_p95_s=600.0, deadline_s=300.0),  # needs 2x the capacity
              GroupView("m/2", 100, wait_p95_s=200.0, deadline_s=3600.0)]
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1, batch=2), groups=groups))
    assert d.batch_backpressure == pytest.approx(1.0)
    assert d.desired("batch") == math.ceil(2 * 2.0 * (1 + CFG.batch_margin))  # 4.4 → 5
    assert "worst group m/1" in d.roles["batch"].reason
    # Comfortable slack: fewer instances suffice (applied once the delay window has passed).
    relaxed = [GroupView("m/1", 50, wait_p95_s=60.0, deadline_s=3600.0)]
    st = PolicyState()
    for t in (0.0, 10.0, 20.0, 31.0, 62.0):
        st, d = decide(CFG, st, ScalerInputs(t, fleet(1, batch=4), groups=relaxed))
    assert d.batch_backpressure < 0 and d.desired("batch") == 1


def test_first_batch_instance_and_past_deadline_groups():
    late = [GroupView("m/0", 100, wait_p95_s=120.0, deadline_s=-1.0)]
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1), groups=late))
    assert d.desired("batch") == 1 and "no batch capacity" in d.roles["batch"].reason
    # The need is ceil(max_ratio · 1.1) = 11 instances; one step adds at most max(2×, +4): 1 → 5.
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1, batch=1), groups=late))
    assert d.roles["batch"].wanted == pytest.approx(CFG.max_ratio * (1 + CFG.batch_margin) - 0)
    assert d.desired("batch") == 5 and "paced" in d.roles["batch"].reason
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1, batch=8), groups=late))
    assert d.desired("batch") == 16
    inf = [GroupView("m/0", 10, wait_p95_s=math.inf, deadline_s=100.0)]
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1, batch=1), groups=inf))
    assert d.desired("batch") == 5
    # A late group that what serves now drains before a new instance could load (wait ≤ the 60 s load time):
    # it counts as ratio 1 (the capacity now and its margin, ceil(1.1) = 2), not max_ratio (5, paced).
    tail = [GroupView("m/0", 10, wait_p95_s=20.0, deadline_s=-1.0)]
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1, batch=1), groups=tail))
    assert d.desired("batch") == 2 and d.batch_backpressure == pytest.approx(0.0)


def test_no_batch_instance_added_while_earlier_ones_start():
    late = [GroupView("m/0", 100, wait_p95_s=120.0, deadline_s=-1.0)]
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1, batch=1), groups=late, pending={"batch": 3}))
    assert d.desired("batch") == 4 and "still starting" in d.roles["batch"].reason


def test_instance_concurrency_counts_what_a_saturated_instance_runs():
    # Cap 256 but 40 running with 60 waiting (KV-bound), admitting 4/s: the queue outlasts the 10 s TTFT SLO
    # (60 > 4 × 10), so the instance holds 40.
    inst = [InstanceView("i0", "interactive", max_batch_size=256, num_running=40, num_waiting=60, admit_rate_per_s=4.0)]
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, inst, ArrivalStats(10.0, 1.0, 100.0)))
    assert d.inputs["instance_concurrency"] == 40
    # Running 40 / 40 = 1 instance by concurrency; 10 arrivals/s / 4 admitted/s = 2.5 by admission rate.
    assert d.inputs["demand_requests"] == 40 and d.inputs["interactive_need_instances"] == pytest.approx(2.5)
    # 2.5 instances' worth: 2 INTERACTIVE, the half plus the headroom on MIXED.
    assert d.desired("interactive") == 2 and d.desired("mixed") == math.ceil(2.5 * (1 + d.theta)) - 2 >= 1


def test_admission_rate_sizes_a_prefill_bound_fleet_and_a_backlog_is_not_concurrency():
    # Long prompts: cap 1024, 10 running, 300 waiting for the token budget, admitting 5/s; 40 arrivals/s.
    # Θ = theta_min (0.1) at this rate and CV. By admission rate the arrivals need 40 / 5 = 8 instances; the
    # backlog of 300 is not 30 instances' worth of concurrency (10 per instance): no instance started now could
    # take it over.
    inst = [InstanceView("m0", "mixed", max_batch_size=1024, num_running=10, num_waiting=300, admit_rate_per_s=5.0)]
    arrivals = ArrivalStats(40.0, 0.5, inflight=310.0)
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, inst, arrivals))
    assert d.theta == CFG.theta_min and d.inputs["admit_rate_per_instance"] == 5.0
    assert d.inputs["demand_requests"] == 10 and d.inputs["interactive_need_instances"] == pytest.approx(8.0)
    assert (d.desired("interactive"), d.desired("mixed")) == (8, 1)  # 8 whole; ceil(8 × 1.1) − 8 on MIXED
    assert "admitted per instance" in d.roles["interactive"].reason
    # No admission rate known yet: the queue counts in the demand, but it has not stood through an interval, so it
    # is no bound on the instance (a queue behind one long prefill is gone by the next sample): 310 / 1024.
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, [dataclasses.replace(inst[0], admit_rate_per_s=math.nan)],
                                                    arrivals))
    assert d.inputs["instance_concurrency"] == 1024
    assert d.inputs["interactive_need_instances"] == pytest.approx(310 / 1024)


def test_observe_reports_an_admission_rate_only_while_a_queue_stands():
    samples: dict = {}
    observe(0.0, [EngineLoad("i0", "interactive", 1024, 10, 50, finished_requests_total=100)], samples, 1.0)
    # 5 s later: 20 finished, running 10 → 15, a queue of 40 still waits: (20 + 5) / 5 = 5 admitted per second.
    inp = observe(5.0, [EngineLoad("i0", "interactive", 1024, 15, 40, finished_requests_total=120)], samples, 1.0)
    assert inp.instances[0].admit_rate_per_s == pytest.approx(5.0) and inp.instances[0].interactive_waiting == 40
    # The queue has drained: the instance was not admitting as fast as it could, so no rate.
    inp = observe(10.0, [EngineLoad("i0", "interactive", 1024, 12, 1, finished_requests_total=150)], samples, 1.0)
    assert math.isnan(inp.instances[0].admit_rate_per_s)


def test_an_interval_admitting_a_request_or_two_gives_no_admission_rate():
    # A queue of 10 stands at a cap-bound instance that admits 2 in 5 s: 0.4/s would stand for minutes as the
    # fleet's rate and ask for λ / 0.4 instances; two admissions are too few to tell a rate from noise.
    samples: dict = {}
    observe(0.0, [EngineLoad("m0", "mixed", 12, 12, 10, finished_requests_total=50)], samples, 1.0)
    inp = observe(5.0, [EngineLoad("m0", "mixed", 12, 12, 10, finished_requests_total=52)], samples, 1.0)
    assert math.isnan(inp.instances[0].admit_rate_per_s)
    inp = observe(10.0, [EngineLoad("m0", "mixed", 12, 12, 10, finished_requests_total=58)], samples, 1.0)
    assert inp.instances[0].admit_rate_per_s == pytest.approx(6 / 5)


def test_a_queue_admitted_within_the_ttft_slo_is_not_a_concurrency_bound():
    # 8 running below a cap of 1024 with 30 waiting, admitting 6/s: the queue is gone in 5 s, within the 10 s
    # TTFT SLO (prompts waiting for the token budget), so the cap stands, not the 8 running.
    st = PolicyState()
    burst = InstanceView("i0", "interactive", max_batch_size=1024, num_running=8, num_waiting=30, admit_rate_per_s=6.0)
    st, d = decide(CFG, st, ScalerInputs(0.0, [burst], ArrivalStats(1.0, 1.0, 38.0)))
    assert d.inputs["instance_concurrency"] == 1024
    # A queue of 100 outlasts the SLO at that rate (100 > 60): then the running count is what it holds.
    st, d = decide(CFG, st, ScalerInputs(5.0, [dataclasses.replace(burst, num_waiting=100)], ArrivalStats(1.0, 1.0, 108.0)))
    assert d.inputs["instance_concurrency"] == 8


def test_a_saturated_count_is_forgotten_once_the_cap_grows():
    # A fresh instance at its initial cap of 16 runs 2 requests with 10 waiting through an interval (its 16-token
    # budget binds), admitting 0.5/s: the queue outlasts the 10-s TTFT SLO.
    st = PolicyState()
    ramping = [InstanceView("i0", "mixed", max_batch_size=16, num_running=2, num_waiting=10, admit_rate_per_s=0.5)]
    st, d = decide(CFG, st, ScalerInputs(0.0, ramping, ArrivalStats(1.0, 1.0, 20.0)))
    assert d.inputs["instance_concurrency"] == 2
    # Same cap, nothing waiting a moment later: the count still stands (the cap's worth is not free room).
    st, d = decide(CFG, st, ScalerInputs(5.0, [InstanceView("i0", "mixed", max_batch_size=16, num_running=2)],
                                          ArrivalStats(1.0, 1.0, 20.0)))
    assert d.inputs["instance_concurrency"] == 2
    # An ordinary move of the cap (within 2x): the count still stands.
    st, d = decide(CFG, st, ScalerInputs(7.0, [InstanceView("i0", "mixed", max_batch_size=24, num_running=2)],
                                          ArrivalStats(1.0, 1.0, 20.0)))
    assert d.inputs["instance_concurrency"] == 2
    # The local autoscaler has grown the cap to 400 and nothing waits: the count was a ramp-up, not a capacity.
    st, d = decide(CFG, st, ScalerInputs(10.0, [InstanceView("i0", "mixed", max_batch_size=400, num_running=30)],
                                          ArrivalStats(1.0, 1.0, 20.0)))
    assert d.inputs["instance_concurrency"] == 400


def test_the_ttft_bound_caps_what_an_instance_is_sized_for():
    # Chat SLO (T = 2 s), prompts of 1,000 tokens, 10,000 prompt tokens/s: an instance prefills 20 requests in one
    # TTFT SLO; with the burst factor 2 it is sized for 40, whatever its cap of 400 (the mean-ITL cap).
    cfg = dataclasses.replace(CFG, interactive_ttft_slo_s=2.0)
    arrivals = ArrivalStats(5.0, 1.0, inflight=200.0, prompt_tokens_mean=1000.0)
    assert ttft_concurrency(cfg, arrivals) == pytest.approx(2 * 10_000 * 2.0 / 1000)
    _, d = decide(cfg, PolicyState(), ScalerInputs(0.0, fleet(2, cap=400), arrivals))
    assert d.inputs["instance_concurrency"] == pytest.approx(40.0) and d.inputs["demand_requests"] == 200
    assert d.inputs["interactive_need_instances"] == pytest.approx(5.0) and "TTFT bound" in d.roles["interactive"].reason
    # Prompts twice as long halve it; at the standard 10-s TTFT SLO the cap binds first.
    longer = dataclasses.replace(arrivals, prompt_tokens_mean=2000.0)
    _, d = decide(cfg, PolicyState(), ScalerInputs(0.0, fleet(2, cap=400), longer))
    assert d.inputs["instance_concurrency"] == pytest.approx(20.0)
    _, d = decide(dataclasses.replace(cfg, interactive_ttft_slo_s=10.0), PolicyState(),
                  ScalerInputs(0.0, fleet(2, cap=150), arrivals))
    assert d.inputs["instance_concurrency"] == 150 and "TTFT bound" not in d.roles["interactive"].reason
    # No prompt seen yet: no bound.
    assert ttft_concurrency(cfg, ArrivalStats(5.0, 1.0, 200.0)) == math.inf


def test_a_fleet_that_keeps_up_stays_sized_for_what_it_prefills():
    # 4 instances keep up with 4.2 requests/s of 5,200-token prompts: nothing waits, so no admission rate is
    # measured, and 28 running requests over C = 38.5 (the TTFT bound at T = 10 s) read as 0.73 instances. Prefilling
    # 4.2 × 5,200 tokens/s at 10,000 tokens/s per instance keeps 2.18 instances busy: N may not fall below that.
    cfg = dataclasses.replace(CFG, interactive_ttft_slo_s=10.0)
    arrivals = ArrivalStats(4.2, 1.0, inflight=28.0, prompt_tokens_mean=5200.0)
    st, d = decide(cfg, PolicyState(), ScalerInputs(0.0, fleet(4, cap=1024), arrivals))
    assert d.inputs["demand_requests"] / d.inputs["instance_concurrency"] == pytest.approx(28 / 38.46, rel=1e-3)
    assert d.inputs["prefill_need_instances"] == pytest.approx(4.2 * 5200 / 10_000)
    assert d.inputs["interactive_need_instances"] == pytest.approx(2.184)
    assert "prefilling 4.20/s" in d.roles["interactive"].reason
    # The rate is the mean over the arrival window: one quiet interval after a busy one does not halve it.
    _, d = decide(cfg, st, ScalerInputs(5.0, fleet(4, cap=1024), dataclasses.replace(arrivals, rate_per_s=2.1)))
    assert d.inputs["prefill_need_instances"] == pytest.approx((4.2 + 2.1) / 2 * 5200 / 10_000, rel=1e-3)
    # No prompt seen yet: no prefill term.
    _, d = decide(cfg, PolicyState(), ScalerInputs(0.0, fleet(4, cap=1024), ArrivalStats(4.2, 1.0, 28.0)))
    assert d.inputs["prefill_need_instances"] == 0


def test_the_mean_prompt_is_smoothed_over_the_prompt_window():
    cfg = dataclasses.replace(CFG, prompt_window_s=300.0)
    last = smooth_prompt(cfg, (-math.inf, math.nan), 0.0, 1000.0)
    assert last == (0.0, 1000.0)  # the first one seen is taken as it is
    # 5 s later a 10-s engine window of a few long prompts reads 3,000: the estimate moves 1/60 of the way.
    t, p = smooth_prompt(cfg, last, 5.0, 3000.0)
    assert t == 5.0 and p == pytest.approx(1000.0 + (1 - math.exp(-5 / 300)) * 2000.0)
    # Nothing seen (no interactive request anywhere): the last estimate stands.
    assert smooth_prompt(cfg, (t, p), 10.0, math.nan) == (t, p)
    # decide() carries it in the state and reports it.
    st, d = decide(cfg, PolicyState(), ScalerInputs(0.0, fleet(1), ArrivalStats(1.0, 1.0, 1.0, 1000.0)))
    st, d = decide(cfg, st, ScalerInputs(5.0, fleet(1), ArrivalStats(1.0, 1.0, 1.0, 3000.0)))
    assert st.prompt_tokens == (5.0, pytest.approx(p)) and d.inputs["prompt_tokens_mean"] == pytest.approx(p)


def test_observe_takes_the_mean_prompt_over_interactive_and_mixed_instances():
    loads = [EngineLoad("i0", "interactive", 64, 4, 0, prompt_tokens_mean=1000.0),
             EngineLoad("m0", "mixed", 64, 4, 0, prompt_tokens_mean=3000.0),
             EngineLoad("i1", "interactive", 64, 0, 0),  # saw no interactive request lately
             EngineLoad("b0", "batch", 256, 100, 0, prompt_tokens_mean=9000.0)]
    assert observe(0.0, loads, {}, 1.0).arrivals.prompt_tokens_mean == pytest.approx(2000.0)
    assert math.isnan(observe(0.0, loads[2:], {}, 1.0).arrivals.prompt_tokens_mean)
    # The engine stats field reaches the scaler's view.
    stats = EngineStatsView(max_batch_size=64, num_running=4, interactive_prompt_tokens_mean=1234.0)
    assert engine_load("i0", "interactive", stats).prompt_tokens_mean == 1234.0


def test_idle_mixed_capacity_is_lent_to_batch_work():
    groups = [GroupView("m/1", 100, wait_p95_s=400.0, deadline_s=200.0)]  # ratio 2
    # Two idle MIXED instances lend 2 instances' worth: need 2·2·1.1 = 4.4, minus 2 lent → 3 BATCH.
    _, idle = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1, mixed=2, batch=0), groups=groups))
    assert idle.inputs["mixed_lend_instances"] == pytest.approx(2.0)
    assert idle.desired("batch") == 3
    # Busy MIXED instances lend nothing: the batch work needs its own instances.
    _, busy = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1, mixed=2, batch=2, mixed_busy=50), groups=groups))
    assert busy.inputs["mixed_lend_instances"] == 0 and busy.desired("batch") == 5


def test_a_mixed_instance_lends_no_more_than_the_batch_work_it_runs():
    groups = [GroupView("m/1", 100, wait_p95_s=400.0, deadline_s=200.0)]  # ratio 2
    batch = [InstanceView(f"b{k}", "batch", 1024, num_running=140) for k in range(2)]
    # 30 interactive requests on a cap of 600 leave it 95% idle from interactive work, but it runs 14 batch
    # requests where a BATCH instance runs 140: it lends 0.1 of an instance, not 0.95.
    carrying = InstanceView("m0", "mixed", 600, num_running=44, interactive_running=30)
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, [InstanceView("i0", "interactive", 600), carrying, *batch],
                                                   groups=groups))
    assert d.inputs["mixed_lend_instances"] == pytest.approx(0.1)
    assert d.inputs["batch_capacity_instances"] == pytest.approx(2.1)
    # Full of batch work (300 running, 20 of them interactive), it lends its idle share, as before.
    full = InstanceView("m0", "mixed", 600, num_running=300, interactive_running=20)
    _, d = decide(CFG, PolicyState(), ScalerInputs(0.0, [InstanceView("i0", "interactive", 600), full, *batch],
                                                   groups=groups))
    assert d.inputs["mixed_lend_instances"] == pytest.approx(1 - 20 / 600)


def test_scale_down_waits_for_the_delay_window_but_scale_up_is_immediate():
    st = PolicyState()
    busy = ArrivalStats(10.0, 1.0, inflight=400.0)
    quiet = ArrivalStats(10.0, 1.0, inflight=50.0)
    st, d = decide(CFG, st, ScalerInputs(0.0, fleet(1), busy))
    assert d.desired("interactive") == 8  # up at once
    for t in (5.0, 15.0, 25.0):
        st, d = decide(CFG, st, ScalerInputs(t, fleet(8), quiet))
        assert d.desired("interactive") == 8 and "delay window" in d.roles["interactive"].reason
    # 31 s after the last busy decision the window holds only quiet ones: down.
    st, d = decide(CFG, st, ScalerInputs(31.0, fleet(8), quiet))
    assert d.desired("interactive") == 1


def test_the_default_delay_window_is_twice_the_model_load_time():
    cfg = dataclasses.replace(CFG, scale_down_delay_s=None, model_load_time_s=20.0).validate()
    assert cfg.delay_s == 40.0 and PolicyConfig().delay_s == 120.0  # the service's default load time is 60 s
    busy = ArrivalStats(10.0, 1.0, inflight=400.0)
    quiet = ArrivalStats(10.0, 1.0, inflight=50.0)
    st, d = decide(cfg, PolicyState(), ScalerInputs(0.0, fleet(1), busy))
    assert d.desired("interactive") > 1
    up = d.desired("interactive")
    st, d = decide(cfg, st, ScalerInputs(39.0, fleet(up), quiet))
    assert d.desired("interactive") == up and "40 s delay window" in d.roles["interactive"].reason
    st, d = decide(cfg, st, ScalerInputs(41.0, fleet(up), quiet))
    assert d.desired("interactive") < up


def test_interactive_and_mixed_instances_cover_each_others_shortfall():
    arrivals = lambda d: ArrivalStats(10.0, 1.0, inflight=d)  # noqa: E731 - Θ = theta_min (0.1) at this rate
    st0, d = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1, 2), arrivals(95.0)))
    assert (d.desired("interactive"), d.desired("mixed")) == (1, 2)  # floor(95/50); ceil(95·1.1/50) − 1
    # The split of the same demand moves (100: 2 + 1) while the delay window keeps the second MIXED instance:
    # that instance covers the INTERACTIVE growth instead of a third one starting.
    st = dataclasses.replace(st0, history={r: type(h)(h) for r, h in st0.history.items()})
    st, d = decide(CFG, st, ScalerInputs(5.0, fleet(1, 2), arrivals(100.0)))
    assert (d.desired("interactive"), d.desired("mixed")) == (1, 2)
    assert d.roles["interactive"].code == "other_role_covers" and "1 of it covered by MIXED" in d.roles["interactive"].reason
    # Once the window lets the surplus go, the roles swap: 2 + 1.
    st, d = decide(CFG, st, ScalerInputs(36.0, fleet(1, 2), arrivals(100.0)))
    assert (d.desired("interactive"), d.desired("mixed")) == (2, 1)
    # Growth beyond the surplus still starts instances (160: 3 + 1 wanted, one covered by the kept MIXED one).
    st = dataclasses.replace(st0, history={r: type(h)(h) for r, h in st0.history.items()})
    st, d = decide(CFG, st, ScalerInputs(5.0, fleet(1, 2), arrivals(160.0)))
    assert (d.desired("interactive"), d.desired("mixed")) == (2, 2)
    # ... but while demand grows, a kept instance that is still starting is left to the growth.
    st = dataclasses.replace(st0, history={r: type(h)(h) for r, h in st0.history.items()})
    st, d = decide(CFG, st, ScalerInputs(5.0, fleet(1, 1), arrivals(160.0), pending={"mixed": 1}))
    assert (d.desired("interactive"), d.desired("mixed")) == (3, 2)
    # A role minimum is kept even when the other role's surplus could cover it.
    lim = with_limits(CFG, interactive=(2, 64))
    st, _ = decide(lim, PolicyState(), ScalerInputs(0.0, fleet(2, 2), arrivals(95.0)))
    _, d = decide(lim, st, ScalerInputs(5.0, fleet(1, 2), arrivals(100.0)))
    assert d.desired("interactive") == 2


def test_the_delay_window_keeps_the_interactive_roles_largest_total_not_each_roles_largest():
    # The window wanted 3 I + 1 M at t = 0 and wants 2 I + 2 M now (145 in flight, C = 50: N = 2.9, Θ = 0.1); the
    # fleet has 3 + 2. Each role's own maximum would keep 3 + 2, but no decision wanted more than 4 together: one
    # goes, MIXED first but not below what is wanted now (2), so the third INTERACTIVE one.
    hist = {"interactive": ((0.0, 3),), "mixed": ((0.0, 1),), "batch": ((0.0, 0),)}
    _, d = decide(CFG, PolicyState(history=hist), ScalerInputs(5.0, fleet(3, 2), ArrivalStats(10.0, 1.0, inflight=145.0)))
    assert (d.desired("interactive"), d.desired("mixed")) == (2, 2)
    assert d.roles["interactive"].code == "scale_down_delay"
    assert "INTERACTIVE + MIXED at once" in d.roles["interactive"].reason
    # Wanted 3 + 1 now too (155 in flight: N = 3.1), the surplus MIXED instance goes.
    _, d = decide(CFG, PolicyState(history=hist), ScalerInputs(5.0, fleet(3, 2), ArrivalStats(10.0, 1.0, inflight=155.0)))
    assert (d.desired("interactive"), d.desired("mixed")) == (3, 1)
    # A window that did want 5 together keeps 5.
    hist = {"interactive": ((0.0, 3),), "mixed": ((0.0, 2),), "batch": ((0.0, 0),)}
    _, d = decide(CFG, PolicyState(history=hist), ScalerInputs(5.0, fleet(3, 2), ArrivalStats(10.0, 1.0, inflight=145.0)))
    assert (d.desired("interactive"), d.desired("mixed")) == (3, 2)


def test_limits_and_gpu_budget_cut_batch_first():
    cfg = dataclasses.replace(with_limits(CFG, interactive=(2, 10), mixed=(0, 3), batch=(0, 20)), gpu_budget=12).validate()
    groups = [GroupView("m/1", 1000, wait_p95_s=3000.0, deadline_s=300.0)]
    _, d = decide(cfg, PolicyState(), ScalerInputs(0.0, fleet(2, batch=4), ArrivalStats(5.0, 2.0, 300.0), groups))
    theta = overprovisioning_theta(cfg, ArrivalStats(5.0, 2.0))
    mixed = math.ceil(300 * (1 + theta) / 50) - 6
    assert d.desired("interactive") == 6 and d.desired("mixed") == mixed == 2
    # Batch wanted 4·10·1.1 = 44 instances; the 12-GPU budget leaves it what INTERACTIVE and MIXED do not use.
    assert d.roles["batch"].wanted == pytest.approx(44.0)
    assert d.desired("batch") == 12 - 6 - mixed and "GPU budget" in d.roles["batch"].reason
    # Minimums hold with no load at all.
    _, d = decide(cfg, PolicyState(), ScalerInputs(0.0, []))
    assert d.desired("interactive") == 2 and d.desired("mixed") == 0 and d.desired("batch") == 0


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"interval_s": 0}, "interval_s"),
    ({"scale_down_delay_s": -1}, "scale_down_delay_s"),
    ({"limits": {"interactive": RoleLimits(5, 2)}}, "min_instances <= max_instances"),
    ({"limits": {"gpu": RoleLimits(0, 2)}}, "unknown role"),
    ({"gpu_budget": 1, "limits": {"interactive": RoleLimits(2, 4)}}, "budget"),
    ({"theta_quantile": 1.0}, "theta_quantile"),
])
def test_invalid_config_is_rejected_with_a_clear_message(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        dataclasses.replace(PolicyConfig(), **changes).validate()


def test_batch_work_in_service_keeps_its_instances_when_nothing_waits():
    serving = [GroupView("m/1", 0, wait_p95_s=0.0, deadline_s=600.0, leased=5)]
    st = PolicyState()
    for t in (0.0, 40.0, 80.0):  # well past the 30 s delay window
        st, d = decide(CFG, st, ScalerInputs(t, fleet(1, batch=2), groups=serving))
        assert d.desired("batch") == 2 and "in service" in d.roles["batch"].reason
    # Once the work is done and nothing waits, the instances go (after the delay window).
    done = [GroupView("m/1", 0, wait_p95_s=0.0, deadline_s=600.0, leased=0)]
    for t in (90.0, 111.0):
        st, d = decide(CFG, st, ScalerInputs(t, fleet(1, batch=2), groups=done))
    assert d.desired("batch") == 0


def test_decide_returns_a_new_state_and_leaves_the_given_one_unchanged():
    st = PolicyState()
    inst = [InstanceView("i0", "interactive", max_batch_size=64, num_running=40, num_waiting=20, admit_rate_per_s=4.0)]
    st1, _ = decide(CFG, st, ScalerInputs(0.0, inst, ArrivalStats(10.0, 1.0, 60.0)))
    assert st == PolicyState() and st1 is not st
    assert st1.history["interactive"] and st1.admit_rate["i0"] == (0.0, 4.0)
    # The same state and inputs give the same decision (no hidden state).
    assert decide(CFG, st, ScalerInputs(0.0, inst, ArrivalStats(10.0, 1.0, 60.0)))[1] == \
        decide(CFG, st, ScalerInputs(0.0, inst, ArrivalStats(10.0, 1.0, 60.0)))[1]


def test_hold_in_window_raises_only_the_latest_count():
    st, _ = decide(CFG, PolicyState(), ScalerInputs(0.0, fleet(1)))
    held = hold_in_window(st, "interactive", 5)
    assert held.history["interactive"][-1] == (0.0, 5) and st.history["interactive"][-1] == (0.0, 1)
    assert hold_in_window(held, "interactive", 2) is held  # never lowers it
    assert hold_in_window(PolicyState(), "batch", 3) == PolicyState()  # nothing to hold yet


def test_observation_builders():
    stats = EngineStatsView(max_batch_size=64, num_running=10, num_waiting=2, finished_requests_total=7,
                            num_batch_requests=3, batch_finished_total=1)
    assert engine_load("m0", "mixed", stats) == EngineLoad("m0", "mixed", 64, 10, 2, 7, batch_requests=3,
                                                           batch_finished_total=1)
    assert engine_load("m0", "mixed", None) == EngineLoad("m0", "mixed", has_stats=False)
    assert group_view("g", 3, math.nan, 100.0, 1) == GroupView("g", 3, math.inf, 100.0, 1)
    G = collections.namedtuple("G", "group_id queued deadline_s leased")
    E = collections.namedtuple("E", "group_id last_wait_quantile_s")
    views = group_views([G("a", 0, 50.0, 4), G("b", 5, 60.0, 1)], [E("b", 12.0)])
    assert views == [GroupView("b", 5, 12.0, 60.0, 1), GroupView("a", 0, 0.0, 50.0, 4)]  # leased-only group kept


def _rates(arrivals: np.ndarray, interval_s: float = 5.0) -> list[tuple[float, float]]:
    """(time, arrivals/s) per interval, as the scaler observes them, for arrival times ``arrivals`` [s]."""
    edges = np.arange(0.0, float(arrivals[-1]) + interval_s, interval_s)
    counts, _ = np.histogram(arrivals, edges)
    return [(0.0, 0.0)] + [(float(t), c / interval_s) for t, c in zip(edges[1:], counts, strict=True)]


def test_measured_arrival_cv_from_the_observed_arrival_rates():
    rng = np.random.default_rng(0)
    for cv in (1.0, 4.0):  # Gamma renewal arrivals at 8/s: the dispersion of 5-s counts gives their CV back
        shape = 1 / cv**2
        t = np.cumsum(rng.gamma(shape, 1 / (8.0 * shape), 24_000))
        rates = _rates(t)
        assert measured_arrival_cv(rates, rates[-1][0], 1e9) == pytest.approx(cv, rel=0.2)
    smooth = [(5.0 * k, 8.0) for k in range(100)]  # the same count every interval
    assert measured_arrival_cv(smooth, 495.0, 300.0) == pytest.approx(0.0)
    assert measured_arrival_cv(smooth[:5], 20.0, 300.0) == 1.0  # too few intervals: Poisson
    assert measured_arrival_cv([(5.0 * k, 0.0) for k in range(100)], 495.0, 300.0) == 1.0  # no arrivals
    # Only the window counts: a burst long ago is forgotten.
    old_burst = [(5.0 * k, 80.0 if k == 3 else 8.0) for k in range(200)]
    assert measured_arrival_cv(old_burst, 995.0, 300.0) == pytest.approx(0.0)
    assert measured_arrival_cv(old_burst, 995.0, 1e9) > 2.0


def test_arrival_rates_keep_what_the_window_reads_and_a_fixed_cv_wins():
    rng = np.random.default_rng(1)
    t = np.cumsum(rng.gamma(1 / 16, 16 / 8.0, 12_000))  # Gamma CV 4 at 8/s
    rates, kept = _rates(t), ArrivalRates(300.0)
    for k, (now, r) in enumerate(rates):
        assert kept.cv(now) == measured_arrival_cv(rates[:k], now, 300.0)  # what the whole history would give
        kept.add(now, r)
    assert len(kept._rates) == 61  # 60 intervals of 5 s in the window, plus the start of the first
    assert ArrivalRates(300.0, fixed_cv=2.5).cv(0.0) == 2.5


def test_slo_met_rule():
    assert slo_met(True, 5.0, 10.0, 90.0, 100.0) is True
    assert slo_met(True, 5.0, 10.0, 120.0, 100.0) is False
    assert slo_met(False, 5.0, 10.0) is False and slo_met(True, math.nan, 10.0) is False
    met = slo_met(np.array([True, True, False]), np.array([1.0, 20.0, 1.0]), 10.0)
    assert met.tolist() == [True, False, False]
