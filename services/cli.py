"""The ``chiron`` command: run services, demos and benchmarks.

    chiron replay                 replay a trace (interactive + batch) through a running cluster; report and plot
    chiron up                     start a whole cluster here (etcd, queue, router, scaler, engines)
    chiron certs DIR              write a development CA and server/client certificates for mutual TLS
    chiron engine                 run one engine agent (gRPC Engine service + local autoscaler)
    chiron queue                  run the global queue (durable request groups, leases, waiting-time estimates)
    chiron router                 run the router (interactive routing, batch submission via the queue)
    chiron gateway                run the OpenAI-compatible HTTP API (completions, chat, models, Batch API) over the router
    chiron scaler                 run the global scaler (policy + instance provider, or --advisory)
    chiron tiny-model DIR         write a tiny Llama model directory for the vllm backend on CPU
    chiron demo                   the whole system: local cluster + Azure trace + batch workload, report and plot
    chiron chaos                  faults (SIGKILL, SIGSTOP) in a replicated local cluster under load: what each cost
    chiron demo-engine            one engine agent + the Azure trace, the local autoscaler's report
    chiron simulate               a policy (or several) on a workload at fleet scale in virtual time
    chiron experiments            the paper's experiments for every policy: markdown report with tables and plots
    chiron bench perf-model       fit error of the A100 performance model on held-out profile rows
    chiron bench local-autoscaler adaptive vs best static vs vLLM default max batch size
    chiron bench estimator        accuracy of the global queue's waiting-time estimator
    chiron bench queue            global queue throughput, latency, memory at 1M queued
    chiron bench scaler           scaling-policy decision latency, scale-up-to-registered time
    chiron bench router           TTFT overhead the router adds at 50/200/500 req/s
    chiron bench gateway          TTFT overhead the HTTP gateway adds over the router's gRPC at 50/200 req/s
    chiron bench engine-overhead  tokens/s through the agent's gRPC vs vLLM called directly
    chiron bench fidelity         the simulator vs a live cluster on the same 5-minute trace slice
    chiron soak                   a local cluster under steady load for N minutes: RSS and descriptors per process
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import tempfile
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.common.grpc_util import run_event_loop

console = Console()
if not console.is_terminal:
    console.width = 140  # tables in logs and CI output stay readable


def _stop_on_signal() -> asyncio.Event:
    """An event the running loop sets on SIGINT or SIGTERM (how every long-running command stops or drains)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _metrics_options(f):
    """``--metrics-port`` and ``--metrics-port-file`` of a service command."""
    f = click.option("--metrics-port-file", type=click.Path(dir_okay=False),
                     help="Write the bound metrics port here (before --port-file); alone, it serves metrics on a free port.")(f)
    return click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
                        help="Serve Prometheus metrics at http://HOST:PORT/metrics (0 = pick a free one). Default: off.")(f)


async def _start_metrics(srv, metrics, host: str, port: int | None, port_file: str | None):
    """The service's /metrics endpoint (:func:`services.common.metrics.serve_metrics`) when ``--metrics-port`` or
    ``--metrics-port-file`` is given, else None. When the address cannot be bound, stops ``srv`` (the service's
    running server) and raises click.ClickException."""
    if port is None and not port_file:
        return None
    from services.common.metrics import serve_metrics

    try:
        return await serve_metrics(metrics, host, port or 0, port_file)
    except OSError as e:
        await srv.stop(0)
        raise click.ClickException(f"cannot serve metrics on {host}:{port}: {e}") from e


def _check_security_settings() -> None:
    """Fail early, with the reason, when the ``CHIRON_*`` security variables are inconsistent (certificate
    without key, missing file). Raises click.ClickException."""
    from pydantic import ValidationError

    from services.common.security import security_settings

    try:
        security_settings()
    except ValidationError as e:
        raise click.ClickException("security settings: " + "; ".join(err["msg"] for err in e.errors())) from None


def _security_options(f):
    """``--tls`` and ``--auth-token`` of the commands that start a local cluster."""
    f = click.option("--auth-token", default=None, metavar="TOKEN",
                     help="Require this bearer token on the router (its clients here send it). Visible in process "
                          "lists: export CHIRON_AUTH_TOKENS / CHIRON_TOKEN instead where that matters.")(f)
    return click.option("--tls", is_flag=True,
                        help="Mutual TLS on every gRPC hop, with a development CA and certificates written to "
                             "WORK_DIR/certs (see 'chiron certs').")(f)


def _print_security(cluster, tls: bool) -> None:
    """Tell how to reach a cluster started with --tls / --auth-token or CHIRON_* variables (never the token)."""
    from services.common.security import security_settings

    s = security_settings()
    if tls:
        certs = cluster.work.resolve() / "certs"
        console.print(f"mutual TLS on: clients need CHIRON_TLS_CA={certs / 'ca.pem'} CHIRON_TLS_CERT={certs / 'client.pem'} "
                      f"CHIRON_TLS_KEY={certs / 'client-key.pem'}", soft_wrap=True)
    elif s.tls_enabled:
        console.print("TLS on, with the certificates named by CHIRON_TLS_CERT / CHIRON_TLS_KEY / CHIRON_TLS_CA")
    if s.auth_enabled:
        console.print("router requires a bearer token: clients send it as CHIRON_TOKEN (gRPC metadata "
                      "'authorization: Bearer <token>'); the gateway too, as the HTTP header 'Authorization: Bearer <token>'")


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def main(log_level: str) -> None:
    """Chiron: SLO-aware hierarchical autoscaling for LLM serving (arXiv 2501.08090)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))  # not a line per HTTP call
    sub = click.get_current_context().invoked_subcommand
    if sub in ("engine", "queue", "router", "scaler", "gateway"):  # CHIRON_* TLS / token settings usable?
        _check_security_settings()
    if sub in ("engine", "queue", "router", "scaler"):  # OTel spans per RPC when OTEL_* variables ask for them
        from services.common.tracing import setup_tracing

        setup_tracing(f"chiron-{sub}")


# ----------------------------------------------------------------------------------------------
# chiron engine
# ----------------------------------------------------------------------------------------------
@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=50061, show_default=True, help="gRPC port (0 = pick a free one).")
@click.option("--port-file", type=click.Path(dir_okay=False), help="Write the bound port here once serving.")
@click.option("--backend", type=click.Choice(["simulated", "vllm"]), default="simulated", show_default=True,
              help="simulated: continuous-batching A100 engine from the fitted performance model; "
                   "vllm: a real vLLM engine in this process (needs vLLM: scripts/install_vllm_cpu.sh on CPU).")
@click.option("--model", default="llama-3-8b", show_default=True,
              help="simulated: llama-3-8b or llama-2-70b (TP=4). vllm: a Hugging Face model directory "
                   "('chiron tiny-model DIR' writes a tiny test model).")
@click.option("--load-format", type=click.Choice(["auto", "dummy"]), default="auto", show_default=True,
              help="vllm: 'dummy' runs the model with random weights (no weight files needed).")
@click.option("--dtype", default="auto", show_default=True, help="vllm: weight/activation dtype (float32 is fastest on CPU).")
@click.option("--max-num-batched-tokens", type=int, default=None,
              help="vllm: per-step token budget (decodes + prefill chunks); default: vLLM's. A small budget keeps "
                   "prefill chunks from stalling decodes past a tight ITL SLO.")
@click.option("--kv-cache-mb", type=int, default=0, show_default=True,
              help="vllm: KV-cache size [MiB] (0 = vLLM's default sizing).")
@click.option("--role", type=click.Choice(["interactive", "mixed", "batch"]), default="interactive", show_default=True)
@click.option("--instance-id", default="", help="Instance id (default: generated).")
@click.option("--itl-slo-ms", type=float, default=None,
              help="ITL SLO the local autoscaler holds [ms]. Default: 50 (interactive/mixed), 500 (batch).")
@click.option("--initial-batch-size", default=16, show_default=True, help="Max batch size at start [requests].")
@click.option("--max-batch-size", type=int, default=None,
              help="Upper bound of the max batch size [requests]. Default: 1024 (simulated), 256 (vllm).")
@click.option("--control-interval-s", default=1.0, show_default=True, help="Local autoscaler period [s].")
@click.option("--static-batch-size", type=int, default=None,
              help="Disable the local autoscaler and fix the max batch size [requests].")
@click.option("--min-prefill-tokens", type=int, default=512, show_default=True,
              help="simulated: with the tied token budget, prefill tokens an iteration may add beyond its decodes "
                   "(keeps long prompts from starving behind a full batch) [tokens].")
@click.option("--token-budget", type=int, default=None,
              help="Fixed per-iteration token budget (vLLM max_num_batched_tokens); default: tied to the batch size.")
@click.option("--speedup", default=1.0, show_default=True, help="Run the simulated engine's clock this much faster.")
@click.option("--etcd", default=None, help="Register this instance in etcd (host:port) under a kept-alive lease.")
@click.option("--queue", "queue_addr", default=None,
              help="Queue service (host:port): a BATCH or MIXED agent leases batch work from it (ignored for interactive).")
@_metrics_options
@click.option("--advertise-host", default=None,
              help="Host others reach this agent at (registered in etcd). Default: --host, or 127.0.0.1 for 0.0.0.0.")
def engine(host, port, port_file, backend, model, load_format, dtype, max_num_batched_tokens,
           kv_cache_mb, role, instance_id, itl_slo_ms, initial_batch_size, max_batch_size, control_interval_s,
           static_batch_size, min_prefill_tokens, token_budget, speedup, etcd, queue_addr, advertise_host, metrics_port,
           metrics_port_file) -> None:
    """Run one engine agent: the chiron.v1.Engine gRPC service with health checking and reflection.

    SIGTERM or Ctrl-C drains: new requests get UNAVAILABLE, running ones finish (up to 30 s).
    """
    from services.engine.backend import SimulatedBackend
    from services.engine.core import EngineConfig
    from services.engine.local_autoscaler import LocalAutoscalerConfig, role_overrides
    from services.engine.server import ROLE_NAMES, AgentConfig, EngineAgent, serve

    if itl_slo_ms is None:
        itl_slo_ms = 500.0 if role == "batch" else 50.0
    if max_batch_size is None:
        max_batch_size = 256 if backend == "vllm" else 1024
    if backend == "simulated" and model not in ("llama-3-8b", "llama-2-70b"):
        raise click.BadParameter(f"the simulated backend models llama-3-8b or llama-2-70b, not {model!r}",
                                 param_hint="--model")
    vllm_cfg = None
    if backend == "vllm":
        from services.engine.vllm_backend import ModelDirError, VllmConfig, check_model_dir, quiet_vllm_logs

        quiet_vllm_logs()
        try:
            check_model_dir(model, load_format)
        except ModelDirError as e:
            raise click.BadParameter(str(e), param_hint="--model") from e
        vllm_cfg = VllmConfig(model_dir=model, load_format=load_format, dtype=dtype,
                              max_num_seqs=max(max_batch_size, static_batch_size or 1),
                              kv_cache_bytes=kv_cache_mb << 20, max_num_batched_tokens=max_num_batched_tokens)
    try:
        a_cfg = LocalAutoscalerConfig(itl_slo_ms=itl_slo_ms, initial_batch_size=static_batch_size or initial_batch_size,
                                      max_batch_size=max(max_batch_size, static_batch_size or 1),
                                      control_interval_s=control_interval_s, **role_overrides(role)).validate()
        e_cfg = EngineConfig(max_num_seqs=a_cfg.initial_batch_size, max_num_seqs_limit=a_cfg.max_batch_size,
                             max_num_batched_tokens=token_budget, min_prefill_tokens=min_prefill_tokens)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e

    async def run() -> None:
        # Signal handlers first: a SIGTERM that arrives while starting (e.g. a scaler scaling down at once) must
        # still drain — once registered, requests may already be routed here.
        stop = _stop_on_signal()
        if vllm_cfg is not None:
            from services.engine.vllm_backend import VllmBackend

            be = VllmBackend(vllm_cfg)
        else:
            be = SimulatedBackend(model, e_cfg, speedup=speedup)
        agent = EngineAgent(be, AgentConfig(instance_id=instance_id, role=ROLE_NAMES[role], autoscaler=a_cfg,
                                            autoscale=static_batch_size is None,
                                            queue_address=queue_addr if role in ("batch", "mixed") else None))
        try:
            srv = await serve(agent, host, port)
        except Exception as e:
            console.print(f"[red]engine failed to start ({backend} backend): {e}[/]")
            raise SystemExit(1) from e
        msrv = await _start_metrics(srv, agent.metrics, host, metrics_port, metrics_port_file)
        reg = None
        if etcd:
            import os

            from services.common.membership import InstanceInfo, MembershipError, Registration

            adv = advertise_host or ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
            info = InstanceInfo(instance_id=agent.config.instance_id, role=role, model=be.model_name,
                                address=f"{adv}:{srv.port}", backend=backend, pid=os.getpid(),
                                labels={"metrics_address": f"{adv}:{msrv.port}"} if msrv else {})
            try:
                reg = await Registration.create(etcd, info)
            except MembershipError as e:
                console.print(f"[red]cannot register in etcd at {etcd}: {e}[/]")
                await srv.stop(grace_s=0)
                raise SystemExit(1) from e
        if port_file:  # last: whoever waits on it may count the instance as registered and serving
            Path(port_file).write_text(str(srv.port))
        console.print(f"engine agent [bold]{agent.config.instance_id}[/] ({backend}, {be.model_name}, {role}) "
                      f"serving on {host}:{srv.port}" + (f", registered in etcd {etcd}" if reg else "")
                      + (f", metrics on http://{host}:{msrv.port}/metrics" if msrv else ""))
        await stop.wait()
        console.print("draining…")
        if reg is not None:
            await reg.update(state="draining")  # routers stop sending; in-flight requests finish below
        await srv.stop(grace_s=30.0)
        if reg is not None:
            await reg.close()
        if msrv is not None:
            msrv.stop()

    run_event_loop(run())


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=50051, show_default=True, help="gRPC port (0 = pick a free one).")
@click.option("--port-file", type=click.Path(dir_okay=False), help="Write the bound port here once serving.")
@click.option("--db", "db_path", default="chiron-queue.db", show_default=True, type=click.Path(dir_okay=False),
              help="SQLite file of the durable queue (WAL mode; one queue process per file), or a PostgreSQL URL "
                   "postgresql://user:password@host:port/dbname, which several queue replicas may share; reopened "
                   "after a crash or restart.")
@click.option("--models", default="", help="Comma-separated models accepted (default: any).")
@click.option("--capacity", default=2_000_000, show_default=True, help="Most requests queued or leased at once.")
@click.option("--group-granularity-s", default=60.0, show_default=True,
              help="Width of a request group's TTFT-deadline bucket [s].")
@click.option("--lease-timeout-s", default=60.0, show_default=True, help="Default lease visibility timeout [s].")
@click.option("--max-ttft-slo-s", default=7 * 24 * 3600.0, show_default=True, help="Largest TTFT SLO accepted [s].")
@click.option("--max-prompt-tokens", default=32768, show_default=True, help="Longest prompt accepted [tokens].")
@click.option("--prior-throughput", type=float, default=0.0, show_default=True,
              help="Batch throughput assumed per model before any request completes [tokens/s] (0 = unknown).")
@click.option("--max-file-bytes", default=64 * 2**20, show_default=True,
              help="Largest Batch API upload stored [bytes] (at most 80 MiB, the gRPC message limit).")
@_metrics_options
def queue(host, port, port_file, db_path, models, capacity, group_granularity_s, lease_timeout_s, max_ttft_slo_s,
          max_prompt_tokens, prior_throughput, max_file_bytes, metrics_port, metrics_port_file) -> None:
    """Run the global queue: the chiron.v1.Queue gRPC service (durable request groups, leases, waiting-time
    estimates) and chiron.v1.BatchApi (uploaded files and batches, in the same database), with health checking
    and reflection. SIGTERM or Ctrl-C stops it; the store survives."""
    from services.queue.server import CapacityTracker, serve
    from services.queue.store import QueueConfig

    cfg = QueueConfig(db_path=db_path, models=tuple(m for m in models.split(",") if m), capacity=capacity,
                      group_granularity_s=group_granularity_s, lease_timeout_s=lease_timeout_s,
                      max_ttft_slo_ms=int(max_ttft_slo_s * 1000), max_prompt_tokens=max_prompt_tokens)
    from services.queue.pg_store import check_database, is_postgres_url, redact_url

    try:
        cfg.validate()
        if is_postgres_url(db_path):
            check_database(cfg)  # unreachable, other schema version: stop now, with the URL and the fix
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    if not 1 <= max_file_bytes <= 80 * 2**20:
        raise click.BadParameter(f"--max-file-bytes must be in 1 .. {80 * 2**20} bytes, got {max_file_bytes}")

    async def run() -> None:
        srv = await serve(cfg, host, port, capacity=CapacityTracker(prior_throughput_tokens_per_s=prior_throughput),
                          max_file_bytes=max_file_bytes)
        msrv = await _start_metrics(srv, srv.service.metrics, host, metrics_port, metrics_port_file)
        if port_file:
            Path(port_file).write_text(str(srv.port))
        console.print(f"queue serving on {host}:{srv.port} (store {redact_url(db_path)})"
                      + (f", metrics on http://{host}:{msrv.port}/metrics" if msrv else ""))
        stop = _stop_on_signal()
        await stop.wait()
        await srv.stop()
        if msrv is not None:
            msrv.stop()

    run_event_loop(run())


def _role_limits(text: str, role: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: use MIN:MAX instance counts, e.g. 1:8", param_hint=f"--{role}") from None
    return lo, hi


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=50071, show_default=True, help="gRPC port of the Scaler service (0 = pick a free one).")
@click.option("--port-file", type=click.Path(dir_okay=False), help="Write the bound port here once serving.")
@click.option("--etcd", required=True, help="etcd endpoint (host:port) holding engine membership.")
@click.option("--queue", "queue_addr", default=None, help="Queue service (host:port) for batch backpressure.")
@click.option("--provider", type=click.Choice(["local", "nomad", "keda"]), default="local", show_default=True,
              help="local: chiron engine processes on this machine; nomad: scale engine task groups via Nomad's API; "
                   "keda: Kubernetes, where KEDA reads the desired counts from this server (deploy/kubernetes/).")
@click.option("--advisory", is_flag=True,
              help="Compute, log and expose every decision exactly as when active, but never call the provider.")
@click.option("--interval-s", default=5.0, show_default=True, help="Scaling interval [s].")
@click.option("--scale-down-delay-s", default=120.0, show_default=True, help="Scale-down delay window [s].")
@click.option("--model-load-time-s", default=60.0, show_default=True,
              help="Time a new instance needs before it serves [s] (sizes the over-provisioning Θ).")
@click.option("--arrival-cv", default=1.0, show_default=True,
              help="Coefficient of variation of interactive inter-arrival times (1 = Poisson) until the router reports it.")
@click.option("--interactive-ttft-slo-ms", default=10_000.0, show_default=True,
              help="Interactive TTFT SLO [ms]: a queue an instance admits within it is not read as that instance's "
                   "concurrency bound (set it to your SLO class, e.g. 2000 for chat).")
@click.option("--interactive", "lim_i", default="1:16", show_default=True, help="MIN:MAX INTERACTIVE instances.")
@click.option("--mixed", "lim_m", default="0:16", show_default=True, help="MIN:MAX MIXED instances.")
@click.option("--batch", "lim_b", default="0:16", show_default=True, help="MIN:MAX BATCH instances.")
@click.option("--gpu-budget", default=50, show_default=True, help="Most GPUs the fleet may use.")
@click.option("--gpus-per-instance", default=1, show_default=True, help="GPUs one engine instance uses.")
@click.option("--engine-args", default="--backend simulated", show_default=True,
              help="local provider: extra 'chiron engine' arguments (one shell-quoted string).")
@click.option("--work-dir", default="out/scaler-local", show_default=True, type=click.Path(file_okay=False),
              help="local provider: where engine logs and port files go.")
@click.option("--nomad-address", default="http://127.0.0.1:4646", show_default=True, help="nomad provider: Nomad HTTP API.")
@click.option("--nomad-job", default="chiron-engine", show_default=True, help="nomad provider: the engine job's id.")
@click.option("--election/--no-election", default=None,
              help="Elect one acting scaler among replicas through etcd (key /chiron/scaler/leader); standbys decide "
                   "and explain but never call the provider. Default: on (off with --advisory, which never acts).")
@click.option("--leader-ttl-s", default=10, show_default=True, type=click.IntRange(min=2),
              help="Election lease TTL [s]: a standby takes over within it when the leader dies or loses etcd; a "
                   "leader that cannot refresh stops acting max(0.5, TTL/4) s before it ends.")
@_metrics_options
def scaler(host, port, port_file, etcd, queue_addr, provider, advisory, interval_s, scale_down_delay_s, model_load_time_s,
           arrival_cv, interactive_ttft_slo_ms, lim_i, lim_m, lim_b, gpu_budget, gpus_per_instance, engine_args, work_dir,
           nomad_address, nomad_job, election, leader_ttl_s, metrics_port, metrics_port_file) -> None:
    """Run the global scaler: desired INTERACTIVE / MIXED / BATCH instance counts from interactive load (with
    over-provisioning Θ) and batch backpressure, applied through an instance provider, explained over gRPC
    (GetDecision / WatchDecisions) and in the log.
    """
    import dataclasses
    import shlex

    from services.global_scaler.policy import PolicyConfig, with_limits

    try:
        cfg = dataclasses.replace(
            with_limits(PolicyConfig(), interactive=_role_limits(lim_i, "interactive"), mixed=_role_limits(lim_m, "mixed"),
                        batch=_role_limits(lim_b, "batch")),
            interval_s=interval_s, scale_down_delay_s=scale_down_delay_s, model_load_time_s=model_load_time_s,
            gpu_budget=gpu_budget, gpus_per_instance=gpus_per_instance,
            interactive_ttft_slo_s=interactive_ttft_slo_ms / 1e3).validate()
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    if election and advisory:
        raise click.BadParameter("an advisory scaler never acts, so it takes no part in the election",
                                 param_hint="--election")
    election = not advisory if election is None else election

    async def run() -> None:
        from services.common.membership import MembershipWatcher
        from services.global_scaler.leader import LeaderElection
        from services.global_scaler.server import ScalerService, serve

        prov = None
        if not advisory:
            if provider == "local":
                from services.global_scaler.local_provider import LocalProvider

                prov = LocalProvider(shlex.split(engine_args), etcd, work_dir)
            elif provider == "nomad":
                from services.global_scaler.nomad import NomadProvider

                prov = NomadProvider(address=nomad_address, job_id=nomad_job)
        watcher = MembershipWatcher(etcd)  # "a:1,b:2,c:3": every member of an etcd cluster
        await watcher.start()
        if not advisory and provider == "keda":
            from services.global_scaler.keda import KedaProvider

            prov = KedaProvider(watcher)
        elect = LeaderElection(etcd, ttl_s=leader_ttl_s) if election else None
        service = ScalerService(cfg, watcher, prov, queue=queue_addr, advisory=advisory, arrival_cv=arrival_cv,
                                election=elect)
        srv = await serve(service, host, port)
        msrv = await _start_metrics(srv, service.metrics, host, metrics_port, metrics_port_file)
        if port_file:
            Path(port_file).write_text(str(srv.port))
        role = ("" if elect is None else f", {'leader' if elect.is_leader else 'standby'} as {elect.candidate_id}")
        console.print(f"scaler serving on {host}:{srv.port} ({'advisory' if advisory else provider + ' provider'}{role})"
                      + (f", metrics on http://{host}:{msrv.port}/metrics" if msrv else ""))
        stop = _stop_on_signal()
        await stop.wait()
        await srv.stop()
        if msrv is not None:
            msrv.stop()
        if prov is not None:
            await prov.close()
        await watcher.stop()

    run_event_loop(run())


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=50050, show_default=True, help="gRPC port of the Router service (0 = pick a free one).")
@click.option("--port-file", type=click.Path(dir_okay=False), help="Write the bound port here once serving.")
@click.option("--etcd", required=True, help="etcd endpoint (host:port) holding engine membership.")
@click.option("--queue", "queue_addr", required=True,
              help="Queue service (host:port) for batch requests; several replicas over one database as "
                   "host:port,host:port (a call one cannot answer goes to the next).")
@click.option("--interactive-ttft-max-ms", default=60_000, show_default=True,
              help="Requests with a TTFT SLO up to this are interactive, longer ones batch [ms].")
@click.option("--stats-interval-s", default=0.25, show_default=True, help="How often engine stats are refreshed [s].")
@_metrics_options
def router(host, port, port_file, etcd, queue_addr, interactive_ttft_max_ms, stats_interval_s, metrics_port,
           metrics_port_file) -> None:
    """Run the router: the client-facing chiron.v1.Router service (Generate for interactive requests,
    Submit / GetResult / StreamResult / Cancel for batch ones), with health checking and reflection."""
    import dataclasses

    from services.router.routing import RouterConfig

    try:
        cfg = dataclasses.replace(RouterConfig(), interactive_ttft_max_ms=interactive_ttft_max_ms).validate()
    except ValueError as e:
        raise click.BadParameter(str(e)) from e

    async def run() -> None:
        from services.common.membership import MembershipWatcher
        from services.router.server import RouterService, serve

        watcher = MembershipWatcher(etcd)  # "a:1,b:2,c:3": every member of an etcd cluster
        await watcher.start()
        srv = await serve(RouterService(cfg, watcher, queue_addr, stats_interval_s=stats_interval_s), host, port)
        msrv = await _start_metrics(srv, srv.service.metrics, host, metrics_port, metrics_port_file)
        if port_file:
            Path(port_file).write_text(str(srv.port))
        console.print(f"router serving on {host}:{srv.port}" + (f", metrics on http://{host}:{msrv.port}/metrics" if msrv else ""))
        stop = _stop_on_signal()
        await stop.wait()
        await srv.stop()
        if msrv is not None:
            msrv.stop()
        await watcher.stop()

    run_event_loop(run())


@main.command()
@click.option("--host", default=None, help="Address to bind. Default: 127.0.0.1.")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="HTTP port (0 = pick a free one). Default: 8000.")
@click.option("--port-file", type=click.Path(dir_okay=False), help="Write the bound port here once serving.")
@click.option("--router", "router_addr", default=None,
              help="Router gRPC address (host:port), or several separated by commas (a:1,b:2): calls fail over to "
                   "the next when one is unavailable. Default: 127.0.0.1:50050.")
@click.option("--tokenizer", default=None,
              help="'simple' (simulated engines: a deterministic word-level tokenizer; output text is placeholder words) "
                   "or a model directory (real vLLM engines: its Hugging Face tokenizer and chat template). Default: simple.")
@click.option("--vocab-size", type=int, default=None,
              help="simple tokenizer: token ids in [0, N) [tokens]. Default: 32000 (valid on every simulated model).")
@click.option("--max-body-bytes", type=int, default=None,
              help="Largest request body, Batch API uploads included [bytes]; larger ones get 413. Default: 68157440 (65 MiB).")
@click.option("--default-max-tokens", type=int, default=None,
              help="Output tokens of a request that sets no max_tokens [tokens]. Default: 256.")
@click.option("--access-log", is_flag=True, help="Log every HTTP request (method, path, status; never headers or bodies).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="HTTP worker processes sharing the port, each with its own event loop, so a burst of requests "
                   "spreads over cores; /metrics sums them. 1 serves in this process. Default: 1.")
@click.option("--worker-fd", type=int, default=None, hidden=True)
@click.option("--worker-dir", type=click.Path(file_okay=False), default=None, hidden=True)
def gateway(host, port, port_file, router_addr, tokenizer, vocab_size, max_body_bytes, default_max_tokens, access_log,
            workers, worker_fd, worker_dir) -> None:
    """Run the OpenAI-compatible HTTP gateway over the router: POST /v1/completions and /v1/chat/completions
    (streaming or not), GET /v1/models, the Batch API (/v1/files, /v1/batches), GET /health and /metrics.

    Every setting can also come from a CHIRON_GATEWAY_<NAME> variable (options win; CHIRON_GATEWAY_SLO_CLASSES
    as JSON); bearer tokens from CHIRON_AUTH_TOKENS (clients send 'Authorization: Bearer <token>'); HTTPS and
    TLS to the router from CHIRON_TLS_*. SIGTERM or Ctrl-C stops it: in-flight requests finish (up to 30 s).
    """
    from pydantic import ValidationError

    from services.gateway.app import GatewayConfig, GatewayServer, GatewayWorkers, worker_config

    _check_security_settings()
    if worker_fd is not None:  # one worker of GatewayWorkers (another 'chiron gateway' started it)
        if worker_dir is None:
            raise click.BadParameter("--worker-fd needs --worker-dir (both are set by 'chiron gateway --workers N')")
        _gateway_worker(worker_config(worker_dir), worker_fd, Path(worker_dir), access_log)
        return
    given = {"host": host, "port": port, "router": router_addr, "tokenizer": tokenizer, "vocab_size": vocab_size,
             "max_body_bytes": max_body_bytes, "default_max_tokens": default_max_tokens, "workers": workers}
    try:
        cfg = GatewayConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        raise click.BadParameter("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None

    async def run() -> None:
        stop = _stop_on_signal()
        server = GatewayServer(cfg, access_log=access_log) if cfg.workers == 1 else GatewayWorkers(cfg, access_log=access_log)
        try:
            bound = await server.start()
        except (RuntimeError, ValueError, OSError, TimeoutError) as e:
            raise click.ClickException(f"the gateway failed to start: {e}") from e
        if port_file:
            Path(port_file).write_text(str(bound))
        console.print(f"gateway serving the OpenAI API on {server.url}/v1 (router {cfg.router}, tokenizer {cfg.tokenizer}, "
                      f"{cfg.workers} worker{'s' if cfg.workers > 1 else ''}); metrics on {server.url}/metrics")
        await stop.wait()
        console.print("stopping: in-flight requests finish…")
        await server.stop()

    run_event_loop(run())


def _gateway_worker(cfg, fd: int, worker_dir: Path, access_log: bool) -> None:
    """Serve the listening socket ``fd`` until SIGTERM, or until the process that started this one is gone (then,
    with nothing left to clean up after the workers, remove ``worker_dir`` too)."""
    import os
    import shutil
    import socket

    from services.gateway.app import GatewayServer

    async def run() -> None:
        stop = _stop_on_signal()
        parent = os.getppid()
        server = GatewayServer(cfg, access_log=access_log, sock=socket.socket(fileno=fd))
        await server.start()
        (worker_dir / f"ready-{os.getpid()}").write_text("")
        while not stop.is_set() and os.getppid() == parent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        await server.stop()
        if os.getppid() != parent:
            shutil.rmtree(worker_dir, ignore_errors=True)

    run_event_loop(run())


_dummy_weights_option = click.option(
    "--dummy-weights", is_flag=True,
    help="vllm: run the model with random weights (--load-format dummy; no weight files needed). Default: the "
         "model's own weights and dtype; a directory written by 'chiron tiny-model' always runs with random weights.")


def _cluster_engine_args(backend: str, model: str | None, dummy_weights: bool, speedup: float) -> str:
    """``chiron up`` / ``chiron demo``: the arguments of the engines the scaler starts. vLLM's model directory is
    checked here, so a missing or weightless one fails before anything starts."""
    from services.cluster import vllm_engine_args

    if backend != "vllm":
        return f"--backend simulated --speedup {speedup}"
    if not model:
        raise click.BadParameter("--backend vllm needs --model DIR ('chiron tiny-model DIR' writes a test model)")
    from services.engine.vllm_backend import ModelDirError, check_model_dir, is_tiny_model

    try:
        check_model_dir(model, "dummy" if dummy_weights or is_tiny_model(model) else "auto")
    except ModelDirError as e:
        msg = str(e).replace("pass --load-format dummy", "pass --dummy-weights")
        raise click.BadParameter(msg, param_hint="'--model'") from None
    return vllm_engine_args(model, dummy_weights)


def write_report_files(report: dict, json_path: str | Path, plot_path: str | Path) -> str | None:
    """Write ``report`` as JSON to ``json_path``, then its plot to ``plot_path``, making their folders first.

    The JSON comes first and its failure raises click.ClickException. A plot that cannot be written (folder or
    file not writable, unknown image format, no matplotlib) raises nothing: the one-line reason comes back
    (None when it was written), since the report is already safe."""
    from services.replay import plot_report

    json_path = Path(json_path)
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, default=float))
    except OSError as e:
        raise click.ClickException(f"cannot write the report to {json_path}: {e}") from e
    try:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        plot_report(report, str(plot_path))
    except Exception as e:  # any failure of the plot leaves the written report standing
        import sys

        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            plt.close("all")
        return f"the plot was not written to {plot_path}: {type(e).__name__}: {e}".replace("\n", " ")
    return None


@main.command()
@click.option("--backend", type=click.Choice(["simulated", "vllm"]), default="simulated", show_default=True,
              help="Engines the scaler starts: simulated A100 engines, or real vLLM (needs --model).")
@click.option("--model", default=None, help="vllm: model directory (e.g. from 'chiron tiny-model DIR').")
@_dummy_weights_option
@click.option("--speedup", default=1.0, show_default=True, help="simulated: engine clock speed-up.")
@click.option("--gateway-port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="HTTP port of the OpenAI-compatible gateway on 127.0.0.1 (0 = pick a free one); a port in use "
                   "fails at once.")
@click.option("--scaler-args", default=None, help="Extra 'chiron scaler' arguments (role limits, intervals).")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Logs, port files, queue database, etcd data (default: a new temporary directory).")
@_security_options
def up(backend, model, dummy_weights, speedup, gateway_port, scaler_args, work_dir, tls, auth_token) -> None:
    """Start a whole Chiron cluster on this machine: etcd, queue, router, the OpenAI-compatible HTTP gateway
    (on port 8000 of 127.0.0.1 unless --gateway-port says otherwise), scaler (local provider), and the engine
    agents the scaler starts; print the endpoints; Ctrl-C stops everything, draining first. Every service keeps
    the port it got at start: one that exits (queue, router, gateway, scaler) is restarted there."""
    import shlex

    from services.cluster import ClusterConfig, start_cluster
    from services.common.etcd_server import EtcdNotFound

    engine_args = _cluster_engine_args(backend, model, dummy_weights, speedup)
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
        _print_security(cluster, tls)
        console.print(f"logs in {cluster.work}; Ctrl-C stops everything (engines drain first)")
        stop = _stop_on_signal()
        await stop.wait()
        live = [f"{n} (draining engines)" if n == "scaler" else n for n in cluster.live()]  # the dead: nothing to stop
        console.print(f"stopping: {', '.join(live) or 'nothing is running'}…")
        await cluster.stop()

    run_event_loop(run())


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", "hosts", multiple=True, default=("127.0.0.1", "localhost", "::1"), show_default=True,
              help="IP address or DNS name the services are dialled at (repeat); goes into the server certificate.")
@click.option("--days", default=30, show_default=True, type=click.IntRange(1, 3650), help="Validity [days].")
def certs(directory, hosts, days) -> None:
    """Write a development CA (ca.pem, ca-key.pem), a certificate for the services (server.pem, server-key.pem:
    server and client use) and one for outside clients (client.pem, client-key.pem) into DIRECTORY, and print
    the variables that turn mutual TLS on. For a lab; production certificates come from your PKI
    (deploy/nomad/TLS.md)."""
    from services.common.security import write_dev_certificates

    try:
        paths = write_dev_certificates(directory, hosts, days)
    except OSError as e:
        raise click.ClickException(f"cannot write certificates to {directory}: {e}") from e
    console.print(f"wrote a CA and certificates for {', '.join(hosts)} (valid {days} days) to {directory}")
    console.print("services (every chiron process):")
    for var, name in (("CHIRON_TLS_CERT", "server"), ("CHIRON_TLS_KEY", "server_key"), ("CHIRON_TLS_CA", "ca")):
        console.print(f"  export {var}={paths[name].resolve()}", soft_wrap=True)
    console.print("outside clients: CHIRON_TLS_CERT / CHIRON_TLS_KEY of client.pem / client-key.pem, the same CHIRON_TLS_CA")


@main.command("tiny-model")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--layers", default=2, show_default=True, help="Decoder layers.")
@click.option("--hidden-size", default=128, show_default=True, help="Hidden size (4 heads of hidden/4).")
@click.option("--vocab-size", default=1024, show_default=True, help="Vocabulary size [tokens].")
@click.option("--max-len", default=2048, show_default=True, help="Context length [tokens].")
def tiny_model(model_dir, layers, hidden_size, vocab_size, max_len) -> None:
    """Write a tiny Llama-architecture model directory (config only) for the vllm backend on CPU.

    Serve it with: chiron engine --backend vllm --model MODEL_DIR --load-format dummy (chiron up and chiron demo
    --backend vllm --model MODEL_DIR know it by its chiron-tiny-model.json marker and add that themselves).
    """
    from services.engine.vllm_backend import write_tiny_model

    d = write_tiny_model(model_dir, num_layers=layers, hidden_size=hidden_size, vocab_size=vocab_size,
                         max_position_embeddings=max_len)
    console.print(f"wrote {d}/config.json: {layers} layers, hidden {hidden_size}, vocab {vocab_size}, "
                  f"context {max_len} (random weights: --load-format dummy)")


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
                  f"{_fmt(i['ttft_p50_ms'])} ms", f"{_fmt(i['ttft_p99_ms'])} ms", f"{_fmt(i['itl_p50_ms'])} ms",
                  f"{_fmt(i['itl_p99_ms'])} ms")
    table.add_row("batch", str(b["count"]), str(b["accepted"]), f"{b['slo_attainment']:.3f}", f"{_fmt(b['ttft_p50_s'])} s",
                  f"{_fmt(b['ttft_p99_s'])} s", "—", "—")
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


@main.command()
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


@main.command()
@click.option("--minutes", default=2.0, show_default=True, help="Wall-clock minutes of replay.")
@_replay_options
@click.option("--backend", type=click.Choice(["simulated", "vllm"]), default="simulated", show_default=True)
@click.option("--model", default=None, help="vllm: model directory (e.g. from 'chiron tiny-model DIR').")
@_dummy_weights_option
@click.option("--json", "json_path", default="out/demo.json", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the JSON report (folders are made).")
@click.option("--plot", "plot_path", default="out/demo.png", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the plot (folders are made).")
@_security_options
def demo(minutes, trace_name, trace_file, start_s, speedup, batch_rate, batch_ttft_s, interactive_ttft_ms,
         interactive_itl_ms, backend, model, dummy_weights, json_path, plot_path, tls, auth_token) -> None:
    """The whole system in one command: start a local cluster (etcd, queue, router, scaler, engines), replay the
    Azure conversation trace (interactive) plus a batch workload through it for a few minutes, print the report
    (SLO attainment, GPU-seconds by role, scale events, lost requests), write JSON and a plot, shut down cleanly."""
    from services.cluster import ClusterConfig, start_cluster
    from services.common.etcd_server import EtcdNotFound
    from services.replay import ReplayConfig

    trace, lengths = _replay_inputs(trace_name, trace_file, start_s, minutes * 60 * speedup)
    engine_args = _cluster_engine_args(backend, model, dummy_weights, speedup)
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


@main.command()
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
        table.add_row(*(_fmt(row.get(c), 2) for c in cols))
    console.print(table)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(report, indent=2))
    console.print(f"report: {json_path}")
    for miss in report["targets_missed"]:
        console.print(f"[red]target missed: {escape(miss)}[/]")
    if report["targets_missed"]:
        raise SystemExit(1)


# ----------------------------------------------------------------------------------------------
# chiron demo
# ----------------------------------------------------------------------------------------------
@main.command("demo-engine")
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
        table.add_row(_fmt(p["t_s"], 0), str(p["max_batch_size"]), str(p["running"]), str(p["waiting"]),
                      _fmt(p["itl_p95_ms"]), _fmt(p["latency_backpressure"], 2),
                      _fmt(p["throughput_tokens_per_s"], 0), _fmt(p["kv_cache_usage"], 2))
    console.print(table)
    summary = Table(title="Replay summary")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for k in ("requests", "completed", "errors", "lost_requests", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
              "itl_p95_ms", "itl_p99_ms", "itl_slo_ms", "itl_slo_attainment", "throughput_tokens_per_s",
              "max_batch_size_initial", "max_batch_size_final", "wall_seconds"):
        summary.add_row(k, _fmt(report[k], 3 if k == "itl_slo_attainment" else 1))
    console.print(summary)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(report, indent=2))
    console.print(f"report written to {json_path}")
    if report["errors"] or report["lost_requests"]:
        raise SystemExit(1)


# ----------------------------------------------------------------------------------------------
# chiron bench
# ----------------------------------------------------------------------------------------------
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
        return escape(f"{_fmt(mean, digits)} [{_fmt(row[f'{name}_min'], digits)}–{_fmt(row[f'{name}_max'], digits)}]")

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
        table.add_row(r["policy"], *seed_col, f"{r['slo_attainment']:.4f}", _fmt(i["slo_attainment"], 4), _fmt(b["slo_attainment"], 4),
                      str(i["rejected"]), f"{_fmt(i['ttft_p99_ms'], 0)} ms", f"{_fmt(i['itl_p99_ms'])} ms",
                      f"{r['gpu_hours']:.2f}", f"{r['gpu_seconds_over_lower_bound']:.2f}", str(r["max_instances"]),
                      f"{r['wall_seconds']:.1f} s")
    return table


@main.command()
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
    from simulator.report import plot_report, run_policy, seed_summary
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

    def params_for(name: str) -> dict:
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

    reports = []
    if seeds == 1:
        for name in names:
            with Progress(TextColumn(f"{name}"), BarColumn(), TextColumn("{task.fields[msg]}"), TimeElapsedColumn(),
                          console=console, transient=True) as bar:
                task = bar.add_task(name, total=None, msg="")
                try:
                    rep = run_policy(name, wl, runs[0][1], params_for(name), workers=workers,
                                     progress=lambda m, t=task: bar.update(t, msg=m))
                except ValueError as e:
                    raise click.BadParameter(str(e)) from e
            reports.append(rep)
    else:
        reports = _simulate_seeds(run_policy, [(name, w, sim, params_for(name)) for name in names
                                               for w, sim in runs], workers)
    if plot_path:
        for name in names:
            rep = next(r for r in reports if r["policy"] == name)
            path = plot_path if len(names) == 1 else str(Path(plot_path).with_name(f"{Path(plot_path).stem}-{name}.png"))
            plot_report(rep, path)
            console.print(f"plot: {path}")
    title = f"Simulated {wl.name}: lower bound {reports[0]['gpu_seconds_lower_bound'] / 3600:.2f} GPU-hours"
    summary = seed_summary(reports) if seeds > 1 else None
    if summary:
        title = f"Simulated {wl.name}, seeds {seed}–{seed + seeds - 1}"
    console.print(_sim_report_table(reports, title, with_seed=seeds > 1))
    if summary:
        console.print(_seed_summary_table(summary, f"{wl.name}: mean [min–max] over {seeds} seeds"))
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


@main.command()
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


@main.group()
def deploy() -> None:
    """Deployment tools: 'chiron deploy rehearse' runs the Nomad job files as local processes with traffic."""


from services.deploy.cli import rehearse_command  # noqa: E402 - the command lives with the rehearsal

deploy.add_command(rehearse_command)


@main.group()
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
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(report, indent=2))
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
        table.add_row(_fmt(r["itl_slo_ms"], 2 if backend == "vllm" else 0), r["setting"], str(r["max_batch_size"]),
                      _fmt(r["throughput_tokens_per_s"], 0), _fmt(r["itl_p50_ms"], 2), _fmt(r["itl_p95_ms"], 2),
                      _fmt(r["itl_slo_attainment"], 4), _fmt(r.get("converge_s")))
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
        conv = ", ".join(_fmt(c) for c in r["converge_s_by_seed"])
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
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(report, indent=2))
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
    table.add_row("decision_ms_p50", _fmt(report["decision_ms_p50"], 2), "")
    table.add_row("decision_ms_p99", _fmt(report["decision_ms_p99"], 2),
                  "≤ 10 " + ("met" if report["decision_ms_p99"] <= 10 else "MISSED"))
    table.add_row("scale_up_to_registered_s", _fmt(report["scale_up_to_registered_s"], 2), "")
    console.print(table)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(report, indent=2))
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
        table.add_row(_fmt(r["rate_rps"], 0), _fmt(r["overhead_p50_ms"], 2), _fmt(r["overhead_p99_ms"], 2),
                      f"{r['direct_ttft_p50_ms']:.1f} / {r['direct_ttft_p99_ms']:.1f}",
                      f"{r['router_ttft_p50_ms']:.1f} / {r['router_ttft_p99_ms']:.1f}")
    console.print(table)
    at200 = next((r for r in report["results"] if r["rate_rps"] == 200), None)
    if at200:
        console.print(f"p99 overhead at 200 req/s: {at200['overhead_p99_ms']:.2f} ms (target ≤ 5 ms): "
                      f"{'met' if at200['overhead_p99_ms'] <= 5 else 'MISSED'}")
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(report, indent=2))
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
        table.add_row(_fmt(r["rate_rps"], 0), _fmt(r["overhead_p50_ms"], 2),
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
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(report, indent=2))
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
        table.add_row(str(r["concurrency"]), _fmt(r["direct_tokens_per_s"], 0), _fmt(r["agent_tokens_per_s"], 0),
                      f"{r['overhead']:.1%}", escape(f"{r['overhead_paired_mean']:.1%} [{lo:.1%}, {hi:.1%}]"),
                      _fmt(r["direct_frontend_cpu_us_per_token"], 0),
                      _fmt(r["agent_frontend_cpu_us_per_token"], 0), _fmt(r["client_cpu_us_per_token"], 0))
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


@main.command()
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


if __name__ == "__main__":
    main()
