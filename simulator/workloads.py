"""Workloads for the cluster simulator: an interactive request stream and a batch backlog, with their SLOs.

A :class:`Workload` is two :class:`~services.common.traces.Trace` objects (interactive, batch) plus the SLOs
the simulator scores them against. :func:`make_workload` builds the named workloads of :data:`WORKLOADS`;
:func:`gpu_seconds_lower_bound` gives the offline lower bound on GPU time that every policy's GPU-hours are
reported against (``../shared/notes/hardware.md``, "Offline lower bound on GPU-hours").

Data files (in ``../shared/data``; source, commit and licence of each in ``../shared/data/PROVENANCE.md``):

* ``traces/azure_llm_2023/AzureLLMInferenceTrace_{conv,code}.csv`` — Azure LLM inference traces 2023
  (Splitwise, ISCA'24; Azure/AzurePublicDataset @ b469a113, CC-BY-4.0): one hour of real arrivals with context
  and generated token counts (conv 19,366 requests, code 8,819). Loaded by
  :func:`services.common.traces.load_azure_trace`, which also loads a user's CSV with the same columns.
* ``traces/sharegpt/sharegpt_8k_filtered_stats_llama2_tokenizer.csv`` — ShareGPT prompt/output token counts
  (Llama-2 tokenizer; microsoft/sarathi-serve @ 72339db5, Apache-2.0). Loaded by
  :func:`services.common.traces.load_sharegpt_lengths`.
* ``traces/arxiv_summarization/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv`` — arXiv
  summarization prompt/output token counts (Llama-2 tokenizer; microsoft/vidur @ 7d475133, MIT): long prompts,
  short outputs, a natural batch workload. Loaded by :func:`arxiv_lengths`.

Named workloads (``make_workload(name, ...)``; every one is deterministic given ``seed``):

* ``azure-conv`` — the Azure conversation trace as interactive traffic (no batch unless ``batch_requests``);
* ``azure-code`` — the same with the Azure code trace;
* ``trace`` — the user's CSV (``make_workload("trace", trace_file=PATH)``, Azure columns) as interactive
  traffic, combinable with a batch backlog (``batch_requests``);
* ``mixed`` — ``azure-conv`` interactive + a backlog of 20,000 ShareGPT batch requests at t=0;
* ``poisson`` — Poisson arrivals at ``rate_per_s`` (required) for 600 s, ShareGPT lengths;
* ``gamma`` — Gamma inter-arrivals with mean ``1/rate_per_s`` and coefficient of variation ``cv`` (both
  required; shape ``1/cv²``, scale ``1/(rate·shape)``) for 600 s, ShareGPT lengths;
* ``batch-backlog`` — 1,000,000 batch requests at t=0 + Poisson interactive traffic at 2/s for 3,600 s.

Parameters, where they apply:

* ``rate_per_s`` — trace workloads (``azure-*``, ``trace``, ``mixed``): the whole trace's arrival times are
  scaled uniformly (burst shape kept) so its mean inter-arrival time is ``1/rate_per_s``; then ``duration_s``
  is taken. Synthetic workloads: the arrival rate.
* ``duration_s`` — trace workloads: keep the first ``duration_s`` seconds (after rescaling); default the whole
  trace. Synthetic: length of the arrival process (``poisson``/``gamma`` 600 s, ``batch-backlog`` 3,600 s).
* ``batch_requests`` — size of the batch backlog, all arriving at t=0 (any workload; default 0, ``mixed``
  20,000, ``batch-backlog`` 1,000,000), lengths from ``batch_source`` (``sharegpt`` or ``arxiv``).
* ``cv`` only with ``gamma``; ``trace_file`` only with ``trace`` (anything else is a ValueError, not ignored).
* At most 10,000,000 requests per class (``batch_requests``, and ``rate_per_s × duration_s`` for synthetic
  arrivals), checked before anything is built.

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
  needs about 93 GPU-hours even at the lower bound (:func:`gpu_seconds_lower_bound`), i.e. nearly 2 h on the
  paper's 50-GPU cap. (``mixed``'s 20,000 requests need about 1.9 GPU-hours: ~4 GPUs for 30 min.)
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
from services.engine.perf_model import PerfModel, default_perf_model, kv_capacity_tokens

ARXIV = "traces/arxiv_summarization/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"

WORKLOADS: dict[str, str] = {
    "azure-conv": "Azure LLM conversation trace (1 h, 19,366 requests) as interactive traffic",
    "azure-code": "Azure LLM code trace (1 h, 8,819 requests) as interactive traffic",
    "trace": "the user's CSV (trace_file=PATH; columns TIMESTAMP,ContextTokens,GeneratedTokens) as interactive traffic",
    "mixed": "azure-conv interactive + a backlog of 20,000 ShareGPT batch requests at t=0 (batch TTFT 30 min)",
    "poisson": "Poisson arrivals at rate_per_s (required) for 600 s, ShareGPT lengths",
    "gamma": "Gamma inter-arrivals at rate_per_s with coefficient of variation cv (both required), 600 s, ShareGPT lengths",
    "batch-backlog": "1,000,000 batch requests at t=0 (batch TTFT 4 h) + Poisson interactive at 2/s for 1 h",
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

_TRACE_WORKLOADS = ("azure-conv", "azure-code", "trace", "mixed")
_SYNTHETIC_WORKLOADS = ("poisson", "gamma", "batch-backlog")


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


def make_workload(name: str, *, rate_per_s: float | None = None, cv: float | None = None,
                  duration_s: float | None = None, batch_requests: int | None = None,
                  batch_ttft_s: float | None = None, batch_source: str = "sharegpt", trace_file: str | Path | None = None,
                  interactive_ttft_ms: float = DEFAULT_INTERACTIVE_TTFT_MS,
                  interactive_itl_ms: float = DEFAULT_INTERACTIVE_ITL_MS,
                  batch_itl_ms: float = DEFAULT_BATCH_ITL_MS,
                  seed: int = 0, max_model_len: int = 8192) -> Workload:
    """Build the named workload (see the module docstring for names, parameters and defaults).

    Raises ValueError for an unknown name (listing the valid ones) or a parameter out of range (naming it and
    the accepted range), before loading or drawing anything; FileNotFoundError for a missing trace file, and
    ValueError with ``path:line`` for a malformed one.
    """
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

    n_batch = batch_requests if batch_requests is not None else {
        "mixed": MIXED_BATCH_REQUESTS, "batch-backlog": BACKLOG_BATCH_REQUESTS}.get(name, 0)
    if batch_ttft_s is None:
        batch_ttft_s = BACKLOG_BATCH_TTFT_S if name == "batch-backlog" else DEFAULT_BATCH_TTFT_S
    if name in _SYNTHETIC_WORKLOADS:
        rate = rate_per_s if rate_per_s is not None else BACKLOG_RATE_PER_S
        dur = duration_s if duration_s is not None else (
            BACKLOG_DURATION_S if name == "batch-backlog" else SYNTHETIC_DURATION_S)
        if rate * dur > MAX_REQUESTS:
            raise ValueError(f"rate_per_s × duration_s must be <= {MAX_REQUESTS:,} expected requests, "
                             f"got {rate} × {dur} = {rate * dur:,.0f}")

    rng_int, rng_batch = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2))

    if name in _TRACE_WORKLOADS:
        source = str(trace_file) if name == "trace" else ("azure-conv" if name == "mixed" else name)
        interactive = _trace_interactive(source, rate_per_s, duration_s, max_model_len)
        what = f"{source}" + (f" rescaled to {rate_per_s:g}/s" if rate_per_s is not None else "")
    else:
        arrivals = _renewal_arrivals(rng_int, rate, dur, cv if name == "gamma" else 1.0)
        prompt, out = _sample_lengths(rng_int, "sharegpt", len(arrivals), max_model_len)
        kind = f"gamma(cv={cv:g})" if name == "gamma" else "poisson"
        interactive = Trace(f"{kind}@{rate:g}/s", arrivals, prompt, out)
        what = f"{kind} at {rate:g}/s for {dur:g} s, ShareGPT lengths"

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


def _prefill_shared_ms_per_token(perf: PerfModel) -> float:
    """Cheapest non-attention prefill cost per token (linear layers, KV save, step overheads) over the budgets."""
    best = math.inf
    for n in PREFILL_TOKEN_BUDGETS:
        ms = perf.iteration_ms(0, 0.0, [(n, 0)]) - perf.model.num_layers * perf.prefill_attention_layer_ms(n, 0)
        best = min(best, ms / n)
    return best


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


def gpu_seconds_lower_bound(workload: Workload, perf: PerfModel | None = None,
                            gpus_per_instance: int | None = None) -> dict:
    """Offline lower bound on the GPU-seconds of ``workload`` (hardware.md, "Offline lower bound on GPU-hours").

    Every request's prefill and decode work, each at the highest per-instance throughput the performance model
    allows while meeting the class's SLO; no idle time, model loading, headroom or queueing is counted, so no
    real policy reaches it.

    * Prefill: each prompt's attention once, in one chunk (``L·(d0 + d1·P + d2·P²/2)``: chunking a prompt keeps
      the ``P²/2`` term and only adds ``d0`` per chunk), plus every prompt token's linear-layer/KV-save/step
      overhead at the cheapest per-token cost over token budgets of 512–16,384 tokens.
    * Decode (per class): a request's tokens after the first (which its prefill step samples) run at context
      ``P + j``. ``ctx`` is the token-weighted mean of that context, which is exact for the model's iteration
      time (linear in the batch's summed context). The batch size ``B*`` maximises ``B / iteration_ms(B, B·ctx)``
      subject to ``iteration_ms ≤`` the class's ITL SLO (``interactive_itl_ms`` / ``batch_itl_ms``) and
      ``B·ctx ≤`` the KV capacity; decode time = decode tokens / that throughput.

    For Llama-3-8B on one A100-80GB with ShareGPT or Azure lengths, the KV capacity (≈397k tokens), not the
    default 100/500 ms ITL SLOs, is what bounds ``B*`` (≈150–320); a tighter interactive ITL SLO (e.g. 30 ms)
    makes the SLO the binding limit.

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
    shared_ms = _prefill_shared_ms_per_token(perf)
    d0, d1, d2 = (float(x) for x in perf.prefill)
    layers = perf.model.num_layers

    result: dict = {}
    total = 0.0
    for cls, trace, itl in (("interactive", workload.interactive, workload.interactive_itl_ms),
                            ("batch", workload.batch, workload.batch_itl_ms)):
        p = trace.prompt_tokens.astype(np.float64)
        o = trace.output_tokens.astype(np.float64)
        prefill_ms = float(p.sum() * shared_ms + layers * (d0 * len(p) + d1 * p.sum() + d2 * (p * p).sum() / 2.0))
        dec = np.maximum(o - 1.0, 0.0)  # decode tokens j = 1..O-1, each at context P + j
        dec_tokens = float(dec.sum())
        batch_size, ctx, decode_ms = 0, 0.0, 0.0
        if dec_tokens > 0:
            ctx = float((dec * p + dec * (dec + 1.0) / 2.0).sum() / dec_tokens)
            batch_size, step_ms = _best_decode_batch(perf, ctx, itl, kv, cls)
            decode_ms = dec_tokens / batch_size * step_ms
        prefill_s, decode_s = float(gpus * prefill_ms / 1e3), float(gpus * decode_ms / 1e3)
        total += prefill_s + decode_s
        result.update({
            f"{cls}_gpu_seconds": prefill_s + decode_s,
            f"{cls}_prefill_gpu_seconds": prefill_s,
            f"{cls}_decode_gpu_seconds": decode_s,
            f"{cls}_batch_size": batch_size,
            f"{cls}_decode_context_tokens": ctx,
        })
    return {
        "gpu_seconds_lower_bound": float(total),
        **result,
        "kv_capacity_tokens": kv,
        "gpus_per_instance": int(gpus),
        "model": perf.model.name,
        "method": ("prefill: each prompt's attention once + linear/overhead per token at the cheapest token budget; "
                   "decode per class: batch size maximising tokens/s with step <= ITL SLO and B*ctx <= KV capacity "
                   "(ctx = token-weighted mean decode context); no idle, load, headroom or queueing time"),
    }
