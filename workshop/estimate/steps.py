"""The step time of DDP, FSDP and tensor parallelism on a two-level cluster (`workshop.estimate.network` prices
the collectives), what a step computes (`Workload`), and the memory per GPU of each strategy.

Step time of one optimizer step per GPU, `compute_s` the forward, backward and optimizer step of its micro
batch with no communication, backward = 2/3 of it (2N FLOPs per token forward, 4N backward; Kaplan et al. 2020):

    DDP    gradients all-reduced in buckets of 25 MiB. Each bucket is one operation and pays its latency;
           buckets go one after another on one stream, but each starts as soon as the backward has produced
           it, so k buckets pipeline with the backward:  exposed = c + (k-1) max(0, c - backward/k), c one
           bucket's all-reduce (the last bucket is never hidden). Gradients reduced in fp32 (4 bytes per
           parameter): autocast (notebook 02) keeps fp32 parameters, so their gradients are fp32.
    FSDP   per unit (a fully_shard group) an all-gather of its parameters in forward, again in backward, and a
           reduce-scatter of its gradients, prefetched one unit ahead (FSDP2's default): forward takes
           ag + (u-1) max(f, ag) + f, backward ag + (u-1) max(b, ag + rs) + b + rs for u units of forward f
           and backward b each. Parameters gathered in bf16 (2 bytes), gradients reduce-scattered in fp32
           (4 bytes): FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32).
    TP     Megatron's f and g (Shoeybi et al. 2019): 2 all-reduces of the (batch, seq, dim) bf16 activations
           per layer in forward, 2 in backward, 2 more when activations are recomputed; on the critical path
           (the next matmul needs them), inside a node. TP x FSDP: TP inside the node, FSDP across.

    steps.ddp_step(compute_s=0.05, grad_bytes=4 * 25_600_000, world_size=8, link=network.get_link("ib-ndr-400"))
    steps.memory_per_gpu(steps.Workload.from_size("7B"), "fsdp", devices=64, micro_batch_size=4)["total"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workshop.estimate import planner
from workshop.estimate.network import AlphaBeta, Cluster, all_gather, all_reduce, reduce_scatter

BACKWARD_SHARE = 2 / 3  # backward: 4N of the 6N FLOPs per token (Kaplan et al. 2020)
DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's bucket_cap_mb=25


def ddp_comm(grad_bytes: float, world_size: int, link: Cluster | AlphaBeta | str, bucket_bytes: float | None = DDP_BUCKET_BYTES,
             per_node: int | None = None) -> tuple[int, float]:
    """(buckets, seconds of one bucket's all-reduce): the gradients in buckets of `bucket_bytes` (None: one)."""
    buckets = max(1, math.ceil(grad_bytes / bucket_bytes)) if bucket_bytes else 1
    return buckets, all_reduce(grad_bytes / buckets, world_size, link, per_node)


def ddp_step(compute_s: float, grad_bytes: float, world_size: int, link: Cluster | AlphaBeta | str, overlap: bool = True,
             bucket_bytes: float | None = DDP_BUCKET_BYTES, per_node: int | None = None) -> float:
    """Seconds of a DDP step: compute, and the bucketed all-reduce of `grad_bytes`. With `overlap`, bucket k
    starts when the backward has produced it and the buckets pipeline with the backward (module docstring);
    without, every bucket waits for the end of the backward."""
    if world_size == 1:
        return compute_s
    k, c = ddp_comm(grad_bytes, world_size, link, bucket_bytes, per_node)
    if not overlap:
        return compute_s + k * c
    backward = BACKWARD_SHARE * compute_s
    return compute_s + c + (k - 1) * max(0.0, c - backward / k)


def fsdp_comm(param_bytes: float, world_size: int, link: Cluster | AlphaBeta | str, units: int = 1,
              grad_bytes: float | None = None, rs_link: Cluster | AlphaBeta | str | None = None,
              per_node: int | None = None) -> float:
    """Seconds of one FSDP (ZeRO-3) step's communication, none of it hidden: per unit an all-gather of its
    parameters in forward, one in backward, and a reduce-scatter of its gradients (`grad_bytes`, default the
    parameters' bytes), the reduce-scatter on `rs_link` where it was calibrated apart."""
    ag, rs = _fsdp_unit(param_bytes, world_size, link, units, grad_bytes, rs_link, per_node)
    return units * (2 * ag + rs)


def _fsdp_unit(param_bytes, world_size, link, units, grad_bytes, rs_link, per_node) -> tuple[float, float]:
    grad_bytes = param_bytes if grad_bytes is None else grad_bytes
    return (all_gather(param_bytes / units, world_size, link, per_node),
            reduce_scatter(grad_bytes / units, world_size, rs_link or link, per_node))


def fsdp_step(compute_s: float, param_bytes: float, world_size: int, link: Cluster | AlphaBeta | str, units: int = 1,
              overlap: bool = True, grad_bytes: float | None = None, rs_link: Cluster | AlphaBeta | str | None = None,
              per_node: int | None = None) -> float:
    """Seconds of an FSDP step of `units` equal units. With `overlap`, each unit's all-gather is prefetched while
    the unit before computes, and its reduce-scatter runs during the next unit's backward (module docstring);
    the first all-gather of each pass and the last reduce-scatter are never hidden. Without, all of it waits."""
    if world_size == 1:
        return compute_s
    ag, rs = _fsdp_unit(param_bytes, world_size, link, units, grad_bytes, rs_link, per_node)
    if not overlap:
        return compute_s + units * (2 * ag + rs)
    f = (1 - BACKWARD_SHARE) * compute_s / units
    b = BACKWARD_SHARE * compute_s / units
    forward = ag + (units - 1) * max(f, ag) + f
    backward = ag + (units - 1) * max(b, ag + rs) + b + rs
    return forward + backward


def tp_comm(activation_bytes: float, layers: int, tp_size: int, link: Cluster | AlphaBeta | str,
            allreduces_per_layer: int = 4) -> float:
    """Seconds of a tensor-parallel step's all-reduces of the (batch, seq, dim) activations: 4 per layer (2 in
    forward, 2 in backward), 6 when the forward is recomputed; not overlapped, the next matmul needs them."""
    if tp_size == 1:
        return 0.0
    return layers * allreduces_per_layer * all_reduce(activation_bytes, tp_size, link)


def tp_step(compute_s: float, activation_bytes: float, layers: int, tp_size: int, link: Cluster | AlphaBeta | str,
            allreduces_per_layer: int = 4) -> float:
    """Seconds of a tensor-parallel step: the compute split over `tp_size` ranks, and its all-reduces."""
    return compute_s / tp_size + tp_comm(activation_bytes, layers, tp_size, link, allreduces_per_layer)


# --- workloads and memory ------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """What a step of a model costs: parameters, training FLOPs per sample; for a transformer also its layers,
    width and heads (activations, tensor parallelism), and the bytes of one layer's output per sample."""

    name: str
    parameters: int
    flops_per_sample: float
    samples_or_tokens: str = "samples"
    tokens_per_sample: int = 1
    layers: int = 1
    activation_bytes_per_sample: float = 0.0  # one layer's (seq, dim) output in bf16
    dim: int = 0  # 0: not a transformer (no activation estimate, no tensor parallelism)
    heads: int = 0

    @classmethod
    def gpt(cls, name: str, layers: int, dim: int, tokens_per_sample: int, parameters: float | None = None,
            heads: int | None = None) -> Workload:
        """A GPT-shaped model: parameters ~ 12 layers dim^2 unless given, 6 FLOPs per parameter per token
        (Kaplan et al. 2020), heads of 128 unless given."""
        n = parameters or 12 * layers * dim**2
        return cls(name, int(n), 6 * n * tokens_per_sample, "tokens", tokens_per_sample, layers,
                   tokens_per_sample * dim * 2, dim, heads or max(1, dim // 128))

    @classmethod
    def from_size(cls, size: str | float, tokens_per_sample: int = 2048, name: str | None = None) -> Workload:
        """A GPT-shaped model of `size` parameters ("7B", "350M", 1.3e9), shaped as the planner shapes one
        (`planner.model_shape`: dim = 128 * layers, so parameters ~ 12 * layers * dim^2), or a model it names."""
        shape = planner.model_shape(size)
        return cls.gpt(name or shape.name, shape.layers, shape.dim, tokens_per_sample, shape.parameters, shape.heads)


STRATEGIES = ("ddp", "fsdp", "tp_fsdp")


def memory_per_gpu(workload: Workload, strategy: str, devices: int, micro_batch_size: int, tp: int = 1,
                   units: int | None = None) -> dict:
    """Bytes one GPU holds, by part, for `strategy` on `devices` GPUs (tensor parallelism over `tp` of them):
    the planner's (`planner.plan`, which says what each part holds) with full activation checkpointing. DDP keeps
    everything whole on every GPU, FSDP shards it over the data-parallel ranks (ZeRO-3), TP x FSDP first splits
    it over the TP ranks. A CNN's activations are not counted: the workload does not describe them."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    shape = planner.ModelShape(workload.name, workload.parameters, workload.layers, workload.dim, workload.heads)
    p = planner.plan(shape, strategy="ddp" if strategy == "ddp" else "fsdp", world_size=devices,
                     tp=tp if strategy == "tp_fsdp" else 1, micro_batch=micro_batch_size,
                     seq_len=workload.tokens_per_sample, checkpointing="full", units=units)
    return {**p.parts, "total": p.total}

