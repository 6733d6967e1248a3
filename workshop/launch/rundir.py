"""A launched run's folder, from its start to its summary:

    run.json              what runs, on how many ranks, with which parameters (`prepare`; `read_meta`)
    parameters.yaml       what every rank's papermill reads
    record.json           the launcher's record from the start ("running"), replaced by the notebook's, settled by `collect`
    <notebook>.ipynb      rank 0's executed notebook; the other ranks' under ranks/ (`output_notebook`)
    logs/rank<R>.log      each rank's output, and logs/rank<R>.status.json how it ended (`failed_cell`)
    attempt<k>/           an earlier attempt's notebooks, logs and record, when the run was resumed (`reuse_run_dir`)

A requeued SLURM job continues in the folder its previous start left (`requeued_run`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path

import yaml

from workshop.base import records, world
from workshop.base.runs import RunError, atomic_write_text, display_path, find_runs, new_run_dir, runs_root
from workshop.launch.options import check_notebook, parse_options

RUNNING = "running"  # the status of a record until the run ends
INTERRUPTED = 3  # the exit status of a run stopped at a checkpoint (or by a signal): resume it

# What a run folder may keep of the environment: the launchers' variables, the workshop's own and the two that place
# a rank's work (its GPUs, its threads); never a name that looks like a secret (a shared cluster's run folders are
# read by others).
RECORD_PREFIXES = (*world.LAUNCHER_PREFIXES, "WORKSHOP_", "PMI_", "OMPI_COMM_WORLD_")  # MPI launchers too, for the record
RECORD_NAMES = (*world.LAUNCHER_VARIABLES, "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH", "COOKIE", "SESSION")


def safe_environment(environ=None) -> dict:
    """The variables a record may hold: launcher and workshop variables, none that looks secret."""
    e = os.environ if environ is None else environ
    return {k: v for k, v in sorted(e.items())
            if (k.startswith(RECORD_PREFIXES) or k in RECORD_NAMES) and not any(w in k.upper() for w in SECRET_WORDS)}


def read_meta(run: Path) -> dict:
    """The run's run.json."""
    return json.loads((Path(run) / "run.json").read_text())


def _write_meta(run: Path, meta: dict) -> None:
    atomic_write_text(run / "run.json", json.dumps(meta, indent=2, default=str) + "\n")


def rank_log(run: Path, rank: int) -> Path:
    return run / "logs" / f"rank{rank}.log"


def status_path(run: Path, rank: int) -> Path:
    """Where rank `rank` says how it ended (`workshop.launch.ranks.run_rank`)."""
    return run / "logs" / f"rank{rank}.status.json"


def output_notebook(run: Path, notebook: Path, rank: int) -> Path:
    return run / f"{notebook.stem}.ipynb" if rank == 0 else run / "ranks" / f"{notebook.stem}.rank{rank}.ipynb"


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def requeued_run(notebook: Path, root: Path | None = None) -> Path | None:
    """A requeued SLURM job (SLURM_RESTART_COUNT > 0; it keeps its id) continues in the run folder
    that its previous start left unfinished: the newest job<id>-<notebook>* not recorded ok."""
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    if not job or not restarts.isdigit() or int(restarts) == 0:
        return None
    for run in sorted(find_runs(notebook.stem, job, root), key=lambda p: p.stat().st_mtime, reverse=True):
        if records.status(run) != "ok":  # interrupted, failed, or killed before it could write a record (a node failed)
            return run
    return None


def reuse_run_dir(run: Path, notebook: Path, papermill_args: list[str], nranks: int | None = None) -> Path:
    """Continue an interrupted or failed run in its own folder: the previous attempt's notebooks,
    logs and record move to attempt<k>/ (nothing is overwritten); checkpoints stay where they are."""
    run = Path(run).resolve()
    try:
        meta = read_meta(run)
    except (OSError, ValueError):
        raise RunError(f"{run} is not a run folder (no readable run.json): give the folder of the run to resume, "
                       f"under {display_path(runs_root())}") from None
    if Path(meta["notebook"]).name != notebook.name:
        raise RunError(f"{display_path(run)} is a run of {Path(meta['notebook']).name}, not of {notebook.name}: "
                       "resume it with its own notebook")
    if meta["papermill_args"] != papermill_args:
        raise RunError(f"{display_path(run)} was started with the parameters {' '.join(meta['papermill_args']) or '(none)'}"
                       f", not {' '.join(papermill_args) or '(none)'}: resume with the same ones, or start a new run")
    if nranks is not None and meta["nranks"] != nranks:
        raise RunError(f"{display_path(run)} ran as {meta['nranks']} rank(s), not {nranks}: resume with the same "
                       "number of ranks (its data order and checkpoints depend on it)")
    if records.status(run) == "ok":
        raise RunError(f"{display_path(run)} finished already (record.json says ok): nothing to resume")
    attempt = run / f"attempt{len(list(run.glob('attempt*'))) + 1}"
    attempt.mkdir(mode=0o700)
    for name in (f"{notebook.stem}.ipynb", "ranks", "logs", "record.json", "stop.requested"):
        if (run / name).exists():
            (run / name).rename(attempt / name)
    meta["attempts"] = meta.get("attempts", 1) + 1
    meta["resumed"] = _now()
    meta["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")
    _write_meta(run, meta)
    return run


def prepare(notebook: str, nranks: int, papermill_args: list[str], resume: str | None = None) -> Path:
    """Check everything, then make (or, to resume, reuse) the run folder of `nranks` ranks (a whole number of at
    least 1, as `workshop.launch.runner.parse_launch` or SLURM gives it): run.json and parameters.yaml."""
    nb = Path(notebook).resolve()
    given = check_notebook(nb, papermill_args)
    options = parse_options(papermill_args)[1]
    again = Path(resume) if resume else requeued_run(nb)
    if again is not None:
        if not again.is_dir():
            raise RunError(f"--resume {resume}: no such run folder (runs are under {display_path(runs_root())})")
        run = reuse_run_dir(again, nb, papermill_args, nranks)
        meta = read_meta(run)
    else:
        run = new_run_dir(nb.stem)
        meta = {"notebook": str(nb), "nranks": nranks, "papermill_args": papermill_args, "started": _now(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "environment": safe_environment()}
        if os.environ.get("SLURM_JOB_ID"):  # the job's own output file, where sbatch put it
            out = Path(os.environ.get("SLURM_SUBMIT_DIR", ".")) / "runs" / f"slurm-{os.environ['SLURM_JOB_ID']}.out"
            if out.exists():
                (run / "slurm.out").symlink_to(os.path.relpath(out, run))
    (run / "ranks").mkdir()
    (run / "logs").mkdir()
    # the parameters travel as data: every rank's papermill reads this file, as given, typed
    meta.update(parameters=given, kernel=options["kernel"], cwd=options["cwd"])
    atomic_write_text(run / "parameters.yaml", yaml.safe_dump(given, sort_keys=False))
    _write_meta(run, meta)
    # A record from the start: the notebook replaces it, `collect` settles it. A run killed with SIGKILL
    # (out of memory, a failed node) keeps this one, and the report lists it as incomplete.
    write_record(run, meta, RUNNING, [f"started {meta.get('resumed') or meta['started']} on {socket.gethostname()} "
                                      f"(launcher pid {os.getpid()}); no final status yet"])
    return run


def write_record(run: Path, meta: dict, status: str, reason: list[str], **extra) -> None:
    """The launcher's own record.json (when the notebook wrote none, or could not)."""
    records.write(run, records.Record(
        notebook=Path(meta["notebook"]).stem, status=status, reason=reason, params=meta.get("parameters", {}),
        slurm_job_id=meta["slurm_job_id"],
        extra={**extra, "run": meta, "launcher": {"host": socket.gethostname(), "pid": os.getpid()}}))


def failed_cell(executed: Path, log: Path | None = None) -> dict:
    """Where an executed notebook stopped: the first cell with an error output; or, when the
    kernel died (killed, out of memory, os._exit), the last cell that started."""
    try:
        nb = json.loads(executed.read_text())
    except (OSError, ValueError):
        return {}
    last = None
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":  # "In [N]" is how Jupyter labels the cell
                return {"cell": f"In [{cell.get('execution_count')}]", "error": f"{out.get('ename')}: {out.get('evalue')}"}
        if cell.get("execution_count"):
            last = cell
    try:
        died = log is not None and "DeadKernelError" in log.read_text(errors="replace")
    except OSError:
        died = False
    if died and last is not None:
        return {"cell": f"In [{last['execution_count']}]",
                "error": "the kernel died (killed by a signal, out of memory, or exited)"}
    return {}


def _statuses(run: Path, nranks: int) -> list[dict]:
    found = []
    for rank in range(nranks):
        try:
            found.append(json.loads(status_path(run, rank).read_text()))
        except (OSError, ValueError):
            pass
    return found


def collect(run: Path, launcher_rc: int, interrupted: str | None = None) -> int:
    """Summarise the ranks of a run; non-zero when any failed or did not report. `interrupted`
    (the reason) marks a run asked to stop (SIGUSR1): its record says so, and how to resume."""
    meta = read_meta(run)
    record = run / "record.json"
    if interrupted and launcher_rc != 0:
        saved = [st for st in _statuses(run, meta["nranks"]) if "Interrupted" in st.get("error", "")]
        slurm = bool(os.environ.get("SLURM_JOB_ID"))
        how = "sbatch [options] scripts/run_notebook.sh" if slurm else f"scripts/run_notebook.sh --nproc {meta['nranks']}"
        args = " ".join(meta["papermill_args"])
        by_hand = f"resume with: {how} --resume {run} {display_path(meta['notebook'])} {args}".rstrip()
        resume = ("the job requeues itself and resumes here" if slurm and interrupted.startswith("SIGUSR1") else by_hand)
        reason = [f"{interrupted}: " + (saved[0]["error"] if saved else "the ranks stopped without a checkpoint"), resume]
        write_record(run, meta, "interrupted", reason, checkpointed=bool(saved))
        print(f"\nRUN INTERRUPTED: {run}", file=sys.stderr)
        for line in reason:
            print(f"  {line}", file=sys.stderr)
        return INTERRUPTED
    problems, failed = [], []
    for rank in range(meta["nranks"]):
        path = status_path(run, rank)
        if not path.exists():
            problems.append(f"rank {rank} did not finish (killed, or stopped when another rank failed): "
                            f"see {rank_log(run, rank)}")
            continue
        st = json.loads(path.read_text())
        if st["returncode"] != 0:
            failed.append(st)
    # the rank that failed first is the cause; the others mostly failed because it had gone
    failed.sort(key=lambda st: st.get("ended_s", 0))
    for i, st in enumerate(failed):
        if "cell" in st:
            where = f"failed in cell {st['cell']} ({st['error']})"
        elif "stopped_by" in st:
            where = f"was {st['error']}"
        else:
            where = "failed before any cell ran"
        first = " first" if i == 0 and len(failed) > 1 else ""
        problems.append(f"rank {st['rank']} on {st['node']}{first} {where}: open {st['notebook']}")
    if launcher_rc != 0 and not problems:
        problems.append(f"the launcher exited with {launcher_rc}: see {run / 'logs'}")
    if problems and records.status(run) in (None, RUNNING):  # a failed run is recorded as failed, never dropped
        write_record(run, meta, "failed", problems)
    if not problems and records.status(run) == RUNNING:  # a notebook that writes no record of its own
        record.unlink()
    if problems:
        print(f"\nRUN FAILED: {run}", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    nb = Path(meta["notebook"])
    print(f"\nrun folder:         {run}")
    print(f"executed notebook:  {output_notebook(run, nb, 0)}")
    if meta["nranks"] > 1:
        print(f"other ranks:        {run / 'ranks'}")
    print(f"record:             {record if record.exists() else '(this notebook writes none)'}")
    return 0
