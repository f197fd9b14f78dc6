"""Time moving a request's KV cache between GPU and host memory on a real GPU, and hold the model's cost against it.

A MIXED instance evicts a batch request when interactive load needs the room, and keeps the request's KV cache in
host memory for a fast restart (paper §4; ``../shared/notes/hardware.md``, "Evicting a batch request"). The engine
model prices that move as ``context tokens × KV bytes per token / host-link bandwidth``
(:func:`services.engine.core.decode_kv_offload_ms`, 25 GB/s for an A100's PCIe Gen4 x16 as seen in practice).
This script measures what the move costs when the cache is laid out the way vLLM pages it.

Two halves, so the build never depends on a GPU:

* ``measure`` (needs PyTorch and a CUDA GPU; nothing else from this project): a paged KV cache of Llama-3-8B's
  shape (32 layers, one ``[2, blocks, 16, 8, 128]`` BF16 tensor per layer, as vLLM lays it out: 128 KiB per
  token), and a request of ``C`` context tokens whose blocks are scattered over it. For each ``C`` it times, as
  CUDA-event medians of 10 runs, in milliseconds:
  - ``bulk_d2h_ms`` / ``bulk_h2d_ms``: one contiguous copy of the same bytes to / from pinned host memory (the
    link's ceiling);
  - ``pageable_d2h_ms``: the same to ordinary (pageable) host memory;
  - ``gather_d2h_ms`` / ``scatter_h2d_ms``: the paged move as an offloading connector does it: per layer, gather
    the request's blocks into a GPU staging buffer and copy that to pinned memory (and back: copy in, scatter into
    freshly allocated blocks);
  - ``per_block_d2h_ms``: one copy per block, per layer, per K and V, issued from Python (the naive swap;
    only up to 2,048 tokens).
* ``compare`` (runs anywhere): prints measured vs. the model per ``C``, and the move against re-running the
  prefill (the recompute alternative) from ``gpu_decode_step`` results on the same device, when given.

Usage::

    python3 -m bench.gpu_kv_move measure --out kv.json                       # on the GPU machine
    python3 -m bench.gpu_kv_move compare kv.json --prefill bench/results/gpu_decode_step_h100.json --json cmp.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# Llama-3-8B KV shape (../shared/notes/hardware.md): 2 (K, V) x 32 layers x 8 KV heads x 128 head dim x 2 B.
LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
KV_BYTES_PER_TOKEN = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2
CONTEXTS = (256, 1024, 2048, 4096, 8192)
PER_BLOCK_MAX = 2048
CACHE_BLOCKS = 4096  # 65,536 tokens: 8 GiB over the 32 layers


def _measure(args: argparse.Namespace) -> None:
    import torch

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dt = torch.bfloat16
    torch.manual_seed(0)
    blocks = args.cache_blocks
    caches = [torch.randn(2, blocks, BLOCK, KV_HEADS, HEAD_DIM, device=dev, dtype=dt) for _ in range(LAYERS)]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def time_ms(fn, reps: int = 10) -> float:
        fn()
        sync()
        times = []
        for _ in range(reps):
            if cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
            else:
                import time
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                     "kv_bytes_per_token": KV_BYTES_PER_TOKEN, "block_tokens": BLOCK, "rows": []}
    gen = torch.Generator().manual_seed(1)

    def measure_one(C: int) -> dict:
        nb = -(-C // BLOCK)
        perm = torch.randperm(blocks, generator=gen)  # source and destination blocks disjoint
        ids, dst_ids = perm[:nb].to(dev), perm[nb:2 * nb].to(dev)
        nbytes = nb * BLOCK * KV_BYTES_PER_TOKEN
        flat = torch.empty(nbytes // 2, device=dev, dtype=dt)
        host_pinned = torch.empty(nbytes // 2, dtype=dt, pin_memory=cuda)
        host_pageable = torch.empty(nbytes // 2, dtype=dt)
        per_layer = 2 * nb * BLOCK * KV_HEADS * HEAD_DIM  # elements per layer
        staging = torch.empty(2, nb, BLOCK, KV_HEADS, HEAD_DIM, device=dev, dtype=dt)
        host_layers = host_pinned.view(LAYERS, 2, nb, BLOCK, KV_HEADS, HEAD_DIM)

        def bulk_d2h() -> None:
            host_pinned.copy_(flat, non_blocking=True)

        def bulk_h2d() -> None:
            flat.copy_(host_pinned, non_blocking=True)

        def pageable_d2h() -> None:
            host_pageable.copy_(flat)

        def gather_d2h() -> None:
            for i, c in enumerate(caches):
                torch.index_select(c, 1, ids, out=staging)
                host_layers[i].copy_(staging, non_blocking=True)

        def scatter_h2d() -> None:
            for i, c in enumerate(caches):
                staging.copy_(host_layers[i], non_blocking=True)
                c.index_copy_(1, dst_ids, staging)

        id_list = ids.tolist()

        def per_block_d2h() -> None:
            for i, c in enumerate(caches):
                hl = host_layers[i]
                for j, b in enumerate(id_list):
                    hl[0, j].copy_(c[0, b], non_blocking=True)
                    hl[1, j].copy_(c[1, b], non_blocking=True)

        assert per_layer * LAYERS * 2 == nbytes
        row = {"context_tokens": C, "bytes": nbytes,
               "bulk_d2h_ms": round(time_ms(bulk_d2h), 4), "bulk_h2d_ms": round(time_ms(bulk_h2d), 4),
               "pageable_d2h_ms": round(time_ms(pageable_d2h, reps=5), 4),
               "gather_d2h_ms": round(time_ms(gather_d2h), 4), "scatter_h2d_ms": round(time_ms(scatter_h2d), 4)}
        if C <= PER_BLOCK_MAX:
            row["per_block_d2h_ms"] = round(time_ms(per_block_d2h, reps=3), 4)
        # The round trip lands the same bytes: check the gather/scatter pair moved the right blocks.
        gather_d2h()
        scatter_h2d()
        sync()
        row["round_trip_exact"] = bool(all(torch.equal(c[:, ids], c[:, dst_ids]) for c in caches[:2]))
        row["bulk_d2h_gb_per_s"] = round(nbytes / row["bulk_d2h_ms"] / 1e6, 2)
        row["gather_d2h_gb_per_s"] = round(nbytes / row["gather_d2h_ms"] / 1e6, 2)
        return row

    for C in args.contexts:
        row = measure_one(C)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


def _prefill_ms(prefill_rows: list[dict], tokens: int) -> float | None:
    """Prefill time for ``tokens`` by linear interpolation in the measured prompt sizes (None outside them)."""
    pts = sorted((r["prompt_tokens"], r["eager_ms"]) for r in prefill_rows)
    for (n0, t0), (n1, t1) in zip(pts, pts[1:], strict=False):
        if n0 <= tokens <= n1:
            return t0 + (t1 - t0) * (tokens - n0) / (n1 - n0)
    return None


def _compare(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from services.engine.core import decode_kv_offload_ms
    from services.engine.perf_model import default_perf_model

    measured = json.loads(Path(args.measured).read_text())
    prefill = json.loads(Path(args.prefill).read_text())["prefill"] if args.prefill else []
    pm = default_perf_model("llama-3-8b")
    rows = []
    for r in measured["rows"]:
        C = r["context_tokens"]
        model_ms = decode_kv_offload_ms(pm, C)
        move_ms = max(r["gather_d2h_ms"], r["scatter_h2d_ms"])
        pre = _prefill_ms(prefill, C)
        rows.append({"context_tokens": C, "model_ms": round(model_ms, 3), "bulk_d2h_ms": r["bulk_d2h_ms"],
                     "gather_d2h_ms": r["gather_d2h_ms"], "scatter_h2d_ms": r["scatter_h2d_ms"],
                     "per_block_d2h_ms": r.get("per_block_d2h_ms"),
                     "model_over_paged": round(model_ms / move_ms, 3),
                     "recompute_prefill_ms": None if pre is None else round(pre, 3),
                     "recompute_over_paged": None if pre is None else round(pre / move_ms, 3)})
    summary = {"device": measured["device"], "rows": rows}
    t = Table(title=f"Llama-3-8B KV move of one request: measured on {measured['device']} vs the model "
                    f"({pm.gpu.host_link_bytes_per_s / 1e9:.0f} GB/s host link)")
    for c in ("context tokens", "model ms", "bulk D2H ms", "paged D2H ms", "paged H2D ms", "per-block D2H ms",
              "model/paged", "recompute prefill ms", "recompute/paged"):
        t.add_column(escape(c), justify="right")

    def f(v) -> str:
        return "-" if v is None else f"{v:.2f}"

    for x in rows:
        t.add_row(str(x["context_tokens"]), f(x["model_ms"]), f(x["bulk_d2h_ms"]), f(x["gather_d2h_ms"]),
                  f(x["scatter_h2d_ms"]), f(x["per_block_d2h_ms"]), f(x["model_over_paged"]),
                  f(x["recompute_prefill_ms"]), f(x["recompute_over_paged"]))
    Console().print(t)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="time the KV moves on this machine's CUDA GPU (needs PyTorch)")
    m.add_argument("--out", required=True, help="JSON file to write")
    m.add_argument("--device", default="cuda", help="torch device (cpu only to check the script runs)")
    m.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS), help="request context sizes [tokens]")
    m.add_argument("--cache-blocks", type=int, default=CACHE_BLOCKS, help="KV blocks per layer in the cache")
    c = sub.add_parser("compare", help="hold the model's KV-move cost against a measure JSON")
    c.add_argument("measured")
    c.add_argument("--prefill", help="a gpu_decode_step measure JSON from the same device (recompute cost)")
    c.add_argument("--json", help="write the comparison here")
    args = ap.parse_args(argv)
    (_measure if args.cmd == "measure" else _compare)(args)


if __name__ == "__main__":
    main()
