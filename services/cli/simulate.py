"""``chiron simulate`` and ``chiron experiments``: policies on workloads at fleet scale in virtual time
(:mod:`simulator`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli._common import console, fmt


def _simulate_seeds(run_policy, jobs: list[tuple], workers: int) -> list[dict]:
    """``chiron simulate --seeds``: run each (policy, workload, sim config, params) job, ``workers`` at a time in
    processes, with a progress bar; reports in job order."""
    from concurrent.futures import ProcessPoolExecutor

    with Progress(TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("runs", total=len(jobs))
        with ProcessPoolExecutor(max(1, workers)) as ex:
            futures = [ex.submit(run_policy, name, wl, sim, params, 1) for name, wl, sim, params in jobs]
            reports = []
            for f in futures:
                try:
                    reports.append(f.result())
                except ValueError as e:
                    raise click.BadParameter(str(e)) from e
                bar.advance(task)
    return reports


def _seed_summary_table(summary: list[dict], title: str) -> Table:
    table = Table(title=escape(title))
    for col in ("policy", "runs", "SLO att.", "interactive att.", "batch att.", "GPU-hours", "× lower bound"):
        table.add_column(escape(col), justify="right")

    def cell(row: dict, name: str, digits: int) -> str:
        mean = row[f"{name}_mean"]
        if math.isnan(mean):
            return "—"
        return escape(f"{fmt(mean, digits)} [{fmt(row[f'{name}_min'], digits)}–{fmt(row[f'{name}_max'], digits)}]")

    for row in summary:
        table.add_row(row["policy"], str(row["runs"]), cell(row, "slo_attainment", 4),
                      cell(row, "interactive_slo_attainment", 4), cell(row, "batch_slo_attainment", 4),
                      cell(row, "gpu_hours", 2), cell(row, "gpu_seconds_over_lower_bound", 3))
    return table


def _sim_report_table(reports: list[dict], title: str, with_seed: bool = False) -> Table:
    table = Table(title=title)
    for col in ("policy", *(("seed",) if with_seed else ()), "SLO att.", "interactive att.", "batch att.", "rejected",
                "TTFT p99", "ITL p99", "GPU-hours", "× lower bound", "max inst.", "wall"):
        table.add_column(escape(col), justify="right")
    for r in reports:
        i, b = r["interactive"], r["batch"]
        seed_col = (str(r["sim_config"]["seed"]),) if with_seed else ()
        table.add_row(r["policy"], *seed_col, f"{r['slo_attainment']:.4f}", fmt(i["slo_attainment"], 4), fmt(b["slo_attainment"], 4),
                      str(i["rejected"]), f"{fmt(i['ttft_p99_ms'], 0)} ms", f"{fmt(i['itl_p99_ms'])} ms",
                      f"{r['gpu_hours']:.2f}", f"{r['gpu_seconds_over_lower_bound']:.2f}", str(r["max_instances"]),
                      f"{r['wall_seconds']:.1f} s")
    return table


@click.command()
@click.option("--policy", default="chiron", show_default=True,
              help="chiron, llumnix, llumnix-tuned, static, queue-length, kpa or sla-planner (comma-separate several "
                   "to compare them side by side).")
@click.option("--workload", default="mixed", show_default=True,
              help="azure-conv, azure-code, mixed, poisson, gamma, batch-backlog, or trace (with --trace-file).")
@click.option("--trace-file", type=click.Path(dir_okay=False), default=None,
              help="Your CSV with the Azure trace's columns (TIMESTAMP,ContextTokens,GeneratedTokens) as interactive "
                   "traffic; combine with --batch-requests.")
@click.option("--rate", "rate_per_s", type=float, default=None, help="Interactive arrival rate [requests/s] (poisson, "
              "gamma; rescales trace workloads).")
@click.option("--cv", type=float, default=None, help="gamma: coefficient of variation of inter-arrival times (> 0).")
@click.option("--duration-s", type=float, default=None, help="Span of interactive arrivals [s] (default: per workload).")
@click.option("--batch-requests", type=int, default=None, help="Batch backlog at t=0 [requests].")
@click.option("--batch-ttft-s", type=float, default=None, help="TTFT SLO of batch requests [s].")
@click.option("--batch-source", type=click.Choice(["sharegpt", "arxiv"]), default="sharegpt", show_default=True,
              help="Token lengths of the batch backlog.")
@click.option("--interactive-ttft-ms", type=float, default=10_000.0, show_default=True, help="Interactive TTFT SLO [ms].")
@click.option("--interactive-itl-ms", type=float, default=100.0, show_default=True,
              help="Interactive ITL SLO (mean per request) [ms].")
@click.option("--instances", type=int, default=None, help="static: fleet size (and the others' initial fleet).")
@click.option("--max-batch-size", type=int, default=None, help="static / llumnix / baselines: engine max batch size.")
@click.option("--variant", type=click.Choice(["engine-queue", "gateway-queue", "priority"]), default="engine-queue",
              show_default=True, help="Baselines: how requests reach the engines (fair-comparison.md §2): into the "
              "engines' own queues on arrival, through a gateway queue that dispatches when an instance has room "
              "(interactive band first), or on arrival with vLLM priority scheduling (batch at low priority).")
@click.option("--max-batched-tokens", type=click.IntRange(min=1), default=None,
              help="Baselines: vLLM's max_num_batched_tokens (per-iteration token budget; default 2048).")
@click.option("--gpu-budget", default=50, show_default=True, help="Most GPUs at once (the paper caps at 50).")
@click.option("--model-load-s", default=30.0, show_default=True, help="Start → serving time of a new instance [s].")
@click.option("--seed", default=0, show_default=True, help="Seed of the workload's draw (arrivals, token lengths) "
              "and of the simulator.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run seeds SEED … SEED+N−1 and print each run and the mean and range per policy (one draw of a "
                   "workload says little about a policy whose cost moves from draw to draw).")
@click.option("--workers", default=2, show_default=True,
              help="Processes for llumnix-tuned's sweep, or for the runs of --seeds.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report(s) here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="PNG of instances, queue, batch size and SLO attainment over time (one policy; with several, "
                   "POLICY is inserted before the suffix; with --seeds, the first seed's run).")
def simulate(policy, workload, trace_file, rate_per_s, cv, duration_s, batch_requests, batch_ttft_s, batch_source,
             interactive_ttft_ms, interactive_itl_ms, instances, max_batch_size, variant, max_batched_tokens, gpu_budget,
             model_load_s, seed, seeds, workers, json_path, plot_path) -> None:
    """Simulate a policy on a workload at fleet scale in virtual time (the services' own decision code).

    Prints SLO attainment, GPU-hours against the offline lower bound and more; --json writes the report
    (DESIGN.md §4 schema plus time series; with several policies or seeds ``{"reports": [...]}``, and with
    --seeds a ``seed_summary`` per policy), --plot a PNG. Example:

        chiron simulate --policy chiron,llumnix --workload mixed --json out/mixed.json --plot out/mixed.png
        chiron simulate --policy chiron --workload mixed --seeds 10
    """
    from simulator.fleet import SimConfig
    from simulator.policies import POLICIES
    from simulator.report import run_policy
    from simulator.workloads import make_workload

    names = [p.strip() for p in policy.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise click.BadParameter(f"unknown policy {', '.join(bad) or '(none)'}; valid policies: {', '.join(POLICIES)}",
                                 param_hint="--policy")
    runs = []  # (workload, sim config) per seed, all built (and so validated) before anything runs
    try:
        for s in range(seed, seed + seeds):
            wl = make_workload("trace" if trace_file else workload, rate_per_s=rate_per_s, cv=cv, duration_s=duration_s,
                               batch_requests=batch_requests, batch_ttft_s=batch_ttft_s, batch_source=batch_source,
                               trace_file=trace_file, interactive_ttft_ms=interactive_ttft_ms,
                               interactive_itl_ms=interactive_itl_ms, seed=s)
            sim = SimConfig(model_load_time_s=model_load_s, gpu_budget=gpu_budget, seed=s,
                            **({"initial_instances": instances} if instances is not None else {})).validate()
            runs.append((wl, sim))
    except (ValueError, FileNotFoundError) as e:
        raise click.BadParameter(str(e)) from e
    wl = runs[0][0]
    console.print(f"workload [bold]{wl.name}[/]: {wl.description} — {len(wl.interactive)} interactive, "
                  f"{len(wl.batch)} batch requests over {wl.duration_s:.0f} s"
                  + (f"; seeds {seed}–{seed + seeds - 1}" if seeds > 1 else ""))

    params = {name: _policy_params(name, instances, max_batch_size, variant, max_batched_tokens) for name in names}
    if seeds == 1:
        reports = [_simulate_one(run_policy, name, wl, runs[0][1], params[name], workers) for name in names]
    else:
        reports = _simulate_seeds(run_policy, [(name, w, sim, params[name]) for name in names for w, sim in runs],
                                  workers)
    _report_simulations(reports, names, wl.name, seed, seeds, json_path, plot_path)


def _policy_params(name: str, instances: int | None, max_batch_size: int | None, variant: str,
                   max_batched_tokens: int | None) -> dict:
    """The ``chiron simulate`` options that apply to policy ``name``, as its parameters (``make_policy``)."""
    params = {}
    if name == "static" and instances is not None:
        params["instances"] = instances
    if max_batch_size is not None and name not in ("chiron", "llumnix-tuned", "oracle"):
        params["max_batch_size"] = max_batch_size
    if name not in ("chiron", "oracle"):
        if variant != "engine-queue":
            params["variant"] = variant
        if max_batched_tokens is not None:
            params["max_batched_tokens"] = max_batched_tokens
    return params


def _simulate_one(run_policy, name: str, wl, sim, params: dict, workers: int) -> dict:
    """One policy's run with a progress line; a bad parameter raises click.BadParameter."""
    with Progress(TextColumn(f"{name}"), BarColumn(), TextColumn("{task.fields[msg]}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(name, total=None, msg="")
        try:
            return run_policy(name, wl, sim, params, workers=workers, progress=lambda m: bar.update(task, msg=m))
        except ValueError as e:
            raise click.BadParameter(str(e)) from e


def _report_simulations(reports: list[dict], names: list[str], workload: str, seed: int, seeds: int,
                        json_path: str | None, plot_path: str | None) -> None:
    """Plot (``--plot``), print the tables and notes, write the JSON (``--json``) of ``chiron simulate``."""
    from simulator.report import plot_report, seed_summary

    if plot_path:
        for name in names:
            rep = next(r for r in reports if r["policy"] == name)
            path = plot_path if len(names) == 1 else str(Path(plot_path).with_name(f"{Path(plot_path).stem}-{name}.png"))
            plot_report(rep, path)
            console.print(f"plot: {path}")
    title = f"Simulated {workload}: lower bound {reports[0]['gpu_seconds_lower_bound'] / 3600:.2f} GPU-hours"
    summary = seed_summary(reports) if seeds > 1 else None
    if summary:
        title = f"Simulated {workload}, seeds {seed}–{seed + seeds - 1}"
    console.print(_sim_report_table(reports, title, with_seed=seeds > 1))
    if summary:
        console.print(_seed_summary_table(summary, f"{workload}: mean [min–max] over {seeds} seeds"))
    for r in reports:
        if r.get("sweep"):
            best = r["policy_params"]
            console.print(f"llumnix-tuned kept max batch size {best['max_batch_size']}, thresholds "
                          f"{best['scale_up_threshold']:g}/{best['scale_down_threshold']:g} of {len(r['sweep'])} settings")
        if r["lost_requests"] or r["unfinished_requests"]:
            console.print(f"[yellow]{r['policy']}: {r['unfinished_requests']} requests unfinished at the time limit, "
                          f"{r['lost_requests']} lost[/]")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        doc = reports[0] if len(reports) == 1 else {"reports": reports}
        if summary:
            doc["seed_summary"] = summary
        Path(json_path).write_text(json.dumps(doc, indent=1, default=float))
        console.print(f"report: {json_path}")


@click.command()
@click.option("--suite", default="paper", show_default=True,
              help="paper: the paper's experiments for every policy; fair: Chiron against every baseline at its "
                   "strongest, at matched SLO attainment, on the tuning and validation workloads (fair.json).")
@click.option("--out", "out_dir", default="out/experiments", show_default=True, type=click.Path(file_okay=False),
              help="Directory for report.md, results.json / fair.json and the plots.")
@click.option("--quick", is_flag=True, help="Shorter runs (trace slices, smaller queues, fewer seeds): minutes, not hours.")
@click.option("--policies", default=",".join(["chiron", "llumnix", "llumnix-tuned", "static", "queue-length", "kpa",
                                             "sla-planner"]), show_default=True,
              help="Comma-separated policies (--suite paper).")
@click.option("--workloads", default="", help="--suite fair: comma-separated suite workloads (default: all).")
@click.option("--slo-levels", default="", help="--suite fair: comma-separated SLO levels (standard, chat; default: both).")
@click.option("--seeds", default="", help="--suite fair: comma-separated seeds (default 0,1,2; --quick 0,1).")
@click.option("--trace-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="--suite fair: your own trace (CSV with the Azure trace's columns TIMESTAMP,ContextTokens,"
                   "GeneratedTokens) as a validation workload, every baseline swept on it as on the suite's; run "
                   "alone unless --workloads names suite workloads too.")
@click.option("--batch-requests", default=0, show_default=True, type=click.IntRange(min=0),
              help="--suite fair with --trace-file: a ShareGPT batch backlog of this many requests at t=0.")
@click.option("--workers", default=2, show_default=True, help="Simulations run in parallel.")
def experiments(suite, out_dir, quick, policies, workloads, slo_levels, seeds, trace_file, batch_requests,
                workers) -> None:
    """The paper's experiments (--suite paper) or the fair comparison (--suite fair).

    paper: headline workloads, SLO attainment vs arrival rate, a large batch queue, burstiness vs
    over-provisioning, estimator accuracy, local-autoscaler convergence; report.md with tables and plots.

    fair (../shared/notes/fair-comparison.md): every baseline swept over its knobs and its fair variants
    (gateway queue, priority scheduling), Chiron in one configuration, the oracle and Chiron's ablations, on
    each suite workload at both SLO levels; headline at matched attainment; fair.json, report.md and a
    frontier plot per workload. The whole suite takes about 45 minutes on 2 cores; --quick about 5. With
    --trace-file, the same comparison on your own trace (e.g. ``chiron experiments --suite fair --trace-file
    my.csv --batch-requests 2000 --out out/mine``).
    """
    if suite == "fair":
        _experiments_fair(out_dir, quick, workloads, slo_levels, seeds, workers, trace_file, batch_requests)
        return
    if suite != "paper":
        raise click.BadParameter(f"unknown suite {suite!r}; valid suites: paper, fair", param_hint="--suite")
    if trace_file or batch_requests:
        raise click.BadParameter("--trace-file and --batch-requests apply to --suite fair", param_hint="--trace-file")
    from simulator.experiments import run_experiments
    from simulator.policies import POLICIES

    names = tuple(p.strip() for p in policies.split(",") if p.strip())
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise click.BadParameter(f"unknown policy {', '.join(bad) or '(none)'}; valid policies: {', '.join(POLICIES)}",
                                 param_hint="--policies")
    with Progress(TextColumn("experiments"), BarColumn(), TextColumn("{task.fields[msg]}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("experiments", total=None, msg="")
        data = run_experiments(out_dir, quick=quick, workers=workers, policies=names,
                               progress=lambda m: bar.update(task, msg=m))
    console.print(f"{len(data['results'])} simulations in {data['wall_seconds'] / 60:.1f} min; "
                  f"report: {Path(out_dir) / 'report.md'}")


def _experiments_fair(out_dir: str, quick: bool, workloads: str, slo_levels: str, seeds: str, workers: int,
                      trace_file: str | None = None, batch_requests: int = 0) -> None:
    from simulator.fair import SLO_LEVELS, SUITE, LostRequests, add_trace_workload, run_fair

    if batch_requests and not trace_file:
        raise click.BadParameter("--batch-requests goes with --trace-file (the suite's workloads carry their own)",
                                 param_hint="--batch-requests")
    mine = None
    if trace_file:
        try:
            mine = add_trace_workload(trace_file, batch_requests)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--trace-file") from None

    def split(text: str, valid, what: str, hint: str) -> tuple | None:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in names if x not in valid]
        if bad:
            raise click.BadParameter(f"unknown {what} {', '.join(bad)}; valid: {', '.join(valid)}", param_hint=hint)
        return names or None

    wls = split(workloads, SUITE, "suite workload", "--workloads")
    if mine:
        wls = tuple(dict.fromkeys((*(wls or ()), mine)))
    slos = split(slo_levels, SLO_LEVELS, "SLO level", "--slo-levels")
    try:
        seed_list = tuple(int(x) for x in seeds.split(",") if x.strip()) or None
    except ValueError:
        raise click.BadParameter(f"seeds must be integers, got {seeds!r}", param_hint="--seeds") from None
    with Progress(TextColumn("fair suite"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[msg]}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("fair", total=None, msg="")

        def progress(done: int, total: int, msg: str) -> None:
            bar.update(task, completed=done, total=total, msg=msg)
            if not console.is_terminal and done % 25 == 0:  # a log file gets a line now and then instead of a bar
                console.print(f"fair suite: {done}/{total} runs ({msg})")
        try:
            data = run_fair(out_dir, quick=quick, workloads=wls, slo_levels=slos, seeds=seed_list, workers=workers,
                            progress=progress)
        except LostRequests as e:
            raise click.ClickException(str(e)) from None
    table = Table(title="fair comparison: Chiron vs the cheapest baseline at matched attainment (means over seeds)")
    for col in ("workload", "SLOs", "chiron GPU-h", "chiron att. int/batch", "comparator", "its GPU-h",
                "its att. int/batch", "matched", "gpu_ratio", "oracle GPU-h"):
        table.add_column(col, justify="right")

    def f(x: float, d: int = 3) -> str:
        return "—" if x != x else f"{x:.{d}f}"
    for h in data["headline"]:
        table.add_row(h["workload"], h["slo_level"], f(h["chiron_gpu_hours"], 2),
                      f"{f(h['chiron_interactive_attainment'])}/{f(h['chiron_batch_attainment'])}",
                      f"{h['best_baseline']} ({h['best_baseline_variant']})", f(h["best_baseline_gpu_hours"], 2),
                      f"{f(h['best_baseline_interactive_attainment'])}/{f(h['best_baseline_batch_attainment'])}",
                      str(h["matched"]), f(h["gpu_ratio"], 2), f(h["oracle_gpu_hours"], 2))
    console.print(table)
    met = sum(t["met"] for t in data["targets"])
    beyond = sum(t.get("beyond_frontier", False) for t in data["targets"])
    console.print(f"targets met: {met} of {len(data['targets'])} (and {beyond} ratio cells beyond every baseline's "
                  f"attainment, cheaper than the most attaining: not counted); {len(data['rows'])} simulations in "
                  f"{data['wall_seconds'] / 60:.1f} min; report: {Path(out_dir) / 'report.md'}, "
                  f"{Path(out_dir) / 'fair.json'}")
