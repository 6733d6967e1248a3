"""`make run`: every notebook in order, each as its declared number of local ranks, into one folder of the series,
the scaling report last over that folder (`python -m workshop.launch.runner series [NOTEBOOK ...]`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from workshop.base.runs import display_path, find_runs, new_run_dir

REPORT_NOTEBOOK = "13_scaling_report"  # run last by `series`, over the runs the series made


def declared_ranks(notebook: Path) -> int:
    """How many ranks a notebook's lesson needs (`make run` gives it that many local ranks): its metadata's
    workshop.make_run_ranks, set by hand, else 1. (workshop.ranks and workshop.nodes say the world the committed
    outputs came from; `make notebooks` writes them.)"""
    meta = json.loads(notebook.read_text()).get("metadata", {})
    return int(meta.get("workshop", {}).get("make_run_ranks", 1))


def series(notebooks: list[Path]) -> int:
    """Run the notebooks in order, each as its declared number of local ranks, all into one folder
    of this series (runs/<time>-series/); the scaling report (notebook 13), when among them, runs
    last over that folder. Then list each one's run folder and say where the report is. Non-zero if
    any failed."""
    root = new_run_dir("series")  # runs/<time>-series: every run of this series under it
    env = dict(os.environ, WORKSHOP_PYTHON=sys.executable, WORKSHOP_RUNS=str(root))
    env.pop("SLURM_JOB_ID", None)  # local ranks even inside an allocation
    notebooks = sorted(notebooks, key=lambda nb: nb.stem == REPORT_NOTEBOOK)  # the report after every other
    width = max(len(nb.name) for nb in notebooks) if notebooks else 8
    rows = []
    print(f"running {len(notebooks)} notebooks into {display_path(root)}; what each printed: logs/launcher.log in its run folder")
    for nb in notebooks:
        before = set(find_runs(nb.stem, root=root))
        nranks = declared_ranks(nb)
        extra = ["-p", "runs", str(root)] if nb.stem == REPORT_NOTEBOOK else []
        print(f"  {nb.name:{width}s}  {nranks} rank(s) ...", end=" ", flush=True)
        start = time.monotonic()
        log = root / f".{nb.stem}.log"  # papermill's cell-by-cell output goes here, not to the terminal
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-m", "workshop.launch.runner", "--nproc", str(nranks), str(nb), *extra],
                                env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        made = sorted(set(find_runs(nb.stem, root=root)) - before)
        lines = log.read_text(errors="replace").splitlines()
        if made:  # beside the ranks' own logs
            log = log.rename(made[-1] / "logs" / "launcher.log" if (made[-1] / "logs").is_dir() else made[-1] / "launcher.log")
        # a failure: the launcher's own summary names the rank and the cell
        where = "" if rc == 0 else next((line.strip() for line in lines if line.strip().startswith("rank ")
                                         and " failed " in line), f"(see {display_path(log)})")
        print(f"{time.monotonic() - start:.0f} s, " + ("ok" if rc == 0 else f"FAILED {where}".rstrip()), flush=True)
        rows.append((nb.name, nranks, "ok" if rc == 0 else f"FAILED ({rc})", made[-1] if made else None))
    width = max(len(name) for name, *_ in rows) if rows else 8
    print(f"\nthis series' runs: {display_path(root)}")
    print(f"{'notebook':{width}s}  ranks  status      run folder (executed notebook, record.json)")
    for name, nranks, status, run in rows:
        print(f"{name:{width}s}  {nranks:5d}  {status:10s}  {display_path(run) if run else '-'}")
    reports = [run / "report" / "report.md" for name, _, _, run in rows if run and name.startswith(REPORT_NOTEBOOK)]
    if reports and reports[0].exists():
        print(f"\nscaling report: {display_path(reports[0])} (its plots beside it)")
    return 0 if all(status == "ok" for _, _, status, _ in rows) else 1
