"""Who am I in this run? One `DistEnv` from whatever launched the process.

A notebook is an SPMD program: the same cells run as one process (JupyterLab, nbval,
papermill) or as N ranks (`scripts/run_notebook.sh`, one papermill process per rank).
`detect()` reads the launcher's variables by the rule of `workshop.base.world` (torchrun, then an srun
step of several tasks, else one process) and adds the device: `cuda:local_rank` where CUDA is, else the CPU.

    env = dist.init()          # detect, then join the process group (a group of one for one process)
    dist.print0(env)           # only rank 0 prints
    trainer = dist.make_trainer(env, max_epochs=2)   # Lightning sees the same world
    dist.cleanup()

A group made by hand (`torch.distributed.init_process_group(...)`, as notebook 05 shows) is adopted by `init(env)`.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Callable, Mapping
from unittest import mock

import torch

# torch._dynamo before any process group, so here, at import: a group made by hand after `from workshop import dist`
# (init_process_group in a notebook's cell, then adopted by init) comes after it too. Imported after a group exists
# (DistributedDataParallel's constructor imports it, so do FSDP2 and Lightning), it keeps that group alive past
# destroy_process_group: after DDP(...) and cleanup() the gloo worker threads still ran; imported before, they end. A
# group that outlives cleanup() meets interpreter finalization with its worker threads running, and one that then
# drops a finished all-reduce's tensors needs the GIL that finalization refuses it: the rank aborts ("terminate called
# without an active exception"; a core dump of it shows ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> decref ->
# take_gil -> pthread_exit -> std::terminate). The same symptom: pytorch/pytorch#107298.
import torch._dynamo as _dynamo  # noqa: F401  (bound apart: `torch` stays this module's global)
import torch.distributed as tdist

from workshop.base import world
from workshop.base.hardware import device_type


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # "torchrun", "slurm" or "single"
    job_id: str | None = None  # SLURM job id, when there is one
    device: str = "cpu"  # "cuda:<i>" or "cpu"
    backend: str = "gloo"  # "nccl" on CUDA, "gloo" on CPU
    nodes: int = 0  # nodes the launcher reports; 0: world size / ranks per node

    @property
    def device_type(self) -> str:
        """"cuda" or "cpu": what init_device_mesh, autocast and Lightning's accelerator take."""
        return device_type(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        return self.nodes or max(1, self.world_size // self.local_world_size)

    @property
    def even_layout(self) -> bool:
        """The same number of ranks on every node. Not so for `sbatch --ntasks=3` on 2 nodes (2 and 1):
        what counts ranks per node (a hybrid mesh, Lightning's devices x nodes) cannot describe it."""
        return self.world_size % self.local_world_size == 0

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}, "
            f"node {self.node_rank}) on {self.device} with {self.backend}, launched by {self.launcher}"
        )


def _device(local_rank: int, cuda_count: int) -> tuple[str, str]:
    if cuda_count == 0:
        return "cpu", "gloo"
    if cuda_count == 1:  # GPUs bound per task (--gpus-per-task=1): each rank sees one, its own
        return "cuda:0", "nccl"
    return f"cuda:{local_rank}", "nccl"  # a local rank past the GPUs is refused by world.gpu_findings first


def detect(
    environ: Mapping[str, str] | None = None,
    cuda_count: int | None = None,
    hostnames: Callable[[str], list[str]] = world.slurm_hostnames,
) -> DistEnv:
    """The DistEnv of this process: the world by `workshop.base.world`'s rule, and the device (see the module
    docstring)."""
    e = os.environ if environ is None else environ
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    fields = world.world(e, hostnames)
    if cuda_count:  # a rank without a GPU of its own, or GPUs split between tasks: refused here, in one line
        fatal = [f for f in world.gpu_findings(e, fields, cuda_count) if f.fatal]
        if fatal:
            raise RuntimeError(fatal[0].text)
    device, backend = _device(fields.get("local_rank", 0), cuda_count)
    # $WORKSHOP_BACKEND overrides the device's choice: gloo between GPUs, to tell an NCCL problem from one of
    # the program (the launcher refuses other names, and nccl without a GPU, before anything runs)
    backend = e.get("WORKSHOP_BACKEND") or backend
    return DistEnv(**fields, device=device, backend=backend)


_ENV: DistEnv | None = None
_STARTED = time.monotonic()  # when a notebook's setup cell imported this module: the start of its own wall time


def check_layout(env: DistEnv, environ: Mapping[str, str] | None = None, adopting: bool = False) -> list[str]:
    """Say, before this rank joins the others, what is wrong with where it sits (`workshop.base.world.layout`): a
    line on stderr per mistake, naming the #SBATCH option or variable to change. A mistake that cannot work (a
    rendezvous host that does not resolve, gloo on the loopback across nodes, a RANK past WORLD_SIZE) raises
    RuntimeError with its line; a GPU layout that cannot work on GPUs is only said on a rank that runs on CPU (the
    local cluster's placeholder GPUs). Returns the lines said."""
    e = os.environ if environ is None else environ
    fields = {k: v for k, v in env.as_dict().items() if k not in ("device", "backend")}
    cuda_count = torch.cuda.device_count() if env.device_type == "cuda" else 0
    said = []
    for finding in world.layout(e, fields, cuda_count=cuda_count, backend=env.backend):
        if finding.fatal and not adopting and (cuda_count or not finding.gpu):
            raise RuntimeError(finding.text)
        cpu = " (this rank runs on CPU, so it goes on)" if finding.fatal and finding.gpu and not cuda_count else ""
        said.append(f"warning: {finding.text}{cpu}")
        print(said[-1], file=sys.stderr, flush=True)
    return said


def init(env: DistEnv | None = None, timeout_s: float | None = None, check: bool = True) -> DistEnv:
    """Detect the world and join its process group, or adopt the group this process made already.

    One process gets a group of its own (world size 1, no network): collectives and
    DistributedDataParallel then run unchanged and do nothing, so a notebook's cells are the same
    on 1 rank and on N. Safe to call again: a second call returns the same DistEnv and joins
    nothing. The timeout (default $WORKSHOP_DIST_TIMEOUT or 600 s) bounds how long a rank waits
    for a dead peer (a group adopted keeps its own). First the layout is checked (`check_layout`; `check=False`
    leaves that to the caller, as the doctor does): a mistake is said in one line before anything waits.

    A group made by hand (`torch.distributed.init_process_group(...)` with `env`'s rank and world size) is adopted:
    its rank and world size must be `env`'s, its backend is taken, and the rest is as for a group init makes (the
    device set, the launcher variables written, the group left at exit).
    """
    global _ENV
    if _ENV is not None and env is None:
        return _ENV
    env = env or detect()
    if check:
        check_layout(env, adopting=tdist.is_initialized())
    if env.device_type == "cuda":
        torch.cuda.set_device(torch.device(env.device))
    if tdist.is_initialized():
        env = _adopt(env)
    elif env.is_distributed:
        _join_world(env, timeout_s)
    else:
        tdist.init_process_group(backend=env.backend, store=tdist.HashStore(), rank=0, world_size=1)
    if env.is_distributed:
        _write_launcher_variables(env)
    _leave_at_exit()
    _ENV = env
    return env


def timeout(timeout_s: float | None = None) -> datetime.timedelta:
    """How long a rank waits for the others, as init_process_group takes it: `timeout_s`, else
    $WORKSHOP_DIST_TIMEOUT, else `workshop.base.world`'s default."""
    return datetime.timedelta(seconds=world.timeout_s() if timeout_s is None else timeout_s)


def _adopt(env: DistEnv) -> DistEnv:
    """`env` for the group this process made already: what reads `env` (data shards, Lightning's plugin) must see the
    world the group holds."""
    rank, world_size = tdist.get_rank(), tdist.get_world_size()
    if (rank, world_size) != (env.rank, env.world_size):
        raise RuntimeError(
            f"the process group made already is rank {rank} of {world_size}, but the launcher ({env.launcher}) "
            f"started rank {env.rank} of {env.world_size}: make the group with rank=env.rank and "
            "world_size=env.world_size of env = dist.detect()")
    backend = str(tdist.get_backend())
    return env if backend == env.backend else replace(env, backend=backend)


_AT_EXIT = False  # cleanup() registered to run at exit


def _leave_at_exit() -> None:
    # Leave the group while the interpreter is whole. A process that exits with a gloo group alive can abort in C++
    # ("terminate called without an active exception"): the group's worker threads still hold work whose tensors
    # reach into Python during interpreter finalization (pytorch/pytorch#190489; the same fix proposed upstream in
    # pytorch/pytorch#179291). A notebook that failed half-way, or forgot dist.cleanup(), then exits cleanly.
    # Registered once per process; cleanup() is safe to run with no group.
    global _AT_EXIT
    if not _AT_EXIT:
        atexit.register(cleanup)
        _AT_EXIT = True


_WRITTEN: dict[str, str | None] = {}  # the launcher variables init() set, with the values they had before


def _write_launcher_variables(env: DistEnv) -> None:
    # Libraries that read the torchrun variables (device meshes, Lightning) see the same world. cleanup() puts back
    # what was there before, so a later detect() in this process reads the launcher that really started it.
    values = dict(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port), RANK=str(env.rank),
                  WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                  LOCAL_WORLD_SIZE=str(env.local_world_size))
    for key, value in values.items():
        _WRITTEN.setdefault(key, os.environ.get(key))
        os.environ[key] = value


def _join_world(env: DistEnv, timeout_s: float | None) -> None:
    tdist.init_process_group(
        backend=env.backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank, world_size=env.world_size,
        timeout=timeout(timeout_s),
    )


def cleanup() -> None:
    """Leave the process group (if any). Safe to call twice."""
    global _ENV
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
        # A group still held by live objects (a DistributedDataParallel model in a script's globals, Lightning's
        # strategy) outlives destroy_process_group, and its gloo worker threads with it. A worker drops a finished
        # all-reduce (and the Python tensors it holds) just after the collective returns, and needs the GIL to do
        # so; if the interpreter is finalizing by then, the rank aborts (see the import of torch._dynamo). While such
        # threads run, give them the GIL for a moment: a worker that drops a work is already waiting for it.
        if _gloo_threads():
            time.sleep(0.2)
    for key, value in _WRITTEN.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _WRITTEN.clear()
    _ENV = None


def _gloo_threads() -> list[str]:
    """The names of this process's gloo threads (Linux; elsewhere none are seen)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return [n for n in names if "gloo" in n]


def get_env() -> DistEnv:
    """The DistEnv of `init()`, or the detected one when init was not called."""
    return _ENV if _ENV is not None else detect()


def describe(env: DistEnv | None = None) -> str:
    """How this run was produced, for a notebook's first output: ranks, nodes, launcher, device.
    "4 rank(s) on 2 node(s), 2 per node, started by srun (SLURM); cpu, gloo"; "3 rank(s) on 2 node(s),
    unevenly (2 on the first), ..." for sbatch --ntasks=3 on two nodes."""
    env = env or get_env()
    started = {"slurm": "started by srun (SLURM)", "torchrun": "started by torchrun on one machine",
               "single": "one process"}[env.launcher]
    per_node = f", {env.local_world_size} per node" if env.is_distributed else ""
    if not env.even_layout:
        per_node = f", unevenly ({env.local_world_size} on the first)"
    device = env.device_type
    return f"{env.world_size} rank(s) on {env.num_nodes} node(s){per_node}, {started}; {device}, {env.backend}"


def elapsed() -> float:
    """Seconds since this module was imported (a notebook's setup cell): what a notebook took, for its last line."""
    return time.monotonic() - _STARTED


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only: every rank runs every cell, one of them speaks."""
    if get_env().is_main:
        print(*args, **kwargs)


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def global_mean(value: torch.Tensor) -> float:
    """The mean over the ranks of a scalar each rank computed on an equal share of the global batch (a loss): the
    global batch's value, the same on every rank. Every rank must call it."""
    total = value.detach().clone()
    if tdist.is_initialized():
        tdist.all_reduce(total)  # the sum of the ranks' means
    return total.item() / (tdist.get_world_size() if tdist.is_initialized() else 1)


def global_max(value: float) -> float:
    """The largest over the ranks of a number each rank has (a pass ends when its slowest rank does). Every rank must
    call it."""
    largest = torch.tensor(float(value))
    if tdist.is_initialized():
        largest = largest.to(get_env().device)  # NCCL reduces only tensors on the GPU
        tdist.all_reduce(largest, op=tdist.ReduceOp.MAX)
    return largest.item()


def lightning_environment(env: DistEnv):
    """A Lightning ClusterEnvironment that reports exactly `env`: pass it as `L.Trainer(plugins=[...])`. Lightning's
    own SLURM detection would take a papermill kernel under sbatch, or a JupyterLab server started as a SLURM job,
    for a world of its own; this plugin overrules it, and refuses a Trainer whose devices x nodes is another world."""
    from lightning.fabric.plugins.environments import ClusterEnvironment

    class WorkshopEnvironment(ClusterEnvironment):
        """The world as workshop.dist sees it; processes are started outside Lightning."""

        @property
        def creates_processes_externally(self) -> bool:
            return True

        @property
        def main_address(self) -> str:
            return env.master_addr

        @property
        def main_port(self) -> int:
            return env.master_port

        @staticmethod
        def detect() -> bool:
            return True

        def world_size(self) -> int:
            return env.world_size

        def set_world_size(self, size: int) -> None:
            if size != env.world_size:
                raise RuntimeError(f"Lightning asked for world size {size}, the launcher started {env.world_size}")

        def global_rank(self) -> int:
            return env.rank

        def set_global_rank(self, rank: int) -> None:
            pass  # the launcher decided it

        def local_rank(self) -> int:
            return env.local_rank

        def node_rank(self) -> int:
            return env.node_rank

    return WorkshopEnvironment()


_LIGHTNING_QUIET = False


def _quiet_lightning() -> None:
    """Silence, once per process, what Lightning says that is not the lesson: its banner of
    accelerators ("GPU available: False, used: False", "TPU available: ...") and its other
    rank-zero notes (INFO; warnings still show), its hint to use srun (the processes were started
    by srun or torchrun already, and the plugin tells it so), a deprecation inside its own code, a
    validation step left unused on purpose, and its advice to sync epoch metrics (in a world of one
    process there is nothing to sync; with more ranks they are synced). The warning filters go in at every call:
    code that restores the filters it found (`warnings.catch_warnings`, as pytest does around each test) drops them
    again, and Python keeps one copy of a filter added twice."""
    global _LIGHTNING_QUIET
    warnings.filterwarnings("ignore", message=r".*`srun` command is available")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no `val_dataloader`")
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist=True\)`")
    if _LIGHTNING_QUIET:
        return
    _LIGHTNING_QUIET = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def lightning_layout(env: DistEnv) -> tuple[int, int]:
    """(devices, num_nodes) for Lightning's Trainer: ranks per node and nodes. Lightning counts devices per node, the
    same on every node: an uneven layout (3 tasks on 2 nodes) is given to it as one node of world-size devices, the
    same world (the plugin gives every rank its own rank)."""
    return (env.local_world_size, env.num_nodes) if env.even_layout else (env.world_size, 1)


@contextlib.contextmanager
def lightning_in_kernel():
    """Build a Lightning Trainer inside, in a kernel (JupyterLab, papermill) that is one rank of a world started by
    torchrun or srun: there Lightning refuses multi-process strategies, fearing it would have to start the processes
    itself. Each rank is a kernel already, and the plugin (`lightning_environment`) says so: the check does not apply
    while the Trainer is built. No public route exists (checked on Lightning 2.6.6): DDPStrategy always builds a
    launcher that is not "interactive compatible", even when the cluster environment creates the processes itself,
    while ModelParallelStrategy builds none then. The patch lasts only while the Trainer is built; a script needs none
    of it. What Lightning says that does not apply here is silenced (`_quiet_lightning`)."""
    from lightning.pytorch.trainer.connectors import accelerator_connector

    _quiet_lightning()
    with mock.patch.object(accelerator_connector, "_IS_INTERACTIVE", False):
        yield


def _check_strategy_fits_device(strategy, env: DistEnv) -> None:
    """Lightning's FSDP strategy (FSDP1) needs GPUs; on CPU say what runs there instead of failing
    deep inside Lightning. ModelParallelStrategy (FSDP2, tensor parallelism) runs on CPU."""
    from lightning.pytorch.strategies import FSDPStrategy

    wants_fsdp = isinstance(strategy, FSDPStrategy) or (isinstance(strategy, str) and strategy.startswith("fsdp"))
    if wants_fsdp and env.device_type != "cuda":
        raise ValueError(
            "Lightning's FSDP strategy needs CUDA GPUs and this rank runs on CPU: use "
            "strategy=ModelParallelStrategy(data_parallel_size=env.world_size, tensor_parallel_size=1) with "
            "`workshop.sharding.apply_fsdp` in the module's configure_model (FSDP2, runs on CPU), or strategy=\"ddp\""
        )


def make_trainer(env: DistEnv | None = None, strategy=None, **kwargs):
    """A Lightning Trainer for this world, the call notebook 05 writes in the open: accelerator, devices and nodes
    (`lightning_layout`) and the cluster plugin (`lightning_environment`) from `env`, built in a kernel too
    (`lightning_in_kernel`). `strategy` defaults to "ddp" with more than one rank, else "auto"; every step is logged.
    The FSDP strategy on CPU is refused with what to use instead (ModelParallelStrategy, which runs on CPU too).
    Unless `enable_progress_bar` is given, Lightning's bar shows in JupyterLab only (`workshop.base.progress`)."""
    import lightning as L

    env = env or get_env()
    if strategy is None:
        strategy = "ddp" if env.is_distributed else "auto"
    _check_strategy_fits_device(strategy, env)
    plugins = list(kwargs.pop("plugins", [])) + [lightning_environment(env)]
    # Lightning's default of a logged step in 50 suits long runs; the workshop's are tens of steps, which it logs
    # nothing of and warns about on stderr ("smaller than the logging interval") unless told to log every step
    kwargs.setdefault("log_every_n_steps", 1)
    if "enable_progress_bar" not in kwargs:  # a bar in JupyterLab; in a batch job's log, a line every N steps
        from workshop.base import progress

        kwargs["enable_progress_bar"] = progress.is_interactive()
        if not kwargs["enable_progress_bar"]:
            callbacks = kwargs.get("callbacks") or []
            kwargs["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]), progress.lightning_lines()]
    devices, num_nodes = lightning_layout(env)
    with lightning_in_kernel():
        return L.Trainer(accelerator="gpu" if env.device_type == "cuda" else "cpu", devices=devices,
                         num_nodes=num_nodes, strategy=strategy, plugins=plugins, **kwargs)
