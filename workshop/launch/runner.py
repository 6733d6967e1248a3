"""One notebook as N ranks: the launcher behind `scripts/run_notebook.sh` and `make run`.

    python -m workshop.launch.runner [--nproc N] [--resume RUN_DIR] NOTEBOOK [-p NAME VALUE ...]   # scripts/run_notebook.sh
    python -m workshop.launch.runner series [NOTEBOOK ...]       # `make run`: every notebook, then the report
    python -m workshop.launch.runner rank RUN_DIR                # one rank; srun or torchrun starts it once per rank
    python -m workshop.launch.runner execute RUN_DIR RANK_DIR    # the rank's papermill, its kernel on Unix sockets

A run, step by step (`launch`):

1. `prepare` refuses bad input before anything runs (a missing notebook, a parameter the notebook does not
   have or a value its rules refuse, a bad rank count) and makes a run folder that no other run writes to:
   run.json (what runs, on how many ranks, with which parameters) and parameters.yaml (what papermill reads).
2. The ranks start: srun under SLURM (one rank per task, across nodes), torchrun for --nproc N > 1, else
   one process. Each runs `rank`: papermill (`execute`), with Jupyter's runtime files, IPython's history
   and the kernel's sockets in node-local temporary folders, and progress as log lines, not bars.
3. Signals: SIGUSR1 (the time limit is near) reaches every rank, whose kernel saves a checkpoint and stops;
   SIGTERM (scancel) and SIGINT (Ctrl-C) stop the ranks. The run is then recorded as interrupted.
4. `collect` says which rank failed, in which cell, and which notebook to open; a SLURM job interrupted
   by SIGUSR1 requeues itself and resumes in the same folder.

This module imports no torch: a bad input is refused in a fraction of a second.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil
import yaml

from workshop.base import params, progress, records, world
from workshop.base.progress import DEFAULT_LOG_EVERY
from workshop.base.runs import REPO, RunError, atomic_write_text, display_path, new_run_dir, runs_root

KERNEL = "workshop-current"  # a kernel spec written per rank: always this interpreter
INTERRUPTED = 3  # the exit status of a run stopped at a checkpoint (or by a signal): resume it
USAGE = ("usage: scripts/run_notebook.sh [--nproc N] [--resume RUN_DIR] NOTEBOOK [papermill options]   "
         "(or: sbatch [options] scripts/run_notebook.sh NOTEBOOK ...)")


def cli_value(text: str):
    """A -p value as papermill's command line reads it: True/False/None, an int, a float, else the string."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _options_parser() -> argparse.ArgumentParser:
    """The papermill options that a run takes, as papermill's own command line spells them."""
    p = argparse.ArgumentParser(prog="scripts/run_notebook.sh NOTEBOOK", add_help=False, allow_abbrev=False,
                                exit_on_error=False)
    p.add_argument("-p", "--parameters", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    p.add_argument("-r", "--parameters_raw", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    p.add_argument("-f", "--parameters_file", action="append", default=[])
    p.add_argument("-y", "--parameters_yaml", action="append", default=[])
    p.add_argument("-b", "--parameters_base64", action="append", default=[])
    p.add_argument("-k", "--kernel", default=None)
    p.add_argument("--cwd", default=None)
    return p


def _yaml_mapping(text: str, where: str) -> dict:
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise RunError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise RunError(f"{where} must give a mapping of parameter names to values")
    return loaded


def parse_options(papermill_args: list[str]) -> tuple[dict, dict]:
    """The parameters that papermill options set, with their values as papermill would pass them
    (files, then YAML, then -p, then -r, as papermill merges them), and the other options (kernel, cwd)."""
    try:
        opts, rest = _options_parser().parse_known_args(papermill_args)
    except argparse.ArgumentError as err:
        raise RunError(f"{err} (e.g. -p epochs 1 -f params.yaml; scripts/run_notebook.sh --help)") from None
    if rest:
        raise RunError(f"unknown option or stray value {' '.join(rest)!r}: a run takes -p NAME VALUE, -r NAME VALUE, "
                       "-f FILE.yaml, -y YAML, -b BASE64, -k KERNEL and --cwd DIR after the notebook")
    import base64
    import binascii

    values: dict = {}
    for text in opts.parameters_base64:
        try:
            values.update(_yaml_mapping(base64.b64decode(text).decode(), "-b"))
        except (binascii.Error, UnicodeDecodeError):
            raise RunError("-b: not base64-encoded YAML") from None
    for name in opts.parameters_file:
        path = Path(name)
        if not path.is_file():
            raise RunError(f"parameters file {path} does not exist")
        values.update(_yaml_mapping(path.read_text(), f"-f {name}"))
    for text in opts.parameters_yaml:
        values.update(_yaml_mapping(text, f"-y {text}"))
    values.update({name: cli_value(value) for name, value in opts.parameters})
    values.update(dict(opts.parameters_raw))
    return values, {"kernel": opts.kernel, "cwd": opts.cwd}


def parameter_values(papermill_args: list[str]) -> dict:
    """The parameters that papermill options set, by name."""
    return parse_options(papermill_args)[0]


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


def check_notebook(notebook: Path, papermill_args: list[str]) -> dict:
    """Raise RunError unless the notebook exists, has every parameter the options set, and the values
    keep its rules; the parameters' values, by name."""
    if not notebook.is_file():
        raise RunError(f"notebook {notebook} does not exist (notebooks are under notebooks/, e.g. notebooks/01_baseline.ipynb)")
    if notebook.suffix != ".ipynb":
        raise RunError(f"{notebook} is not a notebook (.ipynb)")
    if not os.access(notebook, os.R_OK):
        raise RunError(f"notebook {notebook} cannot be read (permission denied): check its permissions "
                       "(ls -l) or copy it somewhere you can read")
    try:
        cells = json.loads(notebook.read_text()).get("cells")
        known = params.inspect(notebook)
    except (ValueError, AttributeError, UnicodeDecodeError, SyntaxError) as err:
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
    return given


def gpu_present() -> bool:
    """Whether this machine shows a GPU to this process, without importing torch (seconds to import):
    the NVIDIA driver lists one, and CUDA_VISIBLE_DEVICES does not hide them all."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def check_environment(given: dict, papermill_args: list[str]) -> None:
    """Refuse, before anything runs, what cannot work on this machine: GPU-sized parameters
    (notebooks/params/) or NCCL without a GPU, and a data set asked for by name but not staged."""
    params_dir = (REPO / "notebooks" / "params").resolve()
    for i, opt in enumerate(papermill_args[:-1]):
        if opt in ("-f", "--parameters_file") and Path(papermill_args[i + 1]).resolve().parent == params_dir:
            if os.environ.get("WORKSHOP_ALLOW_CPU") != "1" and not gpu_present():
                raise RunError(f"{papermill_args[i + 1]} holds GPU-sized parameters and this machine has no GPU: drop "
                               "-f to run the CPU defaults, or submit to a GPU partition (sbatch --gpus-per-node=1 ...); "
                               "WORKSHOP_ALLOW_CPU=1 runs them on CPU anyway")
    backend = os.environ.get("WORKSHOP_BACKEND", "")
    if backend and backend not in ("nccl", "gloo"):
        raise RunError(f"WORKSHOP_BACKEND={backend}: use nccl (GPUs) or gloo (CPU), or unset it to let the device decide")
    if backend == "nccl" and not gpu_present():
        raise RunError("WORKSHOP_BACKEND=nccl but this machine has no GPU: NCCL needs CUDA; unset WORKSHOP_BACKEND "
                       "(gloo is used on CPU) or run on a GPU node")
    try:  # what the kernels would refuse only once they run
        world.timeout_s()
        progress.log_every()
        progress.is_interactive()
    except ValueError as err:
        raise RunError(str(err)) from None
    dataset = given.get("dataset")
    if isinstance(dataset, str) and dataset not in ("auto", "synthetic"):  # staged data: torch only on this path
        from workshop.data import check_cifar10, check_image_folder, data_root

        try:
            if dataset == "cifar10":
                check_cifar10()
            elif dataset == "imagefolder" or (data_root() / dataset).is_dir():
                check_image_folder(data_root() if dataset == "imagefolder" else data_root() / dataset)
        except (FileNotFoundError, ValueError) as err:
            raise RunError(str(err)) from None


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
        if records.status(run) != "ok":  # interrupted, failed, or killed before it could write a record (a node failed)
            return run
    return None


def reuse_run_dir(run: Path, notebook: Path, papermill_args: list[str], nranks: int | None = None) -> Path:
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
    meta["resumed"] = datetime.now().astimezone().isoformat(timespec="seconds")
    meta["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")
    atomic_write_text(run / "run.json", json.dumps(meta, indent=2) + "\n")
    return run


def prepare(notebook: str, nranks: str, papermill_args: list[str], resume: str | None = None) -> Path:
    """Check everything, then make (or, to resume, reuse) the run folder: run.json and parameters.yaml."""
    if not str(nranks).isdigit() or int(nranks) < 1:
        raise RunError(f"the number of ranks must be a positive integer, got {nranks!r} (e.g. --nproc 2)")
    nb = Path(notebook).resolve()
    given = check_notebook(nb, papermill_args)
    options = parse_options(papermill_args)[1]
    again = Path(resume) if resume else requeued_run(nb)
    if again is not None:
        if not again.is_dir():
            raise RunError(f"--resume {resume}: no such run folder (runs are under {display_path(runs_root())})")
        run = reuse_run_dir(again, nb, papermill_args, int(nranks))
        meta = json.loads((run / "run.json").read_text())
    else:
        run = new_run_dir(nb.stem)
        meta = {"notebook": str(nb), "nranks": int(nranks), "papermill_args": papermill_args,
                "started": datetime.now().astimezone().isoformat(timespec="seconds"),
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
    atomic_write_text(run / "run.json", json.dumps(meta, indent=2, default=str) + "\n")
    # A record from the start: the notebook replaces it, `collect` settles it. A run killed with SIGKILL
    # (out of memory, a failed node) keeps this one, and the report lists it as incomplete.
    write_record(run, meta, RUNNING, [f"started {meta.get('resumed') or meta['started']} on {socket.gethostname()} "
                                      f"(launcher pid {os.getpid()}); no final status yet"])
    return run


RUNNING = "running"  # the status of a record until the run ends


def write_record(run: Path, meta: dict, status: str, reason: list[str], **extra) -> None:
    """The launcher's own record.json (when the notebook wrote none, or could not)."""
    records.write(run, records.Record(
        notebook=Path(meta["notebook"]).stem, status=status, reason=reason, params=meta.get("parameters", {}),
        slurm_job_id=meta["slurm_job_id"],
        extra={**extra, "run": meta, "launcher": {"host": socket.gethostname(), "pid": os.getpid()}}))


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
    tmp = Path(tempfile.mkdtemp(prefix=f"wk-rank{rank}-", dir=base))  # short: the kernel's sockets live in it
    spec = tmp / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "workshop (current environment)", "language": "python"}))
    env = dict(os.environ)
    env.update(WORKSHOP_RUN_DIR=str(run), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), IPYTHONDIR=str(tmp / "ipython"),
               JUPYTER_PATH=os.pathsep.join(filter(None, [str(tmp / "jupyter"), os.environ.get("JUPYTER_PATH")])),
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    # A batch run: a line every N training steps in the log, no progress bars (workshop.base.progress),
    # even when submitted from a JupyterLab kernel whose session variable sbatch passed on.
    env.pop("JPY_SESSION_NAME", None)
    env.setdefault("WORKSHOP_PROGRESS", "log")
    env.setdefault("WORKSHOP_LOG_EVERY", str(DEFAULT_LOG_EVERY))
    threads = slurm_threads(env)
    if threads:
        env["OMP_NUM_THREADS"] = threads
    return env, tmp


def slurm_threads(environ) -> str | None:
    """OMP_NUM_THREADS for a SLURM task that has none: its --cpus-per-task, else its share of the
    CPUs the job holds on this node. torch starts one intra-op thread per core of the machine in
    every process, so tasks sharing a node would otherwise run several times its cores' threads
    and spin against each other (measured: 4 tasks of notebook 03 on the local cluster's 2 cores,
    each 20 times slower than alone). torchrun sets OMP_NUM_THREADS=1 for 2 or more ranks itself."""
    if environ.get("OMP_NUM_THREADS") or not environ.get("SLURM_JOB_ID"):
        return None
    if environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return environ["SLURM_CPUS_PER_TASK"]
    cpus = environ.get("SLURM_CPUS_ON_NODE", "")
    if not cpus.isdigit():
        return None
    tasks = 1  # the batch step (a one-task job, an array task) runs one task on its node
    if environ.get("SLURM_STEP_ID", "").isdigit():  # an srun step: "2(x2),1" tasks on its nodes
        per_node = []
        for part in environ.get("SLURM_STEP_TASKS_PER_NODE", "1").split(","):
            count, _, repeat = part.partition("(x")
            per_node += [int(count)] * int(repeat.rstrip(")") or 1)
        node = int(environ.get("SLURM_NODEID", 0))
        tasks = per_node[node] if node < len(per_node) else per_node[0]
    return str(max(1, int(cpus) // tasks))


# Longest Unix socket path: sun_path holds 108 bytes on Linux, 104 on macOS
MAX_SOCKET_PATH = 100


def kernel_sockets(tmp: Path) -> str | None:
    """Where the rank's kernel puts its five ZeroMQ sockets (KernelManager.ip of the "ipc" transport), or None
    for TCP on localhost where ZeroMQ has no Unix sockets or the path would be too long for one.

    Over TCP, jupyter_client picks free ports by binding and releasing them, and the kernel binds them a moment
    later; a process starting at the same time (another rank's kernel, a rendezvous store) can take one in
    between, and the kernel dies before any cell ran: "ZMQError: Address already in use", then "Kernel died
    before replying to kernel_info" (jupyter/jupyter_client#154, nteract/papermill#511; met when two ranks
    start together on one machine). Sockets in the rank's own folder cannot collide."""
    import zmq

    path = str(tmp / "kernel")
    return path if zmq.has("ipc") and len(path) + len("-65535") <= MAX_SOCKET_PATH else None


def execute(run: Path, tmp: Path) -> int:
    """Execute the run's notebook for this rank with papermill (its Python API: the parameters as data), the
    kernel on Unix sockets in the rank's folder `tmp` (`kernel_sockets`), the cells' output as log lines.
    A failing cell raises papermill's error, whose traceback ends the rank's log."""
    import logging

    import papermill
    from traitlets.config import Config

    meta = json.loads((run / "run.json").read_text())
    nb = Path(meta["notebook"])
    parameters = yaml.safe_load((run / "parameters.yaml").read_text()) if meta.get("parameters") else None
    config = Config()
    sockets = kernel_sockets(tmp)
    if sockets:
        config.KernelManager.transport, config.KernelManager.ip = "ipc", sockets
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill's --log-output
    papermill.execute_notebook(str(nb), str(output_notebook(run, nb, this_rank())), parameters=parameters,
                               kernel_name=meta.get("kernel") or KERNEL, cwd=meta.get("cwd") or str(nb.parent),
                               log_output=True, progress_bar=False, config=config)
    return 0


def run_rank(run: Path) -> int:
    """Execute the run's notebook for this rank with papermill; write logs/rank<R>.status.json."""
    rank = this_rank()
    meta = json.loads((run / "run.json").read_text())
    nb = Path(meta["notebook"])
    out = output_notebook(run, nb, rank)
    env, tmp = _rank_environment(run, rank)
    cmd = [sys.executable, "-m", "workshop.launch.runner", "execute", str(run), str(tmp)]
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


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below `pid`: papermill and its kernel, which runs in a session of its own and is
    out of reach of a signal to a process group."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def terminate_tree(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM every process below `pid`, then SIGKILL what is left after `grace_s`."""
    procs = descendants(pid)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    # polled, not psutil.wait_procs: that reaps a child of this process (waitpid), and its Popen would
    # then read the exit status 0 of a process that was killed
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.1)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def forward_signal(pid: int, signum: int = signal.SIGUSR1) -> int:
    """Send `signum` to every process below `pid` (the local launcher's ranks, their papermill and
    kernels); how many got it."""
    n = 0
    for p in descendants(pid):
        try:
            p.send_signal(signum)
            n += 1
        except psutil.NoSuchProcess:
            pass
    return n


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
        write_record(run, meta, "interrupted", reason, checkpointed=bool(saved))
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


REPORT_NOTEBOOK = "12_scaling_report"  # run last by `series`, over the runs the series made


def series(notebooks: list[Path]) -> int:
    """Run the notebooks in order, each as its declared number of local ranks, all into one folder
    of this series (runs/<time>-series/); the scaling report (notebook 12), when among them, runs
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
        before = set(root.glob(f"*-{nb.stem}*"))
        nranks = declared_ranks(nb)
        extra = ["-p", "runs", str(root)] if nb.stem == REPORT_NOTEBOOK else []
        print(f"  {nb.name:{width}s}  {nranks} rank(s) ...", end=" ", flush=True)
        start = time.monotonic()
        log = root / f".{nb.stem}.log"  # papermill's cell-by-cell output goes here, not to the terminal
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-m", "workshop.launch.runner", "--nproc", str(nranks), str(nb), *extra],
                                env=env, stdout=f, stderr=subprocess.STDOUT).returncode
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


def check_local_ranks(nranks: str) -> None:
    """Local ranks share this machine's cores: refuse more than twice the cores this process may use (its
    CPU set, which SLURM narrows to the job's), where every rank would crawl and gloo's timeouts fire."""
    cores = len(os.sched_getaffinity(0))
    if str(nranks).isdigit() and int(nranks) > max(2 * cores, 1):
        raise RunError(f"--nproc {nranks}: too many local ranks for this machine ({cores} core(s) for this process; at "
                       f"most {2 * cores}, twice the cores, run here): use fewer, or submit to SLURM for more "
                       f"(sbatch --ntasks={nranks} scripts/run_notebook.sh ...)")


def parse_launch(argv: list[str]) -> tuple[str | None, str | None, str, list[str]]:
    """--nproc N and --resume RUN_DIR (before the notebook), the notebook, then papermill's options."""
    nproc = resume = None
    argv = list(argv)
    while argv and argv[0].startswith("--"):
        opt, _, inline = argv.pop(0).partition("=")
        if opt not in ("--nproc", "--resume"):
            raise RunError(f"unknown option {opt}: before the notebook come --nproc N and --resume RUN_DIR\n{USAGE}")
        if not inline and not argv:
            raise RunError("--nproc needs a number" if opt == "--nproc" else "--resume needs a run folder")
        value = inline or argv.pop(0)
        nproc, resume = (value, resume) if opt == "--nproc" else (nproc, value)
    if not argv:
        raise RunError(f"no notebook given\n{USAGE}")
    return nproc, resume, argv[0], argv[1:]


class Signals:
    """What the launcher does with the signals it may get while the ranks run. SIGUSR1 may come at any
    moment, even before the ranks start: it is remembered until they run."""

    def __init__(self):
        self.interrupted: str | None = None
        self.usr1_early = False
        self.run: Path | None = None
        self.ranks: subprocess.Popen | None = None
        self.srun = False
        signal.signal(signal.SIGUSR1, self._usr1)

    def _usr1(self, signum, frame):
        if self.ranks is None:
            self.usr1_early = True
            return
        self.interrupted = f"SIGUSR1 at {datetime.now():%H:%M:%S} (the time limit is near)"
        print(f"{self.interrupted}: asking the ranks to save a checkpoint and stop", file=sys.stderr, flush=True)
        (self.run / "stop.requested").touch()  # seen by a kernel that starts later, or missed the signal
        if self.srun:  # every process of the job's steps, on every node; not this batch process
            subprocess.run(["scancel", "--signal=USR1", os.environ["SLURM_JOB_ID"]], check=False)
        else:
            forward_signal(self.ranks.pid, signal.SIGUSR1)

    def _stop(self, signum, frame):
        why = {signal.SIGTERM: "SIGTERM (cancelled, or the time limit was reached)",
               signal.SIGINT: "SIGINT (stopped by the user, Ctrl-C)"}[signum]
        self.interrupted = self.interrupted or why
        try:
            self.ranks.terminate()
        except (OSError, AttributeError):
            pass

    def watch(self, run: Path, ranks: subprocess.Popen, srun: bool) -> None:
        """From now on the signals act on these ranks (and a SIGUSR1 that came early does now)."""
        self.run, self.ranks, self.srun = run, ranks, srun
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        if self.usr1_early:
            self._usr1(signal.SIGUSR1, None)


def _ignore_usr1() -> None:  # in each rank, before it runs: only a kernel that trains with checkpoints reacts
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def launch(argv: list[str]) -> int:
    """Run one notebook as N ranks (see the module's docstring); the exit status: 0 ok, 1 failed,
    2 refused before anything ran, 3 interrupted (resume it)."""
    signals = Signals()
    nproc, resume, notebook, papermill_args = parse_launch(argv)
    if importlib.util.find_spec("papermill") is None:
        raise RunError(f"{sys.executable} cannot import papermill: activate the workshop environment "
                       "(conda activate workshop, or source .venv/bin/activate), or set WORKSHOP_PYTHON")
    job = os.environ.get("SLURM_JOB_ID")
    srun = bool(job) and nproc is None  # under SLURM (sbatch, salloc) the ranks are the job's tasks
    # sbatch sets no SLURM_NTASKS for --nodes=N alone: one task per node
    nranks = (os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_JOB_NUM_NODES") or "1") if srun else (nproc or "1")
    if not srun:
        check_local_ranks(nranks)
    run = prepare(notebook, nranks, papermill_args, resume=resume)
    restart = os.environ.get("SLURM_RESTART_COUNT")
    print(f"run folder: {run} ({nranks} rank(s) via {'srun' if srun else 'torchrun'}"
          f"{', restart ' + restart if restart else ''})", flush=True)
    rank = [sys.executable, "-m", "workshop.launch.runner", "rank", str(run)]
    if srun:  # --kill-on-bad-exit: when one rank fails the others are stopped instead of waiting forever;
        # each task ignores USR1 from its first instruction (scancel signals every process of a step)
        cmd = ["srun", "--kill-on-bad-exit=1", f"--ntasks={nranks}", "bash", "-c", 'trap "" USR1; exec "$@"', "rank", *rank]
    elif int(nranks) == 1:
        cmd = rank
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", nranks, "--no-python",
               *rank]
    ranks = subprocess.Popen(cmd, preexec_fn=_ignore_usr1)
    signals.watch(run, ranks, srun)
    rc = ranks.wait()
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
            return run_rank(Path(argv[1]))
        if argv[:1] == ["execute"] and len(argv) == 3:
            return execute(Path(argv[1]), Path(argv[2]))
        if argv[:1] == ["series"]:
            notebooks = [Path(a) for a in argv[1:]]
            return series(notebooks or sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")))
        return launch(argv)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
