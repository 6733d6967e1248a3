"""The rule for the world, without torch: which launcher started this process, and where it sits in the world.

`workshop.dist.detect` adds the device to what `world` returns; the launcher (`workshop.launch`), which imports no
torch, asks the same functions, so the two never count ranks differently. The variables a launcher sets are
listed here once (`LAUNCHER_VARIABLES`, `LAUNCHER_PREFIXES`), and so is how long a rank waits for the others.

Read in this order:

1. torchrun: RANK, WORLD_SIZE, LOCAL_RANK (+ MASTER_ADDR, MASTER_PORT) win;
2. a SLURM job *step* started by srun with more than one task: SLURM_STEP_ID, SLURM_PROCID,
   SLURM_STEP_NUM_TASKS, SLURM_LOCALID. MASTER_ADDR is the first host of
   `scontrol show hostnames $SLURM_STEP_NODELIST`, MASTER_PORT is derived from the job id
   (and step id), so two jobs sharing a node do not collide. $WORKSHOP_MASTER_ADDR and
   $WORKSHOP_MASTER_PORT, where set, are taken instead: a rendezvous host chosen on purpose
   (another interface's name, or a wrong one that `python -m workshop.launch.doctor` should catch);
3. otherwise one process. A batch script's own step and a JupyterLab server started as a SLURM
   job carry SLURM variables too, but they are one process, not a world.
"""

from __future__ import annotations

import os
import subprocess
from typing import Callable, Mapping

# What a launcher gives a process. torchrun's own (TORCHELASTIC_USE_AGENT_STORE, for one, tells rank 0 not to open
# the store that its ranks would then wait for) and SLURM's come by prefix; the rest by name.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                      "MASTER_ADDR", "MASTER_PORT", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_NAME",
                      "WORKSHOP_MASTER_ADDR", "WORKSHOP_MASTER_PORT")
LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_")

DEFAULT_TIMEOUT_S = 600.0  # how long a rank waits for a dead peer, unless $WORKSHOP_DIST_TIMEOUT says otherwise

# Ports derived from a SLURM job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN): below Linux's
# ephemeral range (32768+), so an outgoing connection never holds a rendezvous port.
PORT_BASE = 20000
PORT_SPAN = 12000


def without_launcher(environ: Mapping[str, str] | None = None) -> dict:
    """A copy of the environment with no launcher variable: a child that starts a world of its own."""
    e = os.environ if environ is None else environ
    return {k: v for k, v in e.items() if k not in LAUNCHER_VARIABLES and not k.startswith(LAUNCHER_PREFIXES)}


def timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """Seconds a rank waits for the others: $WORKSHOP_DIST_TIMEOUT, else DEFAULT_TIMEOUT_S. A value that is not a
    number above 0 is refused with what to set."""
    e = os.environ if environ is None else environ
    text = e.get("WORKSHOP_DIST_TIMEOUT")
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"WORKSHOP_DIST_TIMEOUT={text}: give the seconds a rank waits for the others, a number "
                         f"above 0 (e.g. {DEFAULT_TIMEOUT_S:.0f}), or unset it")
    return value


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list ("n[1-2]") with `scontrol show hostnames`."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(
            f"cannot expand SLURM node list {nodelist!r} with `scontrol show hostnames`: {err}"
        ) from err
    return out.split()


def slurm_port(job_id: str, step_id: str = "0") -> int:
    """A rendezvous port derived from the job (and step) id: the same on every task of a step,
    different for jobs that share a node."""
    step = int(step_id) if step_id.isdigit() else 0
    return PORT_BASE + (int(job_id) * 16 + step) % PORT_SPAN


def _tasks_on_first_node(tasks_per_node: str) -> int:
    # SLURM_STEP_TASKS_PER_NODE looks like "2(x2)" or "2,1"
    return int(tasks_per_node.split(",")[0].split("(")[0])


def launcher(environ: Mapping[str, str] | None = None) -> str:
    """Who started this process: "torchrun", "slurm" (an srun step of several tasks) or "single"."""
    e = os.environ if environ is None else environ
    if "RANK" in e and "WORLD_SIZE" in e:  # torchrun (or any launcher that speaks its language)
        return "torchrun"
    if e.get("SLURM_STEP_ID", "").isdigit() and int(e.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return "slurm"  # an srun step, not the batch or extern step, nor a one-task step
    return "single"


def rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank by the same rule as `world`, read cheaply (no node list expanded)."""
    e = os.environ if environ is None else environ
    how = launcher(e)
    if how == "torchrun":
        return int(e["RANK"])
    return int(e["SLURM_PROCID"]) if how == "slurm" else 0


def world(environ: Mapping[str, str] | None = None,
          hostnames: Callable[[str], list[str]] = slurm_hostnames) -> dict:
    """Where this process sits: rank, local_rank, world_size, local_world_size, node_rank, nodes, master_addr,
    master_port, launcher ("torchrun", "slurm" or "single") and job_id; the fields of workshop.dist.DistEnv but
    the device."""
    e = os.environ if environ is None else environ
    job_id = e.get("SLURM_JOB_ID")
    how = launcher(e)
    if how == "torchrun":
        rank, world_size = int(e["RANK"]), int(e["WORLD_SIZE"])
        fields = dict(
            rank=rank, local_rank=int(e.get("LOCAL_RANK", rank)), world_size=world_size,
            local_world_size=int(e.get("LOCAL_WORLD_SIZE", world_size)),
            node_rank=int(e.get("GROUP_RANK", e.get("NODE_RANK", 0))),
            master_addr=e.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(e.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    elif how == "slurm":
        world_size = int(e["SLURM_STEP_NUM_TASKS"])
        nodelist = e.get("SLURM_STEP_NODELIST") or e["SLURM_JOB_NODELIST"]
        fields = dict(
            rank=int(e["SLURM_PROCID"]), local_rank=int(e.get("SLURM_LOCALID", 0)),
            world_size=world_size,
            local_world_size=_tasks_on_first_node(e.get("SLURM_STEP_TASKS_PER_NODE", str(world_size))),
            node_rank=int(e.get("SLURM_NODEID", 0)),
            nodes=int(e.get("SLURM_STEP_NUM_NODES") or e.get("SLURM_JOB_NUM_NODES") or 0),
            master_addr=e.get("WORKSHOP_MASTER_ADDR") or hostnames(nodelist)[0],
            master_port=int(e.get("WORKSHOP_MASTER_PORT") or slurm_port(job_id, e["SLURM_STEP_ID"])),
            launcher="slurm",
        )
    else:
        fields = dict(launcher="single")
    return dict(fields, job_id=job_id)


def srun_tasks(environ: Mapping[str, str] | None = None) -> int:
    """The tasks a plain `srun` starts inside this allocation (a batch script, salloc): the world its step will have.
    sbatch sets no SLURM_NTASKS for `--nodes=N` alone, and srun then starts one task per node."""
    e = os.environ if environ is None else environ
    return int(e.get("SLURM_NTASKS") or e.get("SLURM_JOB_NUM_NODES") or 1)


def local_ranks(nproc: int, *command: str, run: str = "script", environ: Mapping[str, str] | None = None
                ) -> tuple[list[str], dict]:
    """The command line and environment that start `nproc` ranks of `command` on this machine with torchrun
    (`python -m torch.distributed.run --standalone`): the one way the package and its tests start local ranks.
    `command` is a Python script and its arguments (run="script"), a module and its arguments (run="module", as
    `-m`), or a program run as it is (run="program", torchrun's --no-python). The environment is `environ` (default:
    this process's) without any launcher's variables, so torchrun alone decides this world, even inside a SLURM job
    or another world."""
    import sys

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"the number of local ranks must be an integer of at least 1, got {nproc!r}")
    how = {"script": [], "module": ["-m"], "program": ["--no-python"]}[run]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *how,
           *map(str, command)]
    return cmd, without_launcher(environ)
