"""Pipeline parallelism in the cost model, and every way to place a model on a number of GPUs as dp x tp x pp.

    PP     p stages, m micro-batches of forward and backward t each per stage: GPipe and 1F1B take (m + p - 1) t,
           idle (p - 1) / (m + p - 1) of it (`bubble_fraction`; Huang et al. 2019; Narayanan et al. 2021, eq. 1:
           a bubble (p - 1) / m of the ideal m t); interleaved 1F1B with v stages per GPU (m + (p - 1) / v) t.
           Per micro-batch a stage sends the (micro_batch, seq, dim) bf16 activations forward and their gradient
           backward, 1/tp of them per TP rank (`p2p_bytes`), alpha + n beta each, on the critical path: on a GPU's
           share of the network once the pipeline crosses nodes, on NVLink inside one (`stage_link`).
    3D     `pp_step`: TP inside a node, PP across nodes, DDP or FSDP over the dp = world / (tp pp) replicas of a
           stage, outermost. t = the stage's compute + its TP all-reduces + the sends (+ FSDP's exposed gathers,
           every micro-batch); the step (m + p - 1) t, plus DDP's exposed all-reduce of the stage's gradients
           once per step. `placements` ranks every dp x tp x pp = world, with the planner's memory per GPU.

    placements.placements("llama2-70b", gpus=512, gpu="h100")[0]     # the fastest placement that fits
    python -m workshop.estimate.costmodel placements 70B --gpus 512 --gpu h100
"""

from __future__ import annotations

from dataclasses import dataclass

from workshop.base import hardware
from workshop.base.tables import gib
from workshop.estimate import planner
from workshop.estimate.network import GPUS, AlphaBeta, Cluster, gpu_cluster
from workshop.estimate.steps import Workload, ddp_step, fsdp_step, tp_comm


def bubble_fraction(p: int, m: int, virtual_stages: int = 1) -> float:
    """The idle share of a pipeline step of `p` stages and `m` micro-batches: (p - 1) / (v m + p - 1).

    GPipe and 1F1B both take (m + p - 1) t for micro-batches of forward and backward t per stage: the first stage
    waits p - 1 forwards for the pipeline to fill, the last p - 1 backwards for it to drain (Huang et al. 2019;
    Narayanan et al. 2021, eq. 1: a bubble of (p - 1) t, (p - 1) / m of the ideal m t). With v virtual stages per
    GPU (interleaved 1F1B) the bubble is (p - 1) t / v: (p - 1) / (v m) of the ideal (section 2.2.2)."""
    for name, value in (("p", p), ("m", m), ("virtual_stages", virtual_stages)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return (p - 1) / (virtual_stages * m + p - 1)


def p2p_bytes(workload: Workload, micro_batch_size: int = 1, tp: int = 1) -> float:
    """Bytes a GPU sends over a stage boundary per micro-batch in each direction: the (micro_batch, seq, dim)
    activations forward, their gradient as large backward, in bf16. With tensor and sequence parallelism each of
    the tp ranks holds and sends 1/tp of them, over its own link (Megatron-LM's scatter/gather does the same
    without sequence parallelism: Narayanan et al. 2021, section 4.1)."""
    return workload.activation_bytes_per_sample * micro_batch_size / tp


def stage_link(cluster: Cluster, dp: int, tp: int, pp: int) -> AlphaBeta:
    """The link between pipeline stages, ranks in Megatron-LM's order (tensor parallel fastest, then data
    parallel, then pipeline): a stage is a block of dp x tp consecutive ranks, so the pipeline crosses nodes as
    soon as the configuration does, and its slowest boundary sets the pace: each GPU's share of the network
    (`cluster.inter`), inside one node NVLink."""
    return cluster.inter if dp * tp * pp > cluster.per_node else cluster.intra


@dataclass(frozen=True)
class PipelineStep:
    """Seconds of one step on a GPU of the first pipeline stage, by part (pp_step)."""

    compute_s: float  # its micro-batches' forward and backward on its layers, nothing else
    tp_s: float  # the tensor-parallel all-reduces of those micro-batches
    p2p_s: float  # the sends between stages
    dp_s: float  # the data-parallel communication not hidden: DDP's last buckets, FSDP's exposed gathers
    bubble_s: float  # idle while the pipeline fills and drains
    bubble: float  # bubble_fraction: the idle share of the pipeline

    @property
    def step_s(self) -> float:
        return self.compute_s + self.tp_s + self.p2p_s + self.dp_s + self.bubble_s


def pp_step(model, dp: int, tp: int, pp: int, microbatches: int, micro_batch_size: int = 1, seq_len: int = 4096,
            gpu: str = "h100", strategy: str = "ddp", mfu: float = 0.4, cluster: Cluster | None = None,
            virtual_stages: int = 1, compute_s: float | None = None) -> PipelineStep:
    """Seconds of one step of `model` (a planner.ModelShape, a name of planner.MODELS or a size: planner.find_model)
    on dp x tp x pp GPUs of `gpu`: tensor parallelism over tp GPUs of a node, pp pipeline stages (across nodes once
    there is more than one), and `strategy` ("ddp" or "fsdp") over the dp data-parallel replicas of each stage,
    outermost; each GPU runs `microbatches` micro-batches of `micro_batch_size` sequences of `seq_len` tokens per
    step, 1F1B or GPipe (the same time), interleaved with `virtual_stages` > 1.

    On a GPU of the first stage, which holds ceil(L / pp) layers (planner.stage_layers) and sets the pace, a
    micro-batch takes t = c + tp + p2p (+ FSDP's exposed communication):

        c       the micro-batch's forward and backward on its layers: `compute_s` (one micro-batch of the whole
                model on one GPU, default FLOPs / (peak x mfu), 6 N FLOPs per token) x stage layers / L / tp
        tp      Megatron's all-reduces of the (micro_batch, seq, dim) activations, 6 per layer (the forward is
                recomputed), on NVLink: `tp_comm`
        p2p     2 v sends of `p2p_bytes`, activations forward and gradients backward, on the critical path
                between stages (the next stage waits for them), alpha + n beta on `stage_link`
        fsdp    per micro-batch, the all-gathers and reduce-scatter of the stage's parameters that `fsdp_step`
                does not hide (FSDP2 re-gathers for every micro-batch unless told not to)

    and the step (m + (p - 1) / v) t (`bubble_fraction`), plus for DDP the gradient all-reduce of the stage's
    fp32 gradients over the dp replicas that the last micro-batch's backward does not hide (`ddp_step`, once per
    step: the earlier micro-batches accumulate). The data-parallel group holds per_node / tp GPUs of each node.
    Not modelled: the embedding's and the output head's compute, the last stage's logits, the all-reduce of a
    tied embedding's gradients between first and last stage."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"the data-parallel strategy of a pipeline is 'ddp' or 'fsdp', not {strategy!r}")
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(sorted(GPUS))}")
    for name, value in (("dp", dp), ("tp", tp), ("pp", pp), ("microbatches", microbatches),
                        ("micro_batch_size", micro_batch_size), ("seq_len", seq_len), ("virtual_stages", virtual_stages)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if virtual_stages > 1 and pp == 1:
        raise ValueError(f"virtual_stages {virtual_stages} interleave pipeline stages: they need pp > 1")
    cl = cluster or gpu_cluster(gpu)
    if tp > cl.per_node:
        raise ValueError(f"TP {tp} would cross nodes ({cl.per_node} GPUs per node): keep tp at most {cl.per_node}")
    shape = planner.find_model(model)
    w = Workload.gpt(shape.name, shape.layers, shape.dim, seq_len, shape.parameters, shape.heads)
    layers = planner.stage_layers(shape.layers, pp, virtual_stages) if pp > 1 else shape.layers
    n = planner.stage_parameters(shape, pp, virtual_stages) / tp  # parameters of a GPU of the first stage
    if compute_s is None:
        compute_s = w.flops_per_sample * micro_batch_size / (GPUS[gpu]["flops"] * mfu)
    c = compute_s * layers / shape.layers / tp
    tp_s = tp_comm(w.activation_bytes_per_sample * micro_batch_size, layers, tp, cl.intra, 6)
    link = stage_link(cl, dp, tp, pp)
    p2p = 0.0 if pp == 1 else 2 * virtual_stages * (link.alpha + p2p_bytes(w, micro_batch_size, tp) * link.beta)
    per_node = max(1, cl.per_node // tp)
    fsdp = 0.0
    if strategy == "fsdp":
        fsdp = fsdp_step(c, 2 * n, dp, cl, layers + 1, grad_bytes=4 * n, per_node=per_node) - c
    t = c + tp_s + p2p + fsdp
    ddp = ddp_step(c, 4 * n, dp, cl, per_node=per_node) - c if strategy == "ddp" else 0.0
    m = microbatches
    return PipelineStep(compute_s=m * c, tp_s=m * tp_s, p2p_s=m * p2p, dp_s=m * fsdp + ddp,
                        bubble_s=(pp - 1) / virtual_stages * t, bubble=bubble_fraction(pp, m, virtual_stages))


# Llama 2's global batch: 4M tokens (Touvron et al. 2023, section 2.2 and table 1), 1024 sequences of 4096
GLOBAL_BATCH = 1024
SEQ_LEN = 4096


@dataclass(frozen=True)
class Placement:
    """One (dp, tp, pp) of `placements`: its memory per GPU (planner.plan, first stage), whether it fits, and
    where it fits and may run its step (pp_step), the throughput per GPU and the model FLOPs utilization."""

    dp: int
    tp: int
    pp: int
    microbatches: int
    strategy: str
    memory_bytes: float
    capacity_bytes: float
    fits: bool
    reason: str
    step: PipelineStep | None = None
    tokens_per_s: float | None = None  # per GPU
    mfu: float | None = None

    @property
    def step_s(self) -> float | None:
        return None if self.step is None else self.step.step_s


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _reason(r: PipelineStep, dp, tp, pp, m, strategy, layers, stage_layers, crosses) -> str:
    parts = []
    if tp > 1:
        parts.append(f"TP {tp} inside NVLink")
    if pp > 1:
        where = "across nodes" if crosses else "inside a node"
        uneven = f" ({stage_layers} of {layers} layers on the first, uneven)" if layers % pp else ""
        parts.append(f"PP {pp} {where}{uneven} with {m} micro-batches: bubble {r.bubble:.1%}")
    if dp > 1:
        accumulated = f", {m} micro-batch{'es' if m > 1 else ''} accumulated"
        parts.append(f"{strategy.upper()} over {dp}" + ("" if pp > 1 else accumulated))
    else:
        parts.append("no data parallelism")
    costs = {"bubble": r.bubble_s, "TP all-reduces": r.tp_s, "sends between stages": r.p2p_s,
             f"{strategy.upper()} communication": r.dp_s}
    name, seconds = max(costs.items(), key=lambda kv: kv[1])
    if seconds > 0:
        parts.append(f"most lost to {name}: {seconds / r.step_s:.1%} of the step")
    return "; ".join(parts)


def placements(model="llama2-70b", gpus: int = 512, gpu: str = "h100", global_batch: int = GLOBAL_BATCH,
               micro_batch_size: int = 1, seq_len: int = SEQ_LEN, strategies=("ddp", "fsdp"), mfu: float = 0.4,
               checkpointing: str = "full", schedule: str = "1f1b", cluster: Cluster | None = None) -> list[Placement]:
    """Every way to place `model` on `gpus` GPUs of `gpu` as dp x tp x pp = gpus, for each data-parallel strategy of
    `strategies`: tp a power of two up to a node (and twice that, shown as excluded: tensor parallelism's
    all-reduces belong on NVLink; Narayanan et al. 2021, section 3.3, takeaway 1), pp any divisor of gpus / tp up to
    the layers (uneven splits give the first stages one layer more), and m = global_batch / (dp x micro_batch_size)
    micro-batches per step (`global_batch` sequences of `seq_len` tokens; the default is Llama 2's 4M tokens).

    Memory from planner.plan (full activation checkpointing and the `schedule` by default, fp32 AdamW states as
    everywhere in the cost model) against the GPU's memory x hardware.MEMORY_MARGIN; the step from pp_step with
    compute at `mfu` of the peak. Rows fastest first among those that fit, then those that do not fit (least
    memory first), then those excluded, each with a one-line reason."""
    for s in strategies:
        if s not in ("ddp", "fsdp"):
            raise ValueError(f"the data-parallel strategies of a placement are 'ddp' and 'fsdp', not {s!r}")
    for name, value in (("gpus", gpus), ("global_batch", global_batch), ("micro_batch_size", micro_batch_size),
                        ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(sorted(GPUS))}")
    shape, cl = planner.find_model(model), cluster or gpu_cluster(gpu)
    capacity = hardware.MEMORY_MARGIN * GPUS[gpu]["memory"]
    tps = [t for t in (2**k for k in range(16)) if t <= 2 * cl.per_node and gpus % t == 0]
    rows = []
    for strategy in strategies:
        for tp in tps:
            for pp in (p for p in _divisors(gpus // tp) if p <= shape.layers):
                dp = gpus // (tp * pp)
                if dp == 1 and strategy != strategies[0]:
                    continue  # one replica: no data-parallel strategy to choose
                m, left = divmod(global_batch, dp * micro_batch_size)
                mem = planner.plan(shape, gpu=gpu, strategy=strategy, world_size=gpus, tp=tp, pp=pp,
                                   micro_batch=micro_batch_size, seq_len=seq_len, checkpointing=checkpointing,
                                   microbatches=max(1, m), schedule=schedule)
                row = dict(dp=dp, tp=tp, pp=pp, microbatches=m, strategy=strategy, memory_bytes=mem.total,
                           capacity_bytes=capacity, fits=False)
                if tp > cl.per_node:
                    rows.append(Placement(**row, reason=f"excluded: TP {tp} would cross nodes ({cl.per_node} GPUs per "
                                                        "node), its all-reduces on the network"))
                elif m < 1 or left:
                    rows.append(Placement(**row, reason=f"excluded: {global_batch} sequences do not split into {dp} "
                                                        f"replicas x {micro_batch_size} per micro-batch"))
                elif mem.total > capacity:
                    rows.append(Placement(**row, reason=f"does not fit: {gib(mem.total)} > {gib(capacity)} usable of "
                                                        f"{gib(GPUS[gpu]['memory'])}"))
                else:
                    r = pp_step(shape, dp, tp, pp, m, micro_batch_size, seq_len, gpu, strategy, mfu, cl)
                    tokens = global_batch * seq_len / gpus / r.step_s
                    row.update(fits=True, step=r, tokens_per_s=tokens,
                               mfu=6 * shape.parameters * tokens / GPUS[gpu]["flops"])
                    rows.append(Placement(**row, reason=_reason(r, dp, tp, pp, m, strategy, shape.layers,
                                                                mem.settings["stage_layers"],
                                                                stage_link(cl, dp, tp, pp) is cl.inter)))
    return sorted(rows, key=lambda r: (0, r.step_s) if r.fits else
                  (1, r.memory_bytes) if r.reason.startswith("does not fit") else (2, r.memory_bytes))


def format_placements(rows: list[Placement], top: int | None = 10) -> str:
    """The first `top` rows (None: all) as a Markdown table, and how many fit."""
    strategies = len({r.strategy for r in rows}) > 1
    head = "| dp | tp | pp | micro-batches |" + (" DP |" if strategies else "") + \
        " memory per GPU | fits | step s | bubble % | tokens/s per GPU | MFU | reason |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows[:top]:
        cells = [r.dp, r.tp, r.pp, r.microbatches] + ([r.strategy] if strategies else []) + \
            [gib(r.memory_bytes), "yes" if r.fits else "no"]
        if r.fits:
            cells += [f"{r.step_s:.2f}", f"{r.step.bubble:.1%}".rstrip("%"), f"{r.tokens_per_s:,.0f}", f"{r.mfu:.1%}"]
        else:
            cells += ["", "", "", ""]
        lines.append("| " + " | ".join(str(c) for c in cells + [r.reason]) + " |")
    fitting = sum(r.fits for r in rows)
    shown = len(rows[:top])
    lines += ["", f"{fitting} of {len(rows)} placements fit" + (f"; {shown} shown" if shown < len(rows) else "") + "."]
    return "\n".join(lines)

