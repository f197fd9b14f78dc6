"""Time a Llama-3-8B-shaped forward pass on a real GPU and hold the performance model against it.

Two halves, so the build never depends on a GPU:

* ``measure`` (needs PyTorch and a CUDA GPU; nothing else from this project): builds the 32 decoder
  layers of Llama-3-8B (hidden 4,096, 32 query / 8 KV heads of 128, gated MLP 14,336, vocab 128,256;
  ``../shared/notes/hardware.md``) with random BF16 weights, and times
  - one **decode iteration** (one new token for each of ``B`` requests whose KV cache holds ``L`` tokens:
    RMSNorm, QKV, RoPE-free attention over the cache, output projection, gated MLP, KV write, LM head),
    captured in a CUDA graph as vLLM does for decode;
  - one **prefill** of a single prompt of ``n`` tokens (causal attention, eager).
  Times are CUDA-event medians of 20 replays after warm-up, in milliseconds. Random weights cost what real
  ones do: the arithmetic and the bytes read are the same.
* ``compare`` (runs anywhere): reads that JSON and prints measured vs. ``PerfModel`` (fitted to Vidur's
  **A100** profiles) per point, with the model's GPU-only part (its per-iteration CPU overhead of the
  serving engine removed, since the script has none) and the ratio between them.

Usage::

    python3 -m bench.gpu_decode_step measure --out gpu.json          # on the GPU machine
    python3 -m bench.gpu_decode_step compare gpu.json --json cmp.json  # here
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# Llama-3-8B shape (../shared/notes/hardware.md, the model's config.json).
LAYERS, HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256
DECODE_BATCHES = (1, 8, 32, 64, 128, 256, 512)
DECODE_CONTEXTS = (512, 2048)
PREFILL_TOKENS = (128, 512, 2048, 4096)
KV_BUDGET_BYTES = 36 * 2**30  # per-layer KV caches up to this total; beyond it one cache is shared by all layers


def _measure(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dev = torch.device("cuda")
    dt = torch.bfloat16

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device=dev, dtype=dt) * 0.02)

    layers = [dict(qkv=w((Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), o=w(HIDDEN, HIDDEN),
                   gate_up=w(2 * INTER, HIDDEN), down=w(HIDDEN, INTER),
                   n1=torch.ones(HIDDEN, device=dev, dtype=dt), n2=torch.ones(HIDDEN, device=dev, dtype=dt))
              for _ in range(LAYERS)]
    lm_head = w(VOCAB, HIDDEN)
    final_norm = torch.ones(HIDDEN, device=dev, dtype=dt)

    def rms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (HIDDEN,), g, 1e-5)

    def mlp(x: torch.Tensor, p: dict) -> torch.Tensor:
        gu = F.linear(rms(x, p["n2"]), p["gate_up"])
        g, u = gu.chunk(2, dim=-1)
        return x + F.linear(F.silu(g) * u, p["down"])

    def time_ms(fn, reps: int = 20) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        return statistics.median(times)

    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                     "model": "Llama-3-8B shape, random BF16 weights", "decode": [], "prefill": []}

    for L in DECODE_CONTEXTS:
        for B in DECODE_BATCHES:
            kv_bytes = 2 * B * KV_HEADS * L * HEAD_DIM * 2
            per_layer = kv_bytes * LAYERS <= KV_BUDGET_BYTES
            n_caches = LAYERS if per_layer else 1
            caches = [(torch.randn(B, KV_HEADS, L, HEAD_DIM, device=dev, dtype=dt),
                       torch.randn(B, KV_HEADS, L, HEAD_DIM, device=dev, dtype=dt)) for _ in range(n_caches)]
            x_in = torch.randn(B, HIDDEN, device=dev, dtype=dt)
            pos = torch.tensor([L - 1], device=dev)

            def decode(B=B, caches=caches, n_caches=n_caches, pos=pos, x_in=x_in) -> torch.Tensor:
                x = x_in
                for i, p in enumerate(layers):
                    k_cache, v_cache = caches[i % n_caches]
                    qkv = F.linear(rms(x, p["n1"]), p["qkv"])
                    q, k, v = qkv.split([Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
                    k_cache.index_copy_(2, pos, k.view(B, KV_HEADS, 1, HEAD_DIM))
                    v_cache.index_copy_(2, pos, v.view(B, KV_HEADS, 1, HEAD_DIM))
                    # GQA decode: the 4 query heads sharing a KV head act as 4 query rows over that head.
                    qg = q.view(B, KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM)
                    a = F.scaled_dot_product_attention(qg, k_cache, v_cache)
                    x = x + F.linear(a.reshape(B, HIDDEN), p["o"])
                    x = mlp(x, p)
                return F.linear(rms(x, final_norm), lm_head)

            with torch.no_grad():
                eager_ms = time_ms(decode, reps=5)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        decode()
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    decode()
                graph_ms = time_ms(graph.replay)
            row = {"batch_size": B, "context_tokens": L, "graph_ms": round(graph_ms, 4),
                   "eager_ms": round(eager_ms, 4), "kv_per_layer": per_layer}
            results["decode"].append(row)
            print(json.dumps(row), flush=True)
            del caches, graph, decode
            torch.cuda.empty_cache()

    for n in PREFILL_TOKENS:
        x_in = torch.randn(n, HIDDEN, device=dev, dtype=dt)

        def prefill(n=n, x_in=x_in) -> torch.Tensor:
            x = x_in
            for p in layers:
                qkv = F.linear(rms(x, p["n1"]), p["qkv"])
                q, k, v = qkv.split([Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
                q = q.view(n, Q_HEADS, HEAD_DIM).transpose(0, 1).unsqueeze(0)
                k = k.view(n, KV_HEADS, HEAD_DIM).transpose(0, 1).unsqueeze(0)
                v = v.view(n, KV_HEADS, HEAD_DIM).transpose(0, 1).unsqueeze(0)
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                x = x + F.linear(a.squeeze(0).transpose(0, 1).reshape(n, HIDDEN), p["o"])
                x = mlp(x, p)
            return F.linear(rms(x[-1:], final_norm), lm_head)

        with torch.no_grad():
            ms = time_ms(prefill)
        row = {"prompt_tokens": n, "eager_ms": round(ms, 4)}
        results["prefill"].append(row)
        print(json.dumps(row), flush=True)

    Path(args.out).write_text(json.dumps(results, indent=2))


def _compare(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from services.engine.perf_model import default_perf_model

    measured = json.loads(Path(args.measured).read_text())
    pm = default_perf_model("llama-3-8b")
    rows = []
    for r in measured["decode"]:
        B, L = r["batch_size"], r["context_tokens"]
        model_ms = pm.decode_step_ms(B, L)
        gpu_model_ms = model_ms - pm.cpu_overhead_ms - pm.cpu_overhead_per_seq_ms * B
        rows.append({"kind": "decode", "batch_size": B, "context_tokens": L, "measured_ms": r["graph_ms"],
                     "model_a100_ms": round(model_ms, 3), "model_a100_gpu_only_ms": round(gpu_model_ms, 3),
                     "ratio_gpu_only": round(gpu_model_ms / r["graph_ms"], 3)})
    for r in measured["prefill"]:
        n = r["prompt_tokens"]
        model_ms = pm.iteration_ms(0, 0.0, [(n, 0)])
        gpu_model_ms = model_ms - pm.cpu_overhead_ms - pm.cpu_overhead_per_seq_ms
        rows.append({"kind": "prefill", "prompt_tokens": n, "measured_ms": r["eager_ms"],
                     "model_a100_ms": round(model_ms, 3), "model_a100_gpu_only_ms": round(gpu_model_ms, 3),
                     "ratio_gpu_only": round(gpu_model_ms / r["eager_ms"], 3)})
    ratios = [x["ratio_gpu_only"] for x in rows if x["kind"] == "decode"]
    summary = {"device": measured["device"], "rows": rows,
               "decode_ratio_median": round(statistics.median(ratios), 3),
               "decode_ratio_min": min(ratios), "decode_ratio_max": max(ratios)}
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"Llama-3-8B step: measured on {measured['device']} vs PerfModel (A100 fit)")
    for c in ("kind", "B / tokens", "L", "measured ms", "model ms", "model GPU-only ms", "model/measured"):
        t.add_column(escape(c), justify="right")
    for x in rows:
        t.add_row(x["kind"], str(x.get("batch_size", x.get("prompt_tokens"))), str(x.get("context_tokens", "")),
                  f"{x['measured_ms']:.2f}", f"{x['model_a100_ms']:.2f}", f"{x['model_a100_gpu_only_ms']:.2f}",
                  f"{x['ratio_gpu_only']:.2f}")
    Console().print(t)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="time the forward passes on this machine's CUDA GPU (needs PyTorch)")
    m.add_argument("--out", required=True, help="JSON file to write")
    c = sub.add_parser("compare", help="hold PerfModel against a measure JSON")
    c.add_argument("measured")
    c.add_argument("--json", help="write the comparison here")
    args = ap.parse_args(argv)
    (_measure if args.cmd == "measure" else _compare)(args)


if __name__ == "__main__":
    main()
