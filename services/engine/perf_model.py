"""Performance model of one engine iteration on A100 GPUs, fitted to Vidur's operator profiles.

All times are milliseconds; the model is pure (no I/O after loading) and deterministic. Sources:

* ``../shared/data/profiles/vidur/a100/<model>/mlp.csv`` — per-layer times (ms) of the linear
  operators (QKV/output projections, gated MLP, norms, rope, residual add) against ``num_tokens`` and
  ``num_tensor_parallel_workers`` (microsoft/vidur @ 7d475133, MIT).
* ``../shared/data/profiles/vidur/a100/Meta-Llama-3-8B/attention_subset.csv`` and
  ``Llama-2-70b-hf/attention_tp2_legacy.csv`` — per-layer attention times (ms): decode rows against
  ``batch_size`` and per-request ``kv_cache_size`` (context tokens), prefill rows against
  ``prefill_chunk_size`` and ``kv_cache_size`` (microsoft/vidur, MIT).
* ``../shared/data/profiles/vidur/network/a100_pairwise_nvlink/all_reduce.csv`` — NCCL all-reduce time
  (ms) against message size (bytes), for tensor parallelism.
* ``../shared/notes/hardware.md`` — model shapes, A100 80 GB memory/bandwidth, KV bytes per token.

The fitted shapes follow the roofline argument of ``hardware.md``:

* linear operators (per layer): ``t(n) = (a^p + (b·n)^p)^(1/p)`` — memory-bound floor ``a`` (reading the
  weights once) blending into the compute-bound slope ``b`` ms/token;
* decode attention (per layer, per iteration): ``t = c0 + c1·B + c2·ΣC`` with ``B`` decode requests and
  ``ΣC`` their summed context tokens (KV bytes read);
* prefill attention (per layer, per prompt chunk of ``q`` tokens over ``k`` cached tokens):
  ``t = d0 + d1·q + d2·q·(k + q/2)`` (causal attention FLOPs);
* KV-cache write (per layer): ``t = e0 + e1·n``;
* all-reduce (TP > 1, two per layer): ``t = r0 + r1·bytes``.

Terms not in the profiles are modelled from ``hardware.md`` and stated as assumptions: the LM head
(roofline of a ``hidden × vocab`` GEMM) and a per-iteration CPU overhead of the serving engine
(scheduling, sampling, detokenization; ``cpu_overhead_ms`` + ``cpu_overhead_per_seq_ms`` × sequences).
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from services.common.paths import shared_data_dir

# --------------------------------------------------------------------------------------------
# Hardware and model facts (../shared/notes/hardware.md)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPUSpec:
    """A GPU's public specification (hardware.md, NVIDIA A100 data sheet)."""

    name: str
    memory_bytes: int
    hbm_bandwidth_bytes_per_s: float
    bf16_flops_per_s: float
    host_link_bytes_per_s: float  # PCIe Gen4 x16 as seen in practice (~25 GB/s)


A100_80GB = GPUSpec("A100-80GB", 80 * 10**9, 2.039e12, 312e12, 25e9)


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's shape (its ``config.json``; hardware.md table)."""

    name: str
    vidur_dir: str
    num_layers: int
    hidden: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    params: float
    tensor_parallel: int = 1
    attention_file: str = "attention_subset.csv"
    # TP degree of the attention profile rows; when it differs from tensor_parallel, attention times are
    # scaled by attention_profile_tp / tensor_parallel (heads split evenly over ranks; an assumption).
    attention_profile_tp: int = 1
    max_model_len: int = 8192
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token over all layers and TP ranks: 2 × layers × kv_heads × head_dim × dtype."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes


MODELS: dict[str, ModelSpec] = {
    "llama-3-8b": ModelSpec(
        "llama-3-8b", "Meta-Llama-3-8B", 32, 4096, 32, 8, 128, 14336, 128256, 8.0e9,
        tensor_parallel=1, attention_file="attention_subset.csv", max_model_len=8192,
    ),
    # Llama-2-70B over TP=4 on A100-80GB (hardware.md: 141 GB of weights need TP ≥ 2; TP=4 leaves room for
    # KV). The only attention profile is TP=2 (legacy layout), scaled to TP=4.
    "llama-2-70b": ModelSpec(
        "llama-2-70b", "Llama-2-70b-hf", 80, 8192, 64, 8, 128, 28672, 32000, 69e9,
        tensor_parallel=4, attention_file="attention_tp2_legacy.csv", attention_profile_tp=2,
        max_model_len=4096,
    ),
}


def kv_capacity_tokens(model: ModelSpec, gpu: GPUSpec = A100_80GB, gpu_memory_utilization: float = 0.9,
                       activation_reserve_bytes: float = 4e9) -> int:
    """KV-cache capacity in tokens of one instance (all TP ranks together).

    ``memory × utilization × TP − weights − activation reserve (per rank)``, divided by KV bytes/token
    (hardware.md: Llama-3-8B on one A100-80GB at vLLM's default 0.9 → ≈ 400k tokens).
    Raises ValueError when the weights do not fit.
    """
    tp = model.tensor_parallel
    free = gpu.memory_bytes * gpu_memory_utilization * tp - model.weight_bytes - activation_reserve_bytes * tp
    if free <= 0:
        raise ValueError(f"{model.name} does not fit on {tp} × {gpu.name}")
    return int(free // model.kv_bytes_per_token)


# --------------------------------------------------------------------------------------------
# Profile loading
# --------------------------------------------------------------------------------------------

LINEAR_OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
              "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise FileNotFoundError(f"profile {path} not found; the Vidur profiles live in ../shared/data/profiles/vidur")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(row: dict[str, str], key: str) -> float:
    v = row.get(key, "")
    return float(v) if v not in ("", None) else math.nan


@dataclass
class ProfileTables:
    """Profile rows as arrays (times in ms, per layer)."""

    linear_tokens: np.ndarray
    linear_ms: np.ndarray
    decode_batch: np.ndarray
    decode_context: np.ndarray
    decode_ms: np.ndarray
    prefill_chunk: np.ndarray
    prefill_kv: np.ndarray
    prefill_ms: np.ndarray
    kv_save_tokens: np.ndarray
    kv_save_ms: np.ndarray
    allreduce_bytes: np.ndarray
    allreduce_ms: np.ndarray


@functools.lru_cache(maxsize=8)
def load_profiles(model_name: str, data_dir: str | None = None) -> ProfileTables:
    """Load the Vidur A100 rows for one model at its tensor-parallel degree.

    Raises KeyError for an unknown model and FileNotFoundError when the shared data is missing.
    """
    model = MODELS[model_name]
    base = Path(data_dir) if data_dir else shared_data_dir() / "profiles" / "vidur"
    mdir = base / "a100" / model.vidur_dir
    tp = model.tensor_parallel
    lin = [r for r in _read_csv(mdir / "mlp.csv") if int(r["num_tensor_parallel_workers"]) == tp]
    lin_n = np.array([float(r["num_tokens"]) for r in lin])
    lin_t = np.array([sum(_num(r, f"time_stats.{op}.median") for op in LINEAR_OPS) for r in lin])

    att = [r for r in _read_csv(mdir / model.attention_file)
           if int(r["num_tensor_parallel_workers"]) == model.attention_profile_tp]
    att_scale = model.attention_profile_tp / tp
    dec = [r for r in att if r["is_prefill"] == "False"]
    pre = [r for r in att if r["is_prefill"] == "True" and int(r["batch_size"]) == 1]
    save_key = "time_stats.attn_kv_cache_save.median"
    has_save = bool(att) and save_key in att[0]
    save_rows = [r for r in att if has_save and r.get(save_key)]

    def save_tokens(r: dict[str, str]) -> float:
        return float(r["prefill_chunk_size"]) if r["is_prefill"] == "True" else float(r["batch_size"])

    ar_n = np.array([])
    ar_t = np.array([])
    if tp > 1:
        ar = [r for r in _read_csv(base / "network" / "a100_pairwise_nvlink" / "all_reduce.csv")
              if int(r["num_workers"]) == tp]
        ar_n = np.array([float(r["size"]) for r in ar])
        ar_t = np.array([float(r["time_stats.all_reduce.median"]) for r in ar])

    return ProfileTables(
        linear_tokens=lin_n, linear_ms=lin_t,
        decode_batch=np.array([float(r["batch_size"]) for r in dec]),
        decode_context=np.array([float(r["kv_cache_size"]) for r in dec]),
        decode_ms=att_scale * np.array([_num(r, "time_stats.attn_decode.median") for r in dec]),
        prefill_chunk=np.array([float(r["prefill_chunk_size"]) for r in pre]),
        prefill_kv=np.array([float(r["kv_cache_size"]) for r in pre]),
        prefill_ms=att_scale * np.array([_num(r, "time_stats.attn_prefill.median") for r in pre]),
        kv_save_tokens=np.array([save_tokens(r) for r in save_rows]),
        kv_save_ms=att_scale * np.array([_num(r, save_key) for r in save_rows]),
        allreduce_bytes=ar_n, allreduce_ms=ar_t,
    )


# --------------------------------------------------------------------------------------------
# Fitted shapes
# --------------------------------------------------------------------------------------------


def linear_ops_ms(n: np.ndarray | float, a: float, b: float, p: float) -> np.ndarray | float:
    """Smooth roofline ``(a^p + (b·n)^p)^(1/p)`` (ms per layer for ``n`` tokens). A Python number gives a float
    (the engine's per-step call: no 0-d array; the same libm pow, bit for bit), anything else an array."""
    if not isinstance(n, int | float):
        n = np.asarray(n, dtype=float)
    return (a**p + (b * n) ** p) ** (1.0 / p)


def _decode_design(batch: np.ndarray, context: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones_like(batch), batch, batch * context])


def _prefill_design(chunk: np.ndarray, kv: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones_like(chunk), chunk, chunk * (kv + chunk / 2.0)])


def _affine_design(x: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones_like(x), x])


def _fit_linear_relative(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error (rows weighted by 1/y)."""
    ok = np.isfinite(y) & (y > 0)
    d, t = design[ok], y[ok]
    w = 1.0 / t
    res = least_squares(lambda c: (d @ c - t) * w, x0=np.full(d.shape[1], 1e-6), bounds=(0, np.inf))
    return res.x


def _fit_roofline(n: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    ok = np.isfinite(y) & (y > 0)
    n, y = n[ok], y[ok]
    a0 = float(np.min(y))
    big = n >= np.percentile(n, 90)
    b0 = float(np.median(y[big] / n[big]))

    def resid(x: np.ndarray) -> np.ndarray:
        return np.log(linear_ops_ms(n, math.exp(x[0]), math.exp(x[1]), x[2]) / y)

    res = least_squares(resid, x0=[math.log(a0), math.log(b0), 2.0], bounds=([-20, -30, 1.0], [10, 5, 20]))
    return math.exp(res.x[0]), math.exp(res.x[1]), float(res.x[2])


@dataclass(frozen=True)
class PerfModel:
    """Iteration time of one engine instance (one model on ``tensor_parallel`` A100s).

    Build it with :func:`fit_perf_model`. :meth:`iteration_ms` is the only call the engine makes per step.
    """

    model: ModelSpec
    gpu: GPUSpec
    linear: tuple[float, float, float]
    decode: tuple[float, ...]
    prefill: tuple[float, ...]
    kv_save: tuple[float, ...]
    allreduce: tuple[float, ...] = (0.0, 0.0)
    # Assumed CPU overhead of one engine step (vLLM scheduling + sampling + output processing); not profiled.
    cpu_overhead_ms: float = 2.0
    cpu_overhead_per_seq_ms: float = 0.005
    fit_error: dict[str, float] = field(default_factory=dict, compare=False)

    # --- per-layer pieces (ms) -------------------------------------------------------------
    def linear_layer_ms(self, num_tokens: float) -> float:
        return linear_ops_ms(num_tokens, *self.linear)

    def decode_attention_layer_ms(self, num_decode: int, sum_context_tokens: float) -> float:
        if num_decode <= 0:
            return 0.0
        c0, c1, c2 = self.decode
        # c2 multiplies batch × context in the fit, i.e. the summed context of the batch.
        return c0 + c1 * num_decode + c2 * sum_context_tokens

    def prefill_attention_layer_ms(self, chunk_tokens: int, kv_tokens: int) -> float:
        d0, d1, d2 = self.prefill
        return d0 + d1 * chunk_tokens + d2 * chunk_tokens * (kv_tokens + chunk_tokens / 2.0)

    def lm_head_ms(self, num_seqs: int) -> float:
        """Roofline of the ``hidden × vocab`` LM-head GEMM for the sampled sequences (hardware.md)."""
        if num_seqs <= 0:
            return 0.0
        mem, flops_coef, tp, peak = self._lm_head_terms
        return 1e3 * max(mem, flops_coef * num_seqs / tp / peak)

    @functools.cached_property
    def _lm_head_terms(self) -> tuple[float, float, int, float]:
        """Per-model constants of :meth:`lm_head_ms`: weight-read seconds, ``2·hidden·vocab``, TP, peak FLOP/s."""
        m, g = self.model, self.gpu
        tp = m.tensor_parallel
        return (m.hidden * m.vocab * m.dtype_bytes / tp / g.hbm_bandwidth_bytes_per_s, 2.0 * m.hidden * m.vocab,
                tp, g.bf16_flops_per_s)

    # --- the engine's call -----------------------------------------------------------------
    def iteration_ms(self, num_decode: int, sum_decode_context: float,
                     prefill_chunks: Sequence[tuple[int, int]] = ()) -> float:
        """Time of one continuous-batching iteration, milliseconds.

        Args:
            num_decode: requests producing one decode token in this iteration.
            sum_decode_context: their summed context lengths (prompt + generated so far), tokens.
            prefill_chunks: ``(chunk_tokens, already_cached_tokens)`` for each request prefilling.
        """
        n_tokens = num_decode
        for c, _ in prefill_chunks:
            n_tokens += c
        if n_tokens <= 0:
            return 0.0
        m = self.model
        per_layer = self.linear_layer_ms(n_tokens)
        per_layer += self.decode_attention_layer_ms(num_decode, sum_decode_context)
        for chunk, kv in prefill_chunks:
            per_layer += self.prefill_attention_layer_ms(chunk, kv)
        e0, e1 = self.kv_save
        per_layer += e0 + e1 * n_tokens
        if m.tensor_parallel > 1:
            r0, r1 = self.allreduce
            per_layer += 2.0 * (r0 + r1 * n_tokens * m.hidden * m.dtype_bytes)
        # Sequences that sample a token this step: decodes plus prefills that complete their prompt.
        num_seqs = num_decode + len(prefill_chunks)
        return (m.num_layers * per_layer + self.lm_head_ms(num_seqs)
                + self.cpu_overhead_ms + self.cpu_overhead_per_seq_ms * num_seqs)

    def decode_iteration_ms(self, num_decode: int) -> Callable[[float], float]:
        """``iteration_ms(num_decode, s)`` (no prefill chunks) as a function of the summed context ``s`` [tokens],
        equal to it bit for bit: the terms that depend on ``num_decode`` alone are computed once, for an engine that
        runs many decode-only iterations of one batch back to back. ``num_decode`` ≥ 1."""
        if num_decode <= 0:
            raise ValueError(f"num_decode must be >= 1, got {num_decode}")
        m = self.model
        n = num_decode
        layers = m.num_layers
        lin = self.linear_layer_ms(n)
        c0, c1, c2 = self.decode
        att0 = c0 + c1 * n
        e0, e1 = self.kv_save
        kv = e0 + e1 * n
        r0, r1 = self.allreduce
        ar = 2.0 * (r0 + r1 * n * m.hidden * m.dtype_bytes) if m.tensor_parallel > 1 else None
        lm, cpu, cpu_seqs = self.lm_head_ms(n), self.cpu_overhead_ms, self.cpu_overhead_per_seq_ms * n
        if ar is None:
            return lambda s: layers * (lin + (att0 + c2 * s) + kv) + lm + cpu + cpu_seqs
        return lambda s: layers * (lin + (att0 + c2 * s) + kv + ar) + lm + cpu + cpu_seqs

    def decode_step_ms(self, batch_size: int, context_tokens: int) -> float:
        """Iteration time of a decode-only batch of ``batch_size`` requests at ``context_tokens`` each."""
        return self.iteration_ms(batch_size, float(batch_size * context_tokens))


def _split(n: int, holdout: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    mask = rng.random(n) < holdout
    return ~mask, mask


def fit_perf_model(model_name: str = "llama-3-8b", holdout_fraction: float = 0.0, seed: int = 0,
                   data_dir: str | None = None) -> PerfModel:
    """Fit the performance model of ``model_name`` (a key of :data:`MODELS`) to its Vidur profile rows.

    With ``holdout_fraction`` > 0, that fraction of every table's rows (drawn with ``seed``) is left out of
    the fit and the model's relative error on them is stored in ``fit_error`` (per table, and
    ``median_abs_rel_error`` over all held-out rows). Raises KeyError for an unknown model.
    """
    if model_name not in MODELS:
        raise KeyError(f"unknown model {model_name!r}; known: {sorted(MODELS)}")
    p = load_profiles(model_name, data_dir)
    rng = np.random.default_rng(seed)

    tr, te = {}, {}
    for key, n in (("linear", len(p.linear_ms)), ("decode", len(p.decode_ms)), ("prefill", len(p.prefill_ms)),
                   ("kv_save", len(p.kv_save_ms)), ("allreduce", len(p.allreduce_ms))):
        tr[key], te[key] = _split(n, holdout_fraction, rng)

    linear = _fit_roofline(p.linear_tokens[tr["linear"]], p.linear_ms[tr["linear"]])
    decode = tuple(_fit_linear_relative(_decode_design(p.decode_batch, p.decode_context)[tr["decode"]],
                                        p.decode_ms[tr["decode"]]))
    prefill = tuple(_fit_linear_relative(_prefill_design(p.prefill_chunk, p.prefill_kv)[tr["prefill"]],
                                         p.prefill_ms[tr["prefill"]]))
    kv_save = (tuple(_fit_linear_relative(_affine_design(p.kv_save_tokens)[tr["kv_save"]],
                                          p.kv_save_ms[tr["kv_save"]]))
               if len(p.kv_save_ms) else (0.0, 0.0))
    allreduce = (tuple(_fit_linear_relative(_affine_design(p.allreduce_bytes)[tr["allreduce"]],
                                            p.allreduce_ms[tr["allreduce"]]))
                 if len(p.allreduce_ms) else (0.0, 0.0))

    errors: dict[str, float] = {}
    if holdout_fraction > 0:
        preds = {
            "linear": (linear_ops_ms(p.linear_tokens, *linear), p.linear_ms),
            "decode": (_decode_design(p.decode_batch, p.decode_context) @ np.array(decode), p.decode_ms),
            "prefill": (_prefill_design(p.prefill_chunk, p.prefill_kv) @ np.array(prefill), p.prefill_ms),
        }
        if len(p.kv_save_ms):
            preds["kv_save"] = (_affine_design(p.kv_save_tokens) @ np.array(kv_save), p.kv_save_ms)
        if len(p.allreduce_ms):
            preds["allreduce"] = (_affine_design(p.allreduce_bytes) @ np.array(allreduce), p.allreduce_ms)
        all_err = []
        for key, (pred, obs) in preds.items():
            sel = te[key] & np.isfinite(obs) & (obs > 0)
            err = np.abs(pred[sel] - obs[sel]) / obs[sel]
            errors[f"{key}_median_abs_rel_error"] = float(np.median(err)) if err.size else math.nan
            errors[f"{key}_rows_held_out"] = int(sel.sum())
            all_err.append(err)
        cat = np.concatenate(all_err)
        errors["median_abs_rel_error"] = float(np.median(cat))
        errors["p90_abs_rel_error"] = float(np.percentile(cat, 90))
        errors["rows_held_out"] = int(cat.size)

    return PerfModel(MODELS[model_name], A100_80GB, linear, decode, prefill, kv_save, allreduce,
                     fit_error=errors)


@functools.lru_cache(maxsize=8)
def default_perf_model(model_name: str = "llama-3-8b") -> PerfModel:
    """The model fitted on all profile rows (cached per process)."""
    return fit_perf_model(model_name)
