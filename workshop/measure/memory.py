"""Where the memory of training goes, per rank: parameters, gradients and optimizer states, as the
ZeRO paper counts them (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", SC 2020, section 5 and figure 1), and as measured on a model and optimizer.

With Psi parameters, mixed-precision Adam keeps 2 bytes of fp16/bf16 weights, 2 of gradients and
K = 12 of optimizer states (an fp32 master copy, momentum and variance) per parameter: 16 Psi.
Plain fp32 Adam keeps 4 + 4 + 8. Over N data-parallel ranks:

    stage  "ddp"    every rank holds everything                       (2 + 2 + K) Psi
           "zero1"  optimizer states sharded (P_os)                   (2 + 2) Psi + K Psi / N
           "zero2"  ... and gradients (P_os+g)                        2 Psi + (2 + K) Psi / N
           "zero3"  ... and parameters (P_os+g+p), FSDP's full shard  (2 + 2 + K) Psi / N

    predict(7.5e9, 64, "zero1", preset="mixed_adam").total / 1e9   # 31.4 (GB), as in the paper
    measure(model, optimizer)                                      # this rank's bytes after a step

Activations depend on batch and sequence length, not on the sharding: `saved_for_backward` measures
what autograd keeps, `gpt_layer_activation_bytes` derives it for this package's GPT block, and
`transformer_activation_bytes` counts it as Korthikanti et al. 2022 do, with and without activation
checkpointing (`checkpoint_blocks` applies it). The planner puts it all together, per GPU:

    memory.plan("llama2-70b", gpu="h100", strategy="fsdp", world_size=64, checkpointing="full").fits
    python -m workshop.measure.memory plan 70B --gpu h100 --strategy fsdp --world-size 64 --checkpointing full

With pipeline parallelism over pp stages (Huang et al. 2019, GPipe; Narayanan et al. 2021, "Efficient
Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", section 2.2), world_size = dp x tp x pp
and a GPU of the first stage, the most loaded one, holds

    states       of ceil(L / pp) of the L layers, and the embedding (V x h)        `stage_parameters`
    activations  of the micro-batches in flight on those layers                     `in_flight_microbatches`
                 GPipe: all m; 1F1B: at most pp (a micro-batch's activations stay until its backward, and
                 the first stage runs its first backward after pp forwards); interleaved 1F1B with v chunks
                 per GPU: pp + (pp - 1) / v, so L (1 + (pp - 1) / (pp v)) layers' worth (Korthikanti et al.
                 2022, section 4.2.3)

    memory.plan("llama2-70b", strategy="ddp", world_size=512, tp=8, pp=4, microbatches=64, seq_len=4096,
                checkpointing="full").fits
    python -m workshop.measure.memory plan llama2-70b --strategy ddp --world-size 512 --tp 8 --pp 4 --microbatches 64
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from workshop.base.hardware import device_type

STAGES = ("ddp", "zero1", "zero2", "zero3")

# bytes per parameter: (parameters, gradients, optimizer states)
PRESETS = {
    "mixed_adam": (2, 2, 12),  # fp16/bf16 weights and gradients; fp32 master weights, exp_avg, exp_avg_sq
    "fp32_adam": (4, 4, 8),  # fp32 everything; Adam's exp_avg and exp_avg_sq
}


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds of each part."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a dtype (torch.bfloat16 or "bf16", "fp32", ...)."""
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or a torch.dtype")
        dtype = names[dtype]
    return torch.empty((), dtype=dtype).element_size()


def optimizer_state_bytes(optimizer: str = "adamw", param_dtype: torch.dtype | str = torch.float32,
                          master_weights: bool | None = None) -> int:
    """K, the optimizer's bytes per parameter: its fp32 moments (Adam/AdamW: exp_avg and exp_avg_sq,
    8; SGD with momentum: 4; plain SGD: 0), plus an fp32 master copy of the weights (4) when the
    parameters are kept in a lower precision, or whenever `master_weights` is True (DeepSpeed's ZeRO
    optimizers step an fp32 copy of their partition even of fp32 weights). Per-tensor scalars (Adam's
    `step`) are not counted."""
    moments = {"adam": 8, "adamw": 8, "sgd_momentum": 4, "sgd": 0}
    if optimizer not in moments:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {sorted(moments)}")
    if master_weights is None:
        master_weights = dtype_bytes(param_dtype) < 4
    return moments[optimizer] + (4 if master_weights else 0)


def predict(num_params: float, world_size: int, stage: str, *, preset: str | None = None,
            param_dtype: torch.dtype | str = torch.float32, grad_dtype: torch.dtype | str | None = None,
            optimizer: str = "adamw", master_weights: bool | None = None) -> RankMemory:
    """Bytes per rank of parameters, gradients and optimizer states for `num_params` parameters
    trained data-parallel on `world_size` ranks with a ZeRO `stage` (one of STAGES).

    Bytes per parameter come from a `preset` (PRESETS: "mixed_adam" is the paper's 2 + 2 + 12,
    "fp32_adam" 4 + 4 + 8), else from the dtypes and the optimizer (gradients in the parameters'
    dtype unless `grad_dtype` says otherwise; `master_weights` as in `optimizer_state_bytes`). A shard
    is an exact 1 / world_size: real implementations round (FSDP pads each tensor's first dimension to
    a multiple of the world size; ZeroRedundancyOptimizer gives each rank whole tensors), which the
    measurement shows."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; use one of {STAGES}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; use one of {sorted(PRESETS)}")
        p, g, k = PRESETS[preset]
    else:
        p = dtype_bytes(param_dtype)
        g = dtype_bytes(grad_dtype if grad_dtype is not None else param_dtype)
        k = optimizer_state_bytes(optimizer, param_dtype, master_weights)
    level = STAGES.index(stage)  # 0 ddp, 1 shards optimizer states, 2 and gradients, 3 and parameters
    share = 1 / world_size
    return RankMemory(
        params=num_params * p * (share if level >= 3 else 1),
        grads=num_params * g * (share if level >= 2 else 1),
        optimizer=num_params * k * (share if level >= 1 else 1),
    )


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


def format_table(rows: list[dict]) -> str:
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

    ax = ax or plt.subplots(figsize=(8, 3.5))[1]
    colors = {"params": "tab:blue", "grads": "tab:orange", "optimizer": "tab:green"}
    for i, row in enumerate(rows):
        for offset, prefix, hatch in ((-0.2, "", None), (0.2, "predicted_", "//")):
            bottom = 0.0
            for part in PARTS:
                value = row[prefix + part] / 2**20
                ax.bar(i + offset, value, 0.38, bottom=bottom, color=colors[part], hatch=hatch, edgecolor="white",
                       label=part if i == 0 and not prefix else None)
                bottom += value
    ax.set_xticks(range(len(rows)), [r["version"] for r in rows])
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


class saved_for_backward:
    """Count what a forward pass keeps for backward, on any device, from the saved tensors themselves
    (torch.autograd.graph.saved_tensors_hooks):

        with memory.saved_for_backward(model, {f"layer{i}": b for i, b in enumerate(model.layers)}) as saved:
            loss = models.lm_loss(model(x), y)
        saved.total, saved.by_module["layer0"]

    Each storage counts once, for the module that saved it first (a block's input, saved by its first
    LayerNorm, belongs to that block), at its whole size (a view keeps its whole storage alive). Activation
    checkpointing's saved inputs count; a selective checkpoint's kept outputs count only when the checkpoint
    respects outer hooks (`checkpoint_blocks` asks for that)."""

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


def gpt_layer_activation_bytes(seq_len: int, batch: int, dim: int, heads: int, mlp_ratio: int = 4,
                               value_bytes: int = 4) -> int:
    """Bytes one `models.GPTBlock` saves for backward, derived from its code (fp32, no dropout, attention by
    `scaled_dot_product_attention`'s fused kernel), with s = seq_len, b = batch, h = dim, a = heads:

        values of s*b*h each          first LayerNorm: its input 1, its output 1 (the input of wq, wk, wv)
                                      attention: q, k, v 3, its output 1 (the input of wo, the same storage)
                                      second LayerNorm: its input 1, its output 1 (the input of w1)
                                      MLP: w1's output mlp_ratio (GELU's input), GELU's output mlp_ratio
                                      (w2's input): 8 + 2 * mlp_ratio = 16 values in all
        fp32 statistics               each LayerNorm's mean and 1/std, 2 * 2 * s * b; the attention's
                                      log-sum-exp per head, a * s * b

    Korthikanti et al. 2022 (`korthikanti_layer_bytes`) count s*b*h*(34 + 5*a*s/h) bytes in 16-bit: the same
    16 values at 2 bytes (32), 2 dropout masks of 1 byte (2), and the a*s*s attention scores, softmax and
    dropout (5*a*s*s*b) that a fused attention kernel never stores: it recomputes them in backward."""
    values = (8 + 2 * mlp_ratio) * seq_len * batch * dim * value_bytes
    statistics = (2 * 2 + heads) * seq_len * batch * 4
    return values + statistics


def korthikanti_layer_bytes(seq_len: int, batch: int, dim: int, heads: int) -> float:
    """Activation bytes of one transformer layer in 16-bit with dropout and unfused attention, without
    recomputation: s*b*h*(34 + 5*a*s/h) (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", section 4.1, equation 1)."""
    return seq_len * batch * dim * (34 + 5 * heads * seq_len / dim)


CHECKPOINT_POLICIES = ("none", "full", "every_other", "selective")


def _selective_policy(ctx, op, *args, **kwargs):
    """Selective recomputation: keep the matmuls' and the attention's outputs, recompute everything else
    (LayerNorms, GELU, additions), which is cheap in FLOPs but not in bytes."""
    from torch.utils.checkpoint import CheckpointPolicy

    keep = op in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default) or \
        "scaled_dot_product" in str(op)
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_blocks(blocks, policy: str = "full") -> None:
    """Activation checkpointing of each block in `blocks` (a model's list of layers), in place:

        "full"         each block keeps only its input and recomputes its forward in backward
        "every_other"  blocks 0, 2, 4, ... do, the others keep everything (half the saving, half the cost)
        "selective"    each block keeps its matmuls' and attention's outputs and recomputes the rest
        "none"         back to keeping everything

    Non-reentrant `torch.utils.checkpoint` (the one PyTorch recommends); the blocks' parameters and state
    dict are untouched, so FSDP2 and Lightning wrap them as before (checkpoint first, then shard)."""
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"unknown checkpointing policy {policy!r}; use one of {CHECKPOINT_POLICIES}")
    for i, block in enumerate(blocks):
        block.__dict__.pop("forward", None)  # an earlier policy's: the class's own forward again
        forward = block.forward
        if policy == "none" or (policy == "every_other" and i % 2):
            continue
        options = {}
        if policy == "selective":
            options = dict(context_fn=functools.partial(create_selective_checkpoint_contexts, _selective_policy),
                           respect_saved_tensors_hooks=True)
        block.forward = functools.partial(checkpoint, forward, use_reentrant=False, **options)


# --- the planner: memory per GPU of a training configuration -------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What a GPT-shaped model's memory depends on: its parameters, layers, width and heads; and its vocabulary
    (0: not known), which sizes the embedding and the output head, vocab x dim parameters each, that a pipeline
    puts on its first and last stage."""

    name: str
    parameters: float
    layers: int
    dim: int
    heads: int
    vocab: int = 0


# Published shapes: GPT-3 (Brown et al. 2020, table 2.1), MT-NLG (Smith et al. 2022), Llama 2 (Touvron et al. 2023).
# All are counted as GPT blocks (multi-head attention, a 4h MLP of two matrices): Llama's SwiGLU MLP (three
# matrices) and the 70B's grouped-query attention are not modelled, so Llama's activations are an estimate.
# Vocabularies: GPT-2's BPE of 50,257 tokens for GPT-3 and MT-NLG, Llama's 32,000.
MODELS = {
    "gpt3-175b": ModelShape("GPT-3 175B", 175e9, 96, 12288, 96, 50257),
    "mt-nlg-530b": ModelShape("MT-NLG 530B", 530e9, 105, 20480, 128, 50257),
    "llama2-7b": ModelShape("Llama 2 7B", 6.74e9, 32, 4096, 32, 32000),
    "llama2-13b": ModelShape("Llama 2 13B", 13.0e9, 40, 5120, 40, 32000),
    "llama2-70b": ModelShape("Llama 2 70B", 69.0e9, 80, 8192, 64, 32000),
}
PLAN_STRATEGIES = ("ddp", "zero1", "zero2", "fsdp")
SCHEDULES = ("gpipe", "1f1b")
CHECKPOINTING = ("none", "selective", "full")
OFFLOAD = ("none", "optimizer", "params")


def parse_count(size: str | float) -> float:
    """1.3e9, "1.3B", "350M", "7b", "125k" -> a number of parameters."""
    import re

    if isinstance(size, (int, float)):
        n = float(size)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kKmMbBtT]?)\s*", str(size))
        if not m:
            raise ValueError(f"bad model size {size!r}: write a number of parameters such as 7B, 350M or 1.3e9, "
                             f"or name one of {', '.join(MODELS)}")
        n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"a model has a positive number of parameters, not {size!r}")
    return n


def model_shape(model: str | float | ModelShape) -> ModelShape:
    """A model by name (MODELS), or by its number of parameters ("70B"), shaped as usual: width 128 x layers,
    so parameters ~ 12 x layers x width^2, and heads of 128 dimensions each."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str) and model.lower() in MODELS:
        return MODELS[model.lower()]
    n = parse_count(model)
    layers = max(1, round((n / (12 * 128**2)) ** (1 / 3)))
    return ModelShape(model if isinstance(model, str) else f"{n:.3g}", n, layers, 128 * layers, layers)


def transformer_activation_bytes(seq_len: int, batch: int, dim: int, heads: int, layers: int,
                                 checkpointing: str = "none", tp: int = 1, attention: str = "unfused") -> float:
    """Bytes of activations a transformer keeps for backward, in 16-bit (Korthikanti et al. 2022, table 2), with
    tensor and sequence parallelism over `tp` ranks, per layer s b h (34 + 5 a s / h) / t:

        "none"       every layer keeps all of it
        "selective"  every layer keeps s b h 34 / t: the attention's a s^2 scores, softmax and dropout are
                     recomputed (so does a fused attention kernel, `attention="fused"`, without asking)
        "full"       every layer keeps its input, 2 s b h / t, and one layer at a time holds all of it again
                     while backward recomputes it"""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"unknown checkpointing {checkpointing!r}; use one of {', '.join(CHECKPOINTING)}")
    if attention not in ("unfused", "fused"):
        raise ValueError(f"attention is 'unfused' or 'fused', not {attention!r}")
    sbh = seq_len * batch * dim
    scores = 0 if attention == "fused" else 5 * heads * seq_len / dim
    full = sbh * (34 + scores) / tp
    if checkpointing == "none":
        return layers * full
    if checkpointing == "selective":
        return layers * sbh * 34 / tp
    return layers * 2 * sbh / tp + full


def stage_layers(layers: int, pp: int, virtual_stages: int = 1) -> int:
    """Layers on the most loaded of `pp` pipeline stages: layers / pp when they divide; otherwise the first stages
    take one more, ceil(layers / pp). With `virtual_stages` v chunks per GPU (interleaved 1F1B) each of the
    pp x v chunks holds ceil(layers / (pp v)) and a GPU v of them."""
    chunks = pp * virtual_stages
    if chunks > layers:
        raise ValueError(f"{layers} layers do not fill {pp} pipeline stages x {virtual_stages} virtual stages = "
                         f"{chunks} chunks; choose pp x virtual_stages at most {layers}")
    return virtual_stages * -(-layers // chunks)


def stage_parameters(model: str | float | ModelShape, pp: int = 1, virtual_stages: int = 1) -> float:
    """Parameters a GPU of the first pipeline stage holds (before tensor parallelism): its `stage_layers` share of
    the layers' parameters, and the embedding, vocab x dim (the last stage holds the output head, as many). The
    layers' parameters are the model's less the embedding and the head, 2 x vocab x dim (a model that ties them,
    as GPT-3 does, counts V h once: then this over-counts what is not in the layers by V h, 0.4% of GPT-3).
    pp = 1: all of the model."""
    shape = model_shape(model)
    if pp == 1:
        return shape.parameters
    embedding = shape.vocab * shape.dim
    per_layer = (shape.parameters - 2 * embedding) / shape.layers
    return stage_layers(shape.layers, pp, virtual_stages) * per_layer + embedding


def in_flight_microbatches(pp: int, microbatches: int, schedule: str = "1f1b", virtual_stages: int = 1) -> float:
    """Micro-batches whose activations the first pipeline stage holds at its peak, each over all of its layers:
    GPipe runs the m forwards before any backward and holds all m (Huang et al. 2019); 1F1B starts a backward as
    soon as the last stage has a micro-batch's forward and holds at most pp (Narayanan et al. 2021, section 2.2.1);
    interleaved 1F1B with v chunks per GPU holds pp + (pp - 1) / v stage-micro-batches (Megatron-LM's warm-up of
    2 (pp - 1) + (v - 1) pp chunks and one more, each 1 / v of the stage; section 2.2.2). One stage (pp = 1) is
    gradient accumulation: one micro-batch at a time, except GPipe's all-forwards-first order."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "gpipe":
        return microbatches
    if virtual_stages > 1:
        return min(microbatches, pp + (pp - 1) / virtual_stages)
    return min(microbatches, pp)


@dataclass(frozen=True)
class Plan:
    """Bytes one GPU holds in training, by part, and whether they fit in `capacity`: the GPU's memory times
    hardware.MEMORY_MARGIN. `host` is what offload keeps in the host's memory instead."""

    model: ModelShape
    settings: dict
    parts: dict
    host: float
    gpu_bytes: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def capacity(self) -> float:
        from workshop.base.hardware import MEMORY_MARGIN

        return self.gpu_bytes * MEMORY_MARGIN

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


def plan(model: str | float | ModelShape, *, gpu: str = "h100", strategy: str = "fsdp", world_size: int = 8,
         tp: int = 1, micro_batch: int = 1, seq_len: int = 2048, checkpointing: str = "none", offload: str = "none",
         attention: str = "unfused", states: str = "fp32_adam", units: int | None = None, pp: int = 1,
         microbatches: int | None = None, schedule: str = "1f1b", virtual_stages: int = 1) -> Plan:
    """The memory per GPU of training `model` on `world_size` GPUs: tensor parallelism over `tp` of them and
    pipeline parallelism over `pp` stages (the model split first), `strategy` over the world_size / (tp x pp)
    data-parallel ranks (ddp, zero1, zero2, fsdp = ZeRO-3). With pp > 1, a GPU of the first stage: its
    `stage_parameters` (its layers and the embedding) and the activations of the `in_flight_microbatches` of
    `schedule` ("gpipe" or "1f1b"; `virtual_stages` > 1: interleaved 1F1B) out of `microbatches` per step
    (default pp: as many as stages).

    - params, grads, optimizer: `predict` with the bytes per parameter of `states` (PRESETS): "fp32_adam",
      fp32 parameters and gradients and AdamW's two fp32 moments, as under autocast; "mixed_adam", the ZeRO
      paper's bf16 parameters and gradients with fp32 master weights and moments (16 bytes per parameter both);
    - unsharded (fsdp): the bf16 parameters of the unit that computes and of the one prefetched, and the fp32
      gradients of one unit before its reduce-scatter (`units` = the stage's layers + 1 unless given);
    - activations: `transformer_activation_bytes` (16-bit, sequence parallel with tp) of the stage's layers
      times the micro-batches in flight (with full checkpointing one layer at a time is recomputed, once);
      the logits and the CUDA workspace are not counted;
    - offload "optimizer" (ZeRO-Offload) keeps the optimizer states on the host, "params" (FSDP2's
      CPUOffloadPolicy, fsdp only) the sharded parameters, gradients and optimizer states."""
    from workshop.base import hardware

    shape = model_shape(model)
    if gpu not in hardware.NODES:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(hardware.NODES)}")
    if strategy not in PLAN_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(PLAN_STRATEGIES)}")
    if offload not in OFFLOAD:
        raise ValueError(f"unknown offload {offload!r}; choose one of {', '.join(OFFLOAD)}")
    if offload == "params" and strategy != "fsdp":
        raise ValueError("offload 'params' is FSDP2's CPUOffloadPolicy: it needs strategy fsdp")
    microbatches = pp if microbatches is None else microbatches
    for name, value in (("world_size", world_size), ("tp", tp), ("micro_batch", micro_batch), ("seq_len", seq_len),
                        ("pp", pp), ("microbatches", microbatches), ("virtual_stages", virtual_stages)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if virtual_stages > 1 and (schedule != "1f1b" or pp == 1):
        raise ValueError(f"virtual_stages {virtual_stages} is the interleaved 1F1B schedule: it needs schedule "
                         f"'1f1b' and pp > 1, got {schedule!r} and pp {pp}")
    if world_size % tp:
        raise ValueError(f"world_size {world_size} does not split into tensor-parallel groups of {tp}")
    if world_size % (tp * pp):
        raise ValueError(f"world_size {world_size} does not split into groups of tp x pp = {tp} x {pp} = {tp * pp} "
                         f"GPUs; choose tp x pp dividing {world_size}")
    dp = world_size // (tp * pp)
    layers = stage_layers(shape.layers, pp, virtual_stages) if pp > 1 else shape.layers
    n = stage_parameters(shape, pp, virtual_stages) / tp
    stage = {"fsdp": "zero3"}.get(strategy, strategy)
    held = predict(n, dp, stage, preset=states)
    units = units or layers + 1
    in_flight = in_flight_microbatches(pp, microbatches, schedule, virtual_stages)
    parts = {"params": held.params, "grads": held.grads, "optimizer": held.optimizer,
             "unsharded": (2 * 2 + 4) * n / units if strategy == "fsdp" and dp > 1 else 0.0,
             "activations": transformer_activation_bytes(seq_len, micro_batch, shape.dim, shape.heads,
                                                         layers * in_flight,
                                                         checkpointing, tp, attention) if shape.dim else 0.0}
    moved = {"none": (), "optimizer": ("optimizer",), "params": ("params", "grads", "optimizer")}[offload]
    host = sum(parts[k] for k in moved)
    parts.update({k: 0.0 for k in moved})
    settings = dict(gpu=gpu, strategy=strategy, world_size=world_size, tp=tp, micro_batch=micro_batch, seq_len=seq_len,
                    checkpointing=checkpointing, offload=offload, attention=attention, states=states, pp=pp,
                    microbatches=microbatches, schedule=schedule, virtual_stages=virtual_stages, dp=dp,
                    stage_layers=layers, in_flight=in_flight)
    return Plan(shape, settings, parts, host, hardware.NODES[gpu].memory_GB * 1e9)


def format_plan(p: Plan) -> str:
    """The breakdown as a table, with the verdict."""
    s, gpu = p.settings, p.settings["gpu"].upper()
    gb = lambda b: f"{b / 1e9:8.2f} GB"  # noqa: E731
    lines = [f"{p.model.name}: {p.model.parameters / 1e9:.3g}B parameters, {p.model.layers} layers, width {p.model.dim}, "
             f"{p.model.heads} heads",
             f"{s['world_size']} x {gpu}, {s['strategy']}" + (f" x tensor parallel {s['tp']}" if s["tp"] > 1 else "")
             + (f" x pipeline parallel {s['pp']}" if s["pp"] > 1 else "")
             + f"; micro-batch {s['micro_batch']} x {s['seq_len']} tokens; checkpointing {s['checkpointing']}; "
             f"offload {s['offload']}; {s['attention']} attention"]
    if s["pp"] > 1:
        schedule = s["schedule"] + (f" interleaved, {s['virtual_stages']} virtual stages" if s["virtual_stages"] > 1 else "")
        lines.append(f"first of {s['pp']} stages: {s['stage_layers']} of {p.model.layers} layers and the embedding; "
                     f"{schedule}, {s['microbatches']} micro-batches per step, {s['in_flight']:g} in flight; "
                     f"{s['dp']} data-parallel ranks")
    lines += [f"  {part:<12}{gb(nbytes)}" for part, nbytes in p.parts.items()]
    lines.append(f"  {'per GPU':<12}{gb(p.total)}   usable: {p.capacity / 1e9:.0f} GB of the {p.gpu_bytes / 1e9:.0f} GB")
    if p.host:
        lines.append(f"  {'host':<12}{gb(p.host)}   offloaded to the node's memory, copied every step")
    verdict = "fits" if p.fits else f"does not fit ({(p.total - p.capacity) / 1e9:.1f} GB too much)"
    lines.append(f"{verdict} on {gpu} {p.gpu_bytes / 1e9:.0f} GB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """python -m workshop.measure.memory plan 70B --gpu h100 --strategy fsdp --world-size 64 --checkpointing full"""
    import argparse

    from workshop.base import hardware

    def whole(text):
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
        return int(text)

    parser = argparse.ArgumentParser(prog="python -m workshop.measure.memory", description="Memory per GPU of training a "
                                     "GPT-shaped model: parameters, gradients, optimizer states, activations.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="the memory per GPU of one configuration, by part, and whether it fits")
    p.add_argument("model", help=f"parameters (7B, 350M, 1.3e9) or a published model: {', '.join(MODELS)}")
    p.add_argument("--gpu", choices=list(hardware.NODES), default="h100")
    p.add_argument("--strategy", choices=PLAN_STRATEGIES, default="fsdp")
    p.add_argument("--world-size", type=whole, default=8, help="GPUs in all (default 8)")
    p.add_argument("--tp", type=whole, default=1, help="tensor-parallel size, inside the world (default 1)")
    p.add_argument("--pp", type=whole, default=1, help="pipeline stages, inside the world (default 1)")
    p.add_argument("--microbatches", type=whole, help="micro-batches per step through the pipeline (default: pp)")
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="pipeline schedule (default 1f1b)")
    p.add_argument("--micro-batch", type=whole, default=1, help="sequences per GPU per step (default 1)")
    p.add_argument("--seq-len", type=whole, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--checkpointing", choices=CHECKPOINTING, default="none")
    p.add_argument("--offload", choices=OFFLOAD, default="none")
    p.add_argument("--attention", choices=("unfused", "fused"), default="unfused",
                   help="fused: a FlashAttention-style kernel that stores no attention scores")
    args = parser.parse_args(argv)
    try:
        print(format_plan(plan(args.model, gpu=args.gpu, strategy=args.strategy, world_size=args.world_size, tp=args.tp,
                               micro_batch=args.micro_batch, seq_len=args.seq_len, checkpointing=args.checkpointing,
                               offload=args.offload, attention=args.attention, pp=args.pp,
                               microbatches=args.microbatches, schedule=args.schedule)))
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
