"""``chiron bench fidelity``: the simulator against a live local cluster on the same trace slice.

Targets: on the same slice of the Azure conversation trace (``AzureLLMInferenceTrace_conv.csv``, Microsoft,
CC-BY-4.0, :func:`services.common.traces.load_azure_trace`), the simulator (:mod:`simulator.fleet`) and a live
cluster (:func:`services.cluster.start_cluster`, simulated engines) agree on interactive SLO attainment within 3
percentage points and on GPU-seconds within 10%. Why 1× speed-up and no batch traffic, with measurements:
``docs/decisions/0051-fidelity-bench-configuration.md``.

**Live.** The cluster with ``--backend simulated --speedup S`` engines and its default scaler arguments, then
:func:`services.replay.replay` of the slice at ``S``× (engine and replay clocks in trace time = wall × S).

**Simulator, configured like that cluster**, wall-clock settings × ``S`` into trace time:

* the scaler's policy (:class:`~services.settings.ScalerSettings` from the cluster's scaler arguments,
  defaults as ``chiron scaler``'s): every ``*_s`` duration × ``S``; role limits, GPU budget and arrival CV as is;
  the model-load time ``L`` in Θ = z·CV/sqrt(λL) × ``S`` too (the live scaler measures λ per wall second);
* the time a new instance takes to serve: the median start → serving time of this run's engine processes
  (the local provider's ``starting instance`` / ``is serving`` lines in ``scaler.log``) × ``S``;
* 1 warm INTERACTIVE instance at the start; the engines' local-autoscaler ITL SLOs as ``chiron engine``'s
  defaults (:class:`~services.settings.EngineSettings`); request SLOs and output caps as
  :class:`services.replay.ReplayConfig`.

**GPU-seconds, start → release on both sides.** The simulator counts each instance from start to release; the
live run takes the same from the local provider's log (``starting instance`` → ``drained and stopped``), clipped
to the replay's span. The serving-only counterparts (live: the scaler's ``WatchDecisions`` timeline; simulator:
ready → release) are reported beside them as ``gpu_seconds_serving``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
import statistics
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np

from services.settings import EngineSettings, ScalerSettings

TARGETS = {"attainment_pp": 3, "gpu_seconds_rel": 0.10}
DEFAULT_START_S = 0.0
DEFAULT_SPEEDUP = 1.0
# ``chiron engine``'s local-autoscaler ITL SLOs when --itl-slo-ms is not given [ms].
LIVE_LA_ITL_SLO_MS = EngineSettings(role="interactive").local_itl_slo_ms
LIVE_BATCH_LA_ITL_SLO_MS = EngineSettings(role="batch").local_itl_slo_ms

_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ chiron\.scaler\.local: (.*)$")
_EVENTS = (("start", re.compile(r"^starting instance (\S+) \((\w+)\)")),
           ("serving", re.compile(r"^instance (\S+) \((\w+)\) is serving")),
           ("stopped", re.compile(r"^instance (\S+) \((\w+)\) drained and stopped")))


def scaler_settings(scaler_args: str) -> dict:
    """The live scaler's policy settings from its arguments (:meth:`ScalerSettings.from_args`: the service's
    defaults), as the report gives them."""
    s = ScalerSettings.from_args(scaler_args)
    return {"interval_s": s.interval_s, "scale_down_delay_s": s.policy_config().delay_s,
            "model_load_time_s": s.model_load_time_s, "arrival_cv": s.arrival_cv, "gpu_budget": s.gpu_budget,
            "gpus_per_instance": s.gpus_per_instance, "limits": s.limits}


def instance_lifetimes(scaler_log: Path) -> dict[str, dict]:
    """Per engine instance of the local provider: role and wall-clock ``start`` / ``serving`` / ``stopped``
    times (epoch seconds; a missing event is absent) from ``scaler.log``."""
    out: dict[str, dict] = {}
    for line in scaler_log.read_text(errors="replace").splitlines():
        m = _LOG_LINE.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for kind, pat in _EVENTS:
            e = pat.match(m.group(2))
            if e:
                rec = out.setdefault(e.group(1), {"role": e.group(2)})
                rec.setdefault(kind, t)  # a restarted start keeps its first attempt
    return out


def live_gpu_seconds(lifetimes: dict[str, dict], t0: float, t1: float, speedup: float) -> tuple[float, dict]:
    """Start → release instance-seconds (trace time) by role, clipped to the wall span ``[t0, t1]``."""
    by_role = {"interactive": 0.0, "mixed": 0.0, "batch": 0.0}
    for rec in lifetimes.values():
        a, b = max(rec.get("start", t0), t0), min(rec.get("stopped", t1), t1)
        if b > a:
            by_role[rec["role"]] = by_role.get(rec["role"], 0.0) + (b - a) * speedup
    return sum(by_role.values()), by_role


def _summary(report: dict, gpu_s: float, by_role: dict, gpu_serving: float, span_s: float, wall_s: float) -> dict:
    i = report["interactive"]
    return {"interactive_slo_attainment": i["slo_attainment"], "interactive_requests": i["count"],
            "interactive_rejected": i["count"] - i.get("accepted", i["count"]),
            "ttft_p50_ms": i["ttft_p50_ms"], "ttft_p99_ms": i["ttft_p99_ms"],
            "itl_p50_ms": i["itl_p50_ms"], "itl_p99_ms": i["itl_p99_ms"],
            "gpu_seconds": gpu_s, "instance_seconds_by_role": by_role, "gpu_seconds_serving": gpu_serving,
            "requests": report["requests"], "span_s": span_s, "scale_events": report["scale_events"],
            "lost_requests": report["lost_requests"], "wall_seconds": wall_s}


async def _watch_decisions(scaler: str, t0: float, speedup: float, out: list[dict]) -> None:
    """Every decision of the live scaler with its inputs (demand, instance concurrency, λ) in trace time."""
    import grpc

    from chiron.v1 import scaler_pb2, scaler_pb2_grpc
    from services.common.security import open_channel

    async with open_channel(scaler) as ch:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for msg in scaler_pb2_grpc.GlobalScalerStub(ch).WatchDecisions(scaler_pb2.WatchDecisionsRequest()):
                d = msg.decision
                out.append({"t_s": (time.monotonic() - t0) * speedup, "theta": d.theta, **dict(d.inputs),
                            **{r.role: r.current for r in d.roles}, **{f"desired_{r.role}": r.desired for r in d.roles}})


async def _run_live(trace, rcfg, ccfg, say) -> tuple[dict, float, float, Path, list[dict]]:
    from services.cluster import start_cluster
    from services.replay import replay

    cluster = await start_cluster(ccfg, on_progress=say)
    decisions: list[dict] = []
    try:
        say(f"replaying {len(trace)} interactive requests at {rcfg.speedup:g}x…")
        t0 = time.time()
        watch = asyncio.create_task(_watch_decisions(cluster.endpoint("scaler"), time.monotonic(), rcfg.speedup,
                                                     decisions))
        try:
            with warnings.catch_warnings():  # no batch requests: the replay's batch percentiles are over NaN only
                warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
                report = await replay(cluster.endpoint("router"), cluster.endpoint("scaler"),
                                      cluster.endpoint("queue"), trace, np.zeros((0, 2), dtype=np.int64), rcfg)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        t1 = time.time()
    finally:
        say("stopping the cluster (engines drain first)…")
        await cluster.stop()
    return report, t0, t1, cluster.work, decisions


def _decision_row(d) -> dict:
    """One scaling decision as a row with the live scaler's ``WatchDecisions`` fields."""
    return {"t_s": d.now, "theta": d.theta, **d.inputs, **{r: v.current for r, v in d.roles.items()},
            **{f"desired_{r}": v.desired for r, v in d.roles.items()}}


def run_bench(minutes: float = 5.0, start_s: float = DEFAULT_START_S, speedup: float = DEFAULT_SPEEDUP, seed: int = 0,
              progress=None, work_dir: str | None = None) -> dict:
    """Run the slice live and in the simulator (module docstring); returns the comparison report."""
    from services.cluster import ClusterConfig
    from services.common.traces import Trace, load_azure_trace
    from services.replay import ReplayConfig
    from simulator.fleet import Fleet, SimConfig
    from simulator.policies import make_policy
    from simulator.workloads import DEFAULT_BATCH_TTFT_S, Workload

    say = progress or (lambda _m: None)
    t_start = time.monotonic()
    trace = load_azure_trace("azure-conv").slice(start_s, minutes * 60.0)
    if not len(trace):
        raise ValueError(f"no requests in azure-conv [{start_s:g}, {start_s + minutes * 60:g}) s")
    rcfg = ReplayConfig(speedup=speedup, batch_rate_per_s=0.0, seed=seed)
    ccfg = ClusterConfig(engine_args=f"--backend simulated --speedup {speedup:g}", work_dir=work_dir)
    live_set = scaler_settings(ccfg.scaler_args)

    # ---- live ----
    t_live = time.monotonic()
    live_rep, t0, t1, work, decisions = asyncio.run(_run_live(trace, rcfg, ccfg, say))
    live_wall = time.monotonic() - t_live
    lifetimes = instance_lifetimes(work / "scaler.log")
    loads = [r["serving"] - r["start"] for r in lifetimes.values() if "start" in r and "serving" in r]
    load_wall_s = statistics.median(loads) if loads else 3.0
    live_gpu, live_by_role = live_gpu_seconds(lifetimes, t0, t1, speedup)

    # ---- simulator, configured like the live cluster (times in trace time = wall × speedup) ----
    say("simulating the same slice…")
    clipped = Trace(trace.name, trace.arrival_s, trace.prompt_tokens,
                    np.clip(trace.output_tokens, 1, rcfg.max_output_tokens))
    no_batch = Trace("none", np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    wl = Workload("azure-conv-slice", f"azure-conv [{start_s:g}, {start_s + minutes * 60:g}) s, outputs capped at "
                  f"{rcfg.max_output_tokens}", clipped, no_batch, float(rcfg.interactive_ttft_ms),
                  float(rcfg.interactive_itl_ms), DEFAULT_BATCH_TTFT_S, LIVE_BATCH_LA_ITL_SLO_MS)
    sim_cfg = SimConfig(model_load_time_s=load_wall_s * speedup, initial_instances=1,
                        gpu_budget=live_set["gpu_budget"], gpus_per_instance=live_set["gpus_per_instance"],
                        sample_interval_s=1.0, seed=seed).validate()
    # The live scaler's PolicyConfig as ``chiron scaler`` builds it, then every duration in it (``*_s``: the
    # scaler's wall clock) × speedup into trace time.
    live_pcfg = ScalerSettings.from_args(ccfg.scaler_args).policy_config()
    scaled = {f.name: getattr(live_pcfg, f.name) * speedup for f in dataclasses.fields(live_pcfg)
              if f.name.endswith("_s") and getattr(live_pcfg, f.name) is not None}  # None: derived from the others
    pcfg = dataclasses.replace(live_pcfg, **scaled).validate()
    sim_decisions: list[dict] = []
    policy = make_policy("chiron", wl, sim_cfg, arrival_cv=live_set["arrival_cv"], la_itl_slo_ms=LIVE_LA_ITL_SLO_MS,
                         batch_la_itl_slo_ms=LIVE_BATCH_LA_ITL_SLO_MS, policy_config=pcfg,
                         on_decision=lambda d: sim_decisions.append(_decision_row(d)))
    fleet = Fleet(wl, policy, sim_cfg)
    sim_rep = fleet.run()
    sim_serving = sum(max(0.0, (i.end_s if i.end_s is not None else fleet.now) - i.ready_s)
                      for i in fleet.retired + fleet.instances) * sim_cfg.gpus_per_instance

    live = _summary(live_rep, live_gpu, live_by_role, live_rep["gpu_seconds"], (t1 - t0) * speedup, live_wall)
    live["model_load_wall_s"] = loads
    live["decisions"] = decisions  # the scaler's decisions: inputs, serving and desired counts per role
    sim = _summary(sim_rep, sim_rep["gpu_seconds"], sim_rep["instance_seconds_by_role"], sim_serving,
                   sim_rep["sim_seconds"], sim_rep["wall_seconds"])
    sim["decisions"] = sim_decisions
    att_pp = (sim["interactive_slo_attainment"] - live["interactive_slo_attainment"]) * 100
    rel = (sim["gpu_seconds"] - live["gpu_seconds"]) / live["gpu_seconds"] if live["gpu_seconds"] else math.nan
    rel_serving = ((sim["gpu_seconds_serving"] - live["gpu_seconds_serving"]) / live["gpu_seconds_serving"]
                   if live["gpu_seconds_serving"] else math.nan)
    return {
        "live": live, "sim": sim,
        "interactive_slo_attainment_diff_pp": att_pp,
        "gpu_seconds_rel_diff": rel,
        "gpu_seconds_serving_rel_diff": rel_serving,
        "targets": dict(TARGETS),
        "targets_met": bool(abs(att_pp) <= TARGETS["attainment_pp"] and abs(rel) <= TARGETS["gpu_seconds_rel"]),
        "config": {
            "trace": "azure-conv", "start_s": start_s, "duration_s": minutes * 60.0, "speedup": speedup, "seed": seed,
            "times": "trace time (live: wall × speedup; simulator: virtual seconds)",
            "batch_rate_per_s": 0.0,
            "live": {"engine_args": ccfg.engine_args, "scaler_args": ccfg.scaler_args, "scaler": live_set,
                     "replay": dataclasses.asdict(rcfg), "work_dir": str(work),
                     "local_autoscaler_itl_slo_ms": {"interactive": LIVE_LA_ITL_SLO_MS, "batch": LIVE_BATCH_LA_ITL_SLO_MS}},
            "sim": {"model_load_time_s": sim_cfg.model_load_time_s,
                    "model_load_time_source": (f"median start → serving of {len(loads)} live engine process(es) in "
                                               f"scaler.log ({load_wall_s:.2f} s wall) × speedup" if loads else
                                               "no start → serving pair in scaler.log: 3 s wall assumed × speedup"),
                    "initial_instances": sim_cfg.initial_instances, "interval_s": pcfg.interval_s,
                    "scale_down_delay_s": pcfg.delay_s, "policy_model_load_time_s": pcfg.model_load_time_s,
                    "policy_durations_s": scaled,
                    "arrival_cv": live_set["arrival_cv"], "limits": live_set["limits"],
                    "local_autoscaler_itl_slo_ms": {"interactive": LIVE_LA_ITL_SLO_MS, "batch": LIVE_BATCH_LA_ITL_SLO_MS},
                    "policy_params": sim_rep["policy_params"]},
            "gpu_seconds_accounting": ("start → release for both (live: local provider log, clipped to the replay's "
                                       "span); gpu_seconds_serving: live = the scaler's WatchDecisions timeline "
                                       "(serving instances), sim = ready → release"),
            "wall_seconds": time.monotonic() - t_start,
        },
    }


def print_table(report: dict, console=None) -> None:
    """Live and simulated side by side, with the two diffs against their targets."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = 140
    cfg = report["config"]
    live, sim = report["live"], report["sim"]
    table = Table(title=f"Fidelity: live cluster vs simulator, azure-conv [{cfg['start_s']:g}, "
                        f"{cfg['start_s'] + cfg['duration_s']:g}) s at {cfg['speedup']:g}x (trace time)")
    for col in ("metric", "live", "simulator", "diff", "target"):
        table.add_column(escape(col), justify="right")

    def f(v, d=1):
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{d}f}"

    att = report["interactive_slo_attainment_diff_pp"]
    rel = report["gpu_seconds_rel_diff"]
    t = report["targets"]
    table.add_row("interactive SLO attainment", f(live["interactive_slo_attainment"] * 100, 2) + " %",
                  f(sim["interactive_slo_attainment"] * 100, 2) + " %", f"{att:+.2f} pp",
                  f"±{t['attainment_pp']} pp " + ("met" if abs(att) <= t["attainment_pp"] else "MISSED"))
    table.add_row("GPU-seconds (start → release)", f(live["gpu_seconds"], 0), f(sim["gpu_seconds"], 0), f"{rel:+.1%}",
                  f"±{t['gpu_seconds_rel']:.0%} " + ("met" if abs(rel) <= t["gpu_seconds_rel"] else "MISSED"))
    table.add_row("GPU-seconds (serving only)", f(live["gpu_seconds_serving"], 0), f(sim["gpu_seconds_serving"], 0),
                  f"{report['gpu_seconds_serving_rel_diff']:+.1%}", "")
    for role in ("interactive", "mixed", "batch"):
        table.add_row(f"  instance-seconds {role}", f(live["instance_seconds_by_role"].get(role, 0.0), 0),
                      f(sim["instance_seconds_by_role"].get(role, 0.0), 0), "", "")
    for key, name in (("ttft_p50_ms", "TTFT p50 \\[ms]"), ("ttft_p99_ms", "TTFT p99 \\[ms]"), ("itl_p50_ms", "ITL p50 \\[ms]"),
                      ("itl_p99_ms", "ITL p99 \\[ms]")):
        table.add_row(name, f(live[key]), f(sim[key]), "", "")
    table.add_row("requests (rejected)", f"{live['requests']} ({live['interactive_rejected']})",
                  f"{sim['requests']} ({sim['interactive_rejected']})", "", "")
    table.add_row("scale events", str(len(live["scale_events"])), str(len(sim["scale_events"])), "", "")
    table.add_row("span \\[s trace time]", f(live["span_s"]), f(sim["span_s"]), "", "")
    table.add_row("wall \\[s]", f(live["wall_seconds"]), f(sim["wall_seconds"], 2), "", "")
    console.print(table)
    s = cfg["sim"]
    console.print(f"simulator: model load {s['model_load_time_s']:.1f} s ({s['model_load_time_source']}); scaler interval "
                  f"{s['interval_s']:g} s, scale-down delay {s['scale_down_delay_s']:g} s, Θ load time "
                  f"{s['policy_model_load_time_s']:g} s (live values × {cfg['speedup']:g}); no batch traffic")
    console.print(f"targets met: {report['targets_met']} (total wall {cfg['wall_seconds']:.0f} s)")


def write_json(report: dict, json_path: str) -> None:
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float))


def main(json_path: str = "out/bench-fidelity.json", minutes: float = 5.0, start_s: float = DEFAULT_START_S,
         speedup: float = DEFAULT_SPEEDUP, seed: int = 0, progress=None) -> dict:
    """Run the benchmark, print its table and write the JSON to ``json_path``. Returns the report."""
    report = run_bench(minutes=minutes, start_s=start_s, speedup=speedup, seed=seed, progress=progress)
    print_table(report)
    write_json(report, json_path)
    print(f"written to {json_path}")
    return report


if __name__ == "__main__":
    import sys

    main(*sys.argv[1:2])
