"""``chiron deploy rehearse``: the Nomad job files run as local processes with traffic
(:mod:`services.deploy.rehearse`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from services.cli._common import write_report_json


@click.group()
def deploy() -> None:
    """Deployment tools: 'chiron deploy rehearse' runs the Nomad job files as local processes with traffic."""


DEFAULT_NOMAD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "nomad"  # as services.deploy.rehearse's (imported
# only when the command runs: every `chiron` start imports this module)


def _parse_vars(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r}: use NAME=VALUE, as nomad job run -var", param_hint="--var")
        out[name.strip()] = value
    return out


@deploy.command("rehearse")
@click.option("--json", "json_path", default="out/rehearsal.json", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the JSON report (folders are made).")
@click.option("--nomad-dir", default=str(DEFAULT_NOMAD_DIR), show_default=True, type=click.Path(file_okay=False),
              help="The job files (*.nomad.hcl) to rehearse.")
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE",
              help="A job variable, as 'nomad job run -var' sets it, for every file that declares it (repeat); "
                   "over the rehearsal's own (simulated engines, free ports, short scale-down delay).")
@click.option("--duration-s", default=60.0, show_default=True, help="Length of the Azure conversation trace slice [s of trace time].")
@click.option("--start-s", default=0.0, show_default=True, help="Start of the trace slice [s].")
@click.option("--speedup", default=2.0, show_default=True, help="Replay and simulated-engine speed-up.")
@click.option("--batch-requests", default=24, show_default=True, help="Requests in the Batch API job.")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Allocation directories and logs (default: a temporary directory, removed after a success).")
def rehearse_command(json_path, nomad_dir, variables, duration_s, start_s, speedup, batch_requests, work_dir) -> None:
    """Run the Nomad job files as local processes (no Nomad, Consul or GPU) and send traffic through them.

    Every job file is rendered as 'nomad job run -var ...' renders it and every task checked (its templates, its
    runtime references, its chiron flags against this CLI); then each allocation runs with exactly its rendered
    command line, the scaler scales the engine groups through a local stand-in of Nomad's job scale API, and a slice
    of the Azure conversation trace plus an OpenAI Batch API job go through the gateway. Writes the report (job
    command lines, allocations started and stopped, interactive and batch outcomes, scale events, lost requests)
    and exits 1 when a target is missed or a job file is bad (the message names the file, the task and the reason).
    """
    from services.deploy.rehearse import RehearsalConfig, RehearsalError, rehearse

    cfg = RehearsalConfig(nomad_dir=Path(nomad_dir), variables=_parse_vars(variables), duration_s=duration_s,
                          start_s=start_s, speedup=speedup, batch_requests=batch_requests, work_dir=work_dir)
    chiron = click.get_current_context().find_root().command  # the parser the job files' chiron flags must pass
    try:
        report = asyncio.run(rehearse(cfg, chiron, progress=lambda m: click.echo(f"  {m}")))
    except RehearsalError as e:
        raise click.ClickException(f"rehearsal failed: {e}") from None
    write_report_json(report, json_path)
    i, b, t = report["interactive"], report["batch"], report["targets"]
    click.echo(f"interactive: {i['served']}/{i['count']} served, SLO attainment {i['slo_attainment']:.3f}; "
               f"batch: {b['done']}/{b['count']} done; allocations started {report['allocations_started']}, "
               f"stopped {report['allocations_stopped']} (by the scaler: {report['scaler_allocations']['started']} "
               f"started, {report['scaler_allocations']['stopped']} stopped); scale events "
               f"{len(report['scale_events'])}; lost_requests {report['lost_requests']}; "
               f"{report['wall_seconds']['total']:.0f} s")
    click.echo(f"report: {json_path}")
    if not t["ok"]:
        raise click.ClickException("targets missed: " + ", ".join(k for k, v in t.items() if k != "ok" and not v))
