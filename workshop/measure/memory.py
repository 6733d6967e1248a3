"""Bytes per rank, measured: the parameters, gradients and optimizer states a rank holds after a step (local shards
of FSDP2's DTensors, a ZeroRedundancyOptimizer's or DeepSpeed's partition), gathered from every rank and held
against the ZeRO paper's count (`workshop.estimate.zero`); and the tensors autograd saves for backward, counted from
the saved tensors themselves (`saved_for_backward`), which `workshop.estimate.planner` derives on paper.

    measure(model, optimizer)                                          # this rank's bytes after a step
    compare({"zero1": measure_all(model, optimizer)}, {"zero1": zero.predict(n, world_size, "zero1")})
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from workshop.base.hardware import device_type
from workshop.estimate.zero import RankMemory


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank stores of `t`: its local shard when `t` is a DTensor, else all of it."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds right now (sharded or, between an FSDP all-gather
    and its reshard, whole)."""
    return sum(local_bytes(p) for p in model.parameters())


def measure(model: nn.Module, optimizer: torch.optim.Optimizer) -> RankMemory:
    """Bytes this rank holds of the model's parameters and gradients and of the optimizer's
    states, after a step (before zero_grad): local shards of DTensors (FSDP2), only this rank's
    partition of a ZeroRedundancyOptimizer's states. Optimizer states count every tensor, Adam's
    per-tensor `step` scalars included (4 bytes each, not in the ZeRO model's K)."""
    grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer: the local optimizer
    states = sum(local_bytes(v) for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return RankMemory(params=param_bytes(model), grads=grads, optimizer=states)


def measure_deepspeed(engine) -> RankMemory:
    """Bytes this rank holds in a DeepSpeed ZeRO engine, measured after `engine.backward` and before `engine.step`
    (the step frees the gradient partition): parameters (stage 3: this rank's partition `ds_tensor`, plus whatever
    is gathered at the moment), gradients (the reduced partition the step will use) and optimizer states (the inner
    optimizer's states plus DeepSpeed's fp32 copy of the partition it steps). Reads the ZeRO optimizers' own
    attributes (DeepSpeed 0.19): an unknown layout raises rather than count nothing."""
    zero = engine.optimizer
    stage3 = hasattr(zero, "fp32_partitioned_groups_flat")
    params = 0
    for p in engine.module.parameters():
        params += local_bytes(p.data)  # stage 3: empty outside a gather
        if hasattr(p, "ds_tensor"):
            params += local_bytes(p.ds_tensor)
    if stage3:
        grads, master = [zero.grad_partitions_flat_buffer], zero.fp32_partitioned_groups_flat
    elif hasattr(zero, "single_partition_of_fp32_groups"):
        grads, master = zero.averaged_gradients, zero.single_partition_of_fp32_groups
    else:
        raise TypeError(f"measure_deepspeed reads DeepSpeed's ZeRO optimizers; this engine's is {type(zero).__name__}")
    states = [v for s in zero.optimizer.state.values() for v in s.values()]
    return RankMemory(params=params, grads=_tensor_bytes(grads), optimizer=_tensor_bytes(master) + _tensor_bytes(states))


def _tensor_bytes(held) -> int:
    """Bytes of the tensors in `held`, a tensor or nested lists, tuples and dicts of them (other values count 0)."""
    if isinstance(held, torch.Tensor):
        return local_bytes(held)
    if isinstance(held, dict):
        held = list(held.values())
    if isinstance(held, (list, tuple)):
        return sum(_tensor_bytes(h) for h in held)
    return 0


def measure_all(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """`measure` on every rank, gathered: one `RankMemory.as_dict()` per rank, in rank order, on every
    rank (a collective: every rank must call it). A process of one gets a list of one."""
    return gather(measure(model, optimizer))


def gather(mine: RankMemory) -> list[dict]:
    """Every rank's `RankMemory`, as `as_dict()`, in rank order, on every rank (a collective)."""
    import torch.distributed as tdist

    mine = mine.as_dict()
    if not (tdist.is_available() and tdist.is_initialized()):
        return [mine]
    per_rank: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(per_rank, mine)
    return per_rank


@dataclass
class Measured:
    """What `train_and_measure` saw: the training's wall time on this rank, the peak memory (CUDA
    tensors on a GPU; None on CPU, where the only peak is the process's resident set, which grows with
    whatever ran before and is no measure of a strategy), and every rank's bytes after the last step."""

    seconds: float
    peak_bytes: int | None
    per_rank: list[dict]


def train_and_measure(train, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                      device="cpu") -> Measured:
    """Run `train()` (the steps of `model` with `optimizer`, gradients kept after the last one), timed,
    then measure what every rank holds. Without a model, `train()` measures itself and returns what
    `gather` gave (DeepSpeed: the bytes after a backward, before its step frees them). Every rank must
    call it."""
    from workshop.measure import metrics

    metrics.reset_peak_memory(device)
    with metrics.Timer(device) as timer:
        held = train()
    peak = metrics.peak_memory(device) if device_type(device) == "cuda" else None
    return Measured(timer.elapsed, peak, held if model is None else measure_all(model, optimizer))


PARTS = ("params", "grads", "optimizer")


def compare(measured: dict, predicted: dict, tolerance: float = 0.10) -> list[dict]:
    """One row per version: the largest measured bytes over ranks of each part (the rank that runs
    out of memory first), the prediction, and whether every rank's every part is within
    `tolerance` of it. `measured[version]` is a list of per-rank `RankMemory.as_dict()` (gathered
    from all ranks); `predicted[version]` a RankMemory."""
    rows = []
    for version, per_rank in measured.items():
        want = predicted[version]
        row = {"version": version}
        for part in PARTS:
            row[part] = max(r[part] for r in per_rank)
            row[f"predicted_{part}"] = getattr(want, part)
        row["total"] = max(sum(r[p] for p in PARTS) for r in per_rank)
        row["predicted_total"] = want.total
        row["agrees"] = all(abs(r[p] - getattr(want, p)) <= tolerance * getattr(want, p)
                            for r in per_rank for p in PARTS)
        rows.append(row)
    return rows


def format_compare(rows: list[dict]) -> str:
    """The `compare` rows as text: measured / predicted MiB per part."""
    mib = 2**20
    lines = [f"{'version':<20}" + "".join(f"{part + ' MiB':>22}" for part in (*PARTS, "total")) + "  within 10%",
             f"{'':<20}" + f"{'measured / predicted':>22}" * 4]
    for row in rows:
        cells = "".join(f"{row[p] / mib:>12.3f} / {row['predicted_' + p] / mib:<7.3f}" for p in (*PARTS, "total"))
        lines.append(f"{row['version']:<20}{cells}  {row['agrees']}")
    return "\n".join(lines)


def plot(rows: list[dict], ax=None):
    """Stacked bars per version: measured (left) beside predicted (right, hatched), by part."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, 3.5), layout="constrained")[1]
    colors = {"params": "tab:blue", "grads": "tab:orange", "optimizer": "tab:green"}
    for i, row in enumerate(rows):
        for offset, prefix, hatch in ((-0.2, "", None), (0.2, "predicted_", "//")):
            bottom = 0.0
            for part in PARTS:
                value = row[prefix + part] / 2**20
                ax.bar(i + offset, value, 0.38, bottom=bottom, color=colors[part], hatch=hatch, edgecolor="white",
                       label=part if i == 0 and not prefix else None)
                bottom += value
    # version names are long (fsdp2_reshard_False): slanted, each ending under its pair of bars, so none overlap
    ax.set_xticks(range(len(rows)), [r["version"] for r in rows], rotation=30, ha="right", rotation_mode="anchor")
    ax.set_ylabel("MiB per rank")
    ax.set_title("memory per rank: measured (plain) and predicted (hatched)")
    ax.legend()
    return ax


# --- activations: what autograd keeps for backward -----------------------------------------------


@dataclass
class Saved:
    """Bytes of the tensors autograd saved for backward (parameters not counted: they are there anyway), each
    storage once however many operations saved it or views of it: in all, and by the module that saved them
    (the names given to `saved_for_backward`; "other" outside them)."""

    total: int = 0
    by_module: dict = field(default_factory=dict)


def blocks_of(model: nn.Module) -> dict[str, nn.Module]:
    """A TinyGPT's blocks by the names `saved_for_backward` counts under: layer0, layer1, ..."""
    return {f"layer{i}": block for i, block in enumerate(model.layers)}


class saved_for_backward:
    """Count what a forward pass keeps for backward, on any device, from the saved tensors themselves
    (torch.autograd.graph.saved_tensors_hooks):

        with memory.saved_for_backward(model, memory.blocks_of(model)) as saved:
            loss = models.lm_loss(model(x), y)
        saved.total, saved.by_module["layer0"]

    Each storage counts once, for the module that saved it first (a block's input, saved by its first
    LayerNorm, belongs to that block), at its whole size (a view keeps its whole storage alive). Activation
    checkpointing's saved inputs count; a selective checkpoint's kept outputs count only when the checkpoint
    respects outer hooks (`activation_checkpointing.checkpoint_blocks` asks for that)."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module] | None = None):
        self.model, self.modules = model, modules or {}
        self.saved = Saved()
        self._seen: set[int] = set()
        self._where: list[str] = ["other"]
        self._handles: list = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self._params and key not in self._seen:
            self._seen.add(key)
            self.saved.total += storage.nbytes()
            where = self._where[-1]
            self.saved.by_module[where] = self.saved.by_module.get(where, 0) + storage.nbytes()
        return t

    def __enter__(self) -> Saved:
        from torch.distributed.tensor import DTensor

        # a DTensor parameter (FSDP2's shard) has no storage of its own: its local shard has
        self._params = {(p.to_local() if isinstance(p, DTensor) else p).untyped_storage().data_ptr()
                        for p in self.model.parameters()}
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(lambda m, args, name=name: self._where.append(name)))
            self._handles.append(module.register_forward_hook(lambda m, args, out: (self._where.pop(), None)[1]))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self.saved

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()


def check_every_other(checkpoint_every_other, make_model, x: torch.Tensor, y: torch.Tensor):
    """Exercise 07.1: a student's `checkpoint_every_other(blocks)` on a fresh TinyGPT's `layers` must leave blocks
    0, 2, 4, ... keeping only their input for backward (what full checkpointing keeps) and the others everything,
    with the gradients of no checkpointing. The hint names the block that differs and how."""
    from workshop.check import Match, compare
    from workshop.models import lm_loss

    def run(model):
        with saved_for_backward(model, blocks_of(model)) as saved:
            loss = lm_loss(model(x), y)
        loss.backward()
        return saved

    plain = make_model()
    kept_plain = run(plain).by_module
    model = make_model()
    checkpoint_every_other(model.layers)
    kept = run(model).by_module
    block_input = x.shape[0] * x.shape[1] * model.dim * 4  # fp32 activations (B, T, dim)
    for i in range(len(model.layers)):
        got = kept.get(f"layer{i}", 0)
        if i % 2 == 0 and got != block_input:
            return Match(False, f"block {i} keeps {got:,} bytes for backward, a checkpointed block its input only "
                                f"({block_input:,}): wrap the forward of blocks 0, 2, 4, ... in "
                                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)")
        if i % 2 == 1 and got != kept_plain.get(f"layer{i}", 0):
            return Match(False, f"block {i} keeps {got:,} bytes, not everything ({kept_plain.get(f'layer{i}', 0):,}): "
                                "checkpoint every other block (0, 2, 4, ...), leave the others as they are")
    grads = compare(((f"grad{i}", p.grad, q.grad) for i, (p, q) in enumerate(zip(model.parameters(), plain.parameters()))),
                    rtol=1e-5, atol=1e-8)
    if not grads:
        return Match(False, f"the gradients are not those of no checkpointing ({grads.detail}): a checkpoint recomputes "
                            "the same forward, so wrap the block's own forward and change nothing else")
    return Match(True)
