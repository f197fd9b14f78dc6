"""Continuous-batching engine core in virtual time (the simulated backend's scheduler).

Pure and steppable: :meth:`EngineCore.step` takes ``now`` (seconds, any clock) and returns what one
iteration did and how long it took according to a :class:`~services.engine.perf_model.PerfModel`. The
engine agent's simulated backend drives it in wall-clock time; the fleet simulator drives the same class
in virtual time.

:meth:`EngineCore.advance` runs the same iterations in bulk for a discrete-event simulator: while every
running request decodes one token per iteration, nothing can be admitted and the free KV blocks cover the
growth (*steady decode*), it runs up to the first finish, the first iteration starting at or after a time
horizon, or a step limit, in O(running + iterations) with the engine state, events and timing that as many
:meth:`~EngineCore.step` calls would give; any other iteration is one ``step``.

The scheduling follows vLLM v1's scheduler (``vllm/v1/core/sched/scheduler.py``):

* iteration-level scheduling with a per-iteration token budget (``max_num_batched_tokens``) and a cap on
  running requests (``max_num_seqs``, the *max batch size* the local autoscaler sets at run time);
* running requests first (one decode token each, or the next chunk of an unfinished prefill), then
  waiting requests in FIFO order while the cap, the budget and free KV blocks allow (chunked prefill);
* the KV cache is allocated in blocks of ``block_size`` tokens; when a running request needs a block and
  none is free, the most recently admitted running request is preempted (recompute: its blocks are freed
  and it goes back to the front of the waiting queue);
* lowering the cap never evicts running requests (as in vLLM); it only stops admissions.

A request can arrive with output tokens generated elsewhere (``resumed_tokens``, after an eviction) and
optionally with its KV cache on host memory (``host_kv_tokens``): then its first iteration pays the
host-to-GPU copy instead of recomputing the prefill (``../shared/notes/hardware.md``, "Costs worth
modelling").
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from services.engine.perf_model import PerfModel, kv_capacity_tokens


class RequestRejected(ValueError):
    """A request that the engine can never serve (``code`` names the gRPC status to return)."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code


def validate_request(prompt_tokens: int, max_tokens: int, resumed_tokens: int, max_model_len: int,
                     kv_capacity_tokens: int) -> None:
    """The checks every backend applies before accepting a request (token counts in tokens).

    Raises :class:`RequestRejected`: INVALID_ARGUMENT for an empty prompt, ``max_tokens`` ≤ 0, resumed
    tokens not fewer than ``max_tokens``, or prompt + ``max_tokens`` beyond the model's context;
    RESOURCE_EXHAUSTED when prompt + ``max_tokens`` exceeds the instance's whole KV cache (it could never
    be scheduled there).
    """
    if prompt_tokens <= 0:
        raise RequestRejected("prompt is empty: send at least one prompt token")
    if max_tokens <= 0:
        raise RequestRejected(f"max_tokens must be > 0 (got {max_tokens})")
    if resumed_tokens < 0 or resumed_tokens >= max_tokens:
        raise RequestRejected(f"resumed tokens ({resumed_tokens}) must be fewer than max_tokens ({max_tokens})")
    total = prompt_tokens + max_tokens
    if total > max_model_len:
        raise RequestRejected(
            f"prompt ({prompt_tokens}) + max_tokens ({max_tokens}) = {total} tokens exceeds the model's "
            f"context of {max_model_len} tokens; shorten the prompt or lower max_tokens")
    if total > kv_capacity_tokens:
        raise RequestRejected(
            f"request needs {total} tokens of KV cache but this instance holds only "
            f"{kv_capacity_tokens}; it can never be scheduled here", code="RESOURCE_EXHAUSTED")


class RequestState(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HELD = "held"  # preempted by the agent (MIXED instance making room); resumes on release
    FINISHED = "finished"


@dataclass(slots=True)
class EngineRequest:
    """One request inside the engine. Token counts are in tokens; times in seconds of the engine clock.
    (Slotted: its fields are read and written for every running request in every iteration.)"""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    arrival_s: float
    resumed_tokens: int = 0
    host_kv_tokens: int = 0
    state: RequestState = RequestState.WAITING
    num_generated: int = 0  # output tokens so far, including resumed ones
    num_computed: int = 0  # context tokens whose KV is on the GPU
    num_blocks: int = 0
    first_token_s: float | None = None
    last_token_s: float | None = None
    num_preemptions: int = 0
    priority: bool = False  # waits ahead of non-priority requests (interactive work on a MIXED instance)
    interactive: bool = False  # the owner's label, not the scheduler's: counted in StepResult.num_itl_interactive

    def __post_init__(self) -> None:
        self.num_generated = self.resumed_tokens

    @property
    def context_len(self) -> int:
        """Prompt plus generated tokens: the tokens whose KV a decode step needs."""
        return self.prompt_tokens + self.num_generated

    @property
    def done(self) -> bool:
        return self.num_generated >= self.max_tokens


class TokenEvent(NamedTuple):
    """Output of one request in one :class:`StepResult` (a named tuple: one is made per request per
    iteration, so it must be cheap).

    ``new_tokens`` is 1 for a single iteration and the number of iterations for a bulk result of
    :meth:`EngineCore.advance` (one token per iteration); ``num_generated`` is the count after them,
    ``finished`` whether the request finished (in a bulk, only in its last iteration) and ``first`` whether
    the first of these tokens is the request's first (never in a bulk).
    """

    request_id: str
    new_tokens: int
    num_generated: int
    finished: bool
    first: bool


@dataclass(frozen=True)
class StepResult:
    """What one engine iteration, or a bulk of ``num_steps`` steady-decode iterations, did.

    ``duration_s`` is the modelled time from ``start_s`` to the end of the last iteration, and
    ``step_durations_s`` each iteration's time in order: :class:`EngineCore` always fills it with
    ``num_steps`` entries (``(duration_s,)`` for :meth:`~EngineCore.step`); its default ``()`` only appears
    in results built elsewhere, where ``duration_s`` is then the one iteration's time. A bulk result of
    :meth:`~EngineCore.advance` has one event per running request (``new_tokens`` = ``num_steps``),
    ``num_decode`` = the decodes of each of its iterations (the running count), no prefill tokens and no
    preemptions; its ``duration_s`` equals ``sum(step_durations_s)`` up to float rounding.

    With ``all_events=False`` (:meth:`~EngineCore.step`, :meth:`~EngineCore.advance`; the fleet simulator's
    mode) ``events`` holds only the events that are a request's first token or its finish; the counts below
    are the same either way. ``num_tokens``: output tokens sampled in all iterations together; ``num_itl``:
    per iteration, the tokens that are not a request's first (each one an inter-token latency sample);
    ``num_itl_interactive``: those of requests added with ``interactive=True``.
    """

    start_s: float
    duration_s: float
    events: tuple[TokenEvent, ...]
    num_decode: int
    num_prefill_tokens: int
    preempted: tuple[str, ...] = ()
    num_steps: int = 1
    step_durations_s: tuple[float, ...] = ()
    num_tokens: int = 0
    num_itl: int = 0
    num_itl_interactive: int = 0

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


@dataclass
class EngineConfig:
    """Limits of one engine instance (vLLM's names where vLLM has the knob).

    ``max_num_seqs`` is the initial max batch size; ``max_num_seqs_limit`` the largest the local autoscaler
    may set (vLLM sizes its runner for it). ``max_num_batched_tokens`` is the per-iteration token budget:
    an integer fixes it (vLLM's behaviour; v1's default on 80 GB GPUs for the OpenAI server is 8192),
    ``None`` ties it to the current max batch size, so that the one knob the local autoscaler turns bounds
    all the tokens of an iteration (decode tokens plus prefill chunks) and hence its latency. Chiron's
    default is the tied budget: with prompts much longer than outputs, a fixed large budget lets prefill
    chunks stall every decode in the iteration and no batch size then meets an ITL SLO.
    ``min_prefill_tokens`` widens the tied budget to ``running + min_prefill_tokens`` when that is more:
    without it an engine running close to its cap admits a long prompt a few tokens per iteration, and
    its TTFT suffers (``chiron engine`` and the simulator's Chiron policy use 512). ``kv_capacity_tokens``
    0 = derive it from GPU memory minus weights (:func:`~services.engine.perf_model.kv_capacity_tokens`).
    """

    max_num_seqs: int = 256
    max_num_seqs_limit: int = 1024
    max_num_batched_tokens: int | None = None
    min_prefill_tokens: int = 0  # tied budget only: prefill tokens an iteration may add beyond its decodes
    block_size: int = 16
    kv_capacity_tokens: int = 0
    max_model_len: int = 0  # 0 = the model's


_tuple_new = tuple.__new__  # builds a TokenEvent without the Python-level NamedTuple constructor


@dataclass(slots=True)
class _Batch:
    """What :meth:`EngineCore.step` schedules for one iteration (token counts in tokens)."""

    budget: int  # tokens the iteration may still schedule
    preempted: list[str] = field(default_factory=list)  # ids of running requests preempted for KV blocks
    chunks: list[tuple[int, int]] = field(default_factory=list)  # prefill chunks: (tokens, context already computed)
    sampled: list[EngineRequest] = field(default_factory=list)  # requests that sample a token, in scheduling order
    num_scheduled: int = 0
    num_decode: int = 0
    sum_ctx: int = 0  # summed context of the decodes
    host_load_tokens: int = 0  # KV tokens copied from host memory for admitted requests


def _remove(seq: list[EngineRequest] | deque[EngineRequest], req: EngineRequest) -> None:
    """``seq.remove(req)`` by identity: the same element (an engine's requests have distinct ids, so none
    other compares equal), without calling the dataclass ``__eq__`` on every element before it."""
    for i, r in enumerate(seq):
        if r is req:
            del seq[i]
            return
    seq.remove(req)  # not there: the ValueError list.remove raises


class EngineCore:
    """Continuous-batching scheduler + performance model. Not thread-safe; one owner drives it."""

    def __init__(self, perf: PerfModel, config: EngineConfig | None = None) -> None:
        self.perf = perf
        self.config = cfg = config or EngineConfig()
        if not 1 <= cfg.max_num_seqs <= cfg.max_num_seqs_limit:
            raise ValueError("max_num_seqs must be in [1, max_num_seqs_limit]")
        self.max_model_len = cfg.max_model_len or perf.model.max_model_len
        capacity = cfg.kv_capacity_tokens or kv_capacity_tokens(perf.model, perf.gpu)
        self.total_blocks = capacity // cfg.block_size
        self.free_blocks = self.total_blocks
        self.max_num_seqs = cfg.max_num_seqs
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.requests: dict[str, EngineRequest] = {}
        self.held: dict[str, EngineRequest] = {}
        self.num_preemptions_total = 0
        self.generated_tokens_total = 0
        self.finished_total = 0

    # ---- admission -------------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        return self.total_blocks * self.config.block_size

    def validate(self, prompt_tokens: int, max_tokens: int, resumed_tokens: int = 0) -> None:
        """Raise :class:`RequestRejected` for a request this engine can never serve."""
        validate_request(prompt_tokens, max_tokens, resumed_tokens, self.max_model_len, self.kv_capacity_tokens)

    def add_request(self, request_id: str, prompt_tokens: int, max_tokens: int, now: float,
                    resumed_tokens: int = 0, host_kv_tokens: int = 0, priority: bool = False,
                    interactive: bool = False) -> EngineRequest:
        """Queue a request. ``priority`` (interactive work on a MIXED instance): it waits ahead of every
        non-priority request, behind earlier priority ones. ``interactive`` only labels it for the step
        counts (:attr:`StepResult.num_itl_interactive`). Raises :class:`RequestRejected` (bad or
        unservable) or ValueError (duplicate id)."""
        if request_id in self.requests:
            raise RequestRejected(f"request id {request_id!r} is already in this engine", code="ALREADY_EXISTS")
        self.validate(prompt_tokens, max_tokens, resumed_tokens)
        # A decoding request holds KV for all but its last sampled token: that is the most a host copy brings.
        req = EngineRequest(request_id, prompt_tokens, max_tokens, now, resumed_tokens,
                            max(0, min(host_kv_tokens, prompt_tokens + resumed_tokens - 1)))
        self.requests[request_id] = req
        if interactive:
            req.interactive = True
        if priority:
            req.priority = True
            pos = 0
            for w in self.waiting:
                if not w.priority:
                    break
                pos += 1
            self.waiting.insert(pos, req)
        else:
            self.waiting.append(req)
        return req

    def remove(self, request_id: str) -> EngineRequest | None:
        """Abort or evict: drop the request wherever it is and free its KV blocks. None if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.state is RequestState.RUNNING:
            _remove(self.running, req)
        elif req.state is RequestState.WAITING:
            _remove(self.waiting, req)
        self.held.pop(request_id, None)
        self._free(req)
        req.state = RequestState.FINISHED
        return req

    def hold(self, request_id: str) -> bool:
        """Preempt a request and keep it out of the batch until :meth:`release` (MIXED instances).

        Its KV cache moves to host memory (the paper's mixed instances keep it in CPU memory), so on
        release it resumes by loading, not recomputing, its context. Returns False for an unknown,
        finished or already held request.
        """
        req = self.requests.get(request_id)
        if req is None or req.state in (RequestState.HELD, RequestState.FINISHED):
            return False
        if req.state is RequestState.RUNNING:
            _remove(self.running, req)
            req.host_kv_tokens = max(req.host_kv_tokens, req.num_computed)
            self._free(req)
            req.num_computed = 0
            req.num_preemptions += 1
            self.num_preemptions_total += 1
        else:
            _remove(self.waiting, req)
        req.state = RequestState.HELD
        self.held[request_id] = req
        return True

    def release(self, request_id: str) -> bool:
        """Put a held request back at the front of the waiting queue. False if it is not held."""
        req = self.held.pop(request_id, None)
        if req is None:
            return False
        req.state = RequestState.WAITING
        self.waiting.appendleft(req)
        return True

    def set_max_num_seqs(self, n: int) -> int:
        """Set the max batch size, clamped to [1, max_num_seqs_limit]; returns the value applied."""
        self.max_num_seqs = max(1, min(int(n), self.config.max_num_seqs_limit))
        return self.max_num_seqs

    # ---- state ---------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks if self.total_blocks else 0.0

    @property
    def saturated(self) -> bool:
        """Work is waiting, or the batch is at its cap: throughput then reflects capacity, not load."""
        return bool(self.waiting) or len(self.running) >= self.max_num_seqs

    # ---- one iteration ---------------------------------------------------------------------
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    def _free(self, req: EngineRequest) -> None:
        self.free_blocks += req.num_blocks
        req.num_blocks = 0

    def _grow(self, req: EngineRequest, new_computed: int) -> bool:
        need = self._blocks_for(new_computed) - req.num_blocks
        if need <= 0:
            return True
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        req.num_blocks += need
        return True

    def _preempt(self, victim: EngineRequest) -> None:
        running = self.running
        if running and running[-1] is victim:  # always, from step: the most recently admitted
            running.pop()
        else:
            _remove(running, victim)
        self._free(victim)
        victim.num_computed = 0
        victim.host_kv_tokens = 0
        victim.state = RequestState.WAITING
        victim.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(victim)

    def _grow_or_preempt(self, req: EngineRequest, new_computed: int, preempted: list[str]) -> bool:
        """Grow a running request's KV to ``new_computed`` tokens, preempting the newest running requests
        (appending their ids to ``preempted``) while blocks are short. False if ``req`` itself was preempted."""
        running = self.running
        while not self._grow(req, new_computed):
            victim = running[-1]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _token_budget(self, num_running: int) -> int:
        """Tokens one iteration may schedule. The tied budget is never below the running set, so lowering the
        cap stops admissions but starves no one."""
        cfg = self.config
        return cfg.max_num_batched_tokens or max(self.max_num_seqs, num_running + cfg.min_prefill_tokens)

    def step(self, now: float, all_events: bool = True) -> StepResult:
        """Schedule and run one iteration starting at ``now`` (seconds). Returns an empty result when idle.
        ``all_events=False``: events only for first tokens and finishes (see :class:`StepResult`)."""
        # Hot path of the fleet simulator (one call per iteration, hundreds of requests each): the per-request
        # work is inlined (context_len, done, the tokens wanted, _grow, _blocks_for). Scheduling only reads
        # requests not yet scheduled (preemption victims are later in ``running`` than the request being
        # scheduled) and the free blocks, which finishes give back only after all scheduling.
        batch = _Batch(self._token_budget(len(self.running)))
        self._schedule_running(batch)
        if not batch.preempted:  # no admissions in an iteration that preempted
            self._admit_waiting(batch)
        if not batch.num_scheduled:
            return StepResult(now, 0.0, (), 0, 0, tuple(batch.preempted), 1, (0.0,))
        return self._run_batch(batch, now, all_events)

    def _schedule_running(self, batch: _Batch) -> None:
        """Step 1: running requests, oldest first, while the budget lasts; preempt the newest when KV blocks run
        out. (Iterating the list while preemption pops its tail visits what an index loop up to len(running)
        would.)"""
        bs = self.config.block_size
        budget = batch.budget
        preempted = batch.preempted
        chunks = batch.chunks
        sampled = batch.sampled
        num_scheduled = num_decode = sum_ctx = 0
        for req in self.running:
            if budget <= 0:
                break
            nc = req.num_computed
            ng = req.num_generated
            ctx = req.prompt_tokens + ng
            if nc == ctx - 1 and ng > 0:
                # Decode (the common case): one token, which completes the context and samples the next.
                if ctx > req.num_blocks * bs:  # crosses into a new KV block
                    if self.free_blocks > 0 and ctx <= (req.num_blocks + 1) * bs:
                        self.free_blocks -= 1
                        req.num_blocks += 1
                    elif not self._grow_or_preempt(req, ctx, preempted):
                        break
                budget -= 1
                num_decode += 1
                sum_ctx += ctx
                req.num_computed = ctx
            else:
                n = ctx - nc  # tokens to run so that the step samples the next output token
                if n < 1:
                    n = 1
                if n > budget:
                    n = budget
                new_nc = nc + n
                if new_nc > req.num_blocks * bs and not self._grow_or_preempt(req, new_nc, preempted):
                    break
                budget -= n
                chunks.append((n, nc))
                req.num_computed = new_nc
                if new_nc < ctx:
                    num_scheduled += 1
                    continue  # prefill chunk only, no token sampled yet
            num_scheduled += 1
            req.num_generated = ng + 1
            sampled.append(req)
        batch.budget = budget
        batch.num_scheduled = num_scheduled
        batch.num_decode = num_decode
        batch.sum_ctx = sum_ctx

    def _admit_waiting(self, batch: _Batch) -> None:
        """Step 2: waiting requests (FIFO) while the cap, the budget and the KV cache allow."""
        running = self.running
        waiting = self.waiting
        budget = batch.budget
        chunks = batch.chunks
        sampled = batch.sampled
        num_scheduled = batch.num_scheduled
        num_decode = batch.num_decode
        sum_ctx = batch.sum_ctx
        host_load_tokens = 0
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            req = waiting[0]
            nc = req.num_computed
            ng = req.num_generated
            ctx = req.prompt_tokens + ng
            host = req.host_kv_tokens if nc == 0 else 0
            n = min(ctx - nc - host, budget)
            # One allocation for the host copy and the new tokens: a failed admission holds no blocks.
            if not self._grow(req, nc + host + n):
                break
            if host:
                req.num_computed = nc = host
                host_load_tokens += host
                req.host_kv_tokens = 0
            waiting.popleft()
            req.state = RequestState.RUNNING
            running.append(req)
            num_scheduled += 1
            budget -= n
            if n == 1 and nc == ctx - 1 and ng > 0:
                num_decode += 1
                sum_ctx += ctx
            else:
                chunks.append((n, nc))
            nc += n
            req.num_computed = nc
            if nc < ctx:
                continue  # prefill chunk only, no token sampled yet
            req.num_generated = ng + 1
            sampled.append(req)
        batch.budget = budget
        batch.num_scheduled = num_scheduled
        batch.num_decode = num_decode
        batch.sum_ctx = sum_ctx
        batch.host_load_tokens = host_load_tokens

    def _run_batch(self, batch: _Batch, now: float, all_events: bool) -> StepResult:
        """Step 3: time the scheduled iteration with the performance model (plus the host-to-GPU copy of admitted
        requests' KV, at ``host_link_bytes_per_s``), stamp the sampled tokens, retire finished requests."""
        perf = self.perf
        duration = perf.iteration_ms(batch.num_decode, batch.sum_ctx, batch.chunks) / 1e3
        if batch.host_load_tokens:
            duration += batch.host_load_tokens * perf.model.kv_bytes_per_token / perf.gpu.host_link_bytes_per_s
        end = now + duration
        events: list[TokenEvent] = []
        finished: list[EngineRequest] = []
        new_event = _tuple_new
        num_first = num_itl_interactive = 0
        for req in batch.sampled:
            req.last_token_s = end
            ng = req.num_generated
            first = req.first_token_s is None
            if first:
                req.first_token_s = end
                num_first += 1
            elif req.interactive:
                num_itl_interactive += 1
            done = ng >= req.max_tokens
            if done:
                finished.append(req)
            if all_events or first or done:
                events.append(new_event(TokenEvent, (req.request_id, 1, ng, done, first)))
        num_sampled = len(batch.sampled)
        self.generated_tokens_total += num_sampled
        if finished:
            self._retire(finished)
            running = self.running
            if len(finished) == 1:
                _remove(running, finished[0])
            else:
                running[:] = [req for req in running if req.state is not RequestState.FINISHED]
        num_prefill_tokens = 0
        for c, _ in batch.chunks:
            num_prefill_tokens += c
        return StepResult(now, duration, tuple(events), batch.num_decode, num_prefill_tokens, tuple(batch.preempted),
                          1, (duration,), num_sampled, num_sampled - num_first, num_itl_interactive)

    def _retire(self, finished: list[EngineRequest]) -> None:
        """Free the KV blocks of requests that finished and forget them (the caller drops them from running)."""
        requests = self.requests
        for req in finished:
            self.free_blocks += req.num_blocks
            req.num_blocks = 0
            req.state = RequestState.FINISHED
            del requests[req.request_id]
        self.finished_total += len(finished)

    def advance(self, now: float, until_s: float, max_steps: int = 1_000_000, all_events: bool = True) -> StepResult:
        """Run iterations back to back from ``now``: one :meth:`step`, or a bulk of steady-decode ones.

        The next iteration is *steady decode* when something runs, every running request decodes (its
        prefill is done and it has sampled a token here), the token budget covers them all and the waiting
        queue's head cannot be admitted (empty queue, batch at its cap, budget used up, or too few free KV
        blocks; held requests don't matter). Otherwise this is ``self.step(now)``. If it is, this runs the
        largest number k ≥ 1 of iterations such that no request finishes before the k-th (k ≤ every
        running request's remaining tokens), the free KV blocks cover all k tokens of every running
        request (no preemption), the k-th iteration starts before ``until_s`` (so the end may pass
        ``until_s`` by one iteration; one runs even if ``now >= until_s``) and k ≤ ``max_steps``. The engine
        state, the events' totals, the token times and each iteration's duration are those of k
        consecutive :meth:`step` calls (durations equal to :meth:`PerfModel.iteration_ms`'s bit for bit, the
        clock summed in the same order). Cost: O(running + k), one ``iteration_ms`` call per iteration.
        ``all_events=False``: events only for first tokens and finishes (see :class:`StepResult`).
        """
        plan = self._steady_decode_steps(max_steps)
        if plan is None:
            return self.step(now, all_events)
        k, sum_ctx = plan
        n = len(self.running)
        iteration_ms = self.perf.decode_iteration_ms(n)
        durations: list[float] = []
        end = now
        for j in range(1, k + 1):
            d = iteration_ms(sum_ctx) / 1e3
            durations.append(d)
            end += d
            sum_ctx += n
            if end >= until_s:
                k = j
                break
        return self._run_bulk(now, k, durations, end, all_events)

    def _steady_decode_steps(self, max_steps: int) -> tuple[int, int] | None:
        """The bound on the bulk :meth:`advance` may run before ``until_s`` cuts it, and the running requests'
        summed context [tokens], as ``(k, sum_ctx)``; None when the next iteration is not steady decode."""
        running = self.running
        n = len(running)
        budget = self._token_budget(n)
        if not n or budget < n or max_steps <= 1:
            return None
        bs = self.config.block_size
        free = self.free_blocks
        # Every failed check below means one step; the order of the checks changes nothing else.
        head_need = self._head_blocks(n, budget)
        if head_need is not None:
            if head_need <= free - n:  # fits whatever the first iteration's n decodes take
                return None
            if head_need > free:  # never fits
                head_need = None
        k = max_steps
        sum_ctx = 0
        slack: list[int] = []  # tokens each request can still compute before it needs another KV block
        append = slack.append
        for req in running:
            ng = req.num_generated
            nc = req.num_computed
            ctx = req.prompt_tokens + ng
            # A decode as `step` classifies it; first_token_s also rules out a resumed request whose first
            # token here is still to come (its event would say first=True).
            if nc != ctx - 1 or ng <= 0 or req.first_token_s is None:
                return None
            s = req.num_blocks * bs - nc
            if not 0 <= s < bs:  # not the engine's block accounting: leave it to step
                return None
            append(s)
            remaining = req.max_tokens - ng
            if remaining < k:
                k = remaining
            sum_ctx += ctx
        # KV: after j iterations a request with slack s holds ceil((j - s) / bs) more blocks (0 if j <= s), so
        # with j = q·bs + t (0 <= t < bs) all of them need n·q + #{s < t} blocks; the largest j that fits the free
        # blocks F has q = F // n and t = the (F mod n)-th smallest slack.
        slack.sort()
        q, r = divmod(free, n)
        k_kv = q * bs + slack[r]
        if k_kv < 1:
            return None  # the first iteration preempts
        if head_need is not None and head_need <= free - bisect_right(slack, 0):
            return None
        return min(k, k_kv), sum_ctx

    def _head_blocks(self, num_running: int, budget: int) -> int | None:
        """KV blocks the waiting queue's head would take if admission were tried next to ``num_running`` decodes;
        None when it is not tried (empty queue, batch at its cap, budget used up). Admission would be tried every
        iteration of a bulk; it fails in all of them iff it fails in the first: the head does not change and the
        free blocks only shrink."""
        waiting = self.waiting
        if not (waiting and num_running < self.max_num_seqs and budget > num_running):
            return None
        head = waiting[0]
        hc = head.num_computed
        host = head.host_kv_tokens if hc == 0 else 0
        chunk = min(head.prompt_tokens + head.num_generated - hc - host, budget - num_running)
        return -(-(hc + host + chunk) // self.config.block_size) - head.num_blocks

    def _run_bulk(self, now: float, k: int, durations: list[float], end: float, all_events: bool) -> StepResult:
        """Apply ``k`` steady-decode iterations ending at ``end`` to every running request (see :meth:`advance`)."""
        running = self.running
        n = len(running)
        bs = self.config.block_size
        events: list[TokenEvent] = []
        finished: list[EngineRequest] = []
        new_event = _tuple_new
        grown = 0
        n_interactive = 0
        for req in running:
            ng = req.num_generated + k
            req.num_generated = ng
            nc = req.num_computed + k
            req.num_computed = nc
            blocks = -(-nc // bs)
            grown += blocks - req.num_blocks
            req.num_blocks = blocks
            req.last_token_s = end
            if req.interactive:
                n_interactive += 1
            done = ng >= req.max_tokens
            if done:
                finished.append(req)
            if all_events or done:
                events.append(new_event(TokenEvent, (req.request_id, k, ng, done, False)))
        self.free_blocks -= grown
        self.generated_tokens_total += n * k
        if finished:
            running[:] = [req for req in running if req.num_generated < req.max_tokens]
            self._retire(finished)
        return StepResult(now, end - now, tuple(events), n, 0, (), k, tuple(durations), n * k, n, n_interactive)


def decode_kv_offload_ms(perf: PerfModel, context_tokens: int) -> float:
    """Cost of moving ``context_tokens`` of KV cache between GPU and host memory, milliseconds (hardware.md)."""
    return 1e3 * context_tokens * perf.model.kv_bytes_per_token / perf.gpu.host_link_bytes_per_s


__all__ = ["EngineConfig", "EngineCore", "EngineRequest", "RequestRejected", "RequestState", "StepResult",
           "TokenEvent", "decode_kv_offload_ms"]
