"""Workloads for the cluster simulator: an interactive request stream and a batch backlog, with their SLOs.

A :class:`Workload` is two :class:`~services.common.traces.Trace` objects (interactive, batch) plus the SLOs
the simulator scores them against. :func:`make_workload` builds the named workloads of :data:`WORKLOADS`;
:func:`gpu_seconds_lower_bound` gives the offline lower bound on GPU time that every policy's GPU-hours are
reported against (``../shared/notes/hardware.md``, "Offline lower bound on GPU-hours").

Data files (``../shared/data``; source, commit and licence of each in ``../shared/data/PROVENANCE.md``): the
Azure LLM inference traces 2023 (conv, code; :func:`services.common.traces.load_azure_trace`), ShareGPT and
arXiv-summarization prompt/output token counts (Llama-2 tokenizer; :func:`arxiv_lengths`).

Named workloads (``make_workload(name, ...)``; each deterministic given ``seed``; parameters, token lengths
and SLO defaults: :func:`make_workload`):

* ``azure-conv`` — the Azure conversation trace as interactive traffic (no batch unless ``batch_requests``);
* ``azure-code`` — the same with the Azure code trace;
* ``trace`` — the user's CSV (``make_workload("trace", trace_file=PATH)``, Azure columns) as interactive
  traffic, combinable with a batch backlog (``batch_requests``);
* ``mixed`` — ``azure-conv`` interactive + a backlog of 20,000 ShareGPT batch requests at t=0;
* ``poisson`` — Poisson arrivals at ``rate_per_s`` (required) for 600 s, ShareGPT lengths;
* ``gamma`` — Gamma inter-arrivals with mean ``1/rate_per_s`` and coefficient of variation ``cv`` (both
  required; shape ``1/cv²``, scale ``1/(rate·shape)``) for 600 s, ShareGPT lengths;
* ``batch-backlog`` — 1,000,000 batch requests at t=0 + Poisson interactive traffic at 2/s for 3,600 s;
* ``conversation`` — multi-turn chat sessions (Poisson starts at ``rate_per_s`` sessions/s, default 2.5, ≈ 5
  requests/s, for 1,800 s; ~4 turns drawn, ~2 kept, 30 s think time); a turn's prompt is the whole conversation so far
  plus its new ShareGPT input, and a session stops once it would exceed ``max_model_len``
  (:func:`_conversation_interactive`).
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.paths import shared_data_dir
from services.common.traces import AZURE_TRACES, Trace, load_azure_trace, load_sharegpt_lengths
from services.engine.perf_model import PerfModel, default_perf_model, kv_capacity_tokens, linear_ops_ms

ARXIV = "traces/arxiv_summarization/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"

WORKLOADS: dict[str, str] = {
    "azure-conv": "Azure LLM conversation trace (1 h, 19,366 requests) as interactive traffic",
    "azure-code": "Azure LLM code trace (1 h, 8,819 requests) as interactive traffic",
    "trace": "the user's CSV (trace_file=PATH; columns TIMESTAMP,ContextTokens,GeneratedTokens) as interactive traffic",
    "mixed": "azure-conv interactive + a backlog of 20,000 ShareGPT batch requests at t=0 (batch TTFT 30 min)",
    "poisson": "Poisson arrivals at rate_per_s (required) for 600 s, ShareGPT lengths",
    "gamma": "Gamma inter-arrivals at rate_per_s with coefficient of variation cv (both required), 600 s, ShareGPT lengths",
    "batch-backlog": "1,000,000 batch requests at t=0 (batch TTFT 4 h) + Poisson interactive at 2/s for 1 h",
    "conversation": "multi-turn chat sessions (Poisson at rate_per_s sessions/s, default 2.5, for 1,800 s), each turn's "
                    "prompt the whole conversation so far, ShareGPT lengths",
}
LENGTH_SOURCES = ("sharegpt", "arxiv")

DEFAULT_INTERACTIVE_TTFT_MS = 10_000.0
DEFAULT_INTERACTIVE_ITL_MS = 100.0
DEFAULT_BATCH_ITL_MS = 500.0
DEFAULT_BATCH_TTFT_S = 1_800.0
BACKLOG_BATCH_TTFT_S = 14_400.0
SYNTHETIC_DURATION_S = 600.0
BACKLOG_DURATION_S = 3_600.0
BACKLOG_RATE_PER_S = 2.0
BACKLOG_BATCH_REQUESTS = 1_000_000
MIXED_BATCH_REQUESTS = 20_000
MAX_REQUESTS = 10_000_000
# conversation: sessions/s, turns per session (geometric), think time, response-time estimate
CONVERSATION_RATE_PER_S = 2.5  # ≈ 5 requests/s: the context limit cuts sessions to ≈ 2 turns
CONVERSATION_DURATION_S = 1_800.0
CONVERSATION_MEAN_TURNS = 4.0
CONVERSATION_MAX_TURNS = 12
CONVERSATION_THINK_S = 30.0
CONVERSATION_MS_PER_OUTPUT_TOKEN = 30.0

_TRACE_WORKLOADS = ("azure-conv", "azure-code", "trace", "mixed")
_SYNTHETIC_WORKLOADS = ("poisson", "gamma", "batch-backlog", "conversation")


@dataclass(frozen=True)
class Workload:
    """Interactive and batch requests with their SLOs. Times in seconds from the start of the workload."""

    name: str
    description: str
    interactive: Trace  # interactive requests (arrival_s ascending)
    batch: Trace  # batch requests (arrival_s; a backlog arrives at t=0)
    interactive_ttft_ms: float  # SLO of each interactive request
    interactive_itl_ms: float  # SLO on the request's mean ITL
    batch_ttft_s: float  # TTFT SLO of each batch request (minutes to hours)
    batch_itl_ms: float  # relaxed ITL SLO used by batch instances' local autoscaler

    @property
    def duration_s(self) -> float:
        """Last arrival of either class (0 if there are no requests)."""
        last = [float(t.arrival_s.max()) for t in (self.interactive, self.batch) if len(t)]
        return max(last, default=0.0)


# --------------------------------------------------------------------------------------------
# Token-length pools
# --------------------------------------------------------------------------------------------


def arxiv_lengths(max_total_tokens: int) -> np.ndarray:
    """(prompt_tokens, output_tokens) rows of the arXiv summarization trace whose sum fits ``max_total_tokens``.

    File: ``../shared/data/traces/arxiv_summarization/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv``
    (microsoft/vidur @ 7d475133, MIT; columns ``num_prefill_tokens,num_decode_tokens,...``). Rows with a
    non-positive count are dropped too, as in ``services.common.traces.load_sharegpt_lengths``.
    """
    path = shared_data_dir() / ARXIV
    with path.open(newline="") as f:
        rows = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in csv.DictReader(f)]
    arr = np.array(rows, dtype=np.int64).reshape(-1, 2)
    return arr[(arr.sum(axis=1) <= max_total_tokens) & (arr[:, 0] > 0) & (arr[:, 1] > 0)]


@functools.lru_cache(maxsize=8)
def _length_pool(source: str, max_model_len: int) -> np.ndarray:
    if source == "sharegpt":
        # ../shared/data/traces/sharegpt/sharegpt_8k_filtered_stats_llama2_tokenizer.csv (sarathi-serve, Apache-2.0)
        pool = np.asarray(load_sharegpt_lengths(max_model_len), dtype=np.int64).reshape(-1, 2)
    else:
        pool = arxiv_lengths(max_model_len)
    if not len(pool):
        raise ValueError(f"no {source} request fits max_model_len={max_model_len} tokens")
    pool.setflags(write=False)
    return pool


def _sample_lengths(rng: np.random.Generator, source: str, n: int, max_model_len: int) -> tuple[np.ndarray, np.ndarray]:
    pool = _length_pool(source, max_model_len)
    idx = rng.integers(0, len(pool), size=n)
    rows = pool[idx]
    return np.ascontiguousarray(rows[:, 0]), np.ascontiguousarray(rows[:, 1])


# --------------------------------------------------------------------------------------------
# Arrivals
# --------------------------------------------------------------------------------------------


def _renewal_arrivals(rng: np.random.Generator, rate_per_s: float, duration_s: float, cv: float) -> np.ndarray:
    """Arrival times in ``[0, duration_s)`` of a renewal process with Gamma inter-arrivals.

    Mean inter-arrival ``1/rate``, coefficient of variation ``cv``: shape ``1/cv²``, scale ``1/(rate·shape)``
    (``cv`` = 1 is the Poisson process). Drawn in vectorised chunks.
    """
    shape = 1.0 / cv**2
    scale = 1.0 / (rate_per_s * shape)
    expected = rate_per_s * duration_s
    chunk = int(expected + 6.0 * math.sqrt(expected) * max(cv, 1.0) + 64)
    parts, t0 = [], 0.0
    while True:
        t = t0 + np.cumsum(rng.gamma(shape, scale, size=chunk))
        parts.append(t[t < duration_s])
        if t[-1] >= duration_s:
            break
        t0 = float(t[-1])
    return np.concatenate(parts)


def _conversation_interactive(rng: np.random.Generator, rate_per_s: float, duration_s: float,
                              max_model_len: int) -> Trace:
    """Multi-turn chat sessions: each turn's prompt is the whole conversation so far plus its new input.

    Sessions start as a Poisson process at ``rate_per_s`` sessions/s over ``[0, duration_s)``; a session has
    ``min(Geometric(1/CONVERSATION_MEAN_TURNS), CONVERSATION_MAX_TURNS)`` turns. Each turn draws (new input,
    output) tokens from the ShareGPT pool (``../shared/data/traces/sharegpt/sharegpt_8k_filtered_stats_llama2_tokenizer.csv``,
    microsoft/sarathi-serve @ 72339db5, Apache-2.0; a row's prompt is the turn's new input). Turn ``k``'s prompt
    is the inputs and outputs of turns ``1..k−1`` plus its own input; it arrives at turn ``k−1``'s arrival plus
    its expected response time (``CONVERSATION_MS_PER_OUTPUT_TOKEN`` × its output tokens: the workload is built
    before any simulation) plus an exponential think time (mean ``CONVERSATION_THINK_S``). A session ends at the
    first turn whose prompt + output exceeds ``max_model_len`` (the client starts a new chat: that turn and the
    rest are dropped); turns arriving at or after ``duration_s`` are cut.
    """
    starts = _renewal_arrivals(rng, rate_per_s, duration_s, 1.0)
    turns = np.minimum(rng.geometric(1.0 / CONVERSATION_MEAN_TURNS, size=len(starts)), CONVERSATION_MAX_TURNS)
    new_in, out = _sample_lengths(rng, "sharegpt", int(turns.sum()), max_model_len)
    think_s = rng.exponential(CONVERSATION_THINK_S, size=len(new_in))
    session = np.repeat(np.arange(len(starts)), turns)
    first = (np.cumsum(turns) - turns)[session]  # index of each turn's session's first turn

    def earlier(x: np.ndarray) -> np.ndarray:
        """Sum of ``x`` over the earlier turns of the same session."""
        c = np.cumsum(x) - x
        return c - c[first]

    prompt = earlier(new_in + out) + new_in
    arrival = starts[session] + earlier(out * (CONVERSATION_MS_PER_OUTPUT_TOKEN / 1e3) + think_s)
    # prompt + output and the arrival both grow along a session, so this drops a session's tail only.
    keep = (prompt + out <= max_model_len) & (arrival < duration_s)
    order = np.argsort(arrival[keep], kind="stable")
    return Trace(f"conversation@{rate_per_s:g}/s", arrival[keep][order], prompt[keep][order], out[keep][order])


def _check_trace_tokens(trace: Trace, path: Path) -> None:
    """ContextTokens and GeneratedTokens must be ≥ 1; report the first bad row as ``path:line``."""
    if not len(trace) or (trace.prompt_tokens.min() >= 1 and trace.output_tokens.min() >= 1):
        return
    with path.open(newline="") as f:  # error path only: find the line in the file's own order
        reader = csv.DictReader(f)
        for row in reader:
            ctx, gen = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            if ctx < 1 or gen < 1:
                raise ValueError(f"{path}:{reader.line_num}: ContextTokens and GeneratedTokens must be >= 1, "
                                 f"got ContextTokens={ctx}, GeneratedTokens={gen}")
    raise ValueError(f"{path}: a row has ContextTokens or GeneratedTokens < 1")  # pragma: no cover


def _trace_interactive(source: str, rate_per_s: float | None, duration_s: float | None, max_model_len: int) -> Trace:
    """An Azure-format trace (name or path), checked, rescaled to ``rate_per_s``, cut to ``duration_s``, clipped."""
    trace = load_azure_trace(source)
    path = shared_data_dir() / AZURE_TRACES[source] if source in AZURE_TRACES else Path(source)
    _check_trace_tokens(trace, path)
    if rate_per_s is not None:
        span = float(trace.arrival_s[-1] - trace.arrival_s[0]) if len(trace) else 0.0
        if len(trace) < 2 or span <= 0:
            raise ValueError(f"rate_per_s: {path} needs at least two distinct arrival times to be rescaled")
        factor = span / (len(trace) - 1) * rate_per_s  # old mean gap / new mean gap (1/rate)
        trace = Trace(trace.name, trace.arrival_s / factor, trace.prompt_tokens, trace.output_tokens)
    if duration_s is not None:
        trace = trace.slice(0.0, duration_s)
    out = np.minimum(trace.output_tokens.astype(np.int64), max_model_len - 1)
    prompt = np.minimum(trace.prompt_tokens.astype(np.int64), max_model_len - out)
    return Trace(trace.name, trace.arrival_s.astype(float), prompt, out)


# --------------------------------------------------------------------------------------------
# make_workload
# --------------------------------------------------------------------------------------------


def _positive(name: str, value: float | None, unit: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool) \
        and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        rng = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {rng} ({unit}), got {value!r}")


def _count(name: str, value: int | None) -> None:
    if value is None:
        return
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool) and 0 <= value <= MAX_REQUESTS
    if not ok:
        raise ValueError(f"{name} must be an integer in [0, {MAX_REQUESTS:,}] (requests), got {value!r}")


def _check_args(name: str, rate_per_s, cv, duration_s, batch_requests, batch_ttft_s, batch_source, trace_file,
                interactive_ttft_ms, interactive_itl_ms, batch_itl_ms, seed, max_model_len) -> None:
    """:func:`make_workload`'s argument checks (ValueError naming the parameter and its accepted range)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; valid names: {', '.join(WORKLOADS)}")
    _positive("rate_per_s", rate_per_s, "requests/s")
    _positive("cv", cv, "coefficient of variation of inter-arrival times")
    _positive("duration_s", duration_s, "seconds", allow_zero=True)
    _count("batch_requests", batch_requests)
    _positive("batch_ttft_s", batch_ttft_s, "seconds")
    _positive("interactive_ttft_ms", interactive_ttft_ms, "ms")
    _positive("interactive_itl_ms", interactive_itl_ms, "ms")
    _positive("batch_itl_ms", batch_itl_ms, "ms")
    if batch_source not in LENGTH_SOURCES:
        raise ValueError(f"batch_source must be one of {', '.join(LENGTH_SOURCES)}, got {batch_source!r}")
    if not (isinstance(max_model_len, int | np.integer) and max_model_len >= 2):
        raise ValueError(f"max_model_len must be an integer >= 2 (tokens), got {max_model_len!r}")
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if cv is not None and name != "gamma":
        raise ValueError(f"cv applies only to the gamma workload, not {name!r}")
    if name == "gamma" and cv is None:
        raise ValueError("cv is required for the gamma workload (coefficient of variation > 0; 1 = Poisson)")
    if name in ("poisson", "gamma") and rate_per_s is None:
        raise ValueError(f"rate_per_s is required for the {name} workload (requests/s > 0)")
    if trace_file is not None and name != "trace":
        raise ValueError(f"trace_file applies only to the 'trace' workload, not {name!r}: "
                         "use make_workload('trace', trace_file=PATH, ...)")
    if name == "trace" and trace_file is None:
        raise ValueError("the 'trace' workload needs trace_file=PATH (a CSV with TIMESTAMP,ContextTokens,GeneratedTokens)")


def _interactive(name: str, rng: np.random.Generator, rate_per_s: float | None, cv: float | None,
                 duration_s: float | None, trace_file: str | Path | None, max_model_len: int) -> tuple[Trace, str]:
    """The interactive requests of workload ``name`` and a description of them (:func:`make_workload`).
    ValueError when a synthetic workload would exceed ``MAX_REQUESTS``, checked before drawing anything."""
    if name in _SYNTHETIC_WORKLOADS:
        conv = name == "conversation"
        rate = rate_per_s if rate_per_s is not None else (CONVERSATION_RATE_PER_S if conv else BACKLOG_RATE_PER_S)
        dur = duration_s if duration_s is not None else {
            "batch-backlog": BACKLOG_DURATION_S, "conversation": CONVERSATION_DURATION_S}.get(name, SYNTHETIC_DURATION_S)
        turns = CONVERSATION_MEAN_TURNS if conv else 1.0
        if rate * dur * turns > MAX_REQUESTS:
            per = f" × {turns:g} turns" if conv else ""
            raise ValueError(f"rate_per_s × duration_s{per} must be <= {MAX_REQUESTS:,} expected requests, "
                             f"got {rate} × {dur}{per} = {rate * dur * turns:,.0f}")

    if name in _TRACE_WORKLOADS:
        source = str(trace_file) if name == "trace" else ("azure-conv" if name == "mixed" else name)
        interactive = _trace_interactive(source, rate_per_s, duration_s, max_model_len)
        what = f"{source}" + (f" rescaled to {rate_per_s:g}/s" if rate_per_s is not None else "")
    elif name == "conversation":
        interactive = _conversation_interactive(rng, rate, dur, max_model_len)
        what = f"{rate:g} sessions/s for {dur:g} s, ShareGPT lengths, context growing across turns"
    else:
        arrivals = _renewal_arrivals(rng, rate, dur, cv if name == "gamma" else 1.0)
        prompt, out = _sample_lengths(rng, "sharegpt", len(arrivals), max_model_len)
        kind = f"gamma(cv={cv:g})" if name == "gamma" else "poisson"
        interactive = Trace(f"{kind}@{rate:g}/s", arrivals, prompt, out)
        what = f"{kind} at {rate:g}/s for {dur:g} s, ShareGPT lengths"
    return interactive, what


def make_workload(name: str, *, rate_per_s: float | None = None, cv: float | None = None,
                  duration_s: float | None = None, batch_requests: int | None = None,
                  batch_ttft_s: float | None = None, batch_source: str = "sharegpt", trace_file: str | Path | None = None,
                  interactive_ttft_ms: float = DEFAULT_INTERACTIVE_TTFT_MS,
                  interactive_itl_ms: float = DEFAULT_INTERACTIVE_ITL_MS,
                  batch_itl_ms: float = DEFAULT_BATCH_ITL_MS,
                  seed: int = 0, max_model_len: int = 8192) -> Workload:
    """Build the named workload (names: the module docstring).

    Parameters, where they apply:

    * ``rate_per_s`` — trace workloads (``azure-*``, ``trace``, ``mixed``): the whole trace's arrival times are
      scaled uniformly (burst shape kept) so its mean inter-arrival time is ``1/rate_per_s``; then ``duration_s``
      is taken. Synthetic workloads: the arrival rate (``conversation``: of sessions).
    * ``duration_s`` — trace workloads: keep the first ``duration_s`` seconds (after rescaling); default the whole
      trace. Synthetic: length of the arrival process (``poisson``/``gamma`` 600 s, ``batch-backlog`` 3,600 s,
      ``conversation`` 1,800 s: no turn arrives after it).
    * ``batch_requests`` — size of the batch backlog, all arriving at t=0 (any workload; default 0, ``mixed``
      20,000, ``batch-backlog`` 1,000,000), lengths from ``batch_source`` (``sharegpt`` or ``arxiv``).
    * ``cv`` only with ``gamma``; ``trace_file`` only with ``trace`` (anything else is a ValueError, not ignored).
    * At most 10,000,000 requests per class (``batch_requests``, and ``rate_per_s × duration_s`` for synthetic
      arrivals; × 4 mean turns for ``conversation``), checked before anything is built.

    Synthetic arrivals are a renewal process started at t=0 (the first request arrives after one inter-arrival
    time). Batch and interactive requests are drawn from separate random streams of ``seed``, so changing the
    batch size leaves the interactive requests unchanged (common random numbers).

    Token lengths (``max_model_len``, default 8,192 = Llama-3-8B's context in the performance model):

    * sampled lengths (ShareGPT, arXiv) are drawn, with replacement, from the rows whose prompt ≥ 1, output ≥ 1
      and prompt + output ≤ ``max_model_len`` (the others are **dropped** from the pool);
    * trace lengths (Azure, the user's CSV) are **clipped** so every request and its arrival time stay: output to
      at most ``max_model_len − 1``, then prompt to at most ``max_model_len − output`` (a front end truncating the
      prompt). A trace row with ContextTokens or GeneratedTokens < 1 is an error (``path:line``).

    SLO defaults — Chiron's choices for Llama-3-8B on one A100-80GB; the paper's values are not known
    (``../shared/notes/paper.md`` §1 gives only "seconds" for interactive and "minutes to hours" for batch):

    * interactive TTFT 10,000 ms and mean-ITL 100 ms: the same as ``services.replay.ReplayConfig`` and the
      router's default SLO class, so simulated and replayed runs score alike (a single-request decode step is
      about 12 ms in the performance model);
    * batch ITL 500 ms: the relaxed SLO of ``chiron engine --role batch``'s local autoscaler;
    * batch TTFT 1,800 s (30 min), and 14,400 s (4 h) for ``batch-backlog``, whose million-request ShareGPT queue
      needs about 90 GPU-hours even at the lower bound (:func:`gpu_seconds_lower_bound`), i.e. nearly 2 h on the
      paper's 50-GPU cap. (``mixed``'s 20,000 requests need about 1.8 GPU-hours: ~4 GPUs for 30 min.)

    Raises ValueError for an unknown name (listing the valid ones) or a parameter out of range (naming it and
    the accepted range), before loading or drawing anything; FileNotFoundError for a missing trace file, and
    ValueError with ``path:line`` for a malformed one.
    """
    _check_args(name, rate_per_s, cv, duration_s, batch_requests, batch_ttft_s, batch_source, trace_file,
                interactive_ttft_ms, interactive_itl_ms, batch_itl_ms, seed, max_model_len)
    n_batch = batch_requests if batch_requests is not None else {
        "mixed": MIXED_BATCH_REQUESTS, "batch-backlog": BACKLOG_BATCH_REQUESTS}.get(name, 0)
    if batch_ttft_s is None:
        batch_ttft_s = BACKLOG_BATCH_TTFT_S if name == "batch-backlog" else DEFAULT_BATCH_TTFT_S
    rng_int, rng_batch = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2))
    interactive, what = _interactive(name, rng_int, rate_per_s, cv, duration_s, trace_file, max_model_len)

    b_prompt, b_out = _sample_lengths(rng_batch, batch_source, n_batch, max_model_len)
    batch = Trace(f"{batch_source}-backlog", np.zeros(n_batch), b_prompt, b_out)

    span = float(interactive.arrival_s.max()) if len(interactive) else 0.0
    description = (f"{WORKLOADS[name]}. Built: {len(interactive):,} interactive ({what}, last arrival {span:.0f} s), "
                   f"{n_batch:,} batch ({batch_source} lengths) at t=0; SLOs interactive TTFT {interactive_ttft_ms:g} ms "
                   f"/ ITL {interactive_itl_ms:g} ms, batch TTFT {batch_ttft_s:g} s / ITL {batch_itl_ms:g} ms; "
                   f"max_model_len {max_model_len}, seed {seed}")
    return Workload(name, description, interactive, batch, float(interactive_ttft_ms), float(interactive_itl_ms),
                    float(batch_ttft_s), float(batch_itl_ms))


# --------------------------------------------------------------------------------------------
# Offline lower bound on GPU time
# --------------------------------------------------------------------------------------------

PREFILL_TOKEN_BUDGETS = (512, 1024, 2048, 4096, 8192, 16384)
_GRID = 2049  # batch-size grid points per refinement pass of the decode/prefill optimum


def _prefill_shared_ms_per_token(perf: PerfModel) -> float:
    """Cheapest non-attention stand-alone prefill cost per token (linear layers, KV save, step overheads) over
    the token budgets of :data:`PREFILL_TOKEN_BUDGETS`: the previous bound's prefill charge, kept for
    ``gpu_seconds_standalone_prefill``."""
    best = math.inf
    for n in PREFILL_TOKEN_BUDGETS:
        ms = perf.iteration_ms(0, 0.0, [(n, 0)]) - perf.model.num_layers * perf.prefill_attention_layer_ms(n, 0)
        best = min(best, ms / n)
    return best


def _shared_step_ms(perf: PerfModel, num_decode: np.ndarray | float, prefill_tokens: np.ndarray | float) -> np.ndarray:
    """``G(D, C)``: the part of ``perf.iteration_ms(D, S, chunks)`` (``D ≥ 1`` decodes, ``C`` prefill tokens in
    ``m`` chunks) that depends neither on the decodes' summed context ``S`` nor on how ``C`` splits into chunks::

        G(D, C) = L·[linear(D+C) + c0 + c1·D + e0 + e1·(D+C) + allreduce(D+C)] + lm_head(D) + cpu0 + cpu1·D
        iteration_ms(D, S, chunks) = G(D, C) + L·c2·S + L·Σ prefill_attention(chunk)
                                     + [lm_head(D+m) − lm_head(D)] + cpu1·m

    (``L`` layers; the terms are :meth:`PerfModel.iteration_ms`'s, a test checks the identity). Vectorised,
    real-valued ``D`` and ``C``; convex and increasing in both on ``D ≥ 1``.
    """
    m, g = perf.model, perf.gpu
    d = np.asarray(num_decode, dtype=float)
    n = d + np.asarray(prefill_tokens, dtype=float)
    a, b, p = perf.linear
    c0, c1, _c2 = perf.decode
    e0, e1 = perf.kv_save
    per_layer = linear_ops_ms(n, a, b, p) + c0 + c1 * d + e0 + e1 * n
    if m.tensor_parallel > 1:
        r0, r1 = perf.allreduce
        per_layer = per_layer + 2.0 * (r0 + r1 * n * m.hidden * m.dtype_bytes)
    tp = m.tensor_parallel
    lm_mem = m.hidden * m.vocab * m.dtype_bytes / tp / g.hbm_bandwidth_bytes_per_s
    lm_flops = 2.0 * m.hidden * m.vocab / tp / g.bf16_flops_per_s
    lm_head = 1e3 * np.maximum(lm_mem, lm_flops * d)
    return m.num_layers * per_layer + lm_head + perf.cpu_overhead_ms + perf.cpu_overhead_per_seq_ms * d


def _prefill_slope_ms(perf: PerfModel) -> float:
    """``π0 = L·(b + e1 + 2·r1·hidden·dtype)``: the infimum over chunk sizes of a prefill-only iteration's
    non-attention cost per token (the linear roofline's compute slope ``b`` plus the per-token KV save and
    all-reduce; every fixed cost amortised away). No prefill token, alone or folded into decodes, costs less."""
    m = perf.model
    _a, b, _p = perf.linear
    slope = b + perf.kv_save[1]
    if m.tensor_parallel > 1:
        slope += 2.0 * perf.allreduce[1] * m.hidden * m.dtype_bytes
    return m.num_layers * slope


def _best_decode_batch(perf: PerfModel, ctx: float, itl_ms: float, kv_tokens: int, cls: str) -> tuple[int, float]:
    """Batch size with the most decode tokens/s s.t. step ≤ ``itl_ms`` and ``B·ctx`` ≤ KV; returns (B, step ms)."""
    def step(b: int) -> float:
        return perf.iteration_ms(b, b * ctx)

    b_kv = int(kv_tokens // ctx)
    if b_kv < 1:
        raise ValueError(f"{cls}: mean decode context {ctx:.0f} tokens exceeds the KV capacity ({kv_tokens} tokens)")
    if step(1) > itl_ms:
        raise ValueError(f"{cls}: ITL SLO {itl_ms:g} ms is below one request's decode step "
                         f"({step(1):.1f} ms at {ctx:.0f} tokens of context); no batch size meets it")
    lo, hi = 1, b_kv
    if step(hi) <= itl_ms:
        lo = hi
    while hi - lo > 1:  # step time grows with B: bisect for the largest B within the SLO
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if step(mid) <= itl_ms else (lo, mid)
    cands = np.unique(np.append(np.geomspace(1, lo, 64).astype(int), lo))
    thr = [b / step(int(b)) for b in cands]
    best = int(cands[int(np.argmax(thr))])
    return best, float(step(best))


def _slo_batch_limit(perf: PerfModel, ctx: float, itl_ms: float) -> float:
    """Largest real ``B ≥ 1`` with ``iteration_ms(B, B·ctx) ≤ itl_ms`` (the caller has checked ``B = 1``)."""
    lo, hi = 1.0, 2.0
    while perf.iteration_ms(hi, hi * ctx) <= itl_ms:
        lo, hi = hi, 2.0 * hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if perf.iteration_ms(mid, mid * ctx) <= itl_ms else (lo, mid)
    return lo


def _folded_optimum(perf: PerfModel, dec_tokens: float, prefill_tokens: float, sum_ctx: float, itl_ms: float,
                    kv_tokens: int, b_cap: float) -> tuple[float, float, float]:
    """Minimise ``(T/B)·G(B, x) + (X − T·x/B)·π0`` over the mean decode batch ``B`` and the prefill tokens ``x``
    folded into each decode iteration (``T`` decode tokens, ``X`` prefill tokens, mean context ``ctx = K/T``),
    subject to ``B·ctx + x ≤`` KV, ``G(B, x) + L·c2·B·ctx ≤ itl_ms``, ``1 ≤ B ≤ b_cap``, ``0 ≤ x ≤ B·X/T``.

    For fixed ``B`` the most ``x`` the limits allow is best (``∂G/∂C ≤ π0``); the rest is a one-dimensional
    unimodal search over ``B`` (the objective is convex in ``N = T/B``), done on a geometric grid and refined
    once around its best point. Returns ``(B, x, shared ms)``.
    """
    L, c2 = perf.model.num_layers, perf.decode[2]
    ctx, ratio = sum_ctx / dec_tokens, prefill_tokens / dec_tokens
    pi0 = _prefill_slope_ms(perf)
    b_hi = min(kv_tokens / ctx, _slo_batch_limit(perf, ctx, itl_ms), b_cap)

    def best_x(bs: np.ndarray) -> np.ndarray:
        cap = np.maximum(np.minimum(ratio * bs, kv_tokens - bs * ctx), 0.0)
        room = itl_ms - L * c2 * bs * ctx
        lo, hi = np.zeros_like(bs), cap
        fits = _shared_step_ms(perf, bs, hi) <= room
        for _ in range(60):  # G grows with x: bisect for the largest x within the ITL SLO
            mid = 0.5 * (lo + hi)
            ok = _shared_step_ms(perf, bs, mid) <= room
            lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
        return np.where(fits, cap, lo)

    def objective(bs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = best_x(bs)
        return dec_tokens / bs * _shared_step_ms(perf, bs, x) + (prefill_tokens - dec_tokens * x / bs) * pi0, x

    grid = np.geomspace(1.0, max(b_hi, 1.0), _GRID)
    for _ in range(2):
        val, xs = objective(grid)
        k = int(np.argmin(val))
        best = (float(grid[k]), float(xs[k]), float(val[k]))
        grid = np.linspace(grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)], _GRID)
    return best


def _class_terms(perf: PerfModel, trace: Trace, itl_ms: float, kv: int, cls: str) -> dict:
    """One class's sums for :func:`gpu_seconds_lower_bound`: prompt and decode tokens, Σ decode context, exact
    prefill attention [ms], and (with decode tokens) its mean decode context, best SLO-feasible decode batch
    with its step [ms], and its SLO batch limit."""
    d0, d1, d2 = (float(x) for x in perf.prefill)
    layers = perf.model.num_layers
    p = trace.prompt_tokens.astype(np.float64)
    o = trace.output_tokens.astype(np.float64)
    dec = np.maximum(o - 1.0, 0.0)  # decode tokens j = 1..O-1, each at context P + j
    c = {"itl": float(itl_ms), "prompt_tokens": float(p.sum()), "dec_tokens": float(dec.sum()),
         "sum_ctx": float((dec * p + dec * (dec + 1.0) / 2.0).sum()),
         "attention_ms": float(layers * (d0 * len(p) + d1 * p.sum() + d2 * (p * p).sum() / 2.0)),
         "batch_size": 0, "ctx": 0.0, "step_ms": 0.0, "slo_limit": math.inf}
    if c["dec_tokens"] > 0:
        c["ctx"] = c["sum_ctx"] / c["dec_tokens"]
        c["batch_size"], c["step_ms"] = _best_decode_batch(perf, c["ctx"], itl_ms, kv, cls)
        c["slo_limit"] = _slo_batch_limit(perf, c["ctx"], itl_ms)
    return c


def _pooled_shared_ms(perf: PerfModel, per: dict[str, dict], kv: int) -> tuple[float, float, float, float]:
    """The pooled optimum over both classes (:func:`_folded_optimum`): decode batch ``B``, folded prompt tokens
    per decode step ``x``, and the shared cost ``G`` [ms] split into decode ``(T/B)·G(B, 0)`` and the prefill
    rest (``X·π0`` with no decode tokens)."""
    T = sum(c["dec_tokens"] for c in per.values())
    X = sum(c["prompt_tokens"] for c in per.values())
    K = sum(c["sum_ctx"] for c in per.values())
    if T <= 0:
        return 0.0, 0.0, 0.0, X * _prefill_slope_ms(perf)
    decoding = [c for c in per.values() if c["dec_tokens"] > 0]
    b_cap = min(T * c["slo_limit"] / c["dec_tokens"] for c in decoding)
    itl_max = max(c["itl"] for c in decoding)
    b_opt, x_opt, shared_ms = _folded_optimum(perf, T, X, K, itl_max, kv, b_cap)
    decode_shared_ms = T / b_opt * float(_shared_step_ms(perf, b_opt, 0.0))
    return b_opt, x_opt, decode_shared_ms, shared_ms - decode_shared_ms


def gpu_seconds_lower_bound(workload: Workload, perf: PerfModel | None = None,
                            gpus_per_instance: int | None = None) -> dict:
    """Offline lower bound on the GPU-seconds of ``workload`` (hardware.md, "Offline lower bound on GPU-hours").

    The least busy time any packing of the work into engine iterations can take under our performance model
    (:meth:`PerfModel.iteration_ms`, which ``EngineCore.step`` charges per iteration), with every iteration
    that decodes within the decoding classes' ITL SLO and the KV capacity; no idle time, model loading,
    headroom or queueing is counted, so no real policy reaches it.

    Why nothing beats it (convexity of the iteration cost in the decode batch and folded prefill tokens; exact
    prefill-attention and decode-context terms; preemption only adds work): ``docs/decisions/0024``.

    Decode takes ``(T/B)·G(B, 0)`` plus its context term and is split between the classes in proportion to
    their dedicated-instance cost ``T_c·G(B_c*, 0)/B_c*``; prefill takes the rest of ``G`` (each prompt token
    its marginal share ``prefill_ms_per_token``) plus its attention. ``{cls}_batch_size`` is the class's own
    best SLO-feasible decode batch ``B_c*`` (max ``B/iteration_ms(B, B·ctx_c)`` with ``iteration_ms ≤`` the
    class's ITL SLO and ``B·ctx_c ≤`` KV, ``ctx_c`` the token-weighted mean decode context);
    ``decode_batch_size`` and ``prefill_tokens_per_decode_step`` are the pooled optimum ``(B, x)``.
    ``gpu_seconds_standalone_prefill`` charges prefill in its own iterations at the cheapest of
    :data:`PREFILL_TOKEN_BUDGETS` and decode per class at ``B_c*``: never below the bound (its schedule is one
    the optimum considers), and beaten by a single static instance, which folds prefill into decode steps.

    ``perf`` defaults to Llama-3-8B on A100-80GB; ``gpus_per_instance`` to the model's tensor-parallel degree
    (1 for Llama-3-8B). Batch sizes are 0 for a class without decode tokens. Raises ValueError if a class's ITL
    SLO is below a single request's decode step. Vectorised over requests (a million requests take well under
    a second once the performance model is fitted).
    """
    perf = perf if perf is not None else default_perf_model("llama-3-8b")
    gpus = perf.model.tensor_parallel if gpus_per_instance is None else gpus_per_instance
    if not isinstance(gpus, int | np.integer) or isinstance(gpus, bool) or gpus < 1:
        raise ValueError(f"gpus_per_instance must be an integer >= 1, got {gpus_per_instance!r}")
    kv = kv_capacity_tokens(perf.model, perf.gpu)
    layers, c2 = perf.model.num_layers, float(perf.decode[2])

    per = {cls: _class_terms(perf, trace, itl, kv, cls)
           for cls, trace, itl in (("interactive", workload.interactive, workload.interactive_itl_ms),
                                   ("batch", workload.batch, workload.batch_itl_ms))}

    T = sum(c["dec_tokens"] for c in per.values())
    X = sum(c["prompt_tokens"] for c in per.values())
    b_opt, x_opt, decode_shared_ms, prefill_shared_ms = _pooled_shared_ms(perf, per, kv)
    weights = {cls: (c["dec_tokens"] * float(_shared_step_ms(perf, c["batch_size"], 0.0)) / c["batch_size"]
                     if c["dec_tokens"] > 0 else 0.0) for cls, c in per.items()}
    w_sum = sum(weights.values())

    result: dict = {}
    total = standalone = 0.0
    shared_old = _prefill_shared_ms_per_token(perf)
    for cls, c in per.items():
        decode_ms = decode_shared_ms * weights[cls] / w_sum + layers * c2 * c["sum_ctx"] if w_sum > 0 else 0.0
        prefill_ms = (prefill_shared_ms * c["prompt_tokens"] / X if X > 0 else 0.0) + c["attention_ms"]
        prefill_s, decode_s = gpus * prefill_ms / 1e3, gpus * decode_ms / 1e3
        total += prefill_s + decode_s
        old_decode_ms = c["dec_tokens"] / c["batch_size"] * c["step_ms"] if c["dec_tokens"] > 0 else 0.0
        standalone += gpus * (c["prompt_tokens"] * shared_old + c["attention_ms"] + old_decode_ms) / 1e3
        result.update({
            f"{cls}_gpu_seconds": prefill_s + decode_s,
            f"{cls}_prefill_gpu_seconds": prefill_s,
            f"{cls}_decode_gpu_seconds": decode_s,
            f"{cls}_batch_size": c["batch_size"],
            f"{cls}_decode_context_tokens": c["ctx"],
        })
    return {
        "gpu_seconds_lower_bound": float(total),
        **result,
        "decode_batch_size": b_opt,
        "prefill_tokens_per_decode_step": x_opt,
        "prefill_folded_fraction": min(1.0, T * x_opt / b_opt / X) if b_opt > 0 and X > 0 else 0.0,
        "prefill_ms_per_token": prefill_shared_ms / X if X > 0 else 0.0,
        "gpu_seconds_standalone_prefill": float(standalone),
        "kv_capacity_tokens": kv,
        "gpus_per_instance": int(gpus),
        "model": perf.model.name,
        "method": ("both classes pooled: N decode iterations at their mean point (B decodes, x prompt tokens "
                   "folded in, as chunked prefill does), N*G(B,x) by convexity, with B*ctx+x <= KV capacity, step "
                   "<= the loosest decoding class's ITL SLO and N >= each class's decode tokens / its SLO batch "
                   "limit; prompt tokens not folded at the compute slope pi0; prefill attention and decode "
                   "context terms exact. Changed from prefill at its stand-alone cost (gpu_seconds_standalone_prefill), "
                   "which folding into decode steps beats; no idle, load, headroom or queueing time"),
    }
