"""The ranks of a launched run: how they start (`start`: srun, torchrun or one process), what each one does
(`run_rank`: papermill in a node-local environment, its kernel on Unix sockets, its log and how it ended), and how
signals reach them (`Signals`, `forward_signal`, `terminate_tree`): SIGUSR1 (the time limit is near) for every
kernel, SIGTERM and SIGINT to stop them, papermill's kernel included, which runs in a session of its own."""

from __future__ import annotations

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

import psutil
import yaml

from workshop.base import world
from workshop.base.progress import DEFAULT_LOG_EVERY
from workshop.base.runs import atomic_write_text
from workshop.launch.rundir import failed_cell, output_notebook, rank_log, read_meta, started_path, status_path

KERNEL = "workshop-current"  # a kernel spec written per rank: always this interpreter
# Longest Unix socket path: sun_path holds 108 bytes on Linux, 104 on macOS
MAX_SOCKET_PATH = 100


def _ignore_usr1() -> None:  # in each rank, before it runs: only a kernel that trains with checkpoints reacts
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def start(run: Path, nranks: int, srun: bool) -> subprocess.Popen:
    """Start the run's `nranks` ranks, each running `python -m workshop.launch.runner rank RUN_DIR`: as the tasks
    of an srun step (`srun`: inside a SLURM job), as local ranks under torchrun, or as this one process's child."""
    rank = [sys.executable, "-m", "workshop.launch.runner", "rank", str(run)]
    env = None  # this process's
    if srun:  # --kill-on-bad-exit: when one rank fails the others are stopped instead of waiting forever;
        # each task ignores USR1 from its first instruction (scancel signals every process of a step)
        cmd = ["srun", "--kill-on-bad-exit=1", f"--ntasks={nranks}", "bash", "-c", 'trap "" USR1; exec "$@"', "rank", *rank]
    elif nranks == 1:
        cmd = rank
    else:
        # this process's environment, not local_ranks' own: inside a SLURM allocation (salloc, then --nproc) the
        # ranks keep the job's variables (SLURM_TMPDIR for their runtime files, SLURM_CPUS_PER_TASK for their
        # threads, SLURM_JOB_ID for their records), and torchrun's RANK and WORLD_SIZE win over them (base.world)
        cmd, _ = world.local_ranks(nranks, *rank, run="program")
    return subprocess.Popen(cmd, env=env, preexec_fn=_ignore_usr1)


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
        per_node = world.tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", "1"))
        node = int(environ.get("SLURM_NODEID", 0))
        tasks = per_node[node] if node < len(per_node) else per_node[0]
    return str(max(1, int(cpus) // tasks))


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

    # papermill reads notebooks with nbformat, which imports jsonschema, whose format checkers import
    # rfc3987_syntax if it is installed (nbformat's jsonschema[format-nongpl] installs it): it builds some 35 Lark
    # parsers at import, 2 of the 2.5 CPU-seconds that importing papermill takes, in every rank
    # (python-jsonschema/jsonschema#1428). Only the "iri" formats use it, and no notebook schema has them; without
    # it jsonschema leaves them unchecked. This process only executes the rank's notebook.
    sys.modules.setdefault("rfc3987_syntax", None)
    import papermill
    from traitlets.config import Config

    meta = read_meta(run)
    nb = Path(meta["notebook"])
    parameters = yaml.safe_load((run / "parameters.yaml").read_text()) if meta.get("parameters") else None
    config = Config()
    sockets = kernel_sockets(tmp)
    if sockets:
        config.KernelManager.transport, config.KernelManager.ip = "ipc", sockets
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill's --log-output
    papermill.execute_notebook(str(nb), str(output_notebook(run, nb, world.rank())), parameters=parameters,
                               kernel_name=meta.get("kernel") or KERNEL, cwd=meta.get("cwd") or str(nb.parent),
                               log_output=True, progress_bar=False, config=config)
    return 0


def run_rank(run: Path) -> int:
    """Execute the run's notebook for this rank with papermill; write logs/rank<R>.status.json."""
    rank = world.rank()
    nb = Path(read_meta(run)["notebook"])
    out = output_notebook(run, nb, rank)
    env, tmp = _rank_environment(run, rank)
    cmd = [sys.executable, "-m", "workshop.launch.runner", "execute", str(run), str(tmp)]
    log = rank_log(run, rank)
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
    # Where this rank runs, from its start: a rank killed with its node (SIGKILL, a node that fails) never writes
    # how it ended, and `rundir.collect` names the node whose every rank left only this file
    atomic_write_text(started_path(run, rank), json.dumps({"rank": rank, "node": node, "started": started}) + "\n")
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
        where = f"in cell {status['cell']} ({status['error']})" if "cell" in status else "before any cell ran"
        print(f"rank {rank} on {node} failed {where}: open {out} (log: {log})", file=sys.stderr, flush=True)
    atomic_write_text(status_path(run, rank), json.dumps(status, indent=2) + "\n")
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
