"""Rerun the Chiron, ablation and oracle rows of a fair suite's output at the current commit and rebuild its
headline, ablation, targets, plots and report (baseline rows kept). Usage: ``python rescore.py SRC_DIR OUT_DIR``."""

import json
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from simulator import fair

RERUN = ("chiron", "chiron-ablation", "oracle")


def main(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "fair.json", out / "fair.json")
    data = json.loads((out / "fair.json").read_text())
    keep = [r for r in data["rows"] if r["policy"] not in RERUN]
    jobs = [(fair.Job(r["workload"], r["slo_level"], r["seed"], r["policy"], r["variant"],
                      tuple(sorted(r["params"].items()))), data["quick"])
            for r in data["rows"] if r["policy"] in RERUN]
    with ProcessPoolExecutor(2) as ex:
        new = list(ex.map(fair._run_job, jobs))
    lost = [r for r in new if r.get("lost_requests")]
    if lost:
        raise SystemExit(f"runs lost requests: {lost}")
    fair.rebuild(out, keep + new)
    print(f"reran {len(new)} runs; report: {out / 'report.md'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
