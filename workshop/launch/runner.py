"""One notebook as N ranks: the launcher behind `scripts/run_notebook.sh` and `make run`.

    python -m workshop.launch.runner [--nproc N] [--resume RUN_DIR] NOTEBOOK [-p NAME VALUE ...]   # scripts/run_notebook.sh
    python -m workshop.launch.runner series [NOTEBOOK ...]       # `make run`: every notebook, then the report
    python -m workshop.launch.runner check NOTEBOOK [-p NAME VALUE ...]   # step 1's checks only; nothing runs
    python -m workshop.launch.runner rank RUN_DIR                # one rank; srun or torchrun starts it once per rank
    python -m workshop.launch.runner execute RUN_DIR RANK_DIR    # the rank's papermill, its kernel on Unix sockets

A run, step by step (`launch`):

1. `rundir.prepare` refuses bad input before anything runs (a missing notebook, a parameter the notebook does not
   have or a value its rules refuse: `options`; what this machine cannot run: `preflight`) and makes a run folder
   that no other run writes to: run.json (what runs, on how many ranks, with which parameters) and parameters.yaml
   (what papermill reads). A bad rank count is refused when the command line is read (`parse_launch`).
2. The ranks start (`ranks.start`): srun under SLURM (one rank per task, across nodes), torchrun for --nproc N > 1,
   else one process. Each runs `rank`: papermill (`execute`), with Jupyter's runtime files, IPython's history
   and the kernel's sockets in node-local temporary folders, and progress as log lines, not bars.
3. Signals (`ranks.Signals`): SIGUSR1 (the time limit is near) reaches every rank, whose kernel saves a checkpoint
   and stops; SIGTERM (scancel) and SIGINT (Ctrl-C) stop the ranks. The run is then recorded as interrupted.
4. `rundir.collect` says which rank failed, in which cell, and which notebook to open; a SLURM job interrupted
   by SIGUSR1 requeues itself and resumes in the same folder.

This module and those it imports import no torch: a bad input is refused in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from workshop.base import world
from workshop.base.runs import REPO, RunError
from workshop.launch import ranks
from workshop.launch.options import check_notebook
from workshop.launch.preflight import check_local_ranks
from workshop.launch.rundir import INTERRUPTED, collect, prepare
from workshop.launch.series import series

USAGE = ("usage: scripts/run_notebook.sh [--nproc N] [--resume RUN_DIR] NOTEBOOK [papermill options]   "
         "(or: sbatch [options] scripts/run_notebook.sh NOTEBOOK ...)")


def parse_launch(argv: list[str]) -> tuple[int | None, str | None, str, list[str]]:
    """--nproc N (a whole number of at least 1) and --resume RUN_DIR (before the notebook), the notebook, then
    papermill's options."""
    nproc = resume = None
    argv = list(argv)
    while argv and argv[0].startswith("--"):
        opt, _, inline = argv.pop(0).partition("=")
        if opt not in ("--nproc", "--resume"):
            raise RunError(f"unknown option {opt}: before the notebook come --nproc N and --resume RUN_DIR\n{USAGE}")
        if not inline and not argv:
            raise RunError("--nproc needs a number" if opt == "--nproc" else "--resume needs a run folder")
        value = inline or argv.pop(0)
        if opt == "--resume":
            resume = value
        elif not value.isdigit() or int(value) < 1:
            raise RunError(f"the number of ranks must be a positive integer, got {value!r} (e.g. --nproc 2)")
        else:
            nproc = int(value)
    if not argv:
        raise RunError(f"no notebook given\n{USAGE}")
    return nproc, resume, argv[0], argv[1:]


def launch(argv: list[str]) -> int:
    """Run one notebook as N ranks (see the module's docstring); the exit status: 0 ok, 1 failed,
    2 refused before anything ran, 3 interrupted (resume it)."""
    signals = ranks.Signals()
    nproc, resume, notebook, papermill_args = parse_launch(argv)
    if importlib.util.find_spec("papermill") is None:
        raise RunError(f"{sys.executable} cannot import papermill: activate the workshop environment "
                       "(conda activate workshop, or source .venv/bin/activate), or set WORKSHOP_PYTHON")
    job = os.environ.get("SLURM_JOB_ID")
    srun = bool(job) and nproc is None  # under SLURM (sbatch, salloc) the ranks are the job's tasks
    if srun and shutil.which("srun") is None:
        raise RunError(f"SLURM_JOB_ID={job} says this runs in a SLURM job, but srun is not on PATH: load SLURM (module "
                       "load slurm), or, where the variable is left over (an ssh into a job's node, an exported "
                       "environment), unset SLURM_JOB_ID, or pass --nproc N to run the ranks here")
    nranks = world.srun_tasks() if srun else (nproc or 1)
    if not srun:
        check_local_ranks(nranks)
    run = prepare(notebook, nranks, papermill_args, resume=resume)
    restart = os.environ.get("SLURM_RESTART_COUNT")
    print(f"run folder: {run} ({nranks} rank(s) via {'srun' if srun else 'torchrun'}"
          f"{', restart ' + restart if restart else ''})", flush=True)
    started = ranks.start(run, nranks, srun)
    signals.watch(run, started, srun)
    rc = started.wait()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    status = collect(run, rc, signals.interrupted)
    if status == INTERRUPTED and srun and signals.interrupted.startswith("SIGUSR1"):
        print(f"requeueing job {job}: its next start resumes in {run}", file=sys.stderr, flush=True)
        if subprocess.run(["scontrol", "requeue", job]).returncode == 0:
            return 0
        print(f"scontrol requeue failed (submit with --requeue?): resume with sbatch ... scripts/run_notebook.sh "
              f"--resume {run} {notebook} {' '.join(papermill_args)}".rstrip(), file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["rank"] and len(argv) == 2:
            return ranks.run_rank(Path(argv[1]))
        if argv[:1] == ["execute"] and len(argv) == 3:
            return ranks.execute(Path(argv[1]), Path(argv[2]))
        if argv[:1] == ["check"] and len(argv) > 1:
            given = check_notebook(Path(argv[1]).resolve(), argv[2:])
            print(f"{argv[1]}: {len(given)} parameter(s) checked against the notebook's rules; nothing ran")
            return 0
        if argv[:1] == ["series"]:
            notebooks = [Path(a) for a in argv[1:]]
            return series(notebooks or sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")))
        return launch(argv)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
