"""What the ``chiron`` commands share: the console, option groups (metrics, security, dummy weights), the
serve-until-signal loop of the service commands, report files and number formatting."""

from __future__ import annotations

import asyncio
import json
import math
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import click
from rich.console import Console

console = Console()
if not console.is_terminal:
    console.width = 140  # tables in logs and CI output stay readable


def stop_on_signal() -> asyncio.Event:
    """An event the running loop sets on SIGINT or SIGTERM (how every long-running command stops or drains)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def metrics_options(f):
    """``--metrics-port`` and ``--metrics-port-file`` of a service command."""
    f = click.option("--metrics-port-file", type=click.Path(dir_okay=False),
                     help="Write the bound metrics port here (before --port-file); alone, it serves metrics on a free port.")(f)
    return click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
                        help="Serve Prometheus metrics at http://HOST:PORT/metrics (0 = pick a free one). Default: off.")(f)


async def start_metrics(srv, metrics, host: str, port: int | None, port_file: str | None):
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


def check_security_settings() -> None:
    """Fail early, with the reason, when the ``CHIRON_*`` security variables are inconsistent (certificate
    without key, missing file). Raises click.ClickException."""
    from pydantic import ValidationError

    from services.common.security import security_settings

    try:
        security_settings()
    except ValidationError as e:
        raise click.ClickException("security settings: " + "; ".join(err["msg"] for err in e.errors())) from None


def security_options(f):
    """``--tls`` and ``--auth-token`` of the commands that start a local cluster."""
    f = click.option("--auth-token", default=None, metavar="TOKEN",
                     help="Require this bearer token on the router (its clients here send it). Visible in process "
                          "lists: export CHIRON_AUTH_TOKENS / CHIRON_TOKEN instead where that matters.")(f)
    return click.option("--tls", is_flag=True,
                        help="Mutual TLS on every gRPC hop, with a development CA and certificates written to "
                             "WORK_DIR/certs (see 'chiron certs').")(f)


def print_security(cluster, tls: bool) -> None:
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


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


async def serve_until_signal(srv, metrics, host: str, port_file: str | None, metrics_port: int | None,
                             metrics_port_file: str | None, banner: Callable[[str], str],
                             stop: asyncio.Event | None = None,
                             before_port_file: Callable[[object | None], Awaitable[None]] | None = None) -> object | None:
    """Run a started service until SIGINT or SIGTERM: serve its /metrics when asked (``metrics``: its registry),
    call ``before_port_file(metrics server or None)`` (e.g. register in etcd), write the bound port to
    ``port_file`` (last: whoever waits on it may count the service as up), print ``banner(metrics suffix)``, wait
    for ``stop`` (default: a new :func:`stop_on_signal` event, registered after the banner). Returns the metrics
    server (None without one), still running; the caller stops ``srv`` and it."""
    msrv = await start_metrics(srv, metrics, host, metrics_port, metrics_port_file)
    if before_port_file is not None:
        await before_port_file(msrv)
    if port_file:
        Path(port_file).write_text(str(srv.port))
    console.print(banner(f", metrics on http://{host}:{msrv.port}/metrics" if msrv else ""))
    stop = stop or stop_on_signal()
    await stop.wait()
    return msrv


dummy_weights_option = click.option(
    "--dummy-weights", is_flag=True,
    help="vllm: run the model with random weights (--load-format dummy; no weight files needed). Default: the "
         "model's own weights and dtype; a directory written by 'chiron tiny-model' always runs with random weights.")


def cluster_engine_args(backend: str, model: str | None, dummy_weights: bool, speedup: float) -> str:
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


def save_json(doc: dict, json_path: str | Path, default=None) -> None:
    """Write ``doc`` as indented JSON to ``json_path``, making its folder first; ``default`` as in
    :func:`json.dumps` (``float`` writes numpy numbers). Raises OSError."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=default))


def write_report_json(report: dict, json_path: str | Path) -> None:
    """:func:`save_json` with numpy numbers as floats; raises click.ClickException naming the path when it cannot
    be written."""
    try:
        save_json(report, json_path, default=float)
    except OSError as e:
        raise click.ClickException(f"cannot write the report to {Path(json_path)}: {e}") from e


def write_report_files(report: dict, json_path: str | Path, plot_path: str | Path) -> str | None:
    """Write ``report`` as JSON to ``json_path``, then its plot to ``plot_path``, making their folders first.

    The JSON comes first and its failure raises click.ClickException. A plot that cannot be written (folder or
    file not writable, unknown image format, no matplotlib) raises nothing: the one-line reason comes back
    (None when it was written), since the report is already safe."""
    from services.replay import plot_report

    write_report_json(report, json_path)
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

