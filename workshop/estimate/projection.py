"""A model's training carried from one GPU to 1 ... 4096: step time, throughput, efficiency and memory per GPU, each
configuration first checked against the GPU's memory (the planner) and marked where it does not fit.

    project         weak scaling: the micro batch per GPU stays (the workshop's small models)
    project_strong  strong scaling at a published global batch (default Llama 2's 4M tokens: Touvron et al. 2023):
                    the batch per GPU shrinks as the GPUs grow, printed per row; the step from
                    `workshop.estimate.scaling` with every term of the model; efficiency is the tokens/s per GPU
                    against those at the fewest GPUs where the configuration fits (the published rows' own
                    definition: per-GPU throughput against their base count)

    w = steps.Workload.from_size("7B", tokens_per_sample=2048)
    print(projection.format_projection(projection.project(w, gpu="h100", strategy="fsdp")))
    print(projection.format_projection(projection.project_strong("70B", gpu="h100", strategy="tp_fsdp")))
    python -m workshop.estimate.costmodel project 70B --gpu h100 --strategy fsdp
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from workshop.base import hardware
from workshop.base.tables import gib, table, wrap
from workshop.estimate import planner, terms
from workshop.estimate.network import GPUS, Cluster, gpu_cluster, only
from workshop.estimate.placements import GLOBAL_BATCH, SEQ_LEN
from workshop.estimate.scaling import MODEL, Setup, step_time
from workshop.estimate.steps import STRATEGIES, Workload, ddp_step, fsdp_step, memory_per_gpu, tp_comm

DEVICES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class Projection:
    workload: Workload
    strategy: str
    micro_batch_size: int
    compute_s: float
    gpu: str = "h100"
    tp: int = 1
    rows: list[dict] = field(default_factory=list)  # one per device count; see project
    global_batch: int = 0  # sequences per step: strong scaling (project_strong); 0: weak scaling

    @property
    def label(self) -> str:
        name = {"ddp": "DDP", "fsdp": "FSDP", "tp_fsdp": f"TP{self.tp} x FSDP"}[self.strategy]
        return f"{self.workload.name} {name}"


def _step(strategy: str, w: Workload, compute_s: float, p: int, tp: int, cl: Cluster, units: int, micro_batch_size: int) -> float:
    """Seconds of one step per GPU on `p` GPUs, with the precisions of workshop.estimate.steps: fp32 gradients,
    bf16 gathers."""
    n = w.parameters
    if strategy == "ddp":
        return ddp_step(compute_s, 4 * n, p, cl)
    if strategy == "fsdp":
        return fsdp_step(compute_s, 2 * n, p, cl, units, grad_bytes=4 * n)
    # TP inside the node (its all-reduces on NVLink, 6 per layer: the forward is recomputed), FSDP of the 1/tp
    # shards across the tp-th of each node that holds the same TP rank
    d = p // tp
    fsdp = fsdp_step(compute_s / tp, 2 * n / tp, d, cl, units, grad_bytes=4 * n / tp, per_node=max(1, cl.per_node // tp))
    return fsdp + tp_comm(w.activation_bytes_per_sample * micro_batch_size, w.layers, tp, cl.intra, 6)


def project(workload: Workload, gpu: str = "h100", strategy: str = "ddp", micro_batch_size: int = 8, mfu: float = 0.4,
            devices=DEVICES, compute_s: float | None = None, cluster: Cluster | None = None, units: int | None = None,
            tp: int = 8) -> Projection:
    """Step time, throughput, efficiency and memory of `workload` on each number of `devices` of `gpu`, weak
    scaling (the micro batch per GPU fixed). Compute per step: `compute_s`, else FLOPs / (peak x mfu).
    strategy "ddp", "fsdp" or "tp_fsdp" (tensor parallelism over `tp` GPUs of a node, FSDP across).

    Rows: devices, nodes, tp, memory_bytes, fits, fits_with (the other strategies that fit there), and where it
    fits step_s, comm_exposed_s, throughput, efficiency (throughput over devices x the one-GPU throughput with no
    communication), and bound: "latency" or "bandwidth", whichever part of the communication the step waits
    for more. A configuration that does not fit has None for all of those: it is not a number to plot."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(sorted(GPUS))}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "tp_fsdp" and not workload.dim:
        raise ValueError(f"{workload.name} is not a transformer: tensor parallelism needs its layers' width")
    if micro_batch_size < 1 or not 0 < mfu <= 1:
        raise ValueError(f"micro_batch_size must be >= 1 and mfu in (0, 1], got {micro_batch_size} and {mfu}")
    spec, cl = GPUS[gpu], cluster or gpu_cluster(gpu)
    if compute_s is None:
        compute_s = workload.flops_per_sample * micro_batch_size / (spec["flops"] * mfu)
    units = units or workload.layers + 1
    out = Projection(workload, strategy, micro_batch_size, compute_s, gpu, tp if strategy == "tp_fsdp" else 1)
    capacity = hardware.MEMORY_MARGIN * spec["memory"]
    for p in devices:
        t = min(tp, p, cl.per_node) if strategy == "tp_fsdp" else 1
        if p % t:
            raise ValueError(f"{p} GPUs do not split into tensor-parallel groups of {t}")
        mem = memory_per_gpu(workload, strategy, p, micro_batch_size, t, units)
        others = [s for s in STRATEGIES if s != strategy and (s != "tp_fsdp" or workload.dim)
                  and memory_per_gpu(workload, s, p, micro_batch_size, min(tp, p, cl.per_node) if s == "tp_fsdp" else 1,
                                     units)["total"] <= capacity]
        row = {"devices": p, "nodes": math.ceil(p / cl.per_node), "tp": t, "memory_bytes": mem["total"],
               "fits": mem["total"] <= capacity, "fits_with": others, "step_s": None, "comm_exposed_s": None,
               "throughput": None, "efficiency": None, "bound": None}
        if row["fits"]:
            ideal = compute_s / t
            step = _step(strategy, workload, compute_s, p, t, cl, units, micro_batch_size)
            latency = _step(strategy, workload, compute_s, p, t, only(cl, "latency"), units, micro_batch_size) - ideal
            bandwidth = _step(strategy, workload, compute_s, p, t, only(cl, "bandwidth"), units, micro_batch_size) - ideal
            tokens = p // t * micro_batch_size * workload.tokens_per_sample
            row.update(step_s=step, comm_exposed_s=step - ideal, throughput=tokens / step, efficiency=ideal / step,
                       bound=None if step - ideal <= 0 else "latency" if latency > bandwidth else "bandwidth")
        out.rows.append(row)
    return out


# GPU keys of workshop.base.hardware.NODES to those of terms.GPU_FACTS (a GPU without them: those two terms off)
_FACTS = {"h100": "h100", "h200": "h200", "a100": "a100-80"}


def project_strong(model="70B", gpu: str = "h100", strategy: str = "fsdp", global_batch: int = GLOBAL_BATCH,
                   seq_len: int = SEQ_LEN, micro_batch_size: int = 1, mfu: float = 0.4, tp: int = 8,
                   devices=DEVICES, cluster: Cluster | None = None) -> Projection:
    """`model` (a size or a name of planner.MODELS) trained on each number of `devices` of `gpu` at a fixed global
    batch of `global_batch` sequences of `seq_len` tokens (strong scaling): each of the devices / tp replicas runs
    global_batch / replicas sequences a step, in micro-batches of `micro_batch_size`, and reduces once
    (`workshop.estimate.scaling`). Compute: 6 N FLOPs per token at `mfu` of the peak on one GPU, full activation
    checkpointing. Rows as `project`'s, and per_gpu_sequences, microbatches, mfu (reached), and a reason where it
    does not fit: memory, or a batch that does not split into the replicas. Efficiency: tokens/s per GPU against
    the first row that fits."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(sorted(GPUS))}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if min(global_batch, seq_len, micro_batch_size) < 1 or not 0 < mfu <= 1:
        raise ValueError(f"global_batch, seq_len and micro_batch_size must be >= 1 and mfu in (0, 1], got "
                         f"{global_batch}, {seq_len}, {micro_batch_size} and {mfu}")
    shape, spec, cl = planner.find_model(model), GPUS[gpu], cluster or gpu_cluster(gpu)
    w = Workload.gpt(shape.name, shape.layers, shape.dim, seq_len, shape.parameters, shape.heads)
    facts = _FACTS.get(gpu)
    options = MODEL if facts else replace(MODEL, curve=False, slowdown_blocks=0, elementwise=0.0)
    facts = facts or "h100"  # unused with those terms off
    one = 6 * shape.parameters * micro_batch_size * seq_len  # FLOPs of a micro-batch
    compute_s = one / (spec["flops"] * mfu)  # of a micro-batch on one GPU: GEMMs and elementwise work together
    extra = terms.elementwise_seconds(micro_batch_size * seq_len, shape.dim, shape.layers, facts, True,
                                      options.elementwise)
    if extra >= compute_s:
        raise ValueError(f"mfu {mfu} leaves no time for the GEMMs beside the elementwise work: raise it")
    rate = one / (compute_s - extra)
    ref = terms.gemm_efficiency(micro_batch_size * seq_len, shape.dim, 1, facts) if options.curve else 1.0
    out = Projection(w, strategy, micro_batch_size, compute_s, gpu, tp if strategy == "tp_fsdp" else 1,
                     global_batch=global_batch)
    capacity = hardware.MEMORY_MARGIN * spec["memory"]

    if strategy == "tp_fsdp" and not 1 < tp <= cl.per_node:
        raise ValueError(f"tp {tp}: tensor parallelism over 2 to {cl.per_node} GPUs of a node")

    def place(s, p):  # (tp, replicas, sequences per replica or None, memory) of strategy s on p GPUs
        t = tp if s == "tp_fsdp" else 1
        if p < t:
            return t, 0, None, math.inf
        seqs, left = divmod(global_batch, p // t)
        split = p % t == 0 and not left and seqs % micro_batch_size == 0 and seqs >= micro_batch_size
        mem = planner.plan(shape, gpu=gpu, strategy="ddp" if s == "ddp" else "fsdp", world_size=p, tp=t,
                           micro_batch=micro_batch_size, seq_len=seq_len, checkpointing="full").total
        return t, p // t, seqs if split else None, mem

    first = None
    for p in devices:
        t, dp, seqs, mem = place(strategy, p)
        row = {"devices": p, "nodes": math.ceil(p / cl.per_node), "tp": t, "memory_bytes": mem,
               "per_gpu_sequences": seqs, "microbatches": seqs // micro_batch_size if seqs else None,
               "fits": seqs is not None and mem <= capacity, "step_s": None, "comm_exposed_s": None,
               "throughput": None, "efficiency": None, "bound": None, "mfu": None, "reason": ""}
        if p < t:
            row["reason"] = f"fewer GPUs than TP {t}"
        elif mem > capacity:
            row["reason"] = "memory"
        elif seqs is None:
            row["reason"] = f"{global_batch} sequences do not split into {dp} replicas x {micro_batch_size}"
        row["fits_with"] = [s for s in STRATEGIES if s != strategy and place(s, p)[2] and place(s, p)[3] <= capacity]
        if row["fits"]:
            setup = Setup(p, "3d" if t > 1 else strategy, cl, facts, 6 * shape.parameters * seqs * seq_len / t,
                          shape.parameters, shape.layers, shape.dim, seq_len, micro_batch=micro_batch_size,
                          microbatches=seqs // micro_batch_size, tp=t, dp_strategy="fsdp", tp_allreduces=6,
                          recompute=True)
            step = step_time(setup, rate, options, ref)
            alone = step_time(setup, rate, replace(options, comm=False), ref)
            latency = step_time(setup, rate, replace(options, bandwidth=1e12), ref) - alone
            bandwidth = step_time(setup, rate, replace(options, latency=0.0), ref) - alone
            tokens = global_batch * seq_len / p / step  # per GPU
            first = first or tokens
            row.update(step_s=step, comm_exposed_s=step - alone, throughput=tokens, efficiency=tokens / first,
                       mfu=6 * shape.parameters * tokens / spec["flops"],
                       bound=None if step - alone <= 0 else "latency" if latency > bandwidth else "bandwidth")
        out.rows.append(row)
    return out


def format_strong(proj: Projection, at: tuple[int, ...] | None = None) -> str:
    """A strong-scaling projection as a table: per-GPU batch, memory, step, tokens/s and MFU per GPU, efficiency;
    the rows that do not run say why under it."""
    w, cap = proj.workload, hardware.MEMORY_MARGIN * GPUS[proj.gpu]["memory"]
    base = next((r["devices"] for r in proj.rows if r["fits"]), None)
    rows, notes = [], []
    for r in proj.rows:
        if at is not None and r["devices"] not in at:
            continue
        batch = f"{r['per_gpu_sequences']} ({r['microbatches']} x {proj.micro_batch_size})" \
            if r["per_gpu_sequences"] else "-"
        head = [r["devices"], r["nodes"], batch, gib(r["memory_bytes"]) if math.isfinite(r["memory_bytes"]) else "-"]
        if r["fits"]:
            rows.append(head + [f"{r['step_s']:.2f}", f"{r['comm_exposed_s']:.3f}", f"{r['throughput']:,.0f}",
                                f"{r['mfu']:.1%}", f"{r['efficiency']:.1%}"])
        else:
            alt = f"; fits with {', '.join(r['fits_with'])}" if r["fits_with"] else ""
            why = "does not fit in memory" if r["reason"] == "memory" else r["reason"]
            rows.append(head + ["-", "-", "-", "-", "-"])
            notes.append(wrap(f"{r['devices']} GPUs: {why}{alt}", first="  ", rest="    "))
    tokens = proj.global_batch * w.tokens_per_sample
    terms_off = "" if proj.gpu in _FACTS else (f" (no SM or HBM figures for {proj.gpu} here: without the GEMM "
                                                "efficiency, overlap and elementwise terms)")
    intro = (f"{proj.label}: {w.parameters:,} parameters, {proj.gpu}{terms_off}, strong scaling at a global batch of "
             f"{proj.global_batch} sequences of {w.tokens_per_sample} tokens ({tokens / 1e6:.1f}M tokens), micro-batch "
             f"{proj.micro_batch_size}, full activation checkpointing; memory per GPU against {gib(cap)} usable; "
             "efficiency: " + (f"tokens/s per GPU against {base} GPUs, the fewest where it fits" if base else
                               "none, it fits nowhere"))
    return "\n".join([wrap(intro, rest=""),
                      table(["devices", "nodes", "sequences per GPU", "memory", "step (s)", "exposed comm (s)",
                             "tokens/s per GPU", "MFU", "efficiency"], rows),
                      *notes, wrap(scaling_summary(proj), rest="")])


def format_projection(proj: Projection, at: tuple[int, ...] | None = None) -> str:
    """The rows as a table, memory per GPU in GiB, and the scaling summary under it; `at`: only the rows of
    these GPU counts (default: every row)."""
    if proj.global_batch:
        return format_strong(proj, at)
    w = proj.workload
    unit = "tokens/s" if w.samples_or_tokens == "tokens" else "samples/s"
    cap = hardware.MEMORY_MARGIN * GPUS[proj.gpu]["memory"]
    rows = []
    for r in proj.rows:
        if at is not None and r["devices"] not in at:
            continue
        head = [r["devices"], r["nodes"], gib(r["memory_bytes"])]
        if r["fits"]:
            rows.append(head + [f"{r['step_s'] * 1e3:.2f}", f"{r['comm_exposed_s'] * 1e3:.2f}", f"{r['throughput']:.4g}",
                               f"{r['efficiency']:.1%}"])
        else:
            alt = f"; fits with {', '.join(r['fits_with'])}" if r["fits_with"] else ""
            rows.append(head + ["-", "-", "-", "-", f"does not fit{alt}"])
    return "\n".join([f"{proj.label}: {w.parameters:,} parameters, {proj.gpu}, micro batch {proj.micro_batch_size} per "
                      f"GPU,\ncompute {proj.compute_s * 1e3:.2f} ms per step; memory per GPU against {gib(cap)} usable",
                      table(["devices", "nodes", "memory", "step (ms)", "exposed comm (ms)", unit, "efficiency"], rows),
                      wrap(scaling_summary(proj), rest="")])


def scaling_summary(proj: Projection, floor: float = 0.8) -> str:
    """One sentence from the rows: from how many GPUs it fits, and where efficiency first falls below `floor`
    and why (latency, bandwidth), or how much it keeps at the largest count."""
    rows = proj.rows
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        r = rows[-1]
        cap = hardware.MEMORY_MARGIN * GPUS[proj.gpu]["memory"]
        return (f"{proj.label} does not fit on up to {r['devices']} {proj.gpu} GPUs: memory, {gib(r['memory_bytes'])} per "
                f"GPU there against {gib(cap)} usable.")
    start = fitting[0]
    text = f"{proj.label}"
    if start is not rows[0]:
        text += f" needs {start['devices']} GPUs to fit in memory;"
    low = next((r for r in fitting if r["efficiency"] < floor), None)
    if low is None:
        last = fitting[-1]
        return text + f" keeps {last['efficiency']:.0%} efficiency at {last['devices']} GPUs."
    gap = "latency: the collectives' latency per operation" if low["bound"] == "latency" else \
        "bandwidth: more bytes than the links move while the GPU computes"
    return text + f" falls below {floor:.0%} at {low['devices']} GPUs ({low['efficiency']:.0%}), bound by {gap}."


def plot_projections(projections: list[Projection], published: list | None = None, ax=None):
    """Scaling efficiency against GPUs (log x), one line per projection; configurations that do not fit as an x
    on the floor, not a number; published results, (label, GPUs, per-GPU throughput against their base), as
    labelled stars."""
    from matplotlib.figure import Figure

    fig = None
    if ax is None:
        fig = Figure(figsize=(7, 4.2), layout="constrained")
        ax = fig.add_subplot()
    misfits = 0
    for proj in projections:
        fit = [r for r in proj.rows if r["fits"]]
        line, = ax.plot([r["devices"] for r in fit], [r["efficiency"] for r in fit], "o-", ms=3, label=proj.label)
        out = [r["devices"] for r in proj.rows if not r["fits"]]
        if out:  # one row of marks per projection, so that they do not hide each other
            ax.plot(out, [0.02 + 0.03 * misfits] * len(out), "x", color=line.get_color(), ms=6)
            misfits += 1
    if any(not r["fits"] for p in projections for r in p.rows):
        ax.plot([], [], "x", color="gray", label="does not fit")
    labelled = set()
    for label, gpus, value in published or []:
        ax.plot([gpus], [value], "*", ms=11, color="black", zorder=5)
        if label not in labelled:  # one label per series: its points sit close together
            ax.annotate(label, (gpus, value), textcoords="offset points", xytext=(4, -10), fontsize=7)
            labelled.add(label)
    if published:
        ax.plot([], [], "*", color="black", ms=9, label="published")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("scaling efficiency")
    ax.set_title("projected strong scaling" if any(p.global_batch for p in projections) else "projected weak scaling")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left", bbox_to_anchor=(0, 0.1))
    return fig if fig is not None else ax
