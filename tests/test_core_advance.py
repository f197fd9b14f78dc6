"""EngineCore.advance: bulk steady-decode iterations equal as many EngineCore.step calls (services/engine/core.py)."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from services.engine.core import EngineConfig, EngineCore, RequestRejected, StepResult
from services.engine.perf_model import default_perf_model

PERF = default_perf_model("llama-3-8b")
INF = math.inf


def engine(**cfg) -> EngineCore:
    return EngineCore(PERF, EngineConfig(**cfg))


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def assert_same_state(a: EngineCore, b: EngineCore) -> None:
    """Same scheduler state: queues, KV accounting, totals and every request's counters and token times."""
    assert [r.request_id for r in a.running] == [r.request_id for r in b.running]
    assert [r.request_id for r in a.waiting] == [r.request_id for r in b.waiting]
    assert list(a.held) == list(b.held)
    assert list(a.requests) == list(b.requests)
    assert (a.free_blocks, a.generated_tokens_total, a.finished_total, a.num_preemptions_total, a.max_num_seqs) == (
        b.free_blocks, b.generated_tokens_total, b.finished_total, b.num_preemptions_total, b.max_num_seqs)
    for rid, ra in a.requests.items():
        assert_same_request(ra, b.requests[rid])


def assert_same_request(ra, rb) -> None:
    assert (ra.state, ra.num_generated, ra.num_computed, ra.num_blocks, ra.num_preemptions, ra.host_kv_tokens) == (
        rb.state, rb.num_generated, rb.num_computed, rb.num_blocks, rb.num_preemptions, rb.host_kv_tokens), ra.request_id
    assert close(ra.first_token_s, rb.first_token_s), ra.request_id
    assert close(ra.last_token_s, rb.last_token_s), ra.request_id


def check_bulk(r: StepResult, now: float, until_s: float, max_steps: int) -> None:
    """The shape advance promises for any result, bulk or single."""
    assert r.start_s == now
    assert 1 <= r.num_steps <= max(1, max_steps)
    assert len(r.step_durations_s) == r.num_steps
    assert math.isclose(r.duration_s, sum(r.step_durations_s), rel_tol=1e-9, abs_tol=1e-12)
    if r.num_steps > 1:
        assert r.num_prefill_tokens == 0 and r.preempted == ()
        assert all(ev.new_tokens == r.num_steps and not ev.first for ev in r.events)
        assert len(r.events) == r.num_decode
        # Every iteration starts before the horizon; only the last may finish requests.
        last_start = now + sum(r.step_durations_s[:-1])
        assert last_start < until_s or math.isclose(last_start, until_s, rel_tol=1e-12)


def step_until(e: EngineCore, now: float, until_s: float) -> tuple[float, list[float]]:
    """Reference: step while iterations start before ``until_s`` (at least one); returns the end and durations."""
    durations = []
    while True:
        r = e.step(now)
        durations.append(r.duration_s)
        now = r.end_s
        if now >= until_s or not e.running:
            return now, durations


def decoding_engine(outputs: list[int], prompt: int = 100, **cfg) -> tuple[EngineCore, float]:
    """An engine whose requests r0.. all run in decode (prefilled and one token sampled)."""
    e = engine(**cfg)
    for i, mx in enumerate(outputs):
        e.add_request(f"r{i}", prompt, mx, 0.0)
    now = 0.0
    while any(r.first_token_s is None for r in e.requests.values()):
        now = e.step(now).end_s
    return e, now


def twins(outputs: list[int], **cfg) -> tuple[EngineCore, EngineCore, float]:
    a, now = decoding_engine(outputs, **cfg)
    b, now_b = decoding_engine(outputs, **cfg)
    assert now == now_b
    return a, b, now


# ---- random scenarios: step() vs advance() ------------------------------------------------------------------


@dataclass
class Op:
    t: float
    kind: str  # add | hold | release | cap | remove
    args: tuple


def scenario(rng: random.Random) -> tuple[dict, list[Op]]:
    cfg = dict(max_num_seqs=rng.randint(1, 12), max_num_seqs_limit=32,
               max_num_batched_tokens=rng.choice([None, None, 8, 64, 512, 2048, 2048]),
               block_size=rng.choice([1, 4, 16, 16]),
               kv_capacity_tokens=rng.choice([0, 0, rng.randint(300, 1500), rng.randint(1500, 6000)]))
    ops: list[Op] = []
    t = 0.0
    for i in range(rng.randint(1, 28)):
        t += rng.choice([0.0, 0.0, rng.expovariate(8.0), rng.expovariate(1.0)])
        mx = rng.randint(1, rng.choice([8, 60, 300]))
        resumed = rng.randint(0, mx - 1) if rng.random() < 0.15 else 0
        prompt = rng.randint(1, rng.choice([30, 30, 300, 900]))
        host = rng.randint(0, prompt + resumed) if resumed and rng.random() < 0.5 else 0
        ops.append(Op(t, "add", (f"q{i}", prompt, mx, resumed, host)))
    for _ in range(rng.randint(0, 6)):
        at = rng.uniform(0.0, t + 2.0)
        kind = rng.choice(["hold", "release", "cap", "remove"])
        ops.append(Op(at, kind, (rng.randrange(len(ops)), rng.randint(1, 16))))
    ops.sort(key=lambda op: op.t)
    return cfg, ops


def apply(e: EngineCore, op: Op) -> None:
    if op.kind == "add":
        rid, prompt, mx, resumed, host = op.args
        try:
            e.add_request(rid, prompt, mx, op.t, resumed_tokens=resumed, host_kv_tokens=host,
                          interactive=int(rid[1:]) % 3 == 0)  # a label only: scheduling must not change
        except RequestRejected:
            pass  # unservable on this KV cache; rejected alike by both engines
    elif op.kind == "cap":
        e.set_max_num_seqs(op.args[1])
    else:
        rid = f"q{op.args[0]}"
        {"hold": e.hold, "release": e.release, "remove": e.remove}[op.kind](rid)


class Tally:
    def __init__(self) -> None:
        self.tokens: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        self.first: Counter[str] = Counter()
        self.durations: list[float] = []

    def add(self, r: StepResult) -> None:
        for ev in r.events:
            self.tokens[ev.request_id] += ev.new_tokens
            self.finished[ev.request_id] += ev.finished
            self.first[ev.request_id] += ev.first
        if r.num_decode + r.num_prefill_tokens:
            self.durations.extend(r.step_durations_s)


def check_counts(r: StepResult, interactive: set[str]) -> None:
    """The result's token and ITL counts against its full event list."""
    assert r.num_tokens == sum(ev.new_tokens for ev in r.events)
    not_first = [ev for ev in r.events if not ev.first]
    per_iteration = len(not_first) if r.num_steps == 1 else len(r.events)
    assert r.num_itl == per_iteration
    assert r.num_itl_interactive == sum(ev.request_id in interactive for ev in (not_first if r.num_steps == 1 else r.events))


def check_sparse(full: StepResult, sparse: StepResult) -> None:
    """all_events=False: the same iterations and counts, only first-token and finish events."""
    assert (sparse.start_s, sparse.num_steps, sparse.num_decode, sparse.num_prefill_tokens, sparse.preempted) == (
        full.start_s, full.num_steps, full.num_decode, full.num_prefill_tokens, full.preempted)
    assert sparse.step_durations_s == full.step_durations_s
    assert (sparse.num_tokens, sparse.num_itl, sparse.num_itl_interactive) == (
        full.num_tokens, full.num_itl, full.num_itl_interactive)
    assert sparse.events == tuple(ev for ev in full.events if ev.first or ev.finished)


def run_scenario(seed: int) -> Counter[str]:
    """Drive a random scenario on three engines, one with step, one with advance and one with advance and sparse
    events, checking they agree."""
    rng = random.Random(seed)
    cfg, ops = scenario(rng)
    a, b, c = engine(**cfg), engine(**cfg), engine(**cfg)
    tally_a, tally_b = Tally(), Tally()
    stats: Counter[str] = Counter()
    now_a = now_b = 0.0
    i = 0
    for _ in range(100_000):
        while i < len(ops) and ops[i].t <= now_a:
            apply(a, ops[i])
            apply(b, ops[i])
            apply(c, ops[i])
            i += 1
        assert_same_state(a, b)
        assert_same_state(b, c)
        interactive = {rid for rid, req in a.requests.items() if req.interactive}
        next_t = ops[i].t if i < len(ops) else INF
        if not a.has_work():
            assert not b.has_work()
            if next_t == INF:
                break
            now_a = now_b = next_t
            continue
        # Reference: every iteration that starts before the next operation.
        while a.has_work() and now_a < next_t:
            r = a.step(now_a)
            check_counts(r, interactive)
            tally_a.add(r)
            if r.duration_s == 0.0:
                break
            now_a = r.end_s
        # advance, with horizons of its own (other simulator events) and sometimes a step limit.
        while b.has_work() and now_b < next_t:
            until = min(next_t, now_b + rng.choice([INF, rng.uniform(0.0, 0.3), 0.0]))
            max_steps = rng.choice([1_000_000, 1_000_000, rng.randint(1, 20)])
            r = b.advance(now_b, until, max_steps)
            check_sparse(r, c.advance(now_b, until, max_steps, all_events=False))
            check_bulk(r, now_b, until, max_steps)
            check_counts(r, interactive)
            tally_b.add(r)
            stats["calls"] += 1
            stats["iterations"] += r.num_steps
            stats["bulks"] += r.num_steps > 1
            stats["bulks with waiting"] += r.num_steps > 1 and bool(b.waiting)
            stats["preemptions"] += len(r.preempted)
            if r.duration_s == 0.0:
                break
            now_b = r.end_s
        assert close(now_a, now_b)
        if now_a < next_t:  # went idle (or scheduled nothing) before the next operation
            now_a = now_b = next_t
    else:
        pytest.fail("scenario did not finish")
    assert_same_state(a, b)
    assert not a.has_work() and a.finished_total == b.finished_total
    assert close(now_a, now_b)
    assert tally_a.tokens == tally_b.tokens
    assert tally_a.finished == tally_b.finished and tally_a.first == tally_b.first
    assert len(tally_a.durations) == len(tally_b.durations)
    assert all(close(x, y) for x, y in zip(tally_a.durations, tally_b.durations, strict=True))
    return stats


@pytest.mark.parametrize("seed", range(120))
def test_advance_matches_step_on_random_load(seed):
    run_scenario(seed)


def test_random_scenarios_exercise_bulks_waiting_and_preemption():
    """The random scenarios are not all single steps: most iterations run in bulks, some with a queue."""
    stats: Counter[str] = Counter()
    for seed in range(1000, 1040):
        stats += run_scenario(seed)
    assert stats["bulks"] > 0.05 * stats["calls"]
    assert stats["iterations"] > 1.5 * stats["calls"]
    assert stats["bulks with waiting"] > 0 and stats["preemptions"] > 0


# ---- specific behaviour -------------------------------------------------------------------------------------


def test_advance_stops_at_the_first_finish():
    a, b, now = twins([50, 20, 80], max_num_seqs=3, max_num_batched_tokens=512)
    remaining = {r.request_id: r.max_tokens - r.num_generated for r in b.running}
    r = b.advance(now, INF)
    assert r.num_steps == min(remaining.values()) == 19
    assert [(ev.request_id, ev.new_tokens, ev.finished, ev.first) for ev in r.events] == [
        ("r0", 19, False, False), ("r1", 19, True, False), ("r2", 19, False, False)]
    assert [ev.num_generated for ev in r.events] == [20, 20, 20]
    assert r.num_decode == 3 and r.num_prefill_tokens == 0
    end, durations = now, []
    for _ in range(19):
        s = a.step(end)
        durations.append(s.duration_s)
        end = s.end_s
    assert close(r.end_s, end)
    assert all(close(x, y) for x, y in zip(r.step_durations_s, durations, strict=True))
    assert_same_state(a, b)
    assert [q.request_id for q in b.running] == ["r0", "r2"] and b.finished_total == 1
    # The next bulk runs to r0's end, then r2 runs alone to its own.
    assert b.advance(r.end_s, INF).num_steps == 30
    last = b.advance(b.requests["r2"].last_token_s, INF)
    assert last.num_steps == 30 and last.events[0].finished and not b.has_work()


def test_advance_respects_until_s():
    a, b, now = twins([300] * 4, max_num_seqs=4, max_num_batched_tokens=512)
    until = now + 0.25
    r = b.advance(now, until)
    end, durations = step_until(a, now, until)
    assert r.num_steps == len(durations) > 1
    assert close(r.end_s, end) and r.end_s >= until
    assert now + sum(r.step_durations_s[:-1]) < until  # the last iteration started before the horizon
    assert_same_state(a, b)
    # A horizon already passed still runs one iteration; max_steps caps the bulk.
    one = b.advance(r.end_s, until)
    assert one.num_steps == 1 and one.events[0].new_tokens == 1
    assert b.advance(one.end_s, INF, max_steps=7).num_steps == 7


def test_advance_falls_back_to_step_when_a_request_can_be_admitted():
    a, b, now = twins([100, 100], max_num_seqs=4, max_num_batched_tokens=512)
    for e in (a, b):
        e.add_request("late", 64, 10, now)
    r = b.advance(now, INF)
    s = a.step(now)
    assert r == s and r.num_steps == 1 and r.num_prefill_tokens == 64
    assert_same_state(a, b)
    assert b.requests["late"] in b.running
    # At the cap the waiting request cannot be admitted: the running pair decodes in bulk.
    c, now_c = decoding_engine([100, 100], max_num_seqs=2, max_num_batched_tokens=512)
    c.add_request("late", 64, 10, now_c)
    r = c.advance(now_c, INF)
    assert r.num_steps == 99 and [q.request_id for q in c.waiting] == ["late"]
    assert c.advance(r.end_s, INF).num_prefill_tokens == 64  # both finished: the late one is admitted


def test_advance_falls_back_to_step_for_prefill_and_first_tokens():
    e = engine(max_num_seqs=4, max_num_batched_tokens=512)
    e.add_request("p", 100, 10, 0.0)
    r = e.advance(0.0, INF)
    assert r.num_steps == 1 and r.num_prefill_tokens == 100 and r.events[0].first
    # A resumed request whose chunked prefill stops one token short looks like a decode to step (num_computed
    # = context - 1, num_generated > 0) but samples its first token here: a single step with first=True.
    e = engine(max_num_seqs=4, max_num_batched_tokens=104)
    e.add_request("resumed", 100, 20, 0.0, resumed_tokens=5)
    now = e.step(0.0).end_s
    req = e.requests["resumed"]
    assert req.num_computed == req.context_len - 1 and req.first_token_s is None
    r = e.advance(now, INF)
    assert r.num_steps == 1 and r.events[0].first and r.num_decode == 1
    assert e.advance(r.end_s, INF).num_steps == 14


def test_advance_never_preempts():
    # Two requests with 300-token prompts on 640 tokens of KV (40 blocks of 16): they cannot both finish.
    cfg = dict(max_num_seqs=2, max_num_batched_tokens=1024, kv_capacity_tokens=640, block_size=16)
    a, b, now = twins([300, 300], prompt=300, **cfg)
    r = b.advance(now, INF)
    assert r.preempted == () and r.num_steps == 20  # 2 free blocks + 4 tokens of slack each: 16 + 4 iterations
    end, durations = now, []
    for _ in range(r.num_steps):
        s = a.step(end)
        assert s.preempted == ()
        durations.append(s.duration_s)
        end = s.end_s
    assert_same_state(a, b)
    assert close(r.end_s, end)
    # It stopped because the next iteration needs a block that is not free.
    assert b.free_blocks < sum(q.num_computed + 1 > q.num_blocks * 16 for q in b.running)
    nxt = b.advance(r.end_s, INF)
    assert nxt.num_steps == 1 and nxt.preempted == ("r1",)
    assert a.step(end) == nxt
    assert_same_state(a, b)


def test_advance_runs_in_bulk_past_a_waiting_request_that_does_not_fit():
    # The head of the queue needs more blocks than are free: admission fails every iteration, as in step.
    cfg = dict(max_num_seqs=4, max_num_batched_tokens=1024, kv_capacity_tokens=1600, block_size=16)
    a, b, now = twins([200, 200], prompt=500, **cfg)
    for e in (a, b):
        e.add_request("big", 700, 10, now)
    r = b.advance(now, INF)
    assert r.num_steps > 1 and r.preempted == () and r.num_prefill_tokens == 0
    end = now
    for _ in range(r.num_steps):
        s = a.step(end)
        assert s.num_prefill_tokens == 0
        end = s.end_s
    assert_same_state(a, b)
    assert [q.request_id for q in b.waiting] == ["big"]
