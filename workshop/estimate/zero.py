"""Bytes per rank of parameters, gradients and optimizer states, as the ZeRO paper counts them (Rajbhandari et al.,
"ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", SC 2020, section 5 and figure 1).

With Psi parameters, mixed-precision Adam keeps 2 bytes of fp16/bf16 weights, 2 of gradients and
K = 12 of optimizer states (an fp32 master copy, momentum and variance) per parameter: 16 Psi.
Plain fp32 Adam keeps 4 + 4 + 8. Over N data-parallel ranks:

    stage  "ddp"    every rank holds everything                       (2 + 2 + K) Psi
           "zero1"  optimizer states sharded (P_os)                   (2 + 2) Psi + K Psi / N
           "zero2"  ... and gradients (P_os+g)                        2 Psi + (2 + K) Psi / N
           "zero3"  ... and parameters (P_os+g+p), FSDP's full shard  (2 + 2 + K) Psi / N

    zero.predict(7.5e9, 64, "zero1", preset="mixed_adam").total / 1e9   # 31.4 (GB), as in the paper

`workshop.measure.memory` measures the same three parts on a model and its optimizer. Dtypes are given by name
("bf16", "float32"); a torch.dtype reads as its name (str(torch.bfloat16) is "torch.bfloat16"), so the measuring
side passes its tensors' dtypes as they are and this module imports no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

STAGES = ("ddp", "zero1", "zero2", "zero3")

# bytes per parameter: (parameters, gradients, optimizer states)
PRESETS = {
    "mixed_adam": (2, 2, 12),  # fp16/bf16 weights and gradients; fp32 master weights, exp_avg, exp_avg_sq
    "fp32_adam": (4, 4, 8),  # fp32 everything; Adam's exp_avg and exp_avg_sq
}

# bytes per element, by the short and by torch's name of each floating-point dtype that training keeps
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


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


def dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype named "bf16", "bfloat16", "fp32", ..., or of a torch.dtype (its name)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)} or a torch.dtype")
    return DTYPE_BYTES[name]


def optimizer_state_bytes(optimizer: str = "adamw", param_dtype="fp32", master_weights: bool | None = None) -> int:
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


def predict(num_params: float, world_size: int, stage: str, *, preset: str | None = None, param_dtype="fp32",
            grad_dtype=None, optimizer: str = "adamw", master_weights: bool | None = None) -> RankMemory:
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
