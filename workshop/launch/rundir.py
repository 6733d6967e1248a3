"""A launched run's folder, from its start to its summary:

    run.json              what runs, on how many ranks, with which parameters (`prepare`; `read_meta`)
    parameters.yaml       what every rank's papermill reads
    record.json           the launcher's record from the start ("running"), replaced by the notebook's, settled by `collect`
    <notebook>.ipynb      rank 0's executed notebook; the other ranks' under ranks/ (`output_notebook`)
    logs/rank<R>.log      each rank's output, logs/rank<R>.started.json where it runs, logs/rank<R>.status.json how
                          it ended (`failed_cell`); a node whose ranks left only the first is named (`lost_nodes`)
    attempt<k>/           an earlier attempt's notebooks, logs and record, when the run was resumed (`reuse_run_dir`)

A requeued SLURM job continues in the folder its previous start left (`requeued_run`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
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


def started_path(run: Path, rank: int) -> Path:
    """Where rank `rank` says, as it starts, where it runs: all that is left of a rank killed with its node."""
    return run / "logs" / f"rank{rank}.started.json"


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


def live_writer(run: Path) -> str | None:
    """Who writes `run` now, other than this job, in words; None where nobody does. Its record says running and its
    launcher lives: a SLURM job that squeue still lists, or a process on this host."""
    try:
        record = records.read(run)
    except records.RecordError:
        return None
    if record.status != RUNNING:
        return None
    job = record.slurm_job_id
    if job:
        if job == os.environ.get("SLURM_JOB_ID") or not shutil.which("squeue"):
            return None  # this job's own earlier start, requeued
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
        state = out.stdout.split()[:1] if out.returncode == 0 else []
        return f"job {job} is {state[0]}; scancel {job} stops it" if state else None
    launcher = record.extra.get("launcher") or {}
    pid = launcher.get("pid")
    if launcher.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return f"its launcher, pid {pid} on {launcher['host']}, is running; kill -INT {pid} stops it"


# What a lesson's metadata `workshop.reshards: "restarts"` stands for: it reads nothing an earlier attempt left, so a
# resume is a new start in the same folder, on whatever world it gets (every check compares with one process)
RESTARTS = ("it keeps no state between attempts (what it checkpoints, it writes and reads in one attempt): a resume "
            "runs it again from its first cell, on the ranks it gets")


def reshards(notebook: Path) -> str | None:
    """Why `notebook` may resume on another number of ranks, as its metadata `workshop.reshards` says (its
    checkpoints load on any world: DCP, or state every rank holds whole; its data order follows the global sample
    index; or "restarts": `RESTARTS`), else None: its runs resume on the number of ranks they started with."""
    try:
        why = json.loads(Path(notebook).read_text()).get("metadata", {}).get("workshop", {}).get("reshards")
    except (OSError, ValueError, AttributeError):
        return None
    if why == "restarts":
        return RESTARTS
    return why if isinstance(why, str) and why else None


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
    if nranks is not None and meta["nranks"] != nranks and not reshards(notebook):
        raise RunError(f"{display_path(run)} ran as {meta['nranks']} rank(s), not {nranks}: resume with the same "
                       f"number of ranks ({notebook.name} does not declare that its checkpoints and data order survive "
                       "another: its metadata has no workshop.reshards)")
    if records.status(run) == "ok":
        raise RunError(f"{display_path(run)} finished already (record.json says ok): nothing to resume")
    writer = live_writer(run)
    if writer:
        raise RunError(f"{display_path(run)} is being written by another run now: two runs must not write one run "
                       f"folder; wait until it ends, or start a new run without --resume ({writer})")
    attempt = run / f"attempt{len(list(run.glob('attempt*'))) + 1}"
    attempt.mkdir(mode=0o700)
    for name in (f"{notebook.stem}.ipynb", "ranks", "logs", "record.json", "stop.requested"):
        if (run / name).exists():
            (run / name).rename(attempt / name)
    if nranks is not None and meta["nranks"] != nranks:  # the record keeps every world the run had
        meta["worlds"] = [*meta.get("worlds", [{"attempt": 1, "nranks": meta["nranks"]}]),
                          {"attempt": meta.get("attempts", 1) + 1, "nranks": nranks}]
        print(f"resuming {display_path(run)} on {nranks} rank(s), where it ran on {meta['nranks']}: "
              f"{notebook.name} says {reshards(notebook)}", file=sys.stderr)
        meta["nranks"] = nranks
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
    """The statuses of the ranks that said how they ended."""
    return [st for st in _all_statuses(run, nranks).values() if st and "returncode" in st]


def _all_statuses(run: Path, nranks: int) -> dict[int, dict | None]:
    """Each rank's status: how it ended, else only where it started (no returncode), else None (it never started)."""
    found = {}
    for rank in range(nranks):
        found[rank] = None
        for path in (status_path(run, rank), started_path(run, rank)):
            try:
                found[rank] = json.loads(path.read_text())
                break
            except (OSError, ValueError):
                continue
    return found


def _listed(ranks: list[int]) -> str:
    """"rank 3", "ranks 2 and 3", "ranks 0, 1 and 2"."""
    words = [str(r) for r in sorted(ranks)]
    return f"rank {words[0]}" if len(words) == 1 else f"ranks {', '.join(words[:-1])} and {words[-1]}"


def lost_nodes(statuses: dict[int, dict | None]) -> dict[str, list[int]]:
    """The nodes whose every rank ended without a word (started, by its first status, but never said how it ended):
    {node: its ranks}. A node that failed, was rebooted, or whose tasks the out-of-memory killer took."""
    by_node: dict[str, list[int]] = {}
    for rank, st in statuses.items():
        if st and st.get("node"):
            by_node.setdefault(st["node"], []).append(rank)
    lost = {node: ranks for node, ranks in by_node.items() if all("returncode" not in statuses[r] for r in ranks)}
    return {} if len(by_node) > 1 and len(lost) == len(by_node) else lost  # every node gone: the job, not a node


def _node_state(node: str) -> str:
    """What SLURM says of `node` where it says something is wrong (", which SLURM marks DOWN+NOT_RESPONDING"), else
    ""."""
    if not os.environ.get("SLURM_JOB_ID") or not shutil.which("scontrol"):
        return ""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "node", node], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    state = re.search(r"\bState=(\S+)", out)
    reason = re.search(r"\bReason=(.*?)(?: \w+=|$)", out)
    if not state or not re.search(r"DOWN|DRAIN|FAIL|NOT_RESPONDING|\*", state.group(1)):
        return ""
    return f", which SLURM marks {state.group(1)}" + (f" ({reason.group(1).strip()})" if reason else "")


def resume_command(run: Path, meta: dict, exclude: list[str] = ()) -> str:
    """The command that resumes `run` in its folder: sbatch with the job's nodes and tasks per node, the lost nodes
    left out (and, for a notebook that `reshards`, on as many fewer nodes), under SLURM; else the local launcher with
    the same number of ranks."""
    nb = display_path(meta["notebook"])
    args = " ".join(meta["papermill_args"])
    if meta.get("slurm_job_id"):
        nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or 1)
        per_node = world.tasks_per_node(os.environ.get("SLURM_TASKS_PER_NODE") or str(meta["nranks"]))[0]
        if exclude and nodes > len(exclude) and reshards(Path(meta["notebook"])):  # on the nodes left, now
            nodes -= len(exclude)
        size = f"--nodes={nodes} --ntasks-per-node={per_node}" + (f" --exclude={','.join(exclude)}" if exclude else "")
        how = f"sbatch {size} [your other options] scripts/run_notebook.sh"
    else:
        how = f"scripts/run_notebook.sh --nproc {meta['nranks']}"
    return f"{how} --resume {display_path(run)} {nb} {args}".rstrip()


def _lost_lines(run: Path, meta: dict, statuses: dict[int, dict | None]) -> tuple[list[str], dict[str, list[int]]]:
    """The lost nodes and a line for each: those whose ranks ended without a word, and those SLURM marks down (when
    a node's slurmd stops answering, SLURM ends the job: its ranks may still have said SIGTERM)."""
    lost = lost_nodes(statuses)
    nodes = sorted({st["node"] for st in statuses.values() if st and st.get("node")})
    troubled = any(st is None or st.get("returncode", 1) != 0 for st in statuses.values())
    states = {node: _node_state(node) for node in nodes} if troubled and len(nodes) > 1 else {}
    for node, state in states.items():
        if state and node not in lost:
            lost[node] = [r for r, st in statuses.items() if st and st.get("node") == node]
    lines = []
    for node, ranks in lost.items():
        what = ("ended together without a word (the node failed or rebooted, its tasks were killed, or it ran out of "
                "memory)" if all("returncode" not in statuses[r] for r in ranks) else
                "ended together, stopped with the job when SLURM lost the node")
        lines.append(f"node {node}{states.get(node, '')} was lost: {_listed(ranks)}, every rank it ran, {what}: see "
                     f"{rank_log(run, ranks[0])}")
    return lines, lost


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
        lost_lines, lost = _lost_lines(run, meta, _all_statuses(run, meta["nranks"]))
        if lost:  # SLURM ends a job whose node failed with SIGTERM: the node is the cause
            resume = "resume with: " + resume_command(run, meta, list(lost))
        reason = [*lost_lines, f"{interrupted}: " + (saved[0]["error"] if saved else "the ranks stopped without a "
                                                     "checkpoint"), resume]
        write_record(run, meta, "interrupted", reason, checkpointed=bool(saved), lost_nodes=lost)
        print(f"\nRUN INTERRUPTED: {run}", file=sys.stderr)
        for line in reason:
            print(f"  {line}", file=sys.stderr)
        return INTERRUPTED
    statuses = _all_statuses(run, meta["nranks"])
    problems, lost = _lost_lines(run, meta, statuses)
    on_lost = {rank for ranks in lost.values() for rank in ranks}  # said once, as their node's
    failed = []
    for rank, st in statuses.items():
        if rank in on_lost:
            continue
        if st is None or "returncode" not in st:
            where = f" on {st['node']}" if st else ""
            problems.append(f"rank {rank}{where} did not finish (killed, or stopped when another rank failed): "
                            f"see {rank_log(run, rank)}")
        elif st["returncode"] != 0:
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
        first = " first" if i == 0 and len(failed) > 1 and "stopped_by" not in st else ""  # a stopped rank: no cause
        problems.append(f"rank {st['rank']} on {st['node']}{first} {where}: open {st['notebook']}")
    if launcher_rc != 0 and not problems:
        problems.append(f"the launcher exited with {launcher_rc}: see {run / 'logs'}")
    if lost:  # last, where a user looks first: what to run now
        problems.append("resume with: " + resume_command(run, meta, list(lost)))
    if problems and records.status(run) in (None, RUNNING):  # a failed run is recorded as failed, never dropped
        write_record(run, meta, "failed", problems, lost_nodes=lost)
    if not problems and records.status(run) == RUNNING:  # a notebook that writes no record of its own
        record.unlink()
    if not problems and meta.get("worlds") and record.exists():  # the notebook's record keeps every world the run had
        kept = records.read(record)
        kept.extra.setdefault("worlds", meta["worlds"])
        records.write(run, kept)
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
