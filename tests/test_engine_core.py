"""Unit tests of the continuous-batching engine core (services/engine/core.py) with the fitted A100 model."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from services.engine.core import (
    EngineConfig,
    EngineCore,
    RequestRejected,
    RequestState,
    StepResult,
    TokenEvent,
    decode_kv_offload_ms,
)
from services.engine.perf_model import default_perf_model, kv_capacity_tokens

PERF = default_perf_model()


def engine(**cfg) -> EngineCore:
    return EngineCore(PERF, EngineConfig(**cfg))


def check_blocks(e: EngineCore) -> None:
    """KV accounting: nothing negative, and free + held by live requests == total."""
    assert e.free_blocks >= 0
    used = sum(r.num_blocks for r in e.requests.values())
    assert e.free_blocks + used == e.total_blocks
    for r in e.running:
        assert r.state is RequestState.RUNNING
        assert r.num_blocks * e.config.block_size >= r.num_computed
    for r in e.waiting:
        assert r.state is RequestState.WAITING


def run_to_completion(e: EngineCore, now: float = 0.0, max_steps: int = 100_000,
                      events: dict[str, list[TokenEvent]] | None = None) -> tuple[float, list[StepResult]]:
    """Step until idle, checking KV invariants; returns the end time and the step results."""
    results = []
    idle_steps = 0
    for _ in range(max_steps):
        if not e.has_work():
            return now, results
        r = e.step(now)
        check_blocks(e)
        results.append(r)
        if events is not None:
            for ev in r.events:
                events[ev.request_id].append(ev)
        if r.duration_s == 0.0:
            idle_steps += 1
            assert idle_steps < 3, "engine has work but schedules nothing (deadlock)"
        else:
            idle_steps = 0
        now = r.end_s
    raise AssertionError("engine did not finish its work")


# ---- tokens and events ---------------------------------------------------------------------------


def test_requests_produce_exactly_max_tokens():
    e = engine()
    sizes = {"a": (100, 1), "b": (7, 50), "c": (1000, 17), "d": (1, 3)}
    for rid, (prompt, mx) in sizes.items():
        e.add_request(rid, prompt, mx, 0.0)
    events: dict[str, list[TokenEvent]] = defaultdict(list)
    run_to_completion(e, events=events)
    for rid, (_, mx) in sizes.items():
        evs = events[rid]
        assert sum(ev.new_tokens for ev in evs) == mx
        assert [ev.num_generated for ev in evs] == list(range(1, mx + 1))
        assert [ev.finished for ev in evs] == [False] * (mx - 1) + [True]
    assert e.generated_tokens_total == sum(mx for _, mx in sizes.values())
    assert e.finished_total == len(sizes)
    assert e.requests == {} and e.free_blocks == e.total_blocks


def test_first_token_event_flagged_and_timed():
    e = engine()
    req = e.add_request("a", 300, 4, 0.0)
    events: dict[str, list[TokenEvent]] = defaultdict(list)
    _, results = run_to_completion(e, events=events)
    firsts = [ev.first for ev in events["a"]]
    assert firsts == [True, False, False, False]
    # TTFT: the first token lands at the end of the step that completed the prefill (two 256-token chunks
    # with the default tied budget: 300 = 256 + 44).
    first_step = next(r for r in results if r.events)
    assert req.first_token_s == pytest.approx(first_step.end_s)
    assert req.first_token_s > 0
    assert sum(r.num_prefill_tokens for r in results) == 300
    assert req.last_token_s == pytest.approx(results[-1].end_s)


def test_decode_steps_are_timed_by_perf_model():
    e = engine(max_num_batched_tokens=8192)
    for i in range(8):
        e.add_request(f"r{i}", 100, 10, 0.0)
    r0 = e.step(0.0)  # all prefills in one iteration
    assert r0.num_prefill_tokens == 800 and r0.num_decode == 0 and len(r0.events) == 8
    r1 = e.step(r0.end_s)
    assert r1.num_decode == 8 and r1.num_prefill_tokens == 0
    # Each decode has context 101 (100 prompt + 1 generated).
    assert r1.duration_s == pytest.approx(PERF.iteration_ms(8, 8 * 101.0) / 1e3)
    assert r1.start_s == r0.end_s


def test_idle_step_is_empty():
    r = engine().step(5.0)
    assert r.duration_s == 0.0 and r.events == () and r.start_s == 5.0 and r.end_s == 5.0


# ---- the batch-size cap -----------------------------------------------------------------------------


def test_running_never_exceeds_max_num_seqs():
    e = engine(max_num_seqs=5, max_num_batched_tokens=4096)
    for i in range(20):
        e.add_request(f"r{i}", 50, 30, 0.0)
    now = 0.0
    seen_max = 0
    while e.has_work():
        r = e.step(now)
        now = r.end_s
        assert len(e.running) <= 5
        seen_max = max(seen_max, len(e.running))
    assert seen_max == 5
    assert e.finished_total == 20


def test_lowering_cap_stops_admissions_without_evicting_and_raising_admits():
    e = engine(max_num_seqs=4, max_num_batched_tokens=8192)
    for i in range(12):
        e.add_request(f"r{i}", 64, 100, 0.0)
    r = e.step(0.0)
    assert len(e.running) == 4 and len(e.waiting) == 8
    assert e.saturated
    now = r.end_s
    for _ in range(3):
        now = e.step(now).end_s
    assert len(e.running) == 4 and len(e.waiting) == 8  # the cap holds admissions back

    assert e.set_max_num_seqs(16) == 16
    r = e.step(now)
    now = r.end_s
    assert len(e.running) == 12 and len(e.waiting) == 0
    assert not e.saturated  # 12 running < cap 16, nothing waiting

    # Lower the cap below the running count: nobody is evicted, everybody keeps decoding, no admission.
    e.add_request("late", 64, 10, now)
    assert e.set_max_num_seqs(4) == 4
    r = e.step(now)
    assert len(e.running) == 12 and [w.request_id for w in e.waiting] == ["late"]
    assert r.preempted == ()
    assert len(r.events) == 12
    assert e.saturated


def test_lowering_cap_keeps_all_running_requests_decoding_with_tied_budget():
    e = engine(max_num_seqs=16)  # default tied budget
    for i in range(12):
        e.add_request(f"r{i}", 8, 200, 0.0)
    now = 0.0
    for _ in range(20):
        now = e.step(now).end_s
    assert len(e.running) == 12 and all(r.num_generated > 0 for r in e.running)
    e.set_max_num_seqs(4)
    r = e.step(now)
    assert len(e.running) == 12
    assert len(r.events) == 12


def test_set_max_num_seqs_clamps():
    e = engine(max_num_seqs=8, max_num_seqs_limit=64)
    assert e.set_max_num_seqs(0) == 1
    assert e.set_max_num_seqs(-5) == 1
    assert e.set_max_num_seqs(1000) == 64
    assert e.set_max_num_seqs(33.9) == 33
    assert e.max_num_seqs == 33


def test_config_rejects_cap_out_of_range():
    with pytest.raises(ValueError):
        engine(max_num_seqs=0)
    with pytest.raises(ValueError):
        engine(max_num_seqs=2048, max_num_seqs_limit=1024)


def test_tied_budget_bounds_tokens_per_iteration():
    e = engine(max_num_seqs=32)
    e.add_request("long", 1000, 5, 0.0)
    r = e.step(0.0)
    assert r.num_prefill_tokens == 32  # one chunk of the cap's size
    fixed = engine(max_num_seqs=32, max_num_batched_tokens=512)
    fixed.add_request("long", 1000, 5, 0.0)
    assert fixed.step(0.0).num_prefill_tokens == 512


# ---- KV cache --------------------------------------------------------------------------------------


def test_default_kv_capacity_from_gpu_memory():
    e = engine()
    assert e.kv_capacity_tokens == (kv_capacity_tokens(PERF.model, PERF.gpu) // 16) * 16
    assert 350_000 <= e.kv_capacity_tokens <= 450_000
    assert e.total_blocks == e.free_blocks and e.kv_cache_usage == 0.0


def test_kv_exhaustion_preempts_by_recompute_and_all_complete():
    e = engine(kv_capacity_tokens=2048, max_num_batched_tokens=4096)
    sizes = {f"r{i}": (200, 300) for i in range(8)}  # 8 × 500 tokens of KV in a 2048-token cache
    for rid, (p, m) in sizes.items():
        e.add_request(rid, p, m, 0.0)
    events: dict[str, list[TokenEvent]] = defaultdict(list)
    results: list[StepResult] = []
    now = 0.0
    while e.has_work():
        before = {q.request_id for q in e.running}
        r = e.step(now)
        check_blocks(e)
        after = {q.request_id for q in e.running}
        if r.preempted:
            # Victims go back to the front of the waiting queue, and the step admits nobody.
            assert after <= before
            assert [w.request_id for w in list(e.waiting)[:len(r.preempted)]] == list(reversed(r.preempted))
            assert all(e.requests[v].num_blocks == 0 and e.requests[v].num_computed == 0
                       for v in r.preempted)
        results.append(r)
        for ev in r.events:
            events[ev.request_id].append(ev)
        now = r.end_s
        assert len(results) < 20_000
    preempted = [rid for r in results for rid in r.preempted]
    assert preempted, "the small cache must force preemptions"
    assert e.num_preemptions_total == len(preempted)
    # Victims are the most recently admitted: the first request is never preempted.
    assert "r0" not in preempted
    for rid, (_, m) in sizes.items():
        evs = events[rid]
        assert sum(ev.new_tokens for ev in evs) == m
        assert evs[-1].finished and evs[-1].num_generated == m
        assert [ev.num_generated for ev in evs] == list(range(1, m + 1))  # recompute keeps the tokens
        assert sum(ev.first for ev in evs) == 1 and evs[0].first
    # Recompute re-runs the victim's context as prefill: more prefill tokens than prompts.
    assert sum(r.num_prefill_tokens for r in results) > sum(p for p, _ in sizes.values())
    assert e.free_blocks == e.total_blocks


def test_kv_usage_and_saturation_track_admissions():
    e = engine(kv_capacity_tokens=1024, max_num_batched_tokens=4096)
    e.add_request("a", 500, 10, 0.0)
    e.add_request("b", 500, 10, 0.0)
    e.add_request("c", 500, 10, 0.0)  # does not fit next to a and b
    e.step(0.0)
    assert [r.request_id for r in e.running] == ["a", "b"]
    assert [r.request_id for r in e.waiting] == ["c"]
    assert e.kv_cache_usage == pytest.approx((32 + 32) / 64)
    assert e.saturated  # work waiting


def test_remove_frees_blocks():
    e = engine(kv_capacity_tokens=4096, max_num_batched_tokens=4096)
    for i in range(4):
        e.add_request(f"r{i}", 300, 100, 0.0)
    e.add_request("w", 3000, 10, 0.0)  # waits: not enough KV left
    now = 0.0
    for _ in range(5):
        now = e.step(now).end_s
    assert e.free_blocks < e.total_blocks
    assert [w.request_id for w in e.waiting] == ["w"]
    held = e.requests["r1"].num_blocks
    free_before = e.free_blocks
    removed = e.remove("r1")
    assert removed is not None and removed.state is RequestState.FINISHED and removed.num_blocks == 0
    assert e.free_blocks == free_before + held
    assert "r1" not in e.requests and all(r.request_id != "r1" for r in e.running)
    assert e.remove("w").request_id == "w"
    assert e.remove("nope") is None
    for rid in ("r0", "r2", "r3"):
        e.remove(rid)
    assert e.free_blocks == e.total_blocks
    assert not e.has_work()
    assert e.step(now).events == ()


def test_hold_frees_kv_keeps_progress_and_release_resumes_from_host_kv():
    e = engine(kv_capacity_tokens=16_384, max_num_batched_tokens=4096)
    e.add_request("mixed", 2000, 50, 0.0)
    e.add_request("other", 100, 50, 0.0)
    now = 0.0
    for _ in range(6):
        now = e.step(now).end_s
    req = e.requests["mixed"]
    generated, computed = req.num_generated, req.num_computed
    assert generated > 0 and computed >= 2000
    assert e.hold("mixed") is True
    assert e.hold("mixed") is False and e.hold("nope") is False
    assert req.state is RequestState.HELD and req.num_blocks == 0 and req.host_kv_tokens >= 2000
    check_blocks(e)
    # While held it makes no progress; the other request finishes.
    while "other" in e.requests:
        res = e.step(now)
        now = res.end_s
        assert all(ev.request_id != "mixed" for ev in res.events)
    assert req.num_generated == generated and e.num_preemptions_total == 1
    assert e.release("mixed") is True and e.release("mixed") is False
    first = e.step(now)
    # It resumes from its host KV (a copy, not a 2000-token prefill) and finishes exactly.
    assert first.num_prefill_tokens <= 1
    events: dict[str, list[TokenEvent]] = defaultdict(list)
    run_to_completion(e, now=first.end_s, events=events)
    assert events["mixed"][-1].num_generated == 50 and events["mixed"][-1].finished


def test_held_request_can_be_removed():
    e = engine()
    e.add_request("h", 10, 5, 0.0)
    assert e.hold("h")  # held while still waiting
    assert e.remove("h").state is RequestState.FINISHED
    assert e.release("h") is False and not e.has_work()


# ---- admission errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "max_tokens", "resumed"), [
    (0, 10, 0),  # empty prompt
    (-3, 10, 0),
    (10, 0, 0),  # max_tokens <= 0
    (10, -1, 0),
    (8000, 193, 0),  # 8193 tokens > max_model_len 8192
    (10, 5, 5),  # nothing left to generate
    (10, 5, -1),
])
def test_invalid_requests_rejected(prompt, max_tokens, resumed):
    e = engine()
    with pytest.raises(RequestRejected) as info:
        e.validate(prompt, max_tokens, resumed)
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(RequestRejected) as info:
        e.add_request("x", prompt, max_tokens, 0.0, resumed_tokens=resumed)
    assert info.value.code == "INVALID_ARGUMENT"
    assert str(info.value)  # an actionable message
    assert e.requests == {} and not e.has_work()


def test_max_model_len_boundary_accepted():
    e = engine()
    e.validate(8000, 192)  # exactly 8192
    e = engine(max_model_len=1024)
    with pytest.raises(RequestRejected) as info:
        e.validate(1000, 25)
    assert info.value.code == "INVALID_ARGUMENT" and "1024" in str(info.value)


def test_request_that_never_fits_kv_is_resource_exhausted():
    e = engine(kv_capacity_tokens=1024)
    with pytest.raises(RequestRejected) as info:
        e.validate(1000, 100)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(RequestRejected) as info:
        e.add_request("big", 1000, 100, 0.0)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert e.requests == {}
    # Exactly the capacity fits and completes.
    e.add_request("fits", 1000, 24, 0.0)
    events: dict[str, list[TokenEvent]] = defaultdict(list)
    run_to_completion(e, events=events)
    assert events["fits"][-1].num_generated == 24


def test_duplicate_request_id_rejected():
    e = engine()
    e.add_request("a", 10, 10, 0.0)
    with pytest.raises(RequestRejected) as info:
        e.add_request("a", 10, 10, 0.0)
    assert info.value.code == "ALREADY_EXISTS"
    assert isinstance(info.value, ValueError)


# ---- resumed requests and host KV ------------------------------------------------------------------


def test_resumed_request_generates_only_the_rest():
    e = engine()
    req = e.add_request("r", 200, 50, 0.0, resumed_tokens=20)
    assert req.num_generated == 20 and req.context_len == 220
    events: dict[str, list[TokenEvent]] = defaultdict(list)
    _, results = run_to_completion(e, events=events)
    evs = events["r"]
    assert sum(ev.new_tokens for ev in evs) == 30
    assert evs[0].num_generated == 21 and evs[0].first
    assert evs[-1].num_generated == 50 and evs[-1].finished
    # Without host KV, the resumed context (prompt + 20 tokens) is recomputed as prefill.
    assert sum(r.num_prefill_tokens for r in results) == 220
    assert e.generated_tokens_total == 30


def _first_step(host: bool, context: int = 4000, resumed: int = 10) -> tuple[StepResult, EngineCore]:
    e = engine(max_num_batched_tokens=8192)
    prompt = context - resumed
    e.add_request("r", prompt, resumed + 40, 0.0, resumed_tokens=resumed,
                  host_kv_tokens=context if host else 0)
    return e.step(0.0), e


def test_host_kv_pays_copy_instead_of_recompute():
    host, _ = _first_step(host=True)
    recompute, _ = _first_step(host=False)
    copy_s = decode_kv_offload_ms(PERF, 4000) / 1e3
    assert copy_s == pytest.approx(4000 * 131072 / 25e9)  # ≈ 21 ms over PCIe
    # Both sample their first token in their first step.
    assert [ev.first for ev in host.events] == [True] and [ev.first for ev in recompute.events] == [True]
    assert host.events[0].num_generated == 11 and recompute.events[0].num_generated == 11
    # The host step pays the copy, but is far shorter than recomputing 4000 tokens of prefill.
    assert host.duration_s >= copy_s
    assert host.duration_s < recompute.duration_s
    assert host.duration_s < 0.5 * recompute.duration_s
    assert recompute.num_prefill_tokens == 4000 and host.num_prefill_tokens <= 1


def test_host_kv_request_completes_exactly():
    e = engine(max_num_batched_tokens=8192)
    e.add_request("h", 990, 60, 0.0, resumed_tokens=10, host_kv_tokens=10_000)  # clamped to the context
    assert 999 <= e.requests["h"].host_kv_tokens <= 1000  # at most the context (prompt + resumed)
    events: dict[str, list[TokenEvent]] = defaultdict(list)
    run_to_completion(e, events=events)
    evs = events["h"]
    assert sum(ev.new_tokens for ev in evs) == 50
    assert evs[-1].num_generated == 60 and evs[-1].finished


def test_host_kv_request_decodes_like_a_recomputed_one():
    host_first, host = _first_step(host=True)
    rec_first, rec = _first_step(host=False)
    h2 = host.step(host_first.end_s)
    r2 = rec.step(rec_first.end_s)
    assert (r2.num_decode, r2.num_prefill_tokens) == (1, 0)
    assert (h2.num_decode, h2.num_prefill_tokens) == (1, 0)
    assert h2.duration_s == pytest.approx(r2.duration_s)
    hr = host.requests["r"]
    assert hr.num_computed == hr.context_len - 1


def test_waiting_host_kv_request_cannot_deadlock_engine():
    e = engine(kv_capacity_tokens=64, block_size=16)
    e.add_request("A", 40, 20, 0.0)
    e.add_request("H", 16, 4, 0.0, resumed_tokens=1, host_kv_tokens=16)
    events: dict[str, list[TokenEvent]] = defaultdict(list)
    run_to_completion(e, events=events, max_steps=2000)
    assert events["A"][-1].num_generated == 20
    assert events["H"][-1].num_generated == 4


# ---- property-based invariants ---------------------------------------------------------------------

request_st = st.tuples(
    st.floats(min_value=0.0, max_value=0.3),  # gap to the previous arrival, seconds
    st.integers(min_value=1, max_value=400),  # prompt tokens
    st.integers(min_value=1, max_value=60),  # max tokens
    st.floats(min_value=0.0, max_value=0.9),  # fraction of max tokens already generated (resumed)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(request_st, min_size=1, max_size=14),
    cap=st.integers(min_value=1, max_value=16),
    budget=st.sampled_from([None, 8, 64, 1024]),
    kv_tokens=st.integers(min_value=128, max_value=3000),
    block_size=st.sampled_from([1, 4, 16]),
    cap_changes=st.lists(st.tuples(st.integers(min_value=0, max_value=60), st.integers(min_value=1, max_value=24)),
                         max_size=4),
)
def test_engine_invariants_under_random_load(requests, cap, budget, kv_tokens, block_size, cap_changes):
    e = EngineCore(PERF, EngineConfig(max_num_seqs=cap, max_num_seqs_limit=32, max_num_batched_tokens=budget,
                                      kv_capacity_tokens=kv_tokens, block_size=block_size))
    total_blocks = e.total_blocks
    arrivals = []
    t = 0.0
    for i, (gap, prompt, mx, frac) in enumerate(requests):
        t += gap
        arrivals.append((t, f"q{i}", prompt, mx, min(int(frac * mx), mx - 1)))
    changes = dict(cap_changes)

    expected: dict[str, tuple[int, int]] = {}
    events: dict[str, list[TokenEvent]] = defaultdict(list)
    now = 0.0
    pending = list(arrivals)
    idle_steps = 0
    for step_no in range(60_000):
        while pending and pending[0][0] <= now:
            at, rid, prompt, mx, resumed = pending.pop(0)
            total = prompt + mx
            try:
                e.add_request(rid, prompt, mx, at, resumed_tokens=resumed)
            except RequestRejected as err:
                # Only an unservable request is rejected here: it cannot fit the KV cache.
                assert err.code == "RESOURCE_EXHAUSTED" and total > e.kv_capacity_tokens
                continue
            assert total <= e.kv_capacity_tokens
            expected[rid] = (mx, resumed)
        if not e.has_work():
            if not pending:
                break
            now = pending[0][0]
            continue
        if step_no in changes:
            e.set_max_num_seqs(changes[step_no])
            event("cap changed")
        running_before = len(e.running)
        r = e.step(now)

        # KV accounting.
        assert e.free_blocks >= 0
        assert e.free_blocks + sum(q.num_blocks for q in e.requests.values()) == total_blocks
        # The cap: never admits beyond it (running may exceed it only when it was just lowered).
        assert len(e.running) <= max(e.max_num_seqs, running_before)
        if running_before <= e.max_num_seqs:
            assert len(e.running) <= e.max_num_seqs
        # Budget: tokens in one iteration never exceed it (the tied budget never starves the running set).
        limit = budget or max(e.max_num_seqs, running_before)
        assert r.num_decode + r.num_prefill_tokens <= limit
        assert r.duration_s >= 0.0 and r.start_s == now
        for ev in r.events:
            events[ev.request_id].append(ev)
        if r.preempted:
            event("preemption")
        if len(e.running) > e.max_num_seqs:
            event("running above a lowered cap")
        if r.duration_s == 0.0:
            idle_steps += 1
            assert idle_steps < 3, "engine has work but schedules nothing"
        else:
            idle_steps = 0
        now = r.end_s
    else:
        raise AssertionError("did not finish")

    assert not e.has_work() and not pending
    assert e.free_blocks == total_blocks
    for rid, (mx, resumed) in expected.items():
        evs = events[rid]
        assert sum(ev.new_tokens for ev in evs) == mx - resumed, rid
        assert [ev.num_generated for ev in evs] == list(range(resumed + 1, mx + 1))
        assert evs[-1].finished and not any(ev.finished for ev in evs[:-1])
        assert evs[0].first and sum(ev.first for ev in evs) == 1
    assert e.finished_total == len(expected)
    assert e.generated_tokens_total == sum(mx - res for mx, res in expected.values())
