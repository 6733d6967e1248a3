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

Then what is wrong with where a process sits (`layout`): the layouts students get wrong on a cluster (one GPU per
task, GPUs split between tasks, more tasks than GPUs or GPUs idle, more nodes than tasks, a rendezvous host that does
not resolve, the loopback across nodes, more threads than CPUs, torchrun's variables half set), each a `Finding` of
one line that names the #SBATCH option or variable to change. Read from the environment, without torch.
"""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Callable, Mapping, NamedTuple

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
    """Expand a SLURM node list ("n[1-2]") with `scontrol show hostnames`; a plain list ("n1,n2") needs no scontrol."""
    if "[" not in nodelist:
        return [name for name in nodelist.split(",") if name]
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


def tasks_per_node(text: str) -> list[int]:
    """SLURM's tasks per node (SLURM_STEP_TASKS_PER_NODE, SLURM_TASKS_PER_NODE) as one count per node, in node
    order: "2(x2),1" -> [2, 2, 1]."""
    counts = []
    for part in text.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts


def master_port_override(environ: Mapping[str, str] | None = None) -> int | None:
    """$WORKSHOP_MASTER_PORT as a port number, None when unset; a value that is not a port is refused."""
    e = os.environ if environ is None else environ
    text = e.get("WORKSHOP_MASTER_PORT") or ""
    if not text:
        return None
    if not text.isdigit() or not 1024 <= int(text) <= 65535:
        raise ValueError(f"WORKSHOP_MASTER_PORT={text}: give the rendezvous port, a whole number from 1024 to 65535 "
                         "(e.g. 29500), or unset it to derive one from the job id")
    return int(text)


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
            local_world_size=tasks_per_node(e.get("SLURM_STEP_TASKS_PER_NODE", str(world_size)))[0],
            node_rank=int(e.get("SLURM_NODEID", 0)),
            nodes=int(e.get("SLURM_STEP_NUM_NODES") or e.get("SLURM_JOB_NUM_NODES") or 0),
            master_addr=e.get("WORKSHOP_MASTER_ADDR") or hostnames(nodelist)[0],
            master_port=master_port_override(e) or slurm_port(job_id, e["SLURM_STEP_ID"]),
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


# --- the layouts students get wrong, each said in one line before training starts -----------------------------------

class Finding(NamedTuple):
    """One mistake in how the ranks were laid out, in one line that names what to change."""

    text: str
    fatal: bool = False  # the run cannot work so: refused before training starts
    gpu: bool = False  # about GPUs: fatal only where the rank has CUDA; on CPU the run goes on


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list ("0,1" -> ["0", "1"]); None when unset (every GPU of the machine shows)."""
    e = os.environ if environ is None else environ
    text = e.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return None
    if text.strip() in ("", "-1", "NoDevFiles"):  # SLURM writes NoDevFiles for a job without GPUs
        return []
    return [g.strip() for g in text.split(",") if g.strip()]


def addresses(host: str) -> list[str]:
    """The addresses `host` resolves to here; OSError (socket.gaierror) where it does not."""
    return list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)))


def _loopback(address: str) -> bool:
    return address.startswith("127.") or address == "::1"


def _some(first: int, last: int) -> str:
    return f"local rank {first}" if first == last else f"local ranks {first} to {last}"


def _torchrun_findings(e: Mapping[str, str]) -> list[Finding]:
    given = [k for k in ("RANK", "WORLD_SIZE") if k in e]
    if len(given) == 1:
        other = "WORLD_SIZE" if given == ["RANK"] else "RANK"
        return [Finding(f"{given[0]}={e[given[0]]} is set but {other} is not: this process runs alone, as rank 0 of 1; "
                        f"unset {given[0]} (does the job script or a .bashrc export it?), or start the ranks with srun "
                        "or torchrun, which set both")]
    found = []
    for name, size in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        if e.get(name, "").isdigit() and e.get(size, "").isdigit() and int(e[name]) >= int(e[size]):
            found.append(Finding(f"{name}={e[name]} but {size}={e[size]}: ranks count from 0 to {int(e[size]) - 1}; "
                                 f"let torchrun set {name} and {size} (the job script or a .bashrc should not)",
                                 fatal=True))
    return found


def gpu_findings(environ: Mapping[str, str], fields: dict, cuda_count: int | None = None,
                 host: str | None = None) -> list[Finding]:
    """One GPU per rank, each rank's own, none idle. SLURM binding a GPU to each task makes cuda:<local rank> wrong
    above local rank 0 (Lightning-AI/pytorch-lightning#16828, pytorch/ignite#3259; DeepSpeed PR#3165 and ignite
    PR#3843 fall back to the first visible GPU, as workshop.dist does), and --gpu-bind=closest gives each task a
    share of several (Lightning-AI/pytorch-lightning#13605). Read from the environment, so the local cluster's
    placeholder GPUs show the same mistakes on CPU. Cheap: no name is resolved, nothing is run."""
    e = environ
    host = host or e.get("SLURMD_NODENAME") or socket.gethostname()
    visible = visible_gpus(e)
    count = len(visible) if visible is not None else (cuda_count or 0)
    how = fields["launcher"]
    if count == 0 or how == "single":  # one process may drive every GPU it sees (nn.DataParallel)
        return []
    on_node = None
    if how == "slurm":
        counts = tasks_per_node(e.get("SLURM_STEP_TASKS_PER_NODE") or str(fields["world_size"]))
        node = int(e.get("SLURM_NODEID", 0))
        tasks = counts[node] if node < len(counts) else counts[0]
        on_node = int(e["SLURM_GPUS_ON_NODE"]) if e.get("SLURM_GPUS_ON_NODE", "").isdigit() else None
        ask = "#SBATCH --ntasks-per-node={n} (or --gpus-per-node={t})"
    else:
        tasks = fields["local_world_size"]
        ask = "torchrun --nproc-per-node {n} (or a node with {t} GPUs)"
    if tasks < 2 and count == 1:
        return []
    shown = f"CUDA_VISIBLE_DEVICES={','.join(visible)}" if visible is not None else f"{count} visible"
    bound = how == "slurm" and ((on_node is not None and count < on_node) or (on_node is None and count == 1))
    if how == "torchrun" and count == 1 and tasks > 1:
        # one GPU each, given by a wrapper (CUDA_VISIBLE_DEVICES=$LOCAL_RANK), or one GPU for all: only a rank above
        # local rank 0 that sees the machine's first GPU tells
        if fields["local_rank"] == 0 or (visible is not None and visible != ["0"]):
            return []
    if bound and count == 1 and tasks > 1:
        return [Finding(f"{host}: each of its {tasks} tasks sees one GPU ({shown} here): SLURM binds a GPU to each "
                        "task (--gpus-per-task=1, --ntasks-per-gpu or --gpu-bind), so "
                        "torch.cuda.set_device(LOCAL_RANK) fails above local rank 0 (workshop.dist takes cuda:0); for "
                        f"ranks that train one model ask for #SBATCH --gpus-per-node={tasks} with "
                        f"--ntasks-per-node={tasks} instead")]
    if bound and tasks > 1:
        return [Finding(f"{host}: each of its {tasks} tasks sees {count} of the node's {on_node} GPUs ({shown} here): "
                        "SLURM split them between the tasks (--gpu-bind=closest, or --gpus-per-task), so cuda:<local "
                        "rank> points past a task's share; drop --gpu-bind and ask for #SBATCH "
                        f"--gpus-per-node={on_node} with --ntasks-per-node={on_node}", fatal=True, gpu=True)]
    if count < tasks:
        return [Finding(f"{host} runs {tasks} tasks but has {count} GPU(s) ({shown}): {_some(count, tasks - 1)} "
                        f"would have none of its own; ask for one task per GPU, {ask.format(n=count, t=tasks)}",
                        fatal=True, gpu=True)]
    if count > tasks:
        idle = count - tasks
        return [Finding(f"{host} runs {tasks} task(s) but has {count} GPUs ({shown}): {idle} sit{'s' * (idle == 1)} "
                        f"idle; ask for one task per GPU, {ask.format(n=count, t=tasks)}")]
    return []


def _node_findings(e: Mapping[str, str], fields: dict) -> list[Finding]:
    """A job of several nodes whose tasks run on fewer: `sbatch --nodes=2` with a script that runs python without
    srun, or a JupyterLab server's job of two nodes."""
    held = e.get("SLURM_JOB_NUM_NODES") or e.get("SLURM_NNODES") or ""
    if not e.get("SLURM_JOB_ID") or fields["launcher"] == "torchrun" or not held.isdigit():
        return []
    used = (fields.get("nodes") or 1) if fields["launcher"] == "slurm" else 1
    if int(held) <= used:
        return []
    idle = int(held) - used
    return [Finding(f"the job holds {held} nodes but its {fields.get('world_size', 1)} task(s) run on {used}: {idle} "
                    f"node{'s sit' if idle > 1 else ' sits'} idle; start tasks on every node with srun (#SBATCH "
                    f"--ntasks-per-node=<GPUs per node>, or 1 without GPUs), or ask for #SBATCH --nodes={used}")]


def _one_machine(names: list[str], resolve: Callable[[str], list[str]]) -> bool:
    """Whether every node name resolves, and only to this machine's loopback (the local cluster's n1 and n2)."""
    try:
        return all(all(_loopback(a) for a in resolve(name)) for name in names)
    except OSError:
        return False


def _network_findings(e: Mapping[str, str], fields: dict, backend: str, host: str,
                      resolve: Callable[[str], list[str]], hostname: Callable[[], str],
                      hostnames: Callable[[str], list[str]]) -> list[Finding]:
    """Ranks on several hosts: the rendezvous host must resolve on each, and neither gloo nor NCCL may listen on the
    loopback (ranks that meet at the store and then hang in the first collective: huggingface/nanotron#115)."""
    if fields["launcher"] == "slurm":
        several = (fields.get("nodes") or 1) > 1
        nodelist = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST") or ""
        named = "WORKSHOP_MASTER_ADDR" if e.get("WORKSHOP_MASTER_ADDR") else f"the first node of {nodelist}"
        fix = ("fix or unset WORKSHOP_MASTER_ADDR" if e.get("WORKSHOP_MASTER_ADDR") else
               f"export WORKSHOP_MASTER_ADDR=<an address of {fields['master_addr']} that every node resolves> in the "
               f"job script, or leave the node out (#SBATCH --exclude={fields['master_addr']})")
    elif fields["launcher"] == "torchrun":
        several, nodelist = fields["world_size"] > fields["local_world_size"], ""
        named, fix = "MASTER_ADDR", "give torchrun --master-addr an address that every node resolves"
    else:
        return []
    if not several:
        return []
    addr = fields["master_addr"]
    try:
        resolve(addr)
    except OSError as err:
        return [Finding(f"{host}: the rendezvous host {addr} ({named}) does not resolve here, so no rank here can "
                        f"reach it; {fix} (the resolver said: {getattr(err, 'strerror', None) or err})", fatal=True)]
    if _one_machine(hostnames(nodelist) if fields["launcher"] == "slurm" else [addr], resolve):
        return []  # the nodes are names of this one machine (the local cluster): the loopback reaches them all
    others = ", ".join(n for _, n in socket.if_nameindex() if not n.startswith("lo")) or "none but the loopback"
    findings = []
    if backend == "gloo":
        why = None
        if e.get("GLOO_SOCKET_IFNAME"):
            if all(n.strip().startswith("lo") for n in e["GLOO_SOCKET_IFNAME"].split(",")):
                why = f"GLOO_SOCKET_IFNAME={e['GLOO_SOCKET_IFNAME']}"
        else:
            try:
                mine = resolve(hostname())
            except OSError:
                mine = []
            if mine and all(_loopback(a) for a in mine):  # gloo listens where the host's name resolves
                why = f"this host's name {hostname()} resolves to {mine[0]}"
        if why:
            findings.append(Finding(f"{host}: gloo would listen on the loopback ({why}) while the ranks sit on several "
                                    "nodes, which cannot reach it: the first collective would hang; export "
                                    "GLOO_SOCKET_IFNAME=<the interface between the nodes> in the job script (this host "
                                    f"has {others})", fatal=True))
    nccl = e.get("NCCL_SOCKET_IFNAME", "")
    if backend == "nccl" and nccl and not nccl.startswith("^") and all(
            n.strip().lstrip("=").startswith("lo") for n in nccl.split(",")):
        findings.append(Finding(f"{host}: NCCL_SOCKET_IFNAME={nccl} names the loopback while the ranks sit on several "
                                "nodes, which cannot reach it: NCCL would hang; set it to the interface between the "
                                "nodes in the job script, or unset it to let NCCL choose (this host has "
                                f"{others})", fatal=True))
    return findings


def _thread_findings(e: Mapping[str, str], host: str, cpus: int) -> list[Finding]:
    first = e.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if not first.isdigit() or int(first) <= cpus:
        return []
    return [Finding(f"{host}: OMP_NUM_THREADS={first} is more threads than this task has CPUs: they would take turns, "
                    "slower, not faster; export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK in the job script, or ask for "
                    f"#SBATCH --cpus-per-task={first} (this task may use {cpus})")]


def layout(environ: Mapping[str, str] | None = None, fields: dict | None = None, cuda_count: int | None = None,
           backend: str | None = None, hostnames: Callable[[str], list[str]] = slurm_hostnames,
           resolve: Callable[[str], list[str]] = addresses, hostname: Callable[[], str] = socket.gethostname,
           cpus: int | None = None) -> list[Finding]:
    """What is wrong with where this process sits, before it joins the others: one Finding per mistake, each a line
    that names the #SBATCH option (or the variable) to change. `fields` is `world(environ)` where the caller has it;
    `cuda_count` the GPUs torch sees (None: CUDA_VISIBLE_DEVICES alone); `backend` the one the group will use (None:
    nccl where GPUs show, else gloo). workshop.dist says these on every rank; the doctor and
    `python -m workshop.launch.preflight` too."""
    e = os.environ if environ is None else environ
    found = _torchrun_findings(e)
    if any(f.fatal for f in found):
        return found
    fields = fields or world(e, hostnames)
    host = e.get("SLURMD_NODENAME") or hostname()
    gpus = visible_gpus(e)
    if backend is None:
        backend = e.get("WORKSHOP_BACKEND") or ("nccl" if (len(gpus) if gpus is not None else cuda_count) else "gloo")
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    return (found + gpu_findings(e, fields, cuda_count, host) + _node_findings(e, fields)
            + _network_findings(e, fields, backend, host, resolve, hostname, hostnames)
            + _thread_findings(e, host, cpus))


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
