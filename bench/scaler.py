"""``chiron bench scaler``: decision latency of the global scaling policy and scale-up time of the local provider.

* ``decision_ms_p50`` / ``decision_ms_p99``: one :func:`services.global_scaler.policy.decide` call for a fleet
  of 1,000 instances (roles mixed evenly, random caps and loads) and 10,000 request groups (random sizes,
  waits and deadlines), over ``rounds`` consecutive decisions (the scale-down history carried along).
* ``scale_up_to_registered_s``: a real etcd server, the membership watcher and the ``local`` provider: the
  time from "batch backpressure appears" (a decision asks for one more BATCH instance and the provider is
  called) to "the new instance is registered in etcd and serving" (seen by the watcher), for a simulated
  engine agent started as a process; median of ``scale_ups`` runs.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from services.global_scaler.policy import (
    ArrivalStats,
    GroupView,
    InstanceView,
    PolicyConfig,
    PolicyState,
    RoleLimits,
    ScalerInputs,
    decide,
)


def bench_decisions(instances: int = 1000, groups: int = 10_000, rounds: int = 200, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    roles = ("interactive", "mixed", "batch")
    fleet = [InstanceView(f"i{k}", roles[k % 3], int(rng.integers(16, 257)), int(rng.integers(0, 64)),
                          int(rng.integers(0, 16)), int(rng.integers(0, 32))) for k in range(instances)]
    now = 100_000.0
    gs = [GroupView(f"m/{k}", int(rng.integers(1, 500)), float(rng.uniform(1, 5000)), now + float(rng.uniform(60, 86_400)))
          for k in range(groups)]
    cfg = PolicyConfig(gpu_budget=4 * instances, limits={r: RoleLimits(0, instances) for r in roles}).validate()
    state = PolicyState()
    times = []
    for i in range(rounds):
        inp = ScalerInputs(now + i * cfg.interval_s, fleet, ArrivalStats(50.0, 2.0, 3000.0), gs)
        t = time.perf_counter()
        state, _ = decide(cfg, state, inp)
        times.append((time.perf_counter() - t) * 1e3)
    return {"decision_ms_p50": float(np.percentile(times, 50)), "decision_ms_p99": float(np.percentile(times, 99)),
            "decision_ms_max": max(times), "instances": instances, "groups": groups, "rounds": rounds}


async def bench_scale_up(scale_ups: int = 3) -> dict:
    from services.common.etcd_server import EtcdServer
    from services.common.membership import MembershipWatcher
    from services.global_scaler.local_provider import LocalProvider

    work = Path(tempfile.mkdtemp(prefix="chiron-bench-scaler-"))
    etcd = EtcdServer(work / "etcd")
    etcd.start()
    provider = LocalProvider(["--backend", "simulated"], etcd.endpoint, work / "engines")
    watcher = MembershipWatcher([etcd.endpoint])
    await watcher.start()
    times = []
    try:
        for n in range(1, scale_ups + 1):
            before = {k for k, m in watcher.snapshot().items() if m.role == "batch"}
            t0 = time.perf_counter()
            await provider.set_count("batch", n, "bench: batch backpressure")

            def registered(snapshot, before=before) -> bool:
                return any(m.role == "batch" and m.state == "serving" and k not in before for k, m in snapshot.items())
            await watcher.wait_for(registered, timeout_s=120)
            times.append(time.perf_counter() - t0)
    finally:
        await provider.close()
        await watcher.stop()
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {"scale_up_to_registered_s": statistics.median(times), "scale_up_runs_s": times}


def run_bench(progress=None) -> dict:
    out = bench_decisions()
    if progress:
        progress("decision latency")
    out.update(asyncio.run(bench_scale_up()))
    if progress:
        progress("scale-up time")
    return out
