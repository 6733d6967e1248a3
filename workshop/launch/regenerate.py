"""`make notebooks`: execute every committed notebook the way a reader should see it, and put its outputs back.

A notebook whose lesson needs more than one rank (metadata `workshop.make_run_ranks` > 1) is committed as rank 0's
notebook of a run on 4 ranks over the 2 nodes of the local SLURM cluster (`sbatch --nodes=2 --ntasks-per-node=2
scripts/run_notebook.sh ...`); where no SLURM answers, of 4 local ranks (`--nproc 4`), and its first output line
says so (`dist.describe`). Every other notebook is executed as one process. Either way through
`scripts/run_notebook.sh`, so the committed notebook is what a student's job produces.

Only the outputs and execution counts come back into the committed notebook, with the world they came from
(metadata `workshop.ranks` and `workshop.nodes`, from the run's run.json) and the digest of the record it wrote
(`workshop.record`); its source, cell ids and other metadata stay. The report (13) runs last, whichever notebooks
are made again, over the latest run of every notebook, and its metadata names the records it read
(`workshop.reported`): tests/test_committed_notebooks.py fails when they are not the committed notebooks' own.
Outputs lose what would churn from one run to the next or leak this machine: the repository's absolute path, the
home folder, the user name, SLURM job ids and the time stamps in run-folder names.

    python -m workshop.launch.regenerate                       # all of notebooks/NN_*.ipynb
    python -m workshop.launch.regenerate notebooks/05_ddp.ipynb --local    # 4 local ranks even where SLURM answers
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from workshop.base import records
from workshop.base.runs import REPO, TIME_PATTERN, find_runs
from workshop.launch.series import REPORT_NOTEBOOK, declared_ranks

SCRIPT = REPO / "scripts" / "run_notebook.sh"
RANKS = 4  # a multi-rank notebook's committed world: 2 nodes x 2 ranks
NODES = 2


def slurm_answers() -> bool:
    """True when sinfo lists a node that can take a job."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in out.stdout.split())


def _environment(runs: Path) -> dict:
    # no progress lines in a committed notebook (a batch job's log has them; a reader needs the results)
    env = dict(os.environ, WORKSHOP_RUNS=str(runs), WORKSHOP_PYTHON=sys.executable, WORKSHOP_LOG_EVERY="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for key in [k for k in env if k.startswith("SLURM_")]:  # a job of its own, not a step of the caller's
        del env[key]
    return env


def execute(notebook: Path, runs: Path, ranks: int, use_slurm: bool, timeout_s: int = 1800) -> Path:
    """Run `notebook` through scripts/run_notebook.sh as `ranks` ranks; the executed rank-0 notebook."""
    env = _environment(runs)
    if ranks > 1 and use_slurm:
        per_node = ranks // NODES
        cmd = ["sbatch", "--wait", "--parsable", f"--nodes={NODES}", f"--ntasks-per-node={per_node}",
               f"--output={runs}/slurm-%j.out", str(SCRIPT), str(notebook)]
    else:
        cmd = ["bash", str(SCRIPT), "--nproc", str(ranks), str(notebook)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    made = find_runs(notebook.stem, root=runs)
    log = done.stdout + done.stderr
    for out in runs.glob("slurm-*.out"):
        log += out.read_text(errors="replace")
        out.unlink()
    if done.returncode != 0 or not made:
        raise RuntimeError(f"{notebook.name} failed ({' '.join(cmd[:-1])} ...):\n{log[-3000:]}")
    return made[-1] / f"{notebook.stem}.ipynb"


def scrub(text: str) -> str:
    """What an output line must not carry into the repository: this machine's paths and user, job ids, run-folder
    time stamps."""
    text = text.replace(str(REPO) + "/", "").replace(str(REPO), ".")
    home = os.path.expanduser("~")
    if home not in ("/", ""):
        text = text.replace(home, "~")
    text = re.sub(r"/tmp/[^\s'\"]*", "/tmp/...", text)
    user = getpass.getuser()
    if user and user not in ("root",):
        text = re.sub(rf"\b{re.escape(user)}\b", "USER", text)
    text = re.sub(r"\bjob\d+-", "jobID-", text)  # run folders of SLURM jobs
    text = re.sub(rf"\b({TIME_PATTERN})(-\d+)?-", "TIME-", text)  # run folders named by their start time
    text = re.sub(r"(\bjob id:? |slurm-|\bsweep[- ])\d+\b", r"\1ID", text)  # a sweep of srun tasks is named by its job
    return text


def _scrub_output(out: dict) -> dict:
    out = dict(out)
    if "text" in out:
        text = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
        out["text"] = scrub(text)
    if "data" in out:
        data = dict(out["data"])
        for key in ("text/plain", "text/markdown", "text/html"):
            if key in data:
                value = "".join(data[key]) if isinstance(data[key], list) else data[key]
                data[key] = scrub(value)
        out["data"] = data
    if "traceback" in out:
        out["traceback"] = [scrub(line) for line in out["traceback"]]
    return out


def run_world(run: Path) -> dict:
    """What a run of scripts/run_notebook.sh says of itself: its world, from the run.json its launcher wrote (ranks,
    nodes); the digest of its record.json, where it wrote one (record); and for the report (13), the digests of the
    records it read (reported), so that a test can tell whether the committed report read the committed runs."""
    launched = json.loads((run / "run.json").read_text())
    world = {"ranks": int(launched["nranks"]), "nodes": int(launched.get("environment", {}).get("SLURM_JOB_NUM_NODES", 1))}
    if (run / "record.json").is_file():
        world["record"] = records.digest(run / "record.json")
        reported = json.loads((run / "record.json").read_text()).get("results", {}).get("reported")
        if reported is not None:
            world["reported"] = reported
    return world


def merge_outputs(committed: Path, executed: Path) -> None:
    """Put the executed notebook's outputs (scrubbed) into the committed one, cell by cell (matched by cell id, else
    by position among the cells papermill did not inject), and what `run_world` says of the run into its metadata
    (workshop.ranks, workshop.nodes, and the digests workshop.record and, for the report, workshop.reported). Source
    and other metadata of the committed notebook stay."""
    nb = json.loads(committed.read_text())
    meta = nb["metadata"].setdefault("workshop", {})
    for key in ("record", "reported"):  # a run that wrote no record leaves no digest of an earlier one
        meta.pop(key, None)
    meta.update(run_world(executed.parent))
    ran = json.loads(executed.read_text())
    cells = [c for c in ran["cells"] if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    by_id = {c.get("id"): c for c in cells if c.get("id")}
    if len(cells) != len(nb["cells"]):
        raise RuntimeError(f"{executed} has {len(cells)} cells, {committed} has {len(nb['cells'])}")
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = by_id.get(cell.get("id"), cells[i])
        cell["outputs"] = [_scrub_output(o) for o in src.get("outputs", [])]
        cell["execution_count"] = src.get("execution_count")
    committed.write_text(json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n")  # as nbformat writes it


def regenerate(notebooks: list[Path], local: bool = False) -> int:
    use_slurm = not local and slurm_answers()
    if not use_slurm:
        print(f"no SLURM cluster answers{' (--local)' if local else ''}: multi-rank notebooks run as {RANKS} local ranks "
              "(torchrun), and their first output says so; `make slurm-up` for 2 nodes x 2 ranks", flush=True)
    # a runs folder inside the repository (the nodes of a cluster share it, not every /tmp), of a fixed name so the
    # report (13) prints the same folder every time. It keeps the latest run of each notebook: regenerating some
    # notebooks replaces their runs only, and the report, run last, reads the latest run of every notebook.
    runs = REPO / "runs" / "make-notebooks"
    runs.mkdir(parents=True, exist_ok=True)
    report = REPO / "notebooks" / f"{REPORT_NOTEBOOK}.ipynb"
    if report.is_file() and report not in notebooks:  # the report reads the runs just made: it is made again, last
        print(f"{report.name} runs last, over the runs folder {runs.relative_to(REPO)}", flush=True)
        notebooks = [*notebooks, report]
    for nb in notebooks:
        # its earlier run folder, and a sweep's folder of records (notebook 03 names it after the SLURM job)
        for old in [*find_runs(nb.stem, root=runs), *(runs.glob("sweep-*") if nb.stem.startswith("03_") else [])]:
            shutil.rmtree(old)
    failed = []
    notebooks = sorted(notebooks, key=lambda nb: nb.stem == REPORT_NOTEBOOK)  # the report after the runs it reads
    for nb in notebooks:
        ranks = RANKS if declared_ranks(nb) > 1 else 1
        how = f"{ranks} ranks" + (f" on {NODES} SLURM nodes" if ranks > 1 and use_slurm else " locally" if ranks > 1 else "")
        start = time.monotonic()
        print(f"{nb.name}: {how} ...", end=" ", flush=True)
        try:
            merge_outputs(nb, execute(nb, runs, ranks, use_slurm))
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            print("FAILED", flush=True)
            print(err, file=sys.stderr)
            failed.append(nb.name)
            continue
        print(f"ok, {time.monotonic() - start:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)} (their committed outputs are unchanged)", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workshop.launch.regenerate", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/NN_*.ipynb")
    parser.add_argument("--local", action="store_true", help=f"multi-rank notebooks on {RANKS} local ranks, even with SLURM")
    args = parser.parse_args(argv)
    notebooks = [nb.resolve() for nb in args.notebooks] or sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    missing = [str(nb) for nb in notebooks if not nb.is_file()]
    if missing:
        print(f"error: no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    return regenerate(notebooks, args.local)


if __name__ == "__main__":
    sys.exit(main())
