"""Sharded data parallelism: each rank keeps only a part of the optimizer states (ZeRO-1), or of the
states, gradients and parameters (FSDP2, ZeRO-3-like), and gathers the rest when it needs it.
Notebook 06 writes the ideas in cells and checks these against one process.

    model, optimizer = apply_zero1(model, shard_mesh(env), lr=3e-3)   # DDP + ZeroRedundancyOptimizer
    model = apply_fsdp(model, shard_mesh(env))                          # fully_shard per block, then root
    model = apply_fsdp(model, hybrid_mesh(env))                         # replicate across nodes, shard within
    deepspeed = init_deepspeed(env)                                     # then deepspeed.initialize(...) as usual
    engine, optimizer = apply_deepspeed(model, optimizer, config, env)   # DeepSpeed ZeRO stage 1, 2 or 3
    save_checkpoint(path, model, optimizer, step=step)   # one file per rank
    step = load_checkpoint(path, model, optimizer)       # on any number of ranks

Each `apply_*` takes the mesh explicitly (DeepSpeed's shards over the whole process group); `shard_mesh`
and `hybrid_mesh` build the usual ones from the DistEnv. Works on CPU (gloo) and GPU (NCCL); every rank
calls every function (collectives).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from workshop.base.hardware import device_type
from workshop.dist import DistEnv
from workshop.parallel_dims import build_mesh


def shard_mesh(env: DistEnv) -> DeviceMesh:
    """A 1-D mesh over all ranks, named "shard": every rank holds 1 / world_size."""
    return build_mesh(env, shard=env.world_size)


def hybrid_layout_problem(env: DistEnv) -> str | None:
    """Why this job's layout cannot hold a hybrid mesh (unequal ranks per node, e.g. `sbatch --ntasks=3` on 2
    nodes puts 2 on one and 1 on the other), and what layout would; None when it can."""
    if not env.even_layout:
        return (f"world size {env.world_size} is not a multiple of the ranks per node {env.local_world_size}: hybrid "
                "sharding needs the same number of tasks on every node; submit with --nodes=N --ntasks-per-node=M "
                "(e.g. sbatch --nodes=2 --ntasks-per-node=2)")
    return None


def hybrid_mesh(env: DistEnv) -> DeviceMesh:
    """A 2-D mesh (num_nodes, ranks per node) named ("replicate", "shard"): parameters are sharded
    over the ranks of a node (fast links: NVLink) and replicated across nodes, which then only
    all-reduce gradients (slow links: InfiniBand, once per step instead of gathers every layer).
    Ranks are numbered node by node (SLURM's block distribution, torchrun's node ranks)."""
    problem = hybrid_layout_problem(env)
    if problem:
        raise ValueError(problem)
    return build_mesh(env, replicate=env.num_nodes, shard=env.local_world_size)


def apply_zero1(model: nn.Module, mesh: DeviceMesh, optimizer_class=torch.optim.AdamW, **optimizer_kwargs):
    """ZeRO stage 1: gradients all-reduced as in DDP (every rank holds all of them), but each rank
    keeps the optimizer states of only its share of the parameters, steps those, and broadcasts
    the updated parameters to the others. Returns (the DDP-wrapped model, the optimizer).
    `torch.distributed.optim.ZeroRedundancyOptimizer` gives each rank whole parameter tensors
    (greedily, largest first), so the shares are only about equal."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    if mesh.ndim != 1:
        raise ValueError(f"apply_zero1 takes a 1-D mesh, got {mesh.ndim} dimensions")
    group = mesh.get_group()
    device = next(model.parameters()).device
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  process_group=group)
    optimizer = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=optimizer_class, process_group=group,
                                        **optimizer_kwargs)
    return ddp, optimizer


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, reshard_after_forward: bool = True, mp_policy=None,
               offload_policy=None) -> nn.Module:
    """FSDP2: `fully_shard` each transformer block of `model.layers`, then the root (embeddings,
    final norm, head). Every parameter becomes a DTensor sharded on dim 0 over the mesh's last
    dimension (and replicated over the first of a 2-D mesh: hybrid sharding). Before a block
    runs its parameters are all-gathered; its gradients are reduce-scattered after its backward.

    `reshard_after_forward=True` frees each block's gathered parameters after its forward and
    gathers them again in backward (ZeRO-3: least memory, one more all-gather per block);
    False keeps them until backward (ZeRO-2-like: the whole model unsharded between forward and
    backward, one all-gather fewer). `mp_policy` is a `MixedPrecisionPolicy` (e.g. bf16 compute,
    fp32 reduction on GPUs). `offload_policy` a `CPUOffloadPolicy`: the shards of parameters,
    gradients and optimizer states live in the host's memory, copied to the device before each
    all-gather; the optimizer steps on the CPU. Shards the model in place and returns it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                   mp_policy=mp_policy or MixedPrecisionPolicy(),
                   offload_policy=offload_policy or OffloadPolicy())
    if not hasattr(model, "layers"):
        raise ValueError(f"apply_fsdp shards the blocks in `model.layers`; {type(model).__name__} has none")
    blocks = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers  # a pipeline stage's
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def save_checkpoint(path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int | None = None) -> Path:
    """A sharded checkpoint with torch.distributed.checkpoint: every rank writes its own shards of
    the model and optimizer state (no gather on rank 0) into the folder `path`, plus one metadata
    file; with `step`, the training step it was taken after (`load_checkpoint` returns it). Every
    rank must call it with the same path on a file system they all see. A checkpoint already in that folder is
    replaced whole."""
    import torch.distributed as tdist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    if step is not None:  # AdamW's own "step" counts its updates, not where the data order stands: kept apart
        state["step"] = torch.tensor(int(step))
    # DCP writes one file per rank and the metadata, and leaves what else the folder holds: a run restarted on fewer
    # ranks would keep the shards of the ranks that are gone beside the new ones. Rank 0 clears the earlier save first.
    group = tdist.is_available() and tdist.is_initialized()
    if not group or tdist.get_rank() == 0:
        for old in [*Path(path).glob("*.distcp"), Path(path, ".metadata")]:
            old.unlink(missing_ok=True)
    if group:
        tdist.barrier()
    dcp.save(state, checkpoint_id=str(path))
    return Path(path)


def load_checkpoint(path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
    """Load a `save_checkpoint` folder into an already sharded model and its optimizer, in place:
    each rank reads the pieces of its own shards. Returns the step it was saved with, None if it
    was saved without one.

    What may change on resume: the world size and the mesh (4 ranks save, 2 or 1 load; every
    parameter's and optimizer state's shards are read from whichever files hold them). What must
    stay the same for the run to continue as if uninterrupted: the model (another shape is refused,
    naming what differs), the optimizer and its settings, the global batch size, the data order by
    step (batch s holds the same samples whatever the world size: each rank takes its share of it,
    not a sampler's epoch order for that world) and the seeds of anything random after the load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not Path(path, ".metadata").is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: save one with save_checkpoint(path, model, optimizer)")
    model_state, optim_state = get_state_dict(model, optimizer)  # the layout to read into
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    # dcp.load reads only the keys asked for: a model with fewer blocks than the one saved would load without a
    # word, and a wider one fails with one traceback per rank. Every rank reads the same metadata, so all refuse.
    problem = _model_mismatch(saved, model_state)
    if problem:
        from workshop.checkpoint import CheckpointMismatch

        raise CheckpointMismatch(f"checkpoint {path} holds another model than this one: {problem}; resume with the "
                                 "model that saved it (the same size and overrides), or start afresh in a new folder")
    state = {"model": model_state, "optimizer": optim_state}
    if "step" in saved:
        state["step"] = torch.tensor(0)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return int(state["step"]) if "step" in state else None


def _model_mismatch(saved: dict, model_state: dict) -> str | None:
    """How the model in a checkpoint's metadata (keys "model.<name>", global shapes) differs from
    `model_state` (DTensors report their global shape too); None when every name and shape agree."""
    held = {k.removeprefix("model."): tuple(m.size) for k, m in saved.items()
            if k.startswith("model.") and hasattr(m, "size")}
    wanted = {k: tuple(t.shape) for k, t in model_state.items() if isinstance(t, torch.Tensor)}
    differences = [f"{k} is {held[k]} there, {wanted[k]} here" for k in wanted.keys() & held.keys()
                   if held[k] != wanted[k]]
    differences += [f"{k} is not in the checkpoint" for k in wanted.keys() - held.keys()]
    differences += [f"{k} is not in this model" for k in held.keys() - wanted.keys()]
    if not differences:
        return None
    differences.sort()
    more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
    return "; ".join(differences[:3]) + more


def import_deepspeed(device: str = "cpu"):
    """`import deepspeed`, set up for `device`: its accelerator ("cpu" on CPU, where DeepSpeed would otherwise look for
    CUDA; DS_ACCELERATOR decides at its import, so a value already set is kept) and its INFO lines off. A missing
    package is an error that says how to install it.

    Three settings here outlive the call, each because DeepSpeed reads it later, in the caller's own calls: the
    accelerator is chosen once per process at the first import and kept; its logger writes INFO lines at every
    `engine.step()`; DeepSpeed 0.19 calls all_gather_into_tensor and reduce_scatter_tensor, which torch 2.14
    deprecates with a FutureWarning at every call (its lines, not the lesson's), and the filter names only those."""
    import logging
    import os
    import warnings

    os.environ.setdefault("DS_ACCELERATOR", device_type(device))
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(f"DeepSpeed is not installed ({err}): `pip install deepspeed`, or `make setup` / the conda "
                          "environment, which install it with the workshop") from err
    deepspeed.utils.logger.setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning)
    return deepspeed


def init_deepspeed(env: DistEnv):
    """`import deepspeed` (`import_deepspeed`) and its communication started on the process group that dist.init
    joined, so that `deepspeed.initialize(model=..., optimizer=..., config=...)` then runs as in a script started by
    torchrun or the `deepspeed` launcher. Returns the module. Every rank calls it; a second call does nothing more."""
    import contextlib
    import importlib
    import os
    from unittest import mock

    deepspeed = import_deepspeed(env.device)
    # DeepSpeed reads this rank's device index from LOCAL_RANK, which torchrun sets and srun (SLURM_LOCALID), a
    # papermill kernel or a one-process notebook do not: it asserts without it. dist.init writes it for a world of
    # several ranks; for one process it is set here, to the value that holds for the process's whole life.
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    no_shm = contextlib.nullcontext()
    if env.device_type == "cpu":
        # DeepSpeed's communication backend (TorchBackend) JIT-compiles a shared-memory all-reduce on the CPU
        # accelerator (C++, through ninja and a compiler) when it starts, once per process; only
        # inference_all_reduce uses it, which training never calls, and every collective goes through the gloo group
        # without it. DeepSpeed has no setting for this (the op's compatibility check would itself compile test
        # programs), so its builder is replaced while the backend starts here, and `deepspeed.initialize` later
        # finds it started.
        no_shm = mock.patch.object(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    from deepspeed.accelerator import get_accelerator

    with no_shm:
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())  # as initialize would
    return deepspeed


def apply_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict, env: DistEnv):
    """`deepspeed.initialize` on the process group already started (dist.init): returns (engine, optimizer), the
    engine to call for the forward, `engine.backward(loss)` and `engine.step()`; the optimizer is DeepSpeed's ZeRO
    wrapper around `optimizer`, which it rebuilds over flat fp32 partitions (so a torch optimizer needs
    "zero_allow_untested_optimizer" in `config`). `config` is DeepSpeed's JSON config as a dict."""
    deepspeed = init_deepspeed(env)
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, zero_optimizer


def check_fully_shard(shard, make_model, mesh: DeviceMesh):
    """Exercise 06.1: a student's `shard(model, mesh)` must make each block of `model.layers` an FSDP unit and then
    the root, every parameter a DTensor on `mesh`. The hint names a missing unit. Every rank calls it."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from workshop.check import Match

    model = shard(make_model(), mesh)
    if model is None:
        return Match(False, "return the model: fully_shard shards it in place, and the next cells train what you "
                            "return")
    blocks = list(model.layers)
    if not any(isinstance(block, FSDPModule) for block in blocks):
        return Match(False, "only the root is a unit, so forward gathers every parameter at once and the memory "
                            "sharding saved comes back: fully_shard each block of model.layers first")
    unwrapped = [i for i, block in enumerate(blocks) if not isinstance(block, FSDPModule)]
    if unwrapped:
        return Match(False, f"blocks {unwrapped} are not units of their own: fully_shard every block of model.layers")
    if not isinstance(model, FSDPModule):
        return Match(False, "the blocks are units, the root is not: fully_shard(model, mesh=mesh) after them (the root "
                            "holds the embeddings, the final norm and the head)")
    plain = [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        return Match(False, f"{len(plain)} parameters are not sharded (the first: {plain[0]}): shard the root last")
    return Match(True)


def check_owners(assign, sizes_list: list[list[int]] | None = None, world_sizes: tuple[int, ...] = (1, 2, 3, 4)):
    """Exercise 06.2: a student's `assign(sizes, world_size)` (ZeRO-1: which rank steps each parameter tensor) must
    give every tensor one owner among the ranks and no rank more than an even share plus the largest tensor, which
    placing the largest tensors first on the least loaded rank guarantees. The hint names the tensor or the rank."""
    from workshop.check import Match

    sizes_list = sizes_list or [[512, 512, 64, 64, 8, 8, 8, 8], [1000, 10, 10, 10, 10, 10, 10, 10, 10, 10],
                                [5, 5, 5, 5, 5]]
    for sizes in sizes_list:
        for n in world_sizes:
            owner = assign(list(sizes), n)
            if not isinstance(owner, (list, tuple)) or len(owner) != len(sizes):
                return Match(False, f"for {len(sizes)} tensors on {n} ranks you returned {owner!r}: one rank per "
                                    "tensor, in the tensors' order")
            bad = [i for i, r in enumerate(owner) if not isinstance(r, int) or not 0 <= r < n]
            if bad:
                return Match(False, f"tensor {bad[0]} goes to rank {owner[bad[0]]!r}, but the ranks are 0 to {n - 1}")
            load = [sum(s for s, r in zip(sizes, owner) if r == k) for k in range(n)]
            bound = sum(sizes) / n + max(sizes)
            if max(load) > bound:
                return Match(False, f"sizes {sizes} on {n} ranks: rank {load.index(max(load))} steps {max(load):,} of "
                                    f"{sum(sizes):,} elements; the largest share need not exceed {bound:,.0f}: give "
                                    "each tensor, the largest first, to the rank with the least so far")
    return Match(True)
