"""Submit a notebook as a SLURM batch job from JupyterLab (or Python), and follow it.

The notebook open in JupyterLab runs as one process; the same notebook, submitted, runs as N ranks
across nodes through `sbatch scripts/run_notebook.sh` (see that script's header). From a cell:

    job, run = slurm.submit("05_ddp.ipynb", nodes=2, ntasks_per_node=4, gpus_per_node=4,
                            time="00:30:00", params={"link": "ib-ndr-400"})
    slurm.status(job)          # "PENDING", "RUNNING", ... then "COMPLETED", "FAILED", ...
    slurm.wait(job)            # until the job has ended: its final state
    slurm.open_result(job)     # the executed notebook's path and the run's record

From a shell, `python -m workshop.launch.slurm status JOB` (or `wait`, `result`) follows a job.

A JupyterLab server that a portal started is a SLURM job itself, and its kernel carries that
job's SLURM_* variables: a job submitted with them would inherit the portal job's task and CPU
counts. `submit` hands sbatch an environment without them, with this kernel's interpreter as
the job's Python ($WORKSHOP_PYTHON). The job's state comes from `squeue` while SLURM remembers
the job, then from `sacct` where the cluster keeps accounting, and else from the run's record.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from workshop.base import records
from workshop.base.runs import REPO, RunError, display_path, find_runs, run_name, runs_root
from workshop.base.tables import WIDTH
from workshop.launch.options import check_notebook
from workshop.launch.rundir import read_meta

SCRIPT = REPO / "scripts" / "run_notebook.sh"
# states of a job that has not ended yet (squeue's long names)
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
ENDED_WITHOUT_RECORD = "ENDED"  # SLURM forgot the job, no accounting, and the run wrote no record


class SlurmError(RuntimeError):
    """Something to fix before a job can run; the message says what."""


class Submitted(NamedTuple):
    job_id: str
    run: Path  # the run folder the job writes: runs/job<id>-<notebook>/


def _need(command: str) -> str:
    path = shutil.which(command)
    if path is None:
        raise SlurmError(
            f"`{command}` is not on PATH: this machine is not part of a SLURM cluster (or its SLURM module is not "
            "loaded), so there is nothing to submit to. Run the notebook here instead, as N local ranks: "
            "scripts/run_notebook.sh --nproc N notebooks/<notebook>.ipynb")
    return path


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)


def find_notebook(notebook: str | os.PathLike) -> Path:
    """The notebook's path: as given (absolute, or relative to the working folder), else relative
    to the repository, else under notebooks/ ("05_ddp.ipynb" from a notebook's own folder)."""
    path = Path(notebook)
    if path.suffix != ".ipynb":
        path = path.with_name(path.name + ".ipynb")
    for candidate in (path, REPO / path, REPO / "notebooks" / path):
        if candidate.is_file():
            return candidate.resolve()
    raise SlurmError(f"no notebook {notebook} (looked in the working folder, {REPO} and its notebooks/)")


def papermill_args(params: dict | None) -> list[str]:
    """Papermill options that set `params`, each keeping its Python type: strings as they are (-r),
    numbers, booleans and None as papermill parses them (-p), anything else as YAML (-y)."""
    args: list[str] = []
    for name, value in (params or {}).items():
        if isinstance(value, str):
            args += ["-r", name, value]
        elif value is None or isinstance(value, (bool, int, float)):
            args += ["-p", name, repr(value) if isinstance(value, float) else str(value)]
        else:
            args += ["-y", json.dumps({name: value})]  # JSON is YAML, on one line
    return args


def job_environment() -> dict:
    """The environment sbatch passes to the job: this one without the SLURM and Jupyter session
    variables of a surrounding job or kernel, with this interpreter as the job's Python."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_", "JPY_"))}
    env["WORKSHOP_PYTHON"] = env.get("WORKSHOP_PYTHON") or sys.executable
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def sbatch_command(notebook: Path, *, nodes: int = 1, ntasks_per_node: int = 1, gpus_per_node: int = 0,
                   time: str | None = None, params: dict | None = None, partition: str | None = None,
                   extra: tuple | list = (), parsable: bool = True) -> list[str]:
    """The sbatch command line that `submit` runs, from the repository's root (`--parsable`: sbatch
    answers with the job id alone)."""
    for name, value, least in (("nodes", nodes, 1), ("ntasks_per_node", ntasks_per_node, 1), ("gpus_per_node", gpus_per_node, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise SlurmError(f"{name} must be a whole number >= {least}, got {value!r}")
    cmd = ["sbatch", *(["--parsable"] if parsable else []), f"--nodes={nodes}", f"--ntasks-per-node={ntasks_per_node}"]
    if gpus_per_node:
        cmd.append(f"--gpus-per-node={gpus_per_node}")
    if time:
        cmd.append(f"--time={time}")
    if partition:
        cmd.append(f"--partition={partition}")
    cmd += [str(e) for e in extra]
    try:
        nb = str(notebook.relative_to(REPO))
    except ValueError:
        nb = str(notebook)
    return cmd + [str(SCRIPT.relative_to(REPO)), nb, *papermill_args(params)]


def job_params(notebook: Path, params: dict | None) -> dict:
    """`params`, and `submit=False` where the notebook has that parameter: the job runs the notebook
    as saved, maybe with submit = True, and must not submit itself again."""
    import papermill

    params = dict(params or {})
    if "submit" in papermill.inspect_notebook(str(notebook)):
        params.setdefault("submit", False)
    return params


# papermill's options and how many words each takes with its value: kept together on one line
_OPTION_WORDS = {"-p": 3, "-r": 3, "-y": 3, "-f": 2}


def command_lines(cmd: list[str], width: int = WIDTH, indent: str = "") -> str:
    """`cmd` quoted for a shell, in lines of at most `width` columns where its words allow: `indent` before the
    first line, four more spaces before the others, and each line but the last ends in ` \\` (a continuation),
    so the lines paste into a shell as one command. A papermill option stays with its value (`-p name value`)."""
    groups, i = [], 0
    while i < len(cmd):
        n = _OPTION_WORDS.get(cmd[i], 1)
        groups.append(shlex.join(cmd[i:i + n]))
        i += n
    lines, line = [], indent + groups[0]
    for k, group in enumerate(groups[1:], start=2):
        room = width - (0 if k == len(groups) else 2)  # a line that continues ends in " \\"
        if len(line) + 1 + len(group) > room:
            lines.append(line + " \\")
            line = indent + "    " + group
        else:
            line += " " + group
    return "\n".join(lines + [line])


def shell_command(notebook: str | os.PathLike, params: dict | None = None, *, width: int | None = None,
                  indent: str = "", **kwargs) -> str:
    """What `submit(notebook, **kwargs)` runs, for a shell in the repository's root: one line, or with `width`
    lines of that many columns joined by continuations (`command_lines`)."""
    nb = find_notebook(notebook)
    cmd = sbatch_command(nb, parsable=False, params=job_params(nb, params), **kwargs)
    return indent + shlex.join(cmd) if width is None else command_lines(cmd, width, indent)


def submit(notebook: str | os.PathLike, nodes: int = 1, ntasks_per_node: int = 1, gpus_per_node: int = 0,
           time: str | None = None, params: dict | None = None, partition: str | None = None,
           extra: tuple | list = (), quiet: bool = False) -> Submitted:
    """Submit `notebook` as nodes x ntasks_per_node ranks (one GPU each with gpus_per_node =
    ntasks_per_node), with papermill parameters `params`; `extra` are more sbatch options
    ("--account=ACCOUNT", "--cpus-per-task=8"). Submitted from the repository's root, so the job's
    output lands in runs/slurm-<id>.out. Returns the job id and the run folder it will write.
    A notebook with a `submit` parameter gets `submit=False` (`job_params`)."""
    _need("sbatch")
    nb = find_notebook(notebook)
    try:
        check_notebook(nb, papermill_args(params))  # a parameter the notebook lacks is refused here, not after the queue
    except RunError as err:
        raise SlurmError(str(err)) from None
    params = job_params(nb, params)
    cmd = sbatch_command(nb, nodes=nodes, ntasks_per_node=ntasks_per_node, gpus_per_node=gpus_per_node, time=time,
                         params=params, partition=partition, extra=extra)
    (REPO / "runs").mkdir(exist_ok=True)  # where #SBATCH --output puts the job's output
    out = _run(cmd, cwd=REPO, env=job_environment())
    if out.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {out.stderr.strip() or out.stdout.strip()}\n  command:\n"
                         f"{command_lines(cmd, indent='    ')}")
    job = out.stdout.strip().split(";")[0]  # --parsable: "<id>" or "<id>;<cluster>"
    if not job.isdigit():
        raise SlurmError(f"sbatch answered {out.stdout.strip()!r}, not a job id")
    result = Submitted(job, runs_root() / run_name(nb.stem, job))
    if not quiet:
        print(f"submitted job {job}:\n{command_lines([c for c in cmd if c != '--parsable'], indent='  ')}")
        print(f"its output: runs/slurm-{job}.out; its run folder: {display_path(result.run)}")
    return result


def _job_id(job) -> str:
    job_id = str(job.job_id if isinstance(job, Submitted) else job).strip()
    if not job_id.split("_")[0].isdigit():
        raise SlurmError(f"{job!r} is not a job id (a number, as submit() returns it)")
    return job_id


def run_folder(job) -> Path | None:
    """The run folder of a job: runs/job<id>-<notebook>/ (None before the job made it)."""
    if isinstance(job, Submitted):
        return job.run if job.run.exists() else None
    found = find_runs(job_id=_job_id(job))
    return found[0] if found else None


def _overall(states: list[str]) -> str:
    """One state for a job whose tasks (an array's, one line each) are in `states`: the first that has not
    ended, else the first that did not complete (one failed task fails the array), else COMPLETED."""
    return next((s for s in states if s in ACTIVE), next((s for s in states if s != "COMPLETED"), states[0]))


def status(job) -> str:
    """The job's state: squeue's while SLURM holds the job (it keeps ended ones a few minutes),
    else sacct's where the cluster keeps accounting, else from the run's record ("COMPLETED",
    "FAILED"), else "ENDED" (see the job's output, runs/slurm-<id>.out)."""
    job_id = _job_id(job)
    _need("squeue")
    out = _run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"])
    states = out.stdout.split() if out.returncode == 0 else []
    if states:
        return _overall(states)
    if shutil.which("sacct"):  # "Slurm accounting storage is disabled" on clusters without it: then no answer
        out = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
        states = [line.split()[0] for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
        if states:
            return _overall(states)
    run = run_folder(job)
    if run is not None and (run / "record.json").is_file():
        return "COMPLETED" if records.status(run) == "ok" else "FAILED"
    return ENDED_WITHOUT_RECORD


def wait(job, timeout: float | None = None, poll_s: float = 5.0) -> str:
    """Wait until the job has ended; its final state. TimeoutError after `timeout` seconds."""
    start = time.monotonic()
    while True:
        state = status(job)
        if state not in ACTIVE:
            return state
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"job {_job_id(job)} is still {state} after {timeout:.0f} s: wait again, or cancel it "
                               f"with scancel {_job_id(job)}")
        time.sleep(poll_s)


class Result(NamedTuple):
    run: Path
    notebook: Path  # rank 0's executed notebook: the one to open
    record: dict  # the run's record.json ({} when it wrote none)


def open_result(job, quiet: bool = False) -> Result:
    """Where the job's executed notebook is, and what its record says (printed unless quiet)."""
    run = run_folder(job)
    if run is None:
        state = status(job)
        hint = "it has not started yet" if state in ACTIVE else f"see runs/slurm-{_job_id(job)}.out"
        raise SlurmError(f"job {_job_id(job)} ({state}) has no run folder under {display_path(runs_root())}: {hint}")
    stem = (Path(read_meta(run)["notebook"]).stem if (run / "run.json").is_file()
            else run.name.removeprefix(run_name("", _job_id(job))))
    record_path = run / "record.json"
    record = records.read(record_path).as_dict() if record_path.is_file() else {}
    result = Result(run, run / f"{stem}.ipynb", record)
    if not quiet:
        print(f"job {_job_id(job)}: {display_path(run)}")
        missing = "" if result.notebook.is_file() else " (not written yet)"
        print(f"  executed notebook: {display_path(result.notebook)}{missing}")
        if not record:
            print("  record:            none yet" + ("" if status(job) in ACTIVE else f" (see runs/slurm-{_job_id(job)}.out)"))
        else:
            world = record.get("dist") or {}
            where = f", {world['world_size']} rank(s)" if "world_size" in world else ""
            print(f"  record:            {display_path(record_path)}: status {record.get('status')}{where}")
            for key in ("params", "results", "reason"):
                if record.get(key):
                    print(f"  {key}: {_short(record[key])}")
    return result


def offer(notebook: str | os.PathLike, submit_now: bool, params: dict | None = None, **sizes) -> Result | None:
    """The last cell of a multi-rank notebook: with `submit_now` (its `submit` parameter) submit
    the notebook, wait for the job and open its result; else print the sbatch line that would run.
    Only rank 0 acts (inside a job `submit` is False, so nothing submits itself again)."""
    from workshop.dist import get_env, print0

    if not get_env().is_main:
        return None
    if submit_now:
        job = submit(notebook, params=params, **sizes)
        wait(job)
        return open_result(job)
    print0("submit = False, nothing submitted. With submit = True this cell runs, from the repository's root:")
    print0(shell_command(notebook, params=params, width=WIDTH, indent="  ", **sizes))
    return None


def _short(value, width: int = 300) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    """A job submitted from a notebook, followed from a shell."""
    parser = argparse.ArgumentParser(prog="python -m workshop.launch.slurm", description=main.__doc__)
    parser.add_argument("command", choices=["status", "wait", "result"])
    parser.add_argument("job", help="the job id")
    args = parser.parse_args(argv)
    try:
        if args.command == "status":
            print(status(args.job))
        elif args.command == "wait":
            state = wait(args.job)
            print(state)
            return 0 if state == "COMPLETED" else 1
        else:
            open_result(args.job)
        return 0
    except SlurmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
