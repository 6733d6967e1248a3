"""Activation checkpointing: a block keeps less for backward and runs its forward again to rebuild the rest, memory
paid for in time (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"; the selective variant:
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", section 5).

    activation_checkpointing.checkpoint_blocks(model.layers, "full")    # before FSDP2 wraps the blocks

`workshop.estimate.planner` counts what each policy keeps; notebook 07 measures it.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

CHECKPOINT_POLICIES = ("none", "full", "every_other", "selective")


def _selective_policy(ctx, op, *args, **kwargs):
    """Selective recomputation: keep the matmuls' and the attention's outputs, recompute everything else
    (LayerNorms, GELU, additions), which is cheap in FLOPs but not in bytes."""
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
