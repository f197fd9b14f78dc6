"""``chiron bench ...``: the benchmarks (:mod:`bench`); each prints a table and writes JSON."""

from __future__ import annotations

import asyncio

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli._common import console, fmt, save_json
from services.common.grpc_util import run_event_loop


@click.group()
def bench() -> None:
    """Benchmarks: each prints a table and writes JSON."""


@bench.command("perf-model")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="out/bench-perf-model.json",
              show_default=True)
@click.option("--holdout", default=0.2, show_default=True, help="Fraction of profile rows held out of the fit.")
@click.option("--seed", default=0, show_default=True)
def bench_perf_model(json_path, holdout, seed) -> None:
    """Fit error of the A100 performance model on Vidur profile rows held out from the fit.

    JSON: {"median_abs_rel_error": <worst model's median over its held-out rows>, "models": {...per table...}}.
    Target ≤ 0.10.
    """
    from services.engine.perf_model import MODELS, fit_perf_model

    models = {}
    table = Table(title=f"Performance model fit error on held-out rows ({holdout:.0%}, seed {seed})")
    for col in ("model", "table", "rows held out", "median |rel err|"):
        table.add_column(escape(col), justify="right" if col != "model" else "left")
    for name in MODELS:
        pm = fit_perf_model(name, holdout_fraction=holdout, seed=seed)
        models[name] = pm.fit_error
        for key in ("linear", "decode", "prefill", "kv_save", "allreduce"):
            if f"{key}_median_abs_rel_error" in pm.fit_error:
                table.add_row(name, key, str(pm.fit_error[f"{key}_rows_held_out"]),
                              f"{pm.fit_error[f'{key}_median_abs_rel_error']:.3f}")
        table.add_row(name, "[bold]all", str(pm.fit_error["rows_held_out"]),
                      f"[bold]{pm.fit_error['median_abs_rel_error']:.3f}")
    console.print(table)
    # The headline is the worse of the two models' medians (each over all its held-out rows).
    worst = max(m["median_abs_rel_error"] for m in models.values())
    report = {"median_abs_rel_error": worst, "target": 0.10, "holdout_fraction": holdout, "seed": seed,
              "models": models}
    console.print(f"median_abs_rel_error (worst model) = {report['median_abs_rel_error']:.3f} (target ≤ 0.10)")
    save_json(report, json_path)
    console.print(f"written to {json_path}")


@bench.command("local-autoscaler")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Default: out/bench-local-autoscaler.json (simulated), out/bench-local-autoscaler-vllm.json (vllm).")
@click.option("--backend", type=click.Choice(["simulated", "vllm"]), default="simulated", show_default=True,
              help="simulated: Llama-3-8B/A100 model in virtual time; vllm: real vLLM (tiny model) on this CPU.")
@click.option("--duration-s", default=300.0, show_default=True, help="simulated: seconds per run.")
@click.option("--warmup-s", default=60.0, show_default=True, help="simulated: seconds excluded from the metrics.")
@click.option("--seed", default=0, show_default=True, help="Workload seed (same for every setting).")
@click.option("--workers", default=2, show_default=True, help="simulated: parallel processes for the static sweep.")
@click.option("--robustness-seeds", default=5, show_default=True,
              help="simulated: also run the adaptive setting on this many workload seeds and report the spread "
                   "of its convergence time (JSON key robustness).")
@click.option("--token-budget", default=32, show_default=True, type=click.IntRange(min=1),
              help="vllm: vLLM's per-step token budget (max_num_batched_tokens) for the adaptive and static "
                   "settings; it also bounds their max batch size (caps 1..budget are swept).")
def bench_local_autoscaler(json_path, backend, duration_s, warmup_s, seed, workers, robustness_seeds,
                           token_budget) -> None:
    """Adaptive local autoscaler vs best static max batch size vs vLLM's default (256) on a saturated engine.

    simulated: Llama-3-8B/A100, ITL SLOs of 25, 50 and 100 ms. vllm: the tiny model on this CPU, ITL SLOs
    of 1.5× and 3× the batch-1 ITL p99 measured here, token budget 32 (about 11 minutes of wall time).

    Targets: adaptive ≥ 95% of best-static throughput, ≥ 99% ITL SLO attainment, converges within 30 s.
    """
    from bench.local_autoscaler import STATIC_GRID, run_bench, summarize, write_json

    if backend == "vllm":
        from bench import local_autoscaler_vllm as lav

        json_path = json_path or "out/bench-local-autoscaler-vllm.json"
        with Progress(TextColumn("runs on vLLM"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            task = bar.add_task("runs", total=1 + len(lav.cap_grid(token_budget)) + 5)
            report = asyncio.run(lav.run_bench(seed=seed, token_budget=token_budget,
                                               progress=lambda: bar.advance(task), log=console.print))
        title = (f"Local autoscaler on real vLLM (CPU, tiny Llama; batch-1 ITL p99 "
                 f"{report['config']['batch1_itl_ms']:.2f} ms)")
    else:
        json_path = json_path or "out/bench-local-autoscaler.json"
        slos = (25.0, 50.0, 100.0)
        with Progress(TextColumn("static sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            task = bar.add_task("sweep", total=len(slos) * len(STATIC_GRID))
            report = run_bench(slos, duration_s, warmup_s, seed, workers, progress=lambda: bar.advance(task),
                               robustness_seeds=robustness_seeds)
        title = "Local autoscaler: saturated Llama-3-8B on A100-80GB (simulated), ShareGPT lengths"
    table = Table(title=title)
    for col in ("ITL SLO [ms]", "setting", "max batch", "tokens/s", "ITL p50 [ms]", "ITL p95 [ms]",
                "ITL attainment", "converge [s]"):
        table.add_column(escape(col), justify="right")
    for r in report["results"]:
        table.add_row(fmt(r["itl_slo_ms"], 2 if backend == "vllm" else 0), r["setting"], str(r["max_batch_size"]),
                      fmt(r["throughput_tokens_per_s"], 0), fmt(r["itl_p50_ms"], 2), fmt(r["itl_p95_ms"], 2),
                      fmt(r["itl_slo_attainment"], 4), fmt(r.get("converge_s")))
    console.print(table)
    report["summary"] = summarize(report)
    for s in report["summary"]:
        console.print(f"ITL SLO {s['itl_slo_ms']:.2f} ms: adaptive = {s['adaptive_vs_best_static']:.1%} of best "
                      f"static; targets met: {s['targets_met']}")
        best = next((r for r in report["results"]
                     if r["itl_slo_ms"] == s["itl_slo_ms"] and r["setting"] == "best_static"), {})
        moved, share = best.get("rerun_missed_slo"), best.get("interval_p99_over_slo")
        if moved:
            console.print(f"  the sweep's cap {moved['max_batch_size']} missed the SLO when rerun (attainment "
                          f"{moved['itl_slo_attainment']:.4f}); the next best swept cap ran beside instead")
        if share is not None:
            console.print(f"  best static cap: its 1-s ITL p99 was above the SLO in {share:.0%} of intervals "
                          "(each a latency backpressure > 1 to the local autoscaler)")
        if s["best_static_meets_slo"] is False:
            console.print("  [yellow]the best static cap's own run missed the ITL SLO here (attainment < 0.99): "
                          "the machine's speed moved since the sweep, and the yardstick with it[/]")
    for r in report.get("robustness", []):
        conv = ", ".join(fmt(c) for c in r["converge_s_by_seed"])
        console.print(f"ITL SLO {r['itl_slo_ms']:g} ms over seeds {r['seeds'][0]}–{r['seeds'][-1]}: converge [s] {conv}; "
                      f"within 30 s in {r['converged_within_30s']} of {len(r['seeds'])}; worst ITL attainment "
                      f"{r['min_itl_slo_attainment']:.4f}")
    write_json(report, json_path)
    console.print(f"written to {json_path}")


@bench.command("estimator")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="out/bench-estimator.json",
              show_default=True)
@click.option("--slots", default=8, show_default=True, help="Batch slots (concurrent requests) serving the queue.")
def bench_estimator(json_path, slots) -> None:
    """Waiting-time estimator accuracy (R², median relative error, p95 coverage) at queue sizes 50–20,000 on
    ShareGPT and Azure output lengths, beside the paper's CLT formula and a mean-only baseline.

    Targets: R² ≥ 0.99 at 2,000+ and ≥ 0.90 at 50; p95 coverage within 0.92–0.98 at every size.
    """
    from bench.estimator import main as run_estimator_bench

    run_estimator_bench(json_path, slots=slots)


@bench.command("queue")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="out/bench-queue.json", show_default=True)
@click.option("--n-rss", default=1_000_000, show_default=True, help="Queued requests for the memory / refresh run.")
@click.option("--db", "db_url", default=None, metavar="URL",
              help="Benchmark the PostgreSQL store at this postgresql:// URL (a database of its own: emptied between "
                   "phases) instead of SQLite; adds durable single enqueues on 1 and 8 connections, Batch API uploads "
                   "and lease+ack through two replicas.")
def bench_queue(json_path, n_rss, db_url) -> None:
    """The global queue: enqueue/s in-process and over gRPC, lease/s and Enqueue p99 over gRPC, resident
    memory and statistics-refresh time with 1,000,000 queued requests.

    Targets: ≥ 20,000 enqueues/s in-process; 1M queued within 1.5 GB RSS; refresh ≤ 50 ms at 1M. With --db
    (PostgreSQL, issue 29): ≥ 2,000 durable single enqueues/s, ≥ 20,000/s Batch API uploads, lease+ack ≥ 2,000/s
    over two replicas, refresh ≤ 50 ms at 1M.
    """
    from bench.queue import PG_TARGETS, TARGETS, run_bench, run_bench_pg

    with console.status("benchmarking the queue…") as status:
        if db_url:
            report = run_bench_pg(db_url, n_rss=n_rss, progress=lambda what: status.update(f"done: {what}…"))
        else:
            report = run_bench(n_rss=n_rss, progress=lambda what: status.update(f"done: {what}…"))
    table = Table(title="Global queue (PostgreSQL store, gRPC on loopback)" if db_url
                  else "Global queue (SQLite WAL store, gRPC on loopback)")
    for col in ("metric", "value", "target"):
        table.add_column(escape(col), justify="right")
    rows = [(key, report[key], TARGETS.get(key, ("", None))) for key in (
        "enqueue_per_s_inprocess", "enqueue_per_s_grpc", "lease_per_s_grpc", "enqueue_p99_ms_grpc", "rss_bytes_1m",
        "estimator_refresh_ms_1m")]
    if db_url:
        rows = [r if r[0] != "enqueue_per_s_inprocess" else (r[0], r[1], ("", None)) for r in rows]
        rows += [(f"pg.{key}", report["pg"][key], target) for key, target in PG_TARGETS.items()]
    for key, v, (op, bound) in rows:
        ok = "" if bound is None else ("met" if (v >= bound if op == ">=" else v <= bound) else "MISSED")
        table.add_row(key, f"{v:,.1f}", f"{op} {bound:,.0f} {ok}" if bound is not None else "—")
    console.print(table)
    save_json(report, json_path)
    console.print(f"written to {json_path}")


@bench.command("scaler")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="out/bench-scaler.json", show_default=True)
def bench_scaler(json_path) -> None:
    """Global scaler: policy decision latency for 1,000 instances and 10,000 request groups (target ≤ 10 ms),
    and the time from batch backpressure to a new instance registered in etcd with the local provider (needs
    the etcd binary: apt-get install etcd-server).
    """
    from bench.scaler import run_bench

    with console.status("benchmarking the scaler…") as status:
        report = run_bench(progress=lambda what: status.update(f"done: {what}…"))
    table = Table(title="Global scaler")
    for col in ("metric", "value", "target"):
        table.add_column(escape(col), justify="right")
    table.add_row("decision_ms_p50", fmt(report["decision_ms_p50"], 2), "")
    table.add_row("decision_ms_p99", fmt(report["decision_ms_p99"], 2),
                  "≤ 10 " + ("met" if report["decision_ms_p99"] <= 10 else "MISSED"))
    table.add_row("scale_up_to_registered_s", fmt(report["scale_up_to_registered_s"], 2), "")
    console.print(table)
    save_json(report, json_path)
    console.print(f"written to {json_path}")


@bench.command("router")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="out/bench-router.json", show_default=True)
@click.option("--duration-s", default=10.0, show_default=True, help="Seconds of load per rate and path.")
def bench_router(json_path, duration_s) -> None:
    """TTFT the router adds to interactive requests (through the router minus straight to the engine) at 50,
    200 and 500 requests/s on loopback, p50 and p99; every part a real process. Target: p99 ≤ 5 ms at 200/s."""
    from bench.router import run_bench

    with console.status("benchmarking the router…") as status:
        report = asyncio.run(run_bench(duration_s=duration_s, progress=lambda what: status.update(f"done: {what}…")))
    table = Table(title="Router overhead on TTFT (loopback, simulated engine)")
    for col in ("rate [req/s]", "overhead p50 [ms]", "overhead p99 [ms]", "direct TTFT p50/p99", "router TTFT p50/p99"):
        table.add_column(escape(col), justify="right")
    for r in report["results"]:
        table.add_row(fmt(r["rate_rps"], 0), fmt(r["overhead_p50_ms"], 2), fmt(r["overhead_p99_ms"], 2),
                      f"{r['direct_ttft_p50_ms']:.1f} / {r['direct_ttft_p99_ms']:.1f}",
                      f"{r['router_ttft_p50_ms']:.1f} / {r['router_ttft_p99_ms']:.1f}")
    console.print(table)
    at200 = next((r for r in report["results"] if r["rate_rps"] == 200), None)
    if at200:
        console.print(f"p99 overhead at 200 req/s: {at200['overhead_p99_ms']:.2f} ms (target ≤ 5 ms): "
                      f"{'met' if at200['overhead_p99_ms'] <= 5 else 'MISSED'}")
    save_json(report, json_path)
    console.print(f"written to {json_path}")


@bench.command("gateway")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="out/bench-gateway.json", show_default=True)
@click.option("--duration-s", default=30.0, show_default=True,
              help="Seconds of load per rate (30 s: about 3,000 requests per path at 200/s, so the p99 is not one burst).")
@click.option("--http-client", type=click.Choice(["aiohttp", "httpx"]), default="aiohttp", show_default=True,
              help="HTTP client of the gateway path. httpx (the openai client's) costs the client about 0.7 ms more "
                   "CPU per request, which the overhead then includes.")
@click.option("--gateway-workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes of the gateway under test ('chiron gateway --workers').")
def bench_gateway(json_path, duration_s, http_client, gateway_workers) -> None:
    """TTFT the OpenAI-compatible HTTP gateway adds over calling Router.Generate directly, at 50 and 200
    requests/s, both paths side by side in one run (Poisson arrivals, every other request through the gateway),
    p50 and p99, on loopback; every part a real process (needs the etcd binary). Also the CPU each part spends
    per request. Target: p99 overhead ≤ 5 ms at 200/s."""
    from bench.gateway import run_bench
    from services.common.etcd_server import EtcdNotFound

    with console.status("benchmarking the gateway…") as status:
        try:
            report = asyncio.run(run_bench(duration_s=duration_s, http_client=http_client, gateway_workers=gateway_workers,
                                           progress=lambda what: status.update(f"done: {what}…")))
        except (EtcdNotFound, RuntimeError, TimeoutError) as e:
            raise click.ClickException(str(e)) from e
    table = Table(title="HTTP gateway overhead on TTFT (loopback, simulated engine; streaming /v1/completions vs "
                        "Router.Generate)")
    for col in ("rate [req/s]", "overhead p50 [ms]", "overhead p99 [ms] (95% interval)", "direct TTFT p50/p99 [ms]",
                "gateway TTFT p50/p99 [ms]", "requests (gw/direct)", "errors", "machine CPU busy"):
        table.add_column(escape(col), justify="right")
    for r in report["results"]:
        busy = r.get("machine_cpu_busy")
        lo, hi = r["overhead_p99_ci95_ms"]
        table.add_row(fmt(r["rate_rps"], 0), fmt(r["overhead_p50_ms"], 2),
                      escape(f"{r['overhead_p99_ms']:.2f} [{lo:.1f}, {hi:.1f}]"),
                      f"{r['direct_ttft_p50_ms']:.1f} / {r['direct_ttft_p99_ms']:.1f}",
                      f"{r['gateway_ttft_p50_ms']:.1f} / {r['gateway_ttft_p99_ms']:.1f}",
                      f"{r['gateway_requests']} / {r['direct_requests']}", f"{r['gateway_errors'] + r['direct_errors']}",
                      "—" if busy is None else f"{busy:.0%}")
    console.print(table)
    for r in report["results"]:
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in r.get("cpu_ms_per_request", {}).items())
        console.print(f"{r['rate_rps']:g} req/s: the gateway's own time per request p50 / p99 "
                      f"{r['gateway_internal_p50_ms']:.2f} / {r['gateway_internal_p99_ms']:.2f} ms; CPU per request \\[ms]: "
                      f"{cpu} (the gateway's per gateway request)")
    at200 = next((r for r in report["results"] if r["rate_rps"] == 200), None)
    if at200:
        lo, hi = at200["overhead_p99_ci95_ms"]
        where = ("the whole interval is under 5 ms" if hi <= 5 else "the whole interval is over 5 ms" if lo > 5
                 else "the interval straddles 5 ms: a longer run (--duration-s) narrows it")
        console.print(f"p99 overhead at 200 req/s: {at200['overhead_p99_ms']:.2f} ms (target ≤ 5 ms): "
                      f"{'met' if at200['overhead_p99_ms'] <= 5 else 'MISSED'}; 95% interval \\[{lo:.1f}, {hi:.1f}] ms, "
                      f"{where} ({report['config']['cpu_count']} CPUs, gateway workers {report['config']['gateway_workers']}, "
                      f"machine CPU busy {at200.get('machine_cpu_busy', float('nan')):.0%})")
    save_json(report, json_path)
    console.print(f"written to {json_path}")


@bench.command("engine-overhead")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="out/bench-engine-overhead.json",
              show_default=True)
@click.option("--max-tokens", default=512, show_default=True, help="Output tokens per request.")
@click.option("--reps", default=8, show_default=True,
              help="Alternating repetitions per concurrency (median kept; each adjacent pair also gives an overhead, "
                   "whose mean gets a 95% interval).")
@click.option("--layers", default=2, show_default=True, help="Decoder layers of the tiny model.")
@click.option("--hidden-size", default=128, show_default=True, help="Hidden size of the tiny model.")
@click.option("--stream-interval", default=1, show_default=True, type=click.IntRange(min=1),
              help="Output tokens per streamed message on both paths (1: every token; vLLM's stream interval).")
def bench_engine_overhead(json_path, max_tokens, reps, layers, hidden_size, stream_interval) -> None:
    """Tokens/s through the engine agent's gRPC Generate vs vLLM's AsyncLLM called in-process, same tiny
    model, concurrency 1, 8 and 32 (real vLLM on CPU; needs scripts/install_vllm_cpu.sh).

    Target: agent overhead (1 − agent/direct) ≤ 5% at concurrency 32.
    """
    from bench.engine_overhead import run_bench, write_json

    conc = (1, 8, 32)
    with Progress(TextColumn("direct vs agent"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("runs", total=len(conc) * reps)
        report = run_event_loop(run_bench(conc, max_tokens, reps, num_layers=layers, hidden_size=hidden_size,
                                       stream_interval=stream_interval, progress=lambda: bar.advance(task)))
    table = Table(title="Engine agent overhead: vLLM (CPU, tiny Llama) direct vs through the agent's gRPC, "
                        f"stream interval {stream_interval}")
    for col in ("concurrency", "direct tokens/s", "agent tokens/s", "overhead", "paired runs: mean [95% CI]",
                "CPU µs/token: direct frontend", "agent process", "gRPC client"):
        table.add_column(escape(col), justify="right")
    for r in report["results"]:
        lo, hi = r["overhead_paired_ci95"]
        table.add_row(str(r["concurrency"]), fmt(r["direct_tokens_per_s"], 0), fmt(r["agent_tokens_per_s"], 0),
                      f"{r['overhead']:.1%}", escape(f"{r['overhead_paired_mean']:.1%} [{lo:.1%}, {hi:.1%}]"),
                      fmt(r["direct_frontend_cpu_us_per_token"], 0),
                      fmt(r["agent_frontend_cpu_us_per_token"], 0), fmt(r["client_cpu_us_per_token"], 0))
    console.print(table)
    at32 = next((r for r in report["results"] if r["concurrency"] == 32), None)
    if at32:
        lo, hi = at32["overhead_paired_ci95"]
        console.print(f"overhead at concurrency 32: {at32['overhead']:.1%} (target ≤ 5%): "
                      f"{'met' if at32['overhead'] <= 0.05 else 'MISSED'}; paired runs "
                      f"{at32['overhead_paired_mean']:.1%}, 95% interval {lo:.1%} to {hi:.1%}")
    write_json(report, json_path)
    console.print(f"written to {json_path}")


@bench.command("fidelity")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="out/bench-fidelity.json", show_default=True)
@click.option("--minutes", default=5.0, show_default=True, help="Length of the azure-conv slice [min of trace time].")
@click.option("--start-s", default=0.0, show_default=True, help="Start of the slice in the trace [s].")
@click.option("--speedup", default=1.0, show_default=True,
              help="Live run: replay and simulated-engine clock speed-up (above 1 on a 2-core machine the engines "
                   "fall behind their performance model and the comparison measures the host, not the simulator).")
def bench_fidelity(json_path, minutes, start_s, speedup) -> None:
    """Simulator vs a live local cluster (etcd, queue, router, scaler, simulated engines) on the same slice of the
    Azure conversation trace, configured alike (wall-clock scaler settings × speedup, measured engine start time):
    interactive SLO attainment and GPU-seconds side by side. Needs the etcd binary.

    Targets: attainment within 3 percentage points, GPU-seconds (start → release) within 10%.
    """
    from bench.fidelity import print_table, run_bench, write_json
    from services.common.etcd_server import EtcdNotFound

    with console.status("fidelity: live cluster, then the simulator…") as status:
        try:
            report = run_bench(minutes=minutes, start_s=start_s, speedup=speedup, progress=status.update)
        except (EtcdNotFound, RuntimeError, TimeoutError, ValueError) as e:
            raise click.ClickException(str(e)) from e
    print_table(report, console)
    write_json(report, json_path)
    console.print(f"written to {json_path}")
