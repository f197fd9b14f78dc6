"""Rerun Chiron's rows (and its ablations) of a fair.json at the current code and rebuild headline, ablation,
targets, plots and report. Baseline and oracle rows are kept (their code did not change)."""
import json, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from simulator import fair

src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
data = json.loads((src / "fair.json").read_text())
keep = [r for r in data["rows"] if r["policy"] not in ("chiron", "chiron-ablation", "oracle")]
jobs = [fair.Job(r["workload"], r["slo_level"], r["seed"], r["policy"], r["variant"], tuple(sorted(r["params"].items())))
        for r in data["rows"] if r["policy"] in ("chiron", "chiron-ablation", "oracle")]
t0 = time.perf_counter()
with ProcessPoolExecutor(2) as ex:
    new = list(ex.map(fair._run_job, [(j, data["quick"]) for j in jobs]))
for r in new:
    r["params"] = dict(r["params"])
rows = keep + new
lost = [r for r in rows if r.get("lost_requests")]
assert not lost, lost
workloads = tuple(data["plan"]["workloads"]); slos = tuple(data["plan"]["slo_levels"])
headline = [fair._headline(rows, w, s) for w in workloads for s in slos]
data.update(rows=rows, headline=headline, ablation=fair._ablation(rows, workloads), targets=fair._targets(headline),
            rescored_wall_seconds=time.perf_counter() - t0)
(out / "fair.json").write_text(json.dumps(data, indent=1, default=fair._json_default))
for w in workloads:
    fair._plot_frontier(rows, w, slos, out / f"frontier_{w}.png")
(out / "report.md").write_text(fair._markdown(data))
print("rescored", len(new), "runs in", time.perf_counter() - t0)
