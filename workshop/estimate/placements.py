"""Pipeline parallelism in the cost model, and every way to place a model on a number of GPUs as dp x tp x pp x cp
(x ep for a mixture of experts).

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

    CP     cp ranks split each sequence (ring attention, `workshop.context_parallel`): compute and activations / cp;
           per layer and micro-batch the key/value blocks go round the ring, 4 cp - 3 sends of 2 b (s / cp) h
           kv_heads / heads bf16 values / tp (forward cp - 1, recomputed forward cp - 1, backward 2 cp - 1 with the
           gradients), hidden behind the attention's compute but for what is longer (`cp_ring_s`); on NVLink while
           tp x cp fits in a node (ranks ordered tp, cp, dp, pp from the fastest). The cp ranks hold the same
           weights: data parallelism runs over dp x cp.
    EP     a mixture of experts' experts over ep of the dp x cp ranks (expert parallelism borrows them, as
           torchtitan does): per layer and micro-batch 6 all-to-alls (dispatch and combine in the forward, again
           in the recomputed forward, and in the backward) of tokens x top_k x dim bf16 values
           (`network.all_to_all`), on the critical path: the experts wait for their tokens.

    placements.placements("llama2-70b", gpus=512, gpu="h100")[0]     # the fastest placement that fits
    python -m workshop.estimate.costmodel placements 70B --gpus 512 --gpu h100
    python -m workshop.estimate.placements long-context    # Llama 3 405B at 131,072 tokens: dp x tp x pp x cp
    python -m workshop.estimate.placements moe             # Mixtral 8x7B: dp x tp x pp x ep
"""

from __future__ import annotations

from dataclasses import dataclass

from workshop.base import hardware
from workshop.base.tables import gib
from workshop.estimate import planner
from workshop.estimate.network import GPUS, AlphaBeta, Cluster, all_to_all, gpu_cluster
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


def model_flops(model, seq_len: int) -> float:
    """Training FLOPs of one sequence of `seq_len` tokens: 6 N s for the N parameters a token passes through (a
    mixture of experts: its active ones; Kaplan et al. 2020) and 6 l h s^2 for attention, PaLM's 12 l h s per token
    (Chowdhery et al. 2022, appendix B) halved by the causal mask, whose masked tiles FlashAttention-2 skips (Dao
    2023, section 3.1). What the step computes and what MFU counts here."""
    shape = planner.find_model(model)
    return 6 * shape.active_parameters * seq_len + attention_flops(shape, seq_len)


def attention_flops(shape: planner.ModelShape, seq_len: int) -> float:
    return 6 * shape.layers * shape.dim * seq_len**2


def cp_ring_s(shape: planner.ModelShape, micro_batch_size: int, seq_len: int, tp: int, cp: int, link: AlphaBeta,
              attention_s: float) -> float:
    """Seconds per layer and micro-batch that ring attention's sends add to a GPU's step: 4 cp - 3 key/value
    blocks (module docstring) of 2 b (s / cp) dim kv_heads / heads bf16 values split over tp, alpha + n beta each,
    less the layer's `attention_s` of attention compute they overlap with (Liu et al. 2023: a block's transfer
    hides behind the previous block's attention)."""
    if cp == 1:
        return 0.0
    block = 2 * micro_batch_size * seq_len / cp * shape.dim * (shape.kv_heads or shape.heads) / shape.heads * 2 / tp
    return max(0.0, (4 * cp - 3) * (link.alpha + block * link.beta) - attention_s)


@dataclass(frozen=True)
class PipelineStep:
    """Seconds of one step on a GPU of the first pipeline stage, by part (pp_step)."""

    compute_s: float  # its micro-batches' forward and backward on its layers, nothing else
    tp_s: float  # the tensor-parallel all-reduces of those micro-batches
    p2p_s: float  # the sends between stages
    dp_s: float  # the data-parallel communication not hidden: DDP's last buckets, FSDP's exposed gathers
    bubble_s: float  # idle while the pipeline fills and drains
    bubble: float  # bubble_fraction: the idle share of the pipeline
    cp_s: float = 0.0  # ring attention's sends not hidden behind the attention
    ep_s: float = 0.0  # the experts' all-to-alls

    @property
    def step_s(self) -> float:
        return self.compute_s + self.tp_s + self.p2p_s + self.dp_s + self.bubble_s + self.cp_s + self.ep_s


def pp_step(model, dp: int, tp: int, pp: int, microbatches: int, micro_batch_size: int = 1, seq_len: int = 4096,
            gpu: str = "h100", strategy: str = "ddp", mfu: float = 0.4, cluster: Cluster | None = None,
            virtual_stages: int = 1, compute_s: float | None = None, cp: int = 1, ep: int = 1) -> PipelineStep:
    """Seconds of one step of `model` (a planner.ModelShape, a name of planner.MODELS or a size: planner.find_model)
    on dp x tp x pp x cp GPUs of `gpu`: tensor parallelism over tp GPUs of a node, pp pipeline stages (across nodes once
    there is more than one), and `strategy` ("ddp" or "fsdp") over the dp data-parallel replicas of each stage,
    outermost; each GPU runs `microbatches` micro-batches of `micro_batch_size` sequences of `seq_len` tokens per
    step, 1F1B or GPipe (the same time), interleaved with `virtual_stages` > 1; each sequence split over `cp`
    context-parallel GPUs, a mixture of experts' experts over `ep` of the dp x cp (module docstring).

    On a GPU of the first stage, which holds ceil(L / pp) layers (planner.stage_layers) and sets the pace, a
    micro-batch takes t = c + tp + p2p (+ FSDP's exposed communication):

        c       the micro-batch's forward and backward on its layers: `compute_s` (one micro-batch of the whole
                model on one GPU, default `model_flops` / (peak x mfu)) x stage layers / L / (tp cp)
        tp      Megatron's all-reduces of the (micro_batch, seq, dim) activations, 6 per layer (the forward is
                recomputed), on NVLink: `tp_comm`
        p2p     2 v sends of `p2p_bytes`, activations forward and gradients backward, on the critical path
                between stages (the next stage waits for them), alpha + n beta on `stage_link`
        fsdp    per micro-batch, the all-gathers and reduce-scatter of the stage's parameters that `fsdp_step`
                does not hide (FSDP2 re-gathers for every micro-batch unless told not to)
        cp, ep  the ring's exposed sends (`cp_ring_s`) and the experts' all-to-alls, per layer

    and the step (m + (p - 1) / v) t (`bubble_fraction`), plus for DDP the gradient all-reduce of the stage's
    fp32 gradients over the dp replicas that the last micro-batch's backward does not hide (`ddp_step`, once per
    step: the earlier micro-batches accumulate), over dp x cp. The data-parallel group holds per_node / tp GPUs of
    each node; a mixture of experts' expert gradients count as reduced over all of it (over dp x cp / ep, in fact).
    Not modelled: the embedding's and the output head's compute, the last stage's logits, the all-reduce of a
    tied embedding's gradients between first and last stage."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"the data-parallel strategy of a pipeline is 'ddp' or 'fsdp', not {strategy!r}")
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(sorted(GPUS))}")
    for name, value in (("dp", dp), ("tp", tp), ("pp", pp), ("microbatches", microbatches),
                        ("micro_batch_size", micro_batch_size), ("seq_len", seq_len),
                        ("virtual_stages", virtual_stages), ("cp", cp), ("ep", ep)):
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
    if ep > 1 and (not shape.experts or shape.experts % ep or (dp * cp) % ep):
        raise ValueError(f"ep {ep} needs a mixture of experts whose {shape.experts} experts and dp x cp = {dp * cp} "
                         "ranks it divides")
    w = Workload.gpt(shape.name, shape.layers, shape.dim, seq_len // cp, shape.parameters, shape.heads)
    layers = planner.stage_layers(shape.layers, pp, virtual_stages) if pp > 1 else shape.layers
    experts = planner.stage_expert_parameters(shape, pp, virtual_stages)
    n = (planner.stage_parameters(shape, pp, virtual_stages) - experts * (1 - 1 / ep)) / tp  # on a first-stage GPU
    flops = model_flops(shape, seq_len)
    if compute_s is None:
        compute_s = flops * micro_batch_size / (GPUS[gpu]["flops"] * mfu)
    c = compute_s * layers / shape.layers / (tp * cp)
    tp_s = tp_comm(w.activation_bytes_per_sample * micro_batch_size, layers, tp, cl.intra, 6)
    link = stage_link(cl, dp * cp, tp, pp)
    p2p = 0.0 if pp == 1 else 2 * virtual_stages * (link.alpha + p2p_bytes(w, micro_batch_size, tp) * link.beta)
    per_node = max(1, cl.per_node // tp)
    ring = cl.inter if tp * cp > cl.per_node else cl.intra
    cp_s = layers * cp_ring_s(shape, micro_batch_size, seq_len, tp, cp, ring,
                              c / layers * attention_flops(shape, seq_len) / flops)
    tokens = micro_batch_size * seq_len // (cp * tp)  # each TP rank routes its share (sequence parallel)
    ep_s = 0.0 if ep == 1 else layers * 6 * all_to_all(tokens * shape.top_k * shape.dim * 2, ep, cl, per_node)
    fsdp = 0.0
    if strategy == "fsdp":
        fsdp = fsdp_step(c, 2 * n, dp * cp, cl, layers + 1, grad_bytes=4 * n, per_node=per_node) - c
    t = c + tp_s + p2p + fsdp + cp_s + ep_s
    ddp = ddp_step(c, 4 * n, dp * cp, cl, per_node=per_node) - c if strategy == "ddp" else 0.0
    m = microbatches
    return PipelineStep(compute_s=m * c, tp_s=m * tp_s, p2p_s=m * p2p, dp_s=m * fsdp + ddp,
                        bubble_s=(pp - 1) / virtual_stages * t, bubble=bubble_fraction(pp, m, virtual_stages),
                        cp_s=m * cp_s, ep_s=m * ep_s)


# Llama 2's global batch: 4M tokens (Touvron et al. 2023, section 2.2 and table 1), 1024 sequences of 4096
GLOBAL_BATCH = 1024
SEQ_LEN = 4096


@dataclass(frozen=True)
class Placement:
    """One (dp, tp, pp, cp, ep) of `placements`: its memory per GPU (planner.plan, first stage), whether it fits,
    and where it fits and may run its step (pp_step), the throughput per GPU and the model FLOPs utilization."""

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
    cp: int = 1
    ep: int = 1

    @property
    def step_s(self) -> float | None:
        return None if self.step is None else self.step.step_s

    @property
    def name(self) -> str:
        return " x ".join(f"{d} {getattr(self, d)}" for d in ("dp", "tp", "pp", "cp", "ep")
                          if d in ("dp", "tp", "pp") or getattr(self, d) > 1)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _reason(r: PipelineStep, dp, tp, pp, m, strategy, layers, stage_layers, crosses, cp=1, ep=1,
            cp_crosses=False, ep_crosses=False) -> str:
    parts = []
    if tp > 1:
        parts.append(f"TP {tp} inside NVLink")
    if cp > 1:
        parts.append(f"CP {cp} {'across nodes' if cp_crosses else 'inside a node'}: a GPU holds 1/{cp} of each "
                     f"sequence, ring {'exposed ' + format(r.cp_s / r.step_s, '.1%') if r.cp_s else 'hidden'}")
    if ep > 1:
        parts.append(f"EP {ep} {'across nodes' if ep_crosses else 'inside a node'}: all-to-alls "
                     f"{r.ep_s / r.step_s:.1%} of the step")
    if pp > 1:
        where = "across nodes" if crosses else "inside a node"
        uneven = f" ({stage_layers} of {layers} layers on the first, uneven)" if layers % pp else ""
        parts.append(f"PP {pp} {where}{uneven} with {m} micro-batch{'es' if m > 1 else ''}: bubble {r.bubble:.1%}")
    if dp > 1:
        accumulated = f", {m} micro-batch{'es' if m > 1 else ''} accumulated"
        parts.append(f"{strategy.upper()} over {dp}" + (f" x CP {cp}" if cp > 1 else "")
                     + ("" if pp > 1 else accumulated))
    else:
        parts.append("no data parallelism")
    costs = {"bubble": r.bubble_s, "TP all-reduces": r.tp_s, "sends between stages": r.p2p_s,
             f"{strategy.upper()} communication": r.dp_s, "the CP ring": r.cp_s, "EP all-to-alls": r.ep_s}
    name, seconds = max(costs.items(), key=lambda kv: kv[1])
    if seconds > 0:
        parts.append(f"most lost to {name}: {seconds / r.step_s:.1%} of the step")
    return "; ".join(parts)


def placements(model="llama2-70b", gpus: int = 512, gpu: str = "h100", global_batch: int = GLOBAL_BATCH,
               micro_batch_size: int = 1, seq_len: int = SEQ_LEN, strategies=("ddp", "fsdp"), mfu: float = 0.4,
               checkpointing: str = "full", schedule: str = "1f1b", cluster: Cluster | None = None, *,
               cps=(1,), eps=None, attention: str = "unfused") -> list[Placement]:
    """Every way to place `model` on `gpus` GPUs of `gpu` as dp x tp x pp x cp = gpus, for each data-parallel
    strategy of `strategies`: tp a power of two up to a node (and twice that, shown as excluded: tensor parallelism's
    all-reduces belong on NVLink; Narayanan et al. 2021, section 3.3, takeaway 1), pp any divisor of gpus / tp up to
    the layers (uneven splits give the first stages one layer more), cp each of `cps` that divides the rest and the
    sequence ((1,): no context parallelism), for a mixture of experts ep each of `eps` (None: every divisor of its
    experts) that divides dp x cp, and m = global_batch / (dp x micro_batch_size) micro-batches per step
    (`global_batch` sequences of `seq_len` tokens; the default is Llama 2's 4M tokens).

    Memory from planner.plan (full activation checkpointing, the `schedule` and `attention` "unfused" by default, fp32
    AdamW states as everywhere in the cost model) against the GPU's memory x hardware.MEMORY_MARGIN; the step from
    pp_step with compute at `mfu` of the peak. Rows fastest first among those that fit, then those that do not fit
    (least memory first), then those excluded, each with a one-line reason; `why` compares the first with the
    fastest that does without each of its dimensions."""
    for s in strategies:
        if s not in ("ddp", "fsdp"):
            raise ValueError(f"the data-parallel strategies of a placement are 'ddp' and 'fsdp', not {s!r}")
    for name, value in (("gpus", gpus), ("global_batch", global_batch), ("micro_batch_size", micro_batch_size),
                        ("seq_len", seq_len), *(("cp", c) for c in cps), *(("ep", e) for e in eps or ())):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(sorted(GPUS))}")
    shape, cl = planner.find_model(model), cluster or gpu_cluster(gpu)
    eps = (1,) if not shape.experts else _divisors(shape.experts) if eps is None else eps
    capacity = hardware.MEMORY_MARGIN * GPUS[gpu]["memory"]
    tps = [t for t in (2**k for k in range(16)) if t <= 2 * cl.per_node and gpus % t == 0]
    grid = [(tp, pp, cp, ep) for tp in tps for pp in (p for p in _divisors(gpus // tp) if p <= shape.layers)
            for cp in cps if (gpus // (tp * pp)) % cp == 0 and seq_len % cp == 0
            for ep in eps if (gpus // (tp * pp)) % ep == 0]
    rows = []
    for strategy in strategies:
        for tp, pp, cp, ep in grid:
            dp = gpus // (tp * pp * cp)
            if dp * cp == 1 and strategy != strategies[0]:
                continue  # one replica: no data-parallel strategy to choose
            m, left = divmod(global_batch, dp * micro_batch_size)
            mem = planner.plan(shape, gpu=gpu, strategy=strategy, world_size=gpus, tp=tp, pp=pp,
                               micro_batch=micro_batch_size, seq_len=seq_len, checkpointing=checkpointing,
                               microbatches=max(1, m), schedule=schedule, attention=attention, cp=cp, ep=ep)
            row = dict(dp=dp, tp=tp, pp=pp, microbatches=m, strategy=strategy, memory_bytes=mem.total,
                       capacity_bytes=capacity, fits=False, cp=cp, ep=ep)
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
                r = pp_step(shape, dp, tp, pp, m, micro_batch_size, seq_len, gpu, strategy, mfu, cl, cp=cp, ep=ep)
                tokens = global_batch * seq_len / gpus / r.step_s
                row.update(fits=True, step=r, tokens_per_s=tokens,
                           mfu=model_flops(shape, seq_len) / seq_len * tokens / GPUS[gpu]["flops"])
                rows.append(Placement(**row, reason=_reason(
                    r, dp, tp, pp, m, strategy, shape.layers, mem.settings["stage_layers"],
                    stage_link(cl, dp * cp, tp, pp) is cl.inter, cp, ep, tp * cp > cl.per_node,
                    tp * ep > cl.per_node)))
    return sorted(rows, key=lambda r: (0, r.step_s) if r.fits else
                  (1, r.memory_bytes) if r.reason.startswith("does not fit") else (2, r.memory_bytes))


def why(rows: list[Placement]) -> str:
    """Why the first row wins: its reason, then for each dimension it uses beyond data parallelism (tp, pp, cp, ep)
    the fastest placement without it, how much slower, or that none without it fits, and why not."""
    if not rows or not rows[0].fits:
        return "no placement fits" + (f": the least memory, {rows[0].name}, {rows[0].reason}" if rows else "")
    best = rows[0]
    lines = [f"{best.name} ({best.strategy}) wins, {best.step_s:.2f} s a step, MFU {best.mfu:.1%}: {best.reason}"]
    for d in ("tp", "pp", "cp", "ep"):
        if getattr(best, d) == 1:
            continue
        without = [r for r in rows if getattr(r, d) == 1 and not r.reason.startswith("excluded")]
        fitting = [r for r in without if r.fits]
        if fitting:
            r = fitting[0]
            lines.append(f"without {d.upper()}: at best {r.name} ({r.strategy}), {r.step_s / best.step_s:.2f}x the "
                         f"step: {r.reason}")
        elif without:
            lines.append(f"without {d.upper()}: none of {len(without)} placements fits; the least memory, "
                         f"{without[0].name} ({without[0].strategy}), {without[0].reason}")
    return "\n".join(lines)


def format_placements(rows: list[Placement], top: int | None = 10) -> str:
    """The first `top` rows (None: all) as a Markdown table, and how many fit."""
    strategies = len({r.strategy for r in rows}) > 1
    more = [d for d in ("cp", "ep") if any(getattr(r, d) > 1 for r in rows)]  # columns only where searched
    head = "| dp | tp | pp |" + "".join(f" {d} |" for d in more) + " micro-batches |" \
        + (" DP |" if strategies else "") + " memory per GPU | fits | step s | bubble % | tokens/s per GPU | MFU | reason |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows[:top]:
        cells = [r.dp, r.tp, r.pp, *(getattr(r, d) for d in more), r.microbatches] + \
            ([r.strategy] if strategies else []) + [gib(r.memory_bytes), "yes" if r.fits else "no"]
        if r.fits:
            cells += [f"{r.step_s:.2f}", f"{r.step.bubble:.1%}".rstrip("%"), f"{r.tokens_per_s:,.0f}", f"{r.mfu:.1%}"]
        else:
            cells += ["", "", "", ""]
        lines.append("| " + " | ".join(str(c) for c in cells + [r.reason]) + " |")
    fitting = sum(r.fits for r in rows)
    shown = len(rows[:top])
    lines += ["", f"{fitting} of {len(rows)} placements fit" + (f"; {shown} shown" if shown < len(rows) else "") + "."]
    return "\n".join(lines)



# The runs `python -m workshop.estimate.placements` places. Long context: Llama 3 405B's last pre-training stage,
# 16M tokens a step as 128 sequences of 131,072 on 16,384 H100, which Llama 3 ran as TP 8, CP 16, PP 16, DP 8 (Llama
# Team, AI @ Meta 2024, arXiv:2407.21783, table 4); attention by a fused kernel. Mixture of experts: Mixtral 8x7B's
# shape (Jiang et al. 2024, arXiv:2401.04088; its training setup is not published) at Llama 2's 4M-token batch on 64
# H100, this workshop's choice.
EXAMPLES = {
    "long-context": dict(model="llama3-405b", gpus=16384, gpu="h100", global_batch=128, seq_len=131072,
                         cps=(1, 2, 4, 8, 16, 32), attention="fused", strategies=("fsdp",),
                         published=dict(dp=8, tp=8, pp=16, cp=16)),
    "moe": dict(model="mixtral-8x7b", gpus=64, gpu="h100", global_batch=GLOBAL_BATCH, seq_len=SEQ_LEN),
}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from workshop.base.params import positive

    parser = argparse.ArgumentParser(prog="python -m workshop.estimate.placements", description="Every dp x tp x pp "
                                     "x cp (x ep) placement of a long-context run or a mixture of experts, fastest "
                                     "first, and why the first wins. The cost model's `placements` command places "
                                     "any model, with --cp and --ep.")
    parser.add_argument("example", choices=sorted(EXAMPLES), help="long-context: Llama 3 405B at 131,072 tokens on "
                        "16,384 H100; moe: Mixtral 8x7B on 64 H100")
    parser.add_argument("--gpus", type=positive(int), help="GPUs in all (default: the example's)")
    parser.add_argument("--global-batch", type=positive(int), help="sequences per step (default: the example's)")
    parser.add_argument("--top", type=int, default=10, help="rows to show (default 10; 0: all)")
    args = parser.parse_args(argv)
    if args.top < 0:
        parser.error(f"--top {args.top}: give how many rows to show, or 0 for all")
    run = {**EXAMPLES[args.example], **{k: v for k, v in (("gpus", args.gpus), ("global_batch", args.global_batch))
                                        if v is not None}}
    published = run.pop("published", None)
    try:
        rows = placements(**run)
    except ValueError as err:
        parser.error(str(err))
    shape = planner.find_model(run["model"])
    print(f"{shape.name} ({shape.parameters / 1e9:.3g}B parameters, {shape.layers} layers) on {run['gpus']} "
          f"{run['gpu']}: {run['global_batch']} sequences of {run['seq_len']} tokens per step, micro-batch 1, 1F1B, "
          f"full activation checkpointing, compute at 40% of peak\n")
    print(format_placements(rows, args.top or None))
    print("\n" + why(rows))
    chosen = [(i, r) for i, r in enumerate(rows, 1) if published and r.fits
              and all(getattr(r, d) == n for d, n in published.items())]
    for i, r in chosen:
        print(f"the published placement, {r.name}: {i} of {len(rows)}, {r.step_s / rows[0].step_s:.2f}x the first's "
              f"step: {r.reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
