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

import logging

import click

from services.cli import bench, cluster, deploy, simulate, tools
from services.cli import services as service_commands
from services.cli._common import check_security_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--log-level", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def main(log_level: str) -> None:
    """Chiron: SLO-aware hierarchical autoscaling for LLM serving (arXiv 2501.08090)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))  # not a line per HTTP call
    sub = click.get_current_context().invoked_subcommand
    if sub in ("engine", "queue", "router", "scaler", "gateway"):  # CHIRON_* TLS / token settings usable?
        check_security_settings()
    if sub in ("engine", "queue", "router", "scaler"):  # OTel spans per RPC when OTEL_* variables ask for them
        from services.common.tracing import setup_tracing

        setup_tracing(f"chiron-{sub}")


for command in (service_commands.engine, service_commands.queue, service_commands.router, service_commands.scaler,
                service_commands.gateway, cluster.up, cluster.replay, cluster.demo, cluster.chaos, cluster.soak,
                cluster.demo_engine, simulate.simulate, simulate.experiments, tools.certs, tools.tiny_model,
                deploy.deploy, bench.bench):
    main.add_command(command)
