"""Unit tests of the performance model fitted to Vidur's A100 profiles (services/engine/perf_model.py).

Numbers checked against ``../shared/notes/hardware.md``: A100-80GB HBM 2.039 TB/s, 312 TFLOP/s BF16,
Llama-3-8B ≈ 16 GB of weights and 128 KiB of KV per token (≈ 400k tokens of KV at 0.9 utilization).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from services.engine.perf_model import (
    A100_80GB,
    MODELS,
    default_perf_model,
    fit_perf_model,
    kv_capacity_tokens,
)

MODEL_NAMES = ("llama-3-8b", "llama-2-70b")


@pytest.fixture(scope="module", params=MODEL_NAMES)
def perf(request):
    return default_perf_model(request.param)


# ---- fit quality ------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_holdout_median_relative_error_within_10_percent(model_name):
    fitted = fit_perf_model(model_name, holdout_fraction=0.2)
    err = fitted.fit_error
    # The held-out set is real: a fifth of several hundred (8B) / thousands (70B) of rows.
    assert err["rows_held_out"] >= 100
    assert err["median_abs_rel_error"] <= 0.10
    # Every table that was held out has its own finite error, each also within the 10% bound at the median
    # except KV-save, whose rows are tiny and noisy (about 10%); keep those within 15%.
    for key in ("linear", "decode", "prefill"):
        assert err[f"{key}_rows_held_out"] > 0
        assert err[f"{key}_median_abs_rel_error"] <= 0.10, key
    if "kv_save_median_abs_rel_error" in err:
        assert err["kv_save_median_abs_rel_error"] <= 0.15


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_holdout_error_stable_across_seeds(model_name):
    errs = [fit_perf_model(model_name, holdout_fraction=0.2, seed=s).fit_error["median_abs_rel_error"]
            for s in (1, 2, 3)]
    assert max(errs) <= 0.10


def test_fit_without_holdout_records_no_error():
    assert fit_perf_model("llama-3-8b").fit_error == {}


def test_fit_is_deterministic():
    a = fit_perf_model("llama-3-8b", holdout_fraction=0.2, seed=7)
    b = fit_perf_model("llama-3-8b", holdout_fraction=0.2, seed=7)
    assert a == b
    assert a.fit_error == b.fit_error


# ---- physical shape -----------------------------------------------------------------------------


def test_decode_step_increases_with_batch_size(perf):
    for ctx in (128, 1024, 4000):
        times = [perf.decode_step_ms(b, ctx) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
        assert np.all(np.diff(times) > 0), (ctx, times)
    # Large batches cost clearly more than batch 1 (KV reads and linear compute grow).
    assert perf.decode_step_ms(256, 2048) > 1.5 * perf.decode_step_ms(1, 2048)


def test_decode_step_increases_with_context_length(perf):
    for batch in (1, 16, 128):
        times = [perf.decode_step_ms(batch, c) for c in (16, 128, 512, 1024, 2048, 4000)]
        assert np.all(np.diff(times) > 0), (batch, times)


def test_decode_batch_1_bounded_below_by_weight_read(perf):
    """One decode step reads every weight once: time >= weight bytes per rank / HBM bandwidth."""
    m, g = perf.model, perf.gpu
    floor_ms = 1e3 * m.weight_bytes / m.tensor_parallel / g.hbm_bandwidth_bytes_per_s
    for ctx in (1, 128, 2048):
        assert perf.decode_step_ms(1, ctx) >= floor_ms
    # And it is not absurdly slow: real kernels reach a good fraction of the roof at batch 1.
    assert perf.decode_step_ms(1, 128) <= 5 * floor_ms


def test_llama3_8b_weight_read_floor_is_7_8_ms():
    p = default_perf_model("llama-3-8b")
    floor_ms = 1e3 * 16e9 / 2.039e12
    assert floor_ms == pytest.approx(7.85, abs=0.01)
    assert p.decode_step_ms(1, 1) >= floor_ms
    assert p.iteration_ms(1, 1.0) >= floor_ms


def test_prefill_1024_costs_more_than_decode_batch_1(perf):
    prefill = perf.iteration_ms(0, 0.0, [(1024, 0)])
    decode = perf.decode_step_ms(1, 1024)
    assert prefill > decode
    # Prefill is compute-bound: at least 2 × params × tokens FLOPs at the BF16 roof (per TP rank).
    m, g = perf.model, perf.gpu
    flops_floor_ms = 1e3 * 2 * m.params * 1024 / m.tensor_parallel / g.bf16_flops_per_s
    assert prefill >= flops_floor_ms


def test_prefill_cost_grows_with_chunk_and_cached_context(perf):
    assert perf.iteration_ms(0, 0.0, [(2048, 0)]) > perf.iteration_ms(0, 0.0, [(1024, 0)])
    assert perf.iteration_ms(0, 0.0, [(512, 2048)]) > perf.iteration_ms(0, 0.0, [(512, 0)])


def test_empty_iteration_costs_nothing(perf):
    assert perf.iteration_ms(0, 0.0) == 0.0
    assert perf.iteration_ms(0, 0.0, []) == 0.0


def test_iteration_times_are_finite_and_positive(perf):
    for b in (1, 64, 512):
        t = perf.decode_step_ms(b, 1000)
        assert math.isfinite(t) and t > 0
    t = perf.iteration_ms(32, 32 * 500.0, [(256, 0), (128, 1024)])
    assert math.isfinite(t) and t > perf.decode_step_ms(32, 500)


# ---- memory ------------------------------------------------------------------------------------


def test_kv_bytes_per_token_match_hardware_note():
    assert MODELS["llama-3-8b"].kv_bytes_per_token == 131_072  # 128 KiB
    assert MODELS["llama-2-70b"].kv_bytes_per_token == 327_680  # 320 KiB


def test_kv_capacity_llama3_8b_on_a100_80gb_about_400k():
    cap = kv_capacity_tokens(MODELS["llama-3-8b"], A100_80GB)
    assert 350_000 <= cap <= 450_000


def test_kv_capacity_grows_with_memory_utilization():
    m = MODELS["llama-3-8b"]
    assert kv_capacity_tokens(m, gpu_memory_utilization=0.95) > kv_capacity_tokens(m, gpu_memory_utilization=0.9)


def test_kv_capacity_raises_when_weights_do_not_fit():
    seventy_on_one = dataclasses.replace(MODELS["llama-2-70b"], tensor_parallel=1)
    with pytest.raises(ValueError):
        kv_capacity_tokens(seventy_on_one)


# ---- errors ------------------------------------------------------------------------------------


def test_unknown_model_raises_key_error():
    with pytest.raises(KeyError):
        fit_perf_model("gpt-5-mega")
    with pytest.raises(KeyError):
        default_perf_model("no-such-model")


def test_decode_iteration_ms_is_iteration_ms_bit_for_bit(perf):
    # The engine's bulk decode path uses the precomputed form; any drift would change simulated clocks.
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 64, 255, 1024):
        f = perf.decode_iteration_ms(n)
        for s in rng.integers(n, n * 8192, size=50):
            assert f(int(s)) == perf.iteration_ms(n, int(s))
    with pytest.raises(ValueError, match="num_decode"):
        perf.decode_iteration_ms(0)
