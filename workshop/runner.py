"""One notebook as N ranks: the Python half of `scripts/run_notebook.sh`.

The shell script launches; this module does the rest, in three steps:

    python -m workshop.runner prepare --nranks N NOTEBOOK [papermill options]   # -> run folder
    python -m workshop.runner rank RUN_DIR NOTEBOOK [papermill options]         # once per rank
    python -m workshop.runner collect RUN_DIR LAUNCHER_EXIT_CODE                # summary, exit code
    python -m workshop.runner series [NOTEBOOK ...]                             # `make run`: all, then the report

`prepare` refuses bad input before anything runs (a missing notebook, a parameter the notebook
does not have, a bad rank count) and makes a run folder that no other run writes to. `rank` runs
papermill for the rank that the launcher (torchrun or srun) started, with Jupyter's runtime files
and IPython's history in node-local temporary folders, and progress as log lines, not bars.
`collect` says which rank failed, in which cell, and which notebook to open.
"""

from __future__ import annotations

import argparse
import ast
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from workshop import params
from workshop.metrics import REPO, atomic_write_text, display_path, runs_root
from workshop.progress import DEFAULT_LOG_EVERY

# papermill options that carry parameters, and how many values follow each
PARAM_OPTIONS = {"-p": 2, "--parameters": 2, "-r": 2, "--parameters_raw": 2, "-f": 1,
                 "--parameters_file": 1, "-y": 1, "--parameters_yaml": 1, "-b": 1, "--parameters_base64": 1}
KERNEL = "workshop-current"  # a kernel spec written per rank: always this interpreter


class RunError(Exception):
    """Bad input: the message says what to do."""


def _resolve_cli_value(text: str):
    """A -p value as papermill reads it: True/False/None, an int, a float, else the string."""
    from papermill.cli import _resolve_type

    return _resolve_type(text)


def parameter_values(papermill_args: list[str]) -> dict:
    """The parameters that papermill options set, with their values as papermill will pass them."""
    values_by_name, i = {}, 0
    while i < len(papermill_args):
        opt = papermill_args[i]
        key, _, inline = opt.partition("=")
        if key in PARAM_OPTIONS:
            n = PARAM_OPTIONS[key]
            values = ([inline] if inline else []) + papermill_args[i + 1: i + 1 + n - bool(inline)]
            if len(values) < n:
                raise RunError(f"papermill option {key} needs {n} value(s)")
            if key in ("-p", "--parameters"):
                values_by_name[values[0]] = _resolve_cli_value(values[1])
            elif key in ("-r", "--parameters_raw"):
                values_by_name[values[0]] = values[1]
            else:
                if key in ("-f", "--parameters_file"):
                    path = Path(values[0])
                    if not path.is_file():
                        raise RunError(f"parameters file {path} does not exist")
                    text = path.read_text()
                elif key in ("-b", "--parameters_base64"):
                    text = base64.b64decode(values[0]).decode()
                else:
                    text = values[0]
                try:
                    loaded = yaml.safe_load(text) or {}
                except yaml.YAMLError as err:
                    where = values[0] if key != "-b" else ""
                    raise RunError(f"{key} {where}: not valid YAML ({str(err).splitlines()[0]})") from None
                if not isinstance(loaded, dict):
                    raise RunError(f"{key} must give a mapping of parameter names to values")
                values_by_name.update(loaded)
            i += 1 + n - bool(inline)
        else:
            i += 1
    return values_by_name


def parameter_names(papermill_args: list[str]) -> list[str]:
    """The names of the parameters that papermill options set."""
    return list(parameter_values(papermill_args))


# A parameter's type as papermill infers it from the default, and the value types it accepts. A
# string parameter takes numbers too (papermill turns `-p lrs 0.1` into a float; the notebooks
# read such parameters with str()).
ACCEPTS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str, int, float)}


def default_type(param: dict) -> str | None:
    """The type of a parameter: its annotation, else its default's (a literal), else None."""
    if param.get("inferred_type_name") in ACCEPTS:
        return param["inferred_type_name"]
    try:
        value = ast.literal_eval(param.get("default", ""))
    except (ValueError, SyntaxError):
        return None
    return type(value).__name__ if type(value).__name__ in ACCEPTS else None


def check_types(notebook: Path, known: dict, given: dict) -> None:
    """Raise RunError for a value whose type the notebook's default does not have."""
    for name, value in given.items():
        expected = default_type(known[name])
        accepted = ACCEPTS.get(expected)
        if accepted is None or value is None:
            continue
        ok = isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)
        if not ok:
            raise RunError(f"parameter {name} of {notebook.name} is {'an' if expected == 'int' else 'a'} {expected} "
                           f"(default {known[name]['default']}), got {value!r} ({type(value).__name__}): "
                           f"pass a value of that type, e.g. -p {name} {known[name]['default']}")


def check_notebook(notebook: Path, papermill_args: list[str]) -> None:
    """Raise RunError unless the notebook exists and has every parameter the options set."""
    import papermill

    if not notebook.is_file():
        raise RunError(f"notebook {notebook} does not exist (notebooks are under notebooks/, e.g. notebooks/01_baseline.ipynb)")
    if notebook.suffix != ".ipynb":
        raise RunError(f"{notebook} is not a notebook (.ipynb)")
    if not os.access(notebook, os.R_OK):
        raise RunError(f"notebook {notebook} cannot be read (permission denied): check its permissions "
                       "(ls -l) or copy it somewhere you can read")
    try:
        cells = json.loads(notebook.read_text()).get("cells")
        if not isinstance(cells, list):
            raise ValueError("no list of cells")
        known = papermill.inspect_notebook(str(notebook))
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise RunError(f"{notebook} is not a valid notebook ({type(err).__name__}: {str(err).splitlines()[0]}): "
                       "restore it, e.g. git checkout -- " + display_path(notebook)) from None
    given = parameter_values(papermill_args)
    if given and not any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells):
        raise RunError(f"{notebook.name} is not parameterised (no cell tagged 'parameters'), so "
                       f"{', '.join(given)} cannot be set: tag the cell of defaults 'parameters' "
                       "(JupyterLab: property inspector, cell tags), or run it without -p/-f/-y")
    unknown = [n for n in given if n not in known]
    if unknown:
        listing = "\n".join(f"  {name} = {p['default']}  {p.get('help') or ''}".rstrip() for name, p in known.items())
        raise RunError(
            f"{notebook.name} has no parameter {', '.join(map(repr, unknown))}. Its parameters:\n"
            + (listing or "  (none)")
        )
    check_types(notebook, known, given)
    try:
        broken = params.problems(params.rules(known), given)
    except ValueError as err:  # a rule the notebook declares but nobody can read
        raise RunError(f"{notebook.name}: {err}") from None
    if broken:
        raise RunError("; ".join(broken) + f" (the rules are in {notebook.name}'s parameters cell)")
    check_environment(given, papermill_args)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_environment(given: dict, papermill_args: list[str]) -> None:
    """Refuse, before anything runs, what cannot work on this machine: GPU-sized parameters
    (notebooks/params/) or NCCL without a GPU, and a data set asked for by name but not staged."""
    params_dir = (REPO / "notebooks" / "params").resolve()
    for i, opt in enumerate(papermill_args[:-1]):
        if opt in ("-f", "--parameters_file") and Path(papermill_args[i + 1]).resolve().parent == params_dir:
            if os.environ.get("WORKSHOP_ALLOW_CPU") != "1" and not _has_cuda():
                raise RunError(f"{papermill_args[i + 1]} holds GPU-sized parameters and this machine has no GPU: drop "
                               "-f to run the CPU defaults, or submit to a GPU partition (sbatch --gpus-per-node=1 ...); "
                               "WORKSHOP_ALLOW_CPU=1 runs them on CPU anyway")
    backend = os.environ.get("WORKSHOP_BACKEND", "")
    if backend and backend not in ("nccl", "gloo"):
        raise RunError(f"WORKSHOP_BACKEND={backend}: use nccl (GPUs) or gloo (CPU), or unset it to let the device decide")
    if backend == "nccl" and not _has_cuda():
        raise RunError("WORKSHOP_BACKEND=nccl but this machine has no GPU: NCCL needs CUDA; unset WORKSHOP_BACKEND "
                       "(gloo is used on CPU) or run on a GPU node")
    if given.get("dataset") == "cifar10":
        from workshop.data import check_cifar10

        try:
            check_cifar10()
        except FileNotFoundError as err:
            raise RunError(str(err)) from None


def folder_mode() -> int:
    """The mode of new run folders: $WORKSHOP_RUNS_MODE (octal, e.g. 750 to let the group read),
    else 700: on a shared cluster a run's notebooks, logs and checkpoints are its owner's."""
    text = os.environ.get("WORKSHOP_RUNS_MODE", "700")
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or not mode & 0o700 == 0o700:
        raise RunError(f"WORKSHOP_RUNS_MODE={text} is not an octal mode the owner can use: give three octal digits "
                       "starting with 7, e.g. 700 (only you) or 750 (your group may read)")
    return mode


def new_run_dir(notebook: Path, root: Path | None = None) -> Path:
    """runs/<job id or time>-<notebook>, made here and now: a name taken already gets a suffix,
    so a second run never writes into the first's folder."""
    root = root or runs_root()
    mode = folder_mode()
    try:
        root.mkdir(parents=True, exist_ok=True)
        writable = os.access(root, os.W_OK | os.X_OK)
    except OSError:
        writable = False
    if not writable:
        raise RunError(f"the runs folder {root} is not writable: set WORKSHOP_RUNS to a folder you can write "
                       "(e.g. export WORKSHOP_RUNS=$HOME/runs, or one on the project's scratch file system)")
    job = os.environ.get("SLURM_JOB_ID")
    stem = f"{'job' + job if job else datetime.now().strftime('%Y%m%d-%H%M%S')}-{notebook.stem}"
    for i in range(1, 1000):
        path = root / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir(mode=mode)
        except FileExistsError:
            continue
        path.chmod(mode)  # mkdir's mode is masked by the umask; this is the mode asked for
        return path
    raise RunError(f"too many runs named {stem} under {root}")


# What a run folder may keep of the environment: the launchers' variables and the workshop's own,
# never a name that looks like a secret (a shared cluster's run folders are read by others).
ENV_PREFIXES = ("SLURM_", "WORKSHOP_", "TORCHELASTIC_", "PMI_", "OMPI_COMM_WORLD_")
ENV_NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
             "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH", "COOKIE", "SESSION")


def safe_environment(environ=None) -> dict:
    """The variables a record may hold: launcher and workshop variables, none that looks secret."""
    e = os.environ if environ is None else environ
    return {k: v for k, v in sorted(e.items())
            if (k.startswith(ENV_PREFIXES) or k in ENV_NAMES) and not any(w in k.upper() for w in SECRET_WORDS)}


def requeued_run(notebook: Path, root: Path | None = None) -> Path | None:
    """A requeued SLURM job (SLURM_RESTART_COUNT > 0; it keeps its id) continues in the run folder
    that its previous start left unfinished: the newest job<id>-<notebook>* not recorded ok."""
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    if not job or not restarts.isdigit() or int(restarts) == 0:
        return None
    root = root or runs_root()
    for run in sorted(root.glob(f"job{job}-{notebook.stem}*"), key=lambda p: p.stat().st_mtime, reverse=True):
        record = run / "record.json"
        try:  # interrupted, failed, or killed before it could write a record (a node failed)
            if not record.exists() or json.loads(record.read_text()).get("status") != "ok":
                return run
        except (OSError, ValueError):
            return run
    return None


def reuse_run_dir(run: Path, notebook: Path, papermill_args: list[str]) -> Path:
    """Continue an interrupted or failed run in its own folder: the previous attempt's notebooks,
    logs and record move to attempt<k>/ (nothing is overwritten); checkpoints stay where they are."""
    run = Path(run).resolve()
    try:
        meta = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        raise RunError(f"{run} is not a run folder (no readable run.json): give the folder of the run to resume, "
                       f"under {display_path(runs_root())}") from None
    if Path(meta["notebook"]).name != notebook.name:
        raise RunError(f"{display_path(run)} is a run of {Path(meta['notebook']).name}, not of {notebook.name}: "
                       "resume it with its own notebook")
    if meta["papermill_args"] != papermill_args:
        raise RunError(f"{display_path(run)} was started with the parameters {' '.join(meta['papermill_args']) or '(none)'}"
                       f", not {' '.join(papermill_args) or '(none)'}: resume with the same ones, or start a new run")
    record = run / "record.json"
    if record.exists() and json.loads(record.read_text()).get("status") == "ok":
        raise RunError(f"{display_path(run)} finished already (record.json says ok): nothing to resume")
    attempt = run / f"attempt{len(list(run.glob('attempt*'))) + 1}"
    attempt.mkdir(mode=0o700)
    for name in (f"{notebook.stem}.ipynb", "ranks", "logs", "record.json", "stop.requested"):
        if (run / name).exists():
            (run / name).rename(attempt / name)
    meta["attempts"] = meta.get("attempts", 1) + 1
    meta["resumed"] = datetime.now().astimezone().isoformat(timespec="seconds")
    meta["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")
    atomic_write_text(run / "run.json", json.dumps(meta, indent=2) + "\n")
    return run


def prepare(notebook: str, nranks: str, papermill_args: list[str], resume: str | None = None) -> Path:
    if not nranks.isdigit() or int(nranks) < 1:
        raise RunError(f"the number of ranks must be a positive integer, got {nranks!r} (e.g. --nproc 2)")
    nb = Path(notebook).resolve()
    check_notebook(nb, papermill_args)
    again = Path(resume) if resume else requeued_run(nb)
    if again is not None:
        if not again.is_dir():
            raise RunError(f"--resume {resume}: no such run folder (runs are under {display_path(runs_root())})")
        run = reuse_run_dir(again, nb, papermill_args)
        meta = json.loads((run / "run.json").read_text())
        if meta["nranks"] != int(nranks):
            raise RunError(f"{display_path(run)} ran as {meta['nranks']} ranks, not {nranks}: resume with the same "
                           "number of ranks (its data order and checkpoints depend on it)")
        (run / "ranks").mkdir()
        (run / "logs").mkdir()
        return run
    run = new_run_dir(nb)
    (run / "ranks").mkdir()
    (run / "logs").mkdir()
    meta = {"notebook": str(nb), "nranks": int(nranks), "papermill_args": papermill_args,
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "environment": safe_environment()}
    atomic_write_text(run / "run.json", json.dumps(meta, indent=2) + "\n")
    if os.environ.get("SLURM_JOB_ID"):  # the job's own output file, where sbatch put it
        out = Path(os.environ.get("SLURM_SUBMIT_DIR", ".")) / "runs" / f"slurm-{os.environ['SLURM_JOB_ID']}.out"
        if out.exists():
            (run / "slurm.out").symlink_to(os.path.relpath(out, run))
    return run


def this_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def output_notebook(run: Path, notebook: Path, rank: int) -> Path:
    return run / f"{notebook.stem}.ipynb" if rank == 0 else run / "ranks" / f"{notebook.stem}.rank{rank}.ipynb"


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


def _rank_environment(run: Path, rank: int) -> tuple[dict, Path]:
    """Node-local folders for Jupyter's runtime files and IPython's history (a shared home
    folder breaks their sqlite and socket files), and a kernel spec for this interpreter."""
    base = Path(os.environ.get("SLURM_TMPDIR") or tempfile.gettempdir())
    tmp = Path(tempfile.mkdtemp(prefix=f"workshop-{run.name}-rank{rank}-", dir=base))
    spec = tmp / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "workshop (current environment)", "language": "python"}))
    env = dict(os.environ)
    env.update(WORKSHOP_RUN_DIR=str(run), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), IPYTHONDIR=str(tmp / "ipython"),
               JUPYTER_PATH=os.pathsep.join(filter(None, [str(tmp / "jupyter"), os.environ.get("JUPYTER_PATH")])),
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    # A batch run: a line every N training steps in the log, no progress bars (workshop.progress),
    # even when submitted from a JupyterLab kernel whose session variable sbatch passed on.
    env.pop("JPY_SESSION_NAME", None)
    env.setdefault("WORKSHOP_PROGRESS", "log")
    env.setdefault("WORKSHOP_LOG_EVERY", str(DEFAULT_LOG_EVERY))
    return env, tmp


def run_rank(run: Path, notebook: str, papermill_args: list[str]) -> int:
    """Execute the notebook for this rank with papermill; write logs/rank<R>.status.json."""
    rank = this_rank()
    nb = Path(notebook).resolve()
    out = output_notebook(run, nb, rank)
    env, tmp = _rank_environment(run, rank)
    defaults = []
    if not {"-k", "--kernel"} & {a.split("=")[0] for a in papermill_args}:
        defaults += ["-k", KERNEL]
    if "--cwd" not in papermill_args:
        defaults += ["--cwd", str(nb.parent)]
    cmd = [sys.executable, "-m", "papermill", str(nb), str(out), *defaults, "--log-output", "--no-progress-bar", *papermill_args]
    log = run / "logs" / f"rank{rank}.log"
    node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    # SIGUSR1 (the time limit is near) is for the kernel, which installs a handler when it trains
    # with checkpoints (workshop.checkpoint.StopOnSignal); this process and papermill ignore it,
    # and pass the ignoring on, so a notebook without a handler is not killed by it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    stopped = []

    def stop(signum, frame):  # the launcher stops this rank (another rank failed, scancel)
        stopped.append(signal.Signals(signum).name)
        terminate_tree(os.getpid())

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:  # rank 0 also shows its progress in the job's output
            f.write(line)
            f.flush()  # a log to follow (tail -f) while the rank runs
            if rank == 0:
                sys.stdout.write(line)
                sys.stdout.flush()
        rc = proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)
    status = {"rank": rank, "node": node, "returncode": rc, "notebook": str(out), "log": str(log),
              "started": started, "ended": datetime.now().astimezone().isoformat(timespec="seconds"),
              "ended_s": time.time()}
    if stopped:
        status.update(stopped_by=stopped[0], error=f"stopped by {stopped[0]} (another rank failed, or the job was cancelled)")
    if rc != 0:
        status.update(failed_cell(out, log))
        where = f"cell {status['cell']} ({status['error']})" if "cell" in status else "before any cell ran"
        print(f"rank {rank} on {node} failed in {where}: open {out} (log: {log})", file=sys.stderr, flush=True)
    atomic_write_text(run / "logs" / f"rank{rank}.status.json", json.dumps(status, indent=2) + "\n")
    return rc


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first), from /proc: papermill and its kernel, which
    runs in a session of its own and is out of reach of a signal to a process group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # the name, in parentheses, may hold spaces
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def terminate_tree(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM every process below `pid`, then SIGKILL what is left after `grace_s`."""
    procs = descendants(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(_alive(p) for p in procs):
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def forward_signal(pid: int, signum: int = signal.SIGUSR1) -> int:
    """Send `signum` to every process below `pid` (the local launcher's ranks, their papermill and
    kernels); how many got it."""
    n = 0
    for p in descendants(pid):
        try:
            os.kill(p, signum)
            n += 1
        except ProcessLookupError:
            pass
    return n


INTERRUPTED = 3  # collect's exit status for a run stopped at a checkpoint: resume it


def collect(run: Path, launcher_rc: int, interrupted: str | None = None) -> int:
    """Summarise the ranks of a run; non-zero when any failed or did not report. `interrupted`
    (the reason) marks a run asked to stop (SIGUSR1): its record says so, and how to resume."""
    meta = json.loads((run / "run.json").read_text())
    record = run / "record.json"
    if interrupted and launcher_rc != 0:
        saved = [st for st in _statuses(run, meta["nranks"]) if "Interrupted" in st.get("error", "")]
        slurm = bool(os.environ.get("SLURM_JOB_ID"))
        how = "sbatch [options] scripts/run_notebook.sh" if slurm else f"scripts/run_notebook.sh --nproc {meta['nranks']}"
        args = " ".join(meta["papermill_args"])
        by_hand = f"resume with: {how} --resume {run} {display_path(meta['notebook'])} {args}".rstrip()
        resume = ("the job requeues itself and resumes here" if slurm and interrupted.startswith("SIGUSR1") else by_hand)
        reason = [f"{interrupted}: " + (saved[0]["error"] if saved else "the ranks stopped without a checkpoint"), resume]
        atomic_write_text(record, json.dumps({"notebook": Path(meta["notebook"]).stem, "status": "interrupted",
                                              "reason": reason, "checkpointed": bool(saved), "params": {},
                                              "slurm_job_id": meta["slurm_job_id"], "run": meta}, indent=2) + "\n")
        print(f"\nRUN INTERRUPTED: {run}", file=sys.stderr)
        for line in reason:
            print(f"  {line}", file=sys.stderr)
        return INTERRUPTED
    problems, failed = [], []
    for rank in range(meta["nranks"]):
        path = run / "logs" / f"rank{rank}.status.json"
        if not path.exists():
            log = run / "logs" / f"rank{rank}.log"
            problems.append(f"rank {rank} did not finish (killed, or stopped when another rank failed): see {log}")
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
    if problems and not record.exists():  # a failed run is recorded as failed, never dropped
        atomic_write_text(record, json.dumps({"notebook": Path(meta["notebook"]).stem, "status": "failed",
                                              "reason": problems, "params": {}, "slurm_job_id": meta["slurm_job_id"],
                                              "run": meta}, indent=2) + "\n")
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


def _statuses(run: Path, nranks: int) -> list[dict]:
    found = []
    for rank in range(nranks):
        try:
            found.append(json.loads((run / "logs" / f"rank{rank}.status.json").read_text()))
        except (OSError, ValueError):
            pass
    return found


def declared_ranks(notebook: Path) -> int:
    """How many local ranks `make run` gives a notebook: its metadata's workshop.ranks, else 1."""
    meta = json.loads(notebook.read_text()).get("metadata", {})
    return int(meta.get("workshop", {}).get("ranks", 1))


REPORT_NOTEBOOK = "09_scaling_report"  # run last by `series`, over the runs the series made


def series(notebooks: list[Path]) -> int:
    """Run the notebooks in order, each as its declared number of local ranks, through
    scripts/run_notebook.sh, all into one folder of this series (runs/<time>-series/); the scaling
    report (notebook 09), when among them, runs last over that folder. Then list each one's run
    folder and say where the report is. Non-zero if any failed."""
    script = REPO / "scripts" / "run_notebook.sh"
    root = new_run_dir(Path("series"))  # runs/<time>-series: every run of this series under it
    env = dict(os.environ, WORKSHOP_PYTHON=sys.executable, WORKSHOP_RUNS=str(root))
    env.pop("SLURM_JOB_ID", None)  # local ranks even inside an allocation
    notebooks = sorted(notebooks, key=lambda nb: nb.stem == REPORT_NOTEBOOK)  # the report after every other
    width = max(len(nb.name) for nb in notebooks) if notebooks else 8
    rows = []
    print(f"running {len(notebooks)} notebooks into {display_path(root)}; what each printed: logs/launcher.log in its run folder")
    for nb in notebooks:
        before = set(root.glob(f"*-{nb.stem}*"))
        nranks = declared_ranks(nb)
        extra = ["-p", "runs", str(root)] if nb.stem == REPORT_NOTEBOOK else []
        print(f"  {nb.name:{width}s}  {nranks} rank(s) ...", end=" ", flush=True)
        start = time.monotonic()
        log = root / f".{nb.stem}.log"  # papermill's cell-by-cell output goes here, not to the terminal
        with open(log, "w") as f:
            rc = subprocess.run(["bash", str(script), "--nproc", str(nranks), str(nb), *extra], env=env, stdout=f,
                                stderr=subprocess.STDOUT).returncode
        made = sorted(set(root.glob(f"*-{nb.stem}*")) - before)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workshop.runner", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", allow_abbrev=False)
    p.add_argument("--nranks", default="1")
    p.add_argument("--resume", default=None)
    p.add_argument("notebook")
    r = sub.add_parser("rank", allow_abbrev=False)
    r.add_argument("run_dir", type=Path)
    r.add_argument("notebook")
    c = sub.add_parser("collect", allow_abbrev=False)
    c.add_argument("run_dir", type=Path)
    c.add_argument("launcher_rc", type=int)
    c.add_argument("--interrupted", default=None)
    f = sub.add_parser("forward-signal", allow_abbrev=False)
    f.add_argument("pid", type=int)
    f.add_argument("signal", default="USR1", nargs="?")
    s = sub.add_parser("series", allow_abbrev=False)
    s.add_argument("notebooks", nargs="*", type=Path)
    args, rest = parser.parse_known_args(argv)
    try:
        if args.step == "prepare":
            print(prepare(args.notebook, args.nranks, rest, resume=args.resume))
            return 0
        if args.step == "forward-signal":
            n = forward_signal(args.pid, getattr(signal, f"SIG{args.signal.removeprefix('SIG')}"))
            return 0 if n else 1
        if args.step == "rank":
            return run_rank(args.run_dir, args.notebook, rest)
        if args.step == "series":
            return series(args.notebooks or sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")))
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return collect(args.run_dir, args.launcher_rc, args.interrupted)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
