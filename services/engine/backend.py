"""The engine agent's backend interface and the simulated A100 backend.

The interface is shaped after vLLM's async engine (``vllm/v1/engine/async_llm.py``) so that a real vLLM
engine fits behind it unchanged:

* ``generate(request)`` is a per-request async stream of outputs (``AsyncLLM.generate``); cancelling the
  consumer aborts the request (as cancelling ``generate()`` does in vLLM);
* ``abort`` / ``evict`` stop a request (``AsyncLLM.abort``); ``evict`` also returns its progress;
* ``set_max_batch_size`` is the runtime cap the local autoscaler sets (vLLM: the scheduler's
  ``max_num_active_reqs``, reached through an engine utility call);
* ``preempt`` / ``resume`` hold one request out of the batch and bring it back (MIXED instances making
  room for interactive work; vLLM: recompute-style preemption through the same utility route);
* per-step statistics reach listeners after every engine iteration (vLLM: ``StatLoggerBase.record`` with
  ``SchedulerStats`` and ``IterationStats``).

The simulated backend runs :class:`~services.engine.core.EngineCore` in wall-clock time: each iteration
sleeps for its modelled duration (divided by ``speedup``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from services.engine.core import EngineConfig, EngineCore, RequestRejected, decode_kv_offload_ms, validate_request
from services.engine.perf_model import default_perf_model


@dataclass(frozen=True)
class BackendRequest:
    """A validated request as the backend sees it (token counts in tokens)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    resume_token_ids: tuple[int, ...] = ()
    host_kv_tokens: int = 0  # context tokens whose KV cache the request brings in host memory
    ignore_eos: bool = False  # keep generating past the end-of-sequence token (benchmarks, tests)
    priority: bool = False  # interactive work on a MIXED instance: waits ahead of batch work (simulated backend)
    stream_interval: int = 1  # output tokens per streamed chunk after the first (vLLM coalesces in its engine)


@dataclass(slots=True)  # one per token per step: a frozen dataclass's __init__ costs four times as much
class TokenOutput:
    """New tokens of one request from one engine step. Times are seconds of the backend's clock."""

    request_id: str
    token_ids: tuple[int, ...]
    num_generated: int  # output tokens so far, including resumed ones
    time_s: float
    finish_reason: str | None = None  # "length", "stop", "abort", "evicted"


@dataclass(frozen=True)
class Progress:
    """Where an evicted request stopped: enough to resume it on another engine."""

    request_id: str
    generated_token_ids: tuple[int, ...]
    num_prompt_tokens: int
    kv_offloaded_tokens: int = 0
    kv_offload_ms: float = 0.0


@dataclass(frozen=True)
class StepStats:
    """Statistics of one engine iteration (vLLM: SchedulerStats + IterationStats).

    ``itl_ms``: inter-token latency of the tokens this step produced after each request's first, as
    ``(latency_ms, count)``; ``ttft_ms``: time to first token of requests that got their first token;
    ``num_prefill_tokens``: prompt tokens the step prefilled (0: a decode-only step, whose ITL the batch size
    alone sets; the local autoscaler's prefill-bound test reads it).
    """

    time_s: float
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_generation_tokens: int
    num_preempted: int
    num_finished: int
    itl_ms: tuple[tuple[float, int], ...]
    ttft_ms: tuple[float, ...]
    saturated: bool
    num_prefill_tokens: int = 0


@dataclass(frozen=True)
class BackendSnapshot:
    num_running: int
    num_waiting: int
    max_batch_size: int
    kv_cache_usage: float
    kv_cache_capacity_tokens: int
    num_preemptions_total: int
    generated_tokens_total: int
    finished_requests_total: int
    saturated: bool


class Backend(abc.ABC):
    """What the engine agent needs from an inference engine."""

    name: str = "abstract"
    model_name: str = ""
    max_model_len: int = 0
    speedup: float = 1.0  # backend-clock seconds per wall-clock second (1 for a real engine)

    def __init__(self) -> None:
        self._listeners: list[Callable[[StepStats], None]] = []

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        self._listeners.append(listener)

    def remove_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        self._listeners.remove(listener)

    def _emit(self, stats: StepStats) -> None:
        for listener in self._listeners:
            listener(stats)

    @abc.abstractmethod
    def now(self) -> float:
        """The backend's clock, seconds."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    vocab_size: int = 0

    @property
    @abc.abstractmethod
    def kv_cache_capacity_tokens(self) -> int:
        """Tokens the whole KV cache of this instance holds."""

    def validate(self, request: BackendRequest) -> None:
        """Raise :class:`RequestRejected` for a request this engine can never serve (same rules for every
        backend: :func:`~services.engine.core.validate_request` plus the vocabulary range)."""
        validate_request(len(request.prompt_token_ids), request.max_tokens, len(request.resume_token_ids),
                         self.max_model_len, self.kv_cache_capacity_tokens)
        bad = [t for t in (*request.prompt_token_ids, *request.resume_token_ids) if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejected(f"token ids must be in [0, {self.vocab_size}) for {self.model_name} "
                                  f"(got {bad[0]})")

    @abc.abstractmethod
    def generate(self, request: BackendRequest) -> AsyncIterator[TokenOutput]:
        """Stream a request's outputs; the last has ``finish_reason`` set. Closing the stream aborts it."""

    @abc.abstractmethod
    async def evict(self, request_id: str) -> Progress | None:
        """Stop a request and return its progress (None if unknown). Its stream ends with ``evicted``."""

    @abc.abstractmethod
    async def set_max_batch_size(self, n: int) -> int:
        """Set the max batch size at run time; returns the value applied (clamped to the engine's limits)."""

    @abc.abstractmethod
    async def preempt(self, request_id: str) -> bool:
        """Hold a request out of the batch (its stream pauses); False if unknown, finished or held."""

    @abc.abstractmethod
    async def resume(self, request_id: str) -> bool:
        """Return a held request to the front of the waiting queue; False if it is not held."""

    @abc.abstractmethod
    def snapshot(self) -> BackendSnapshot: ...


_MAX_LAG_S = 0.1  # engine seconds: a loop later than this after the last iteration's end starts the next one now


@dataclass
class _Stream:
    request: BackendRequest
    queue: asyncio.Queue[TokenOutput] = field(default_factory=asyncio.Queue)
    token_ids: list[int] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)
    last_token_s: float | None = None
    added_s: float = 0.0


class SimulatedBackend(Backend):
    """A continuous-batching A100 engine simulated from the fitted performance model.

    ``speedup`` > 1 runs the engine's clock faster than the wall clock (demos); token ids are drawn from a
    per-request seeded generator over the model's vocabulary (there are no weights to sample from).
    """

    name = "simulated"

    def __init__(self, model_name: str = "llama-3-8b", config: EngineConfig | None = None,
                 speedup: float = 1.0) -> None:
        super().__init__()
        if speedup <= 0:
            raise ValueError("speedup must be > 0")
        self.perf = default_perf_model(model_name)
        self.core = EngineCore(self.perf, config)
        self.model_name = model_name
        self.max_model_len = self.core.max_model_len
        self.vocab_size = self.perf.model.vocab
        self.speedup = speedup
        self._t0 = time.monotonic()
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._prev_end_s: float | None = None
        self._last_add_s = 0.0

    def now(self) -> float:
        return (time.monotonic() - self._t0) * self.speedup

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="simulated-engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for rid in list(self._streams):
            self._finish(rid, "abort")

    @property
    def kv_cache_capacity_tokens(self) -> int:
        return self.core.kv_capacity_tokens

    async def generate(self, request: BackendRequest) -> AsyncIterator[TokenOutput]:
        rid = request.request_id
        if rid in self._streams:
            raise RequestRejected(f"request id {rid!r} is already running on this engine", code="ALREADY_EXISTS")
        self.validate(request)
        now = self.now()
        self.core.add_request(rid, len(request.prompt_token_ids), request.max_tokens, now,
                              resumed_tokens=len(request.resume_token_ids),
                              host_kv_tokens=request.host_kv_tokens, priority=request.priority)
        self._last_add_s = now
        stream = _Stream(request, token_ids=list(request.resume_token_ids), rng=random.Random(rid), added_s=now)
        self._streams[rid] = stream
        self._wake.set()
        try:
            while True:
                out = await stream.queue.get()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            # Consumer went away (client cancelled) or finished: make sure the engine forgets the request.
            if self._streams.pop(rid, None) is not None:
                self.core.remove(rid)

    def _finish(self, rid: str, reason: str) -> _Stream | None:
        stream = self._streams.pop(rid, None)
        if stream is not None:
            stream.queue.put_nowait(TokenOutput(rid, (), len(stream.token_ids), self.now(), reason))
        return stream

    async def evict(self, request_id: str) -> Progress | None:
        req = self.core.remove(request_id)
        stream = self._streams.get(request_id)
        if req is None or stream is None:
            return None
        context = req.num_computed  # KV on the GPU at eviction: what a host copy would keep
        self._finish(request_id, "evicted")
        return Progress(request_id, tuple(stream.token_ids), len(stream.request.prompt_token_ids),
                        kv_offloaded_tokens=context, kv_offload_ms=decode_kv_offload_ms(self.perf, context))

    async def set_max_batch_size(self, n: int) -> int:
        applied = self.core.set_max_num_seqs(n)
        self._wake.set()
        return applied

    async def preempt(self, request_id: str) -> bool:
        return request_id in self._streams and self.core.hold(request_id)

    async def resume(self, request_id: str) -> bool:
        ok = self.core.release(request_id)
        self._wake.set()
        return ok

    def snapshot(self) -> BackendSnapshot:
        c = self.core
        return BackendSnapshot(len(c.running), len(c.waiting), c.max_num_seqs, c.kv_cache_usage,
                               c.kv_capacity_tokens, c.num_preemptions_total, c.generated_tokens_total,
                               c.finished_total, c.saturated)

    async def _loop(self) -> None:
        while True:
            if not self.core.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            # Back-to-back iterations: the next one starts when the previous one ended (engine time), not when
            # this loop got round to it, so host scheduling delay (amplified by speedup) is not added to every
            # iteration; after an idle gap (or a lag beyond _MAX_LAG_S) it starts now.
            now = self.now()
            # (never before the newest request's arrival: an iteration cannot include a request added after it began)
            start = (max(self._prev_end_s, self._last_add_s)
                     if self._prev_end_s is not None and 0 <= now - self._prev_end_s <= _MAX_LAG_S else now)
            result = self.core.step(start)
            if result.duration_s <= 0:
                # Nothing schedulable (e.g. cap just lowered to below the running set): wait for a change.
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.01)
                continue
            # The streams this iteration ran for: a request cancelled while it runs and re-sent under the same id
            # (a gateway retrying through another router) is another stream, and this iteration's tokens are not its.
            streams = self._streams
            owners = [streams.get(ev.request_id) for ev in result.events]
            await asyncio.sleep(max(0.0, result.end_s - self.now()) / self.speedup)
            end = self._prev_end_s = result.end_s
            itl: dict[float, int] = {}
            ttft: list[float] = []
            finished = 0
            for ev, stream in zip(result.events, owners, strict=True):
                if stream is None or streams.get(ev.request_id) is not stream:
                    continue  # aborted while the step ran
                tok = stream.rng.randrange(self.vocab_size)
                stream.token_ids.append(tok)
                if stream.last_token_s is None:
                    ttft.append((end - stream.added_s) * 1e3)
                else:
                    lat = round((end - stream.last_token_s) * 1e3, 3)
                    itl[lat] = itl.get(lat, 0) + 1
                stream.last_token_s = end
                reason = "length" if ev.finished else None
                stream.queue.put_nowait(TokenOutput(ev.request_id, (tok,), ev.num_generated, end, reason))
                if ev.finished:
                    finished += 1
                    self._streams.pop(ev.request_id, None)
            c = self.core
            self._emit(StepStats(end, len(c.running), len(c.waiting), c.kv_cache_usage, len(result.events),
                                 len(result.preempted), finished, tuple(itl.items()), tuple(ttft), c.saturated,
                                 result.num_prefill_tokens))
