"""The commands that run a local cluster: ``chiron up``, ``replay`` (against a running one), ``demo``,
``chaos``, ``soak`` and ``demo-engine`` (one engine agent)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli._common import (
    cluster_engine_args,
    console,
    dummy_weights_option,
    fmt,
    print_security,
    save_json,
    security_options,
    stop_on_signal,
    write_report_files,
)
from services.common.grpc_util import run_event_loop


@click.command()
@click.option("--backend", type=click.Choice(["simulated", "vllm"]), default="simulated", show_default=True,
              help="Engines the scaler starts: simulated A100 engines, or real vLLM (needs --model).")
@click.option("--model", default=None, help="vllm: model directory (e.g. from 'chiron tiny-model DIR').")
@dummy_weights_option
@click.option("--speedup", default=1.0, show_default=True, help="simulated: engine clock speed-up.")
@click.option("--gateway-port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="HTTP port of the OpenAI-compatible gateway on 127.0.0.1 (0 = pick a free one); a port in use "
                   "fails at once.")
@click.option("--scaler-args", default=None, help="Extra 'chiron scaler' arguments (role limits, intervals).")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Logs, port files, queue database, etcd data (default: a new temporary directory).")
@security_options
def up(backend, model, dummy_weights, speedup, gateway_port, scaler_args, work_dir, tls, auth_token) -> None:
    """Start a whole Chiron cluster on this machine: etcd, queue, router, the OpenAI-compatible HTTP gateway
    (on port 8000 of 127.0.0.1 unless --gateway-port says otherwise), scaler (local provider), and the engine
    agents the scaler starts; print the endpoints; Ctrl-C stops everything, draining first. Every service keeps
    the port it got at start: one that exits (queue, router, gateway, scaler) is restarted there."""
    import shlex

    from services.cluster import ClusterConfig, start_cluster
    from services.common.etcd_server import EtcdNotFound

    engine_args = cluster_engine_args(backend, model, dummy_weights, speedup)
    cfg = ClusterConfig(engine_args=engine_args, work_dir=work_dir, tls=tls, auth_token=auth_token,
                        gateway_args=f"--tokenizer {shlex.quote(model)}" if backend == "vllm" else "",
                        gateway_port=gateway_port)
    if scaler_args:
        cfg.scaler_args = scaler_args

    async def run() -> None:
        try:
            cluster = await start_cluster(cfg, on_progress=lambda m: console.print(f"  {m}"))
        except EtcdNotFound as e:
            raise click.ClickException(str(e)) from e
        except (RuntimeError, TimeoutError) as e:
            raise click.ClickException(str(e)) from e
        table = Table(title="Chiron is up")
        table.add_column("service")
        table.add_column("endpoint")
        for name, ep in cluster.endpoints().items():
            table.add_row(name, ep)
        for name, url in (await cluster.metrics_endpoints()).items():
            table.add_row(f"{name} metrics", url)
        console.print(table)
        print_security(cluster, tls)
        console.print(f"logs in {cluster.work}; Ctrl-C stops everything (engines drain first)")
        stop = stop_on_signal()
        await stop.wait()
        live = [f"{n} (draining engines)" if n == "scaler" else n for n in cluster.live()]  # the dead: nothing to stop
        console.print(f"stopping: {', '.join(live) or 'nothing is running'}…")
        await cluster.stop()

    run_event_loop(run())


def _replay_inputs(trace_name, trace_file, start_s, duration_s):
    from services.common.traces import load_azure_trace, load_sharegpt_lengths

    trace = load_azure_trace(trace_file or trace_name).slice(start_s, duration_s)
    if len(trace) == 0:
        raise click.BadParameter("the trace slice holds no requests; check --start-s/--duration-s")
    return trace, load_sharegpt_lengths(4096)


def _print_report(report: dict) -> None:
    i, b = report["interactive"], report["batch"]
    table = Table(title=f"Chiron replay of {report['trace']} ({report['requests']} requests, trace time)")
    for col in ("", "count", "accepted", "SLO attainment", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"):
        table.add_column(escape(col), justify="right")
    table.add_row("interactive", str(i["count"]), str(i["accepted"]), f"{i['slo_attainment']:.3f}",
                  f"{fmt(i['ttft_p50_ms'])} ms", f"{fmt(i['ttft_p99_ms'])} ms", f"{fmt(i['itl_p50_ms'])} ms",
                  f"{fmt(i['itl_p99_ms'])} ms")
    table.add_row("batch", str(b["count"]), str(b["accepted"]), f"{b['slo_attainment']:.3f}", f"{fmt(b['ttft_p50_s'])} s",
                  f"{fmt(b['ttft_p99_s'])} s", "—", "—")
    console.print(table)
    by_role = ", ".join(f"{r} {v:.0f}" for r, v in report["instance_seconds_by_role"].items())
    console.print(f"SLO attainment {report['slo_attainment']:.3f}; GPU-seconds {report['gpu_seconds']:.0f} ({by_role}); "
                  f"scale events {len(report['scale_events'])}; batch done {b['done']}, unfinished {b['unfinished']}; "
                  f"[bold]lost_requests: {report['lost_requests']}[/]")


_REPLAY_OPTIONS = [
    click.option("--trace", "trace_name", default="azure-conv", show_default=True, help="azure-conv or azure-code."),
    click.option("--trace-file", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="Your own CSV with the Azure trace's columns (TIMESTAMP,ContextTokens,GeneratedTokens)."),
    click.option("--start-s", default=0.0, show_default=True, help="Start of the trace slice [s]."),
    click.option("--speedup", default=2.0, show_default=True, help="Replay speed-up (simulated engines run as fast)."),
    click.option("--batch-rate", default=0.5, show_default=True, help="Batch requests per second of trace time."),
    click.option("--batch-ttft-s", default=600.0, show_default=True, help="Batch TTFT SLO [s of trace time]."),
    click.option("--interactive-ttft-ms", default=10_000, show_default=True, help="Interactive TTFT SLO [ms]."),
    click.option("--interactive-itl-ms", default=100, show_default=True, help="Interactive ITL SLO (mean per request) [ms]."),
]


def _replay_options(f):
    for opt in reversed(_REPLAY_OPTIONS):
        f = opt(f)
    return f


def _run_replay(router_addr, scaler_addr, queue_addr, trace, lengths, cfg, json_path, plot_path) -> tuple[dict, str | None]:
    """Replay, print and write the report; returns it and why its plot was not written (None: it was)."""
    from services.replay import replay

    with Progress(TextColumn("replaying"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("replay", total=1.0)
        report = asyncio.run(replay(router_addr, scaler_addr, queue_addr, trace, lengths, cfg,
                                    progress=lambda f: bar.update(task, completed=f)))
    _print_report(report)
    plot_error = write_report_files(report, json_path, plot_path)
    if plot_error:
        console.print(f"report: {json_path}; [red]error: {escape(plot_error)}[/]", soft_wrap=True)
    else:
        console.print(f"report: {json_path}; plot: {plot_path}")
    return report, plot_error


@click.command()
@click.option("--router", "router_addr", default="127.0.0.1:50050", show_default=True,
              help="Router (host:port), or several separated by commas: calls fail over between them.")
@click.option("--scaler", "scaler_addr", default=None, help="Scaler (host:port), for the instance timeline.")
@click.option("--queue", "queue_addr", default=None, help="Queue (host:port), for the queue-size timeline.")
@click.option("--duration-s", default=120.0, show_default=True, help="Length of the trace slice [s of trace time].")
@_replay_options
@click.option("--json", "json_path", default="out/replay.json", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the JSON report (folders are made).")
@click.option("--plot", "plot_path", default="out/replay.png", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the plot (folders are made).")
def replay(router_addr, scaler_addr, queue_addr, duration_s, trace_name, trace_file, start_s, speedup, batch_rate,
           batch_ttft_s, interactive_ttft_ms, interactive_itl_ms, json_path, plot_path) -> None:
    """Replay a trace through a running cluster's router: Azure trace requests as interactive traffic at their own
    arrival times (÷ speedup) plus batch requests with ShareGPT lengths; report (DESIGN.md §4 schema) and plot."""
    from services.replay import ReplayConfig

    trace, lengths = _replay_inputs(trace_name, trace_file, start_s, duration_s)
    cfg = ReplayConfig(speedup=speedup, batch_rate_per_s=batch_rate, batch_ttft_s=batch_ttft_s,
                       interactive_ttft_ms=interactive_ttft_ms, interactive_itl_ms=interactive_itl_ms)
    _, plot_error = _run_replay(router_addr, scaler_addr, queue_addr, trace, lengths, cfg, json_path, plot_path)
    if plot_error:
        raise click.ClickException(f"{plot_error} (the report is in {json_path})")


@click.command()
@click.option("--minutes", default=2.0, show_default=True, help="Wall-clock minutes of replay.")
@_replay_options
@click.option("--backend", type=click.Choice(["simulated", "vllm"]), default="simulated", show_default=True)
@click.option("--model", default=None, help="vllm: model directory (e.g. from 'chiron tiny-model DIR').")
@dummy_weights_option
@click.option("--json", "json_path", default="out/demo.json", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the JSON report (folders are made).")
@click.option("--plot", "plot_path", default="out/demo.png", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the plot (folders are made).")
@security_options
def demo(minutes, trace_name, trace_file, start_s, speedup, batch_rate, batch_ttft_s, interactive_ttft_ms,
         interactive_itl_ms, backend, model, dummy_weights, json_path, plot_path, tls, auth_token) -> None:
    """The whole system in one command: start a local cluster (etcd, queue, router, scaler, engines), replay the
    Azure conversation trace (interactive) plus a batch workload through it for a few minutes, print the report
    (SLO attainment, GPU-seconds by role, scale events, lost requests), write JSON and a plot, shut down cleanly."""
    from services.cluster import ClusterConfig, start_cluster
    from services.common.etcd_server import EtcdNotFound
    from services.replay import ReplayConfig

    trace, lengths = _replay_inputs(trace_name, trace_file, start_s, minutes * 60 * speedup)
    engine_args = cluster_engine_args(backend, model, dummy_weights, speedup)
    cfg = ReplayConfig(speedup=speedup, batch_rate_per_s=batch_rate, batch_ttft_s=batch_ttft_s,
                       interactive_ttft_ms=interactive_ttft_ms, interactive_itl_ms=interactive_itl_ms)

    async def start():
        try:
            return await start_cluster(ClusterConfig(engine_args=engine_args, tls=tls, auth_token=auth_token),
                                       on_progress=lambda m: console.print(f"  {m}"))
        except (EtcdNotFound, RuntimeError, TimeoutError) as e:
            raise click.ClickException(str(e)) from e

    console.print("starting a local Chiron cluster…")
    cluster = asyncio.run(start())
    try:
        console.print(f"replaying {minutes:g} min of {trace.name} at {speedup:g}x ({len(trace)} interactive requests) "
                      f"plus batch requests at {batch_rate:g}/s…")
        report, plot_error = _run_replay(cluster.endpoint("router"), cluster.endpoint("scaler"),
                                         cluster.endpoint("queue"), trace, lengths, cfg, json_path, plot_path)
    finally:
        console.print("shutting down (engines drain first)…")
        asyncio.run(cluster.stop())
    if plot_error:
        raise click.ClickException(f"{plot_error} (the report is in {json_path})")
    if report["lost_requests"]:
        raise SystemExit(1)


@click.command()
@click.option("--json", "json_path", default="out/chaos.json", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the report (folders are made).")
@click.option("--faults", default=None, help="Comma-separated subset, in order, of: queue, router, gateway, scaler, "
              "engine, etcd-leader, freeze. Default: all (--quick: gateway, router, engine).")
@click.option("--minutes", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Spread the faults over about this many minutes (0: --fault-interval-s apart).")
@click.option("--fault-interval-s", type=click.FloatRange(min=1), default=None,
              help="Seconds from one fault to the next. Default: 40 (--quick: 8).")
@click.option("--stall-s", type=click.FloatRange(min=0.5), default=None,
              help="How long the etcd leader stays stopped and the cluster frozen [s]. Default: 30 (--quick: 5).")
@click.option("--quick", is_flag=True, help="A short run: a few faults, 5-s stalls, small jobs.")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False), help="Logs (default: a temporary folder).")
def chaos(json_path, faults, minutes, fault_interval_s, stall_s, quick, work_dir) -> None:
    """Chaos run: a local cluster with two replicas of queue (one PostgreSQL), router, gateway and scaler (elected
    leader), three etcd members and simulated engines, under the Azure conversation trace and Batch API jobs
    through both gateways; kills one replica of each service, an engine, stops the etcd leader and freezes
    everything, in turn. One row per fault (failed/duplicated/lost/twice-completed requests, recovery_s) and
    totals; exits 1 when a target is missed. Needs etcd and PostgreSQL binaries."""
    from services.chaos import ChaosConfig, run_chaos

    kw = {k: v for k, v in {"fault_interval_s": fault_interval_s, "stall_s": stall_s, "minutes": minutes,
                            "work_dir": work_dir}.items() if v is not None}
    chosen = tuple(f.strip() for f in faults.split(",") if f.strip()) if faults else None
    cfg = ChaosConfig.quick(chosen, **kw) if quick else ChaosConfig(**({"faults": chosen} if chosen else {}), **kw)
    with Progress(TextColumn("chaos"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[msg]}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("chaos", total=len(cfg.faults), msg="starting the cluster")
        try:
            report = asyncio.run(run_chaos(cfg, say=lambda m: bar.console.print(f"  {escape(m)}"),
                                           progress=lambda d, _t, what: bar.update(task, completed=d, msg=what)))
        except (ValueError, RuntimeError, TimeoutError) as e:
            raise click.ClickException(str(e)) from e
    table = Table(title=f"chiron chaos ({report['wall_seconds']:.0f} s)")
    cols = ("fault", "interactive_failed", "interactive_duplicated_tokens", "batch_lost", "batch_completed_twice",
            "recovery_s", "replica_back_s", "gateway_connections_cut")
    for c in cols:
        table.add_column(c.replace("_", " "), justify="left" if c == "fault" else "right")
    for row in [*report["faults"], {"fault": "total", **report["totals"]}]:
        table.add_row(*(fmt(row.get(c), 2) for c in cols))
    console.print(table)
    save_json(report, json_path)
    console.print(f"report: {json_path}")
    for miss in report["targets_missed"]:
        console.print(f"[red]target missed: {escape(miss)}[/]")
    if report["targets_missed"]:
        raise SystemExit(1)


@click.command("demo-engine")
@click.option("--trace", "trace_name", default="azure-conv", show_default=True,
              help="azure-conv, azure-code, or a CSV path with TIMESTAMP,ContextTokens,GeneratedTokens.")
@click.option("--start-s", default=0.0, show_default=True, help="Start of the trace slice [s].")
@click.option("--duration-s", default=120.0, show_default=True, help="Length of the trace slice [s of trace time].")
@click.option("--speedup", default=2.0, show_default=True, help="Replay (and simulated engine) speed-up factor.")
@click.option("--itl-slo-ms", default=50.0, show_default=True, help="Interactive ITL SLO [ms].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default="out/demo-engine.json",
              show_default=True, help="Where to write the JSON report.")
def demo_engine(trace_name, start_s, duration_s, speedup, itl_slo_ms, json_path) -> None:
    """Start a local engine agent, replay a slice of the Azure conversation trace, report the local autoscaler.

    The agent is a real subprocess speaking gRPC; the simulated Llama-3-8B/A100 engine starts at a max batch
    size of 16 and the local autoscaler adapts it from ITL and throughput backpressure.
    """
    from services.common.traces import load_azure_trace
    from services.engine.demo import replay, start_engine_process, stop_process, summarize, wait_healthy, wait_port_file

    trace = load_azure_trace(trace_name).slice(start_s, duration_s)
    if len(trace) == 0:
        raise click.BadParameter("the trace slice holds no requests; check --start-s/--duration-s")
    log_path = Path(tempfile.gettempdir()) / "chiron-demo-engine.log"
    proc, port_file = start_engine_process(["--speedup", str(speedup), "--itl-slo-ms", str(itl_slo_ms)], log_path)

    async def run():
        port = await wait_port_file(port_file, proc)
        target = f"127.0.0.1:{port}"
        await wait_healthy(target, proc=proc)
        console.print(f"engine agent up on {target} (log: {log_path}); replaying {len(trace)} requests of "
                      f"{trace_name} ({duration_s:.0f} s of trace at {speedup:g}×)")
        with Progress(TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            task = bar.add_task("replay", total=len(trace))
            return await replay(target, trace, speedup, int(itl_slo_ms), on_progress=lambda: bar.advance(task))

    t0 = time.monotonic()
    try:
        records, timeline = asyncio.run(run())
    finally:
        stop_process(proc)
        port_file.unlink(missing_ok=True)
    report = summarize(records, timeline, itl_slo_ms, time.monotonic() - t0, trace_name)

    table = Table(title="Local autoscaler over time (engine time)")
    for col in ("t [s]", "max batch", "running", "waiting", "ITL p95 [ms]", "LBP", "tokens/s", "KV use"):
        table.add_column(escape(col), justify="right")
    step = max(1, len(timeline) // 20)
    for p in timeline[::step]:
        table.add_row(fmt(p["t_s"], 0), str(p["max_batch_size"]), str(p["running"]), str(p["waiting"]),
                      fmt(p["itl_p95_ms"]), fmt(p["latency_backpressure"], 2),
                      fmt(p["throughput_tokens_per_s"], 0), fmt(p["kv_cache_usage"], 2))
    console.print(table)
    summary = Table(title="Replay summary")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for k in ("requests", "completed", "errors", "lost_requests", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
              "itl_p95_ms", "itl_p99_ms", "itl_slo_ms", "itl_slo_attainment", "throughput_tokens_per_s",
              "max_batch_size_initial", "max_batch_size_final", "wall_seconds"):
        summary.add_row(k, fmt(report[k], 3 if k == "itl_slo_attainment" else 1))
    console.print(summary)
    save_json(report, json_path)
    console.print(f"report written to {json_path}")
    if report["errors"] or report["lost_requests"]:
        raise SystemExit(1)



@click.command()
@click.option("--minutes", default=60.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Wall-clock minutes of load and sampling (the cluster's start and stop come on top).")
@click.option("--interval-s", default=5.0, show_default=True, type=click.FloatRange(min=0.2), help="Sampling period [s].")
@click.option("--rate", "interactive_rate", default=5.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Interactive requests per second (streamed /v1/completions through the gateway).")
@click.option("--batch-rate", default=0.1, show_default=True, type=click.FloatRange(min=0.0),
              help="Batch requests per second (Router.Submit, TTFT SLO 60 s).")
@click.option("--window-min", type=float, default=None,
              help="Summary window at the end of the run [min] (default: 50 for --minutes >= 60, else minutes - 10, "
                   "at least half the run).")
@click.option("--edge-min", type=float, default=None, help="Edges of the window compared for RSS growth [min] "
                                                            "(default: min(5, window / 2)).")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False), help="Cluster logs (default: a temporary folder).")
@click.option("--json", "json_path", default="out/soak.json", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the report (folders are made).")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False),
              help="Where to write the plot (default: the JSON path with .png).")
def soak(minutes, interval_s, interactive_rate, batch_rate, window_min, edge_min, work_dir, json_path, plot_path) -> None:
    """Soak test: a local cluster (simulated engines) under steady interactive load through the gateway plus a
    trickle of batch work for --minutes; every process's RSS and open descriptors sampled every --interval-s.
    Report per process (samples, RSS growth over the window, descriptor slope) and plot. Targets (issue 29,
    --minutes 60): RSS growth <= 5% and a flat descriptor count (drift <= 2) per process over the last 50 min.
    Needs the etcd binary. Exits 1 when a target is missed."""
    from services.common.etcd_server import EtcdNotFound
    from services.soak import SoakConfig, plot_report, print_summary, run_soak, write_json

    cfg = SoakConfig(minutes=minutes, interval_s=interval_s, interactive_rate_per_s=interactive_rate,
                     batch_rate_per_s=batch_rate, window_min=window_min, edge_min=edge_min, work_dir=work_dir)
    plot_path = plot_path or str(Path(json_path).with_suffix(".png"))
    console.print(f"soak: starting a local cluster, then {minutes:g} min at {interactive_rate:g} interactive req/s "
                  f"and {batch_rate:g} batch req/s, sampling every {interval_s:g} s…")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[at]}"), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("soak", total=minutes * 60, at="starting the cluster")

        def progress(done_s: float, total_s: float) -> None:
            bar.update(task, completed=done_s, at=f"{done_s / 60:.1f}/{total_s / 60:g} min")

        try:
            report = asyncio.run(run_soak(cfg, progress=progress, on_message=lambda m: bar.console.print(f"  {m}")))
        except (EtcdNotFound, RuntimeError, TimeoutError) as e:
            raise click.ClickException(str(e)) from e
    print_summary(report, console)
    write_json(report, json_path)
    try:
        plot_report(report, plot_path)
        console.print(f"report: {json_path}; plot: {plot_path}")
    except Exception as e:  # noqa: BLE001 - the report is written; a plot error is one line
        console.print(f"report: {json_path}; [red]the plot was not written: {escape(str(e))}[/]")
    if not report["targets"]["met"]:
        raise SystemExit(1)
