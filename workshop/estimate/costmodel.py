"""A cost model of collectives on a two-level cluster, and the step time of DDP, FSDP, tensor and pipeline parallelism.

A message of n bytes over one link takes alpha + n * beta seconds: alpha the latency of a step (seconds), beta
the inverse of the link's bandwidth (seconds per byte). A cluster has two levels: `per_node` GPUs joined by a
fast link (NVLink), and nodes joined by a network of which each GPU has a share (`inter`, bandwidth per GPU).

Collectives on p = N nodes x g GPUs, n bytes (NCCL's algorithms; Thakur, Rabenseifner and Gropp 2005 for the
ring; Sanders, Speck and Traeff 2009 for the double binary tree; latencies counted as NCCL's tuning model counts
them, src/graph/tuning.cc: every step of the ring pays one hop, the steps that cross nodes the network's):

    ring all-reduce     latency  (2(p-1) - 2N) alpha_intra + 2N alpha_inter
                        bytes    2(p-1)/p n * max((g-1)/g beta_intra, beta_inter / g)
    tree all-reduce     latency  2 [(g-1) alpha_intra + log2(N) alpha_inter]      (a chain in the node, trees across)
                        bytes    2 n * max((g-1)/g beta_intra, beta_inter / g)
    all-gather,         latency  (p-1-N) alpha_intra + N alpha_inter             (ring; n: the whole tensor)
    reduce-scatter      bytes    (p-1)/p n * max((g-1)/g beta_intra, beta_inter / g)

The bytes term: NCCL runs one ring (or tree) per NIC of a node, so a node's g GPUs cross the network together
at g times a GPU's share, while inside the node each GPU forwards (g-1)/g of the traffic over NVLink; the
slower of the two sets the pace. The all-reduce takes whichever of ring and tree is faster for its size and
scale, as NCCL's tuner does: the ring for large messages on few nodes, the tree where the ring's latency,
linear in p, takes over (2(p-1) hops: on 4096 H100 of LINKS, 30 ms per operation against 0.2 ms for the tree).
Inside one node (N = 1) it is the ring. On one link (an AlphaBeta) these are the plain ring formulas.

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
    PP     p stages, m micro-batches of forward and backward t each per stage: GPipe and 1F1B take (m + p - 1) t,
           idle (p - 1) / (m + p - 1) of it (`bubble_fraction`; Huang et al. 2019; Narayanan et al. 2021, eq. 1:
           a bubble (p - 1) / m of the ideal m t); interleaved 1F1B with v stages per GPU (m + (p - 1) / v) t.
           Per micro-batch a stage sends the (micro_batch, seq, dim) bf16 activations forward and their gradient
           backward, 1/tp of them per TP rank (`p2p_bytes`), alpha + n beta each, on the critical path: on a GPU's
           share of the network once the pipeline crosses nodes, on NVLink inside one (`stage_link`).
    3D     `pp_step`: TP inside a node, PP across nodes, DDP or FSDP over the dp = world / (tp pp) replicas of a
           stage, outermost. t = the stage's compute + its TP all-reduces + the sends (+ FSDP's exposed gathers,
           every micro-batch); the step (m + p - 1) t, plus DDP's exposed all-reduce of the stage's gradients
           once per step. `placements` ranks every dp x tp x pp = world, with memory.plan's memory per GPU.

`project` carries a one-GPU step to 1 ... 4096 GPUs (weak scaling: the micro batch per GPU stays), checks each
configuration's memory per GPU with `workshop.measure.memory` and marks the ones that do not fit. `PUBLISHED` holds
published scaling results with their hardware, and `validate` compares the model with them.

    ab = costmodel.calibrate(costmodel.allreduce_rows(records))   # AlphaBeta(alpha=..., beta=...)
    costmodel.ddp_step(compute_s=0.05, grad_bytes=4 * 25_600_000, world_size=8, link=ab)
    costmodel.project(costmodel.Workload.from_size("7B", tokens_per_sample=2048), gpu="h100", strategy="fsdp")
    python -m workshop.estimate.costmodel project 70B --gpu h100 --strategy fsdp
    costmodel.placements("llama2-70b", gpus=512, gpu="h100")[0]     # the fastest placement that fits
    python -m workshop.estimate.costmodel placements 70B --gpus 512 --gpu h100
    python -m workshop.estimate.costmodel validate --out docs/results
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from workshop.base import hardware

# --- links and clusters --------------------------------------------------------------------------


@dataclass(frozen=True)
class AlphaBeta:
    """A link: alpha seconds per message (per step of a collective), beta seconds per byte (1 / bandwidth)."""

    alpha: float
    beta: float
    name: str = ""

    @property
    def bandwidth_GBps(self) -> float:
        return 1 / self.beta / 1e9 if self.beta > 0 else math.inf

    def __str__(self) -> str:
        label = f"{self.name}: " if self.name else ""
        return f"{label}alpha {self.alpha * 1e6:.1f} us, beta {self.beta * 1e9:.4f} ns/B ({self.bandwidth_GBps:.2f} GB/s)"


def _link(name: str, alpha_us: float, GBps: float) -> AlphaBeta:
    return AlphaBeta(alpha_us * 1e-6, 1 / (GBps * 1e9), name)


# The links and GPUs of workshop.base.hardware (data sheets), as the model uses them: alpha-beta links, and per GPU its
# dense bf16 peak, memory and usual node.
LINKS = {name: _link(name, link.latency_us, link.GBps) for name, link in hardware.LINKS.items()}
GPUS = {key: {"flops": hardware.GPU_PEAK_TFLOPS[node.gpu]["bf16"] * 1e12, "memory": node.memory_GB * 1e9,
              "per_node": node.per_node, "intra": node.intra, "inter": node.inter} for key, node in hardware.NODES.items()}
MEMORY_MARGIN = hardware.MEMORY_MARGIN


def get_link(link: AlphaBeta | str) -> AlphaBeta:
    if isinstance(link, AlphaBeta):
        return link
    if link not in LINKS:
        raise ValueError(f"unknown link {link!r}; give an AlphaBeta or one of {', '.join(sorted(LINKS))}")
    return LINKS[link]


def shared(link: AlphaBeta | str, gpus: int) -> AlphaBeta:
    """A network link shared by `gpus` GPUs (one NIC per node, or fewer NICs than GPUs): each GPU's share."""
    ab = get_link(link)
    return AlphaBeta(ab.alpha, ab.beta * gpus, f"{ab.name}/{gpus}")


@dataclass(frozen=True)
class Cluster:
    """Two levels: `per_node` GPUs joined by `intra`; nodes joined by a network of which each GPU has `inter`."""

    intra: AlphaBeta
    inter: AlphaBeta
    per_node: int
    name: str = ""

    def __str__(self) -> str:
        return f"{self.name or 'cluster'}: {self.per_node} GPUs per node; inside {self.intra}; across, per GPU {self.inter}"


_ONE_LEVEL = 2**40  # a single link: every rank in one "node"


def gpu_cluster(gpu: str) -> Cluster:
    """The usual cluster of `gpu` (GPUS): 8 per node, its NVLink, one NIC per GPU."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(sorted(GPUS))}")
    spec = GPUS[gpu]
    return Cluster(get_link(spec["intra"]), get_link(spec["inter"]), spec["per_node"], gpu)


def _cluster(link: Cluster | AlphaBeta | str) -> Cluster:
    if isinstance(link, Cluster):
        return link
    ab = get_link(link)
    return Cluster(ab, ab, _ONE_LEVEL, ab.name)


def _strip(cl: Cluster, latency: bool = True, bandwidth: bool = True) -> Cluster:
    """The cluster with only its latencies, or only its bandwidths: which of the two a step waits for."""
    def part(ab):
        return AlphaBeta(ab.alpha if latency else 0.0, ab.beta if bandwidth else 0.0, ab.name)
    return replace(cl, intra=part(cl.intra), inter=part(cl.inter))


# --- collectives ---------------------------------------------------------------------------------

def _check(nbytes: float, p: int) -> None:
    if p < 1 or int(p) != p:
        raise ValueError(f"the number of ranks must be a whole number >= 1, got {p}")
    if nbytes < 0:
        raise ValueError(f"a message cannot have {nbytes} bytes")


def _shape(p: int, cl: Cluster, per_node: int | None) -> tuple[int, int]:
    """(g, N): ranks of the group per node, and nodes. `per_node` overrides the cluster's for a group that holds
    fewer GPUs of each node (the data-parallel group of tensor-parallel ranks)."""
    g = max(1, min(per_node or cl.per_node, p))
    return g, math.ceil(p / g)


def _bytes_beta(cl: Cluster, g: int, N: int) -> float:
    """Seconds per byte of the slower level: (g-1)/g of the bytes over NVLink, 1/g through each GPU's NIC."""
    if N == 1:
        return cl.intra.beta
    return max((g - 1) / g * cl.intra.beta, cl.inter.beta / g)


def _ring(nbytes: float, p: int, cl: Cluster, per_node: int | None, rounds: int) -> float:
    """A ring of `rounds` passes (1: all-gather or reduce-scatter, 2: all-reduce)."""
    if p == 1:
        return 0.0
    g, N = _shape(p, cl, per_node)
    steps = rounds * (p - 1)
    inter_steps = 0 if N == 1 else min(rounds * N, steps)
    latency = (steps - inter_steps) * cl.intra.alpha + inter_steps * cl.inter.alpha
    return latency + rounds * (p - 1) / p * nbytes * _bytes_beta(cl, g, N)


def all_reduce_times(nbytes: float, p: int, link: Cluster | AlphaBeta | str, per_node: int | None = None) -> dict:
    """Seconds of each all-reduce algorithm that applies: {"ring": ..., "tree": ...} (no tree inside a node)."""
    _check(nbytes, p)
    cl = _cluster(link)
    times = {"ring": _ring(nbytes, p, cl, per_node, 2)}
    g, N = _shape(p, cl, per_node)
    if N > 1:
        times["tree"] = (2 * ((g - 1) * cl.intra.alpha + math.ceil(math.log2(N)) * cl.inter.alpha)
                         + 2 * nbytes * _bytes_beta(cl, g, N))
    return times


def all_reduce(nbytes: float, p: int, link: Cluster | AlphaBeta | str, per_node: int | None = None) -> float:
    """Seconds of an all-reduce of `nbytes` on `p` ranks: the faster of ring and tree (one link: the ring,
    2(p-1) alpha + 2(p-1)/p n beta)."""
    return min(all_reduce_times(nbytes, p, link, per_node).values())


def all_gather(nbytes: float, p: int, link: Cluster | AlphaBeta | str, per_node: int | None = None) -> float:
    """Seconds of a ring all-gather whose result has `nbytes` (one link: (p-1) alpha + (p-1)/p n beta)."""
    _check(nbytes, p)
    return _ring(nbytes, p, _cluster(link), per_node, 1)


def reduce_scatter(nbytes: float, p: int, link: Cluster | AlphaBeta | str, per_node: int | None = None) -> float:
    """Seconds of a ring reduce-scatter of an `nbytes` input: the all-gather's steps, the other way round."""
    return all_gather(nbytes, p, link, per_node)


# --- calibration ---------------------------------------------------------------------------------

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


def collective_rows(records: list[dict], collective: str = "all_reduce") -> list[dict]:
    """Every measurement of `collective` in `records`: rows {bytes, time_s, world_size} from
    `python -m workshop.measure.bench collectives` (results.rows, each with its collective), and for the all-reduce also
    `bench allreduce` (results.rows) and notebook 05 (results.allreduce). Failed and single-rank runs are skipped."""
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; choose from {', '.join(COLLECTIVES)}")
    rows = []
    for rec in records:
        if rec.get("status", "ok") != "ok":
            continue
        results = rec.get("results") or {}
        notebook = rec.get("notebook")
        if notebook == "bench-collectives":
            measured = [r for r in results.get("rows") or [] if r.get("collective") == collective]
        elif collective != "all_reduce":
            continue
        else:
            measured = results.get("rows") if notebook == "bench-allreduce" else results.get("allreduce")
        p = int((rec.get("dist") or {}).get("world_size", 1))
        if not measured or p < 2:
            continue
        for r in measured:
            if r.get("bytes") and r.get("time_s"):
                rows.append({"bytes": int(r["bytes"]), "time_s": float(r["time_s"]), "world_size": p})
    return rows


def allreduce_rows(records: list[dict]) -> list[dict]:
    """Every all-reduce measurement in `records` (see collective_rows)."""
    return collective_rows(records, "all_reduce")


def _terms(collective: str, n: float, p: int) -> tuple[float, float]:
    """(steps, bytes per rank): the coefficients of alpha and beta in a ring collective on one link."""
    rounds = 2 if collective == "all_reduce" else 1
    return rounds * (p - 1), rounds * (p - 1) / p * n


def calibrate(rows: list[dict], name: str = "calibrated", collective: str = "all_reduce") -> AlphaBeta:
    """alpha and beta from rows {bytes, time_s, world_size} of `collective` (any world sizes >= 2).

    Least squares of t = steps alpha + bytes beta (all-reduce: 2(p-1) alpha + 2(p-1)/p n beta; all-gather and
    reduce-scatter: (p-1) alpha + (p-1)/p n beta), weighted by 1/t so that each size counts by its relative error
    (unweighted, the largest messages alone would decide alpha). A coefficient that comes out negative is set to
    0 and the other refitted: neither can be negative.
    """
    pts = [(*_terms(collective, r["bytes"], r["world_size"]), r["time_s"])
           for r in rows if r["world_size"] >= 2 and r["time_s"] > 0]
    if len(pts) < 2 or len({x2 for _, x2, _ in pts}) < 2:
        raise ValueError(f"calibration needs {collective} times of at least two message sizes on 2 or more ranks: run "
                         "python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.measure.bench collectives")
    # weighted rows: (x1/t, x2/t) . (alpha, beta) ~ 1
    a11 = sum((x1 / t) ** 2 for x1, _, t in pts)
    a12 = sum(x1 * x2 / t**2 for x1, x2, t in pts)
    a22 = sum((x2 / t) ** 2 for _, x2, t in pts)
    b1 = sum(x1 / t for x1, _, t in pts)
    b2 = sum(x2 / t for _, x2, t in pts)
    det = a11 * a22 - a12 * a12
    alpha = (b1 * a22 - b2 * a12) / det if det else -1.0
    beta = (a11 * b2 - a12 * b1) / det if det else -1.0
    if alpha < 0 or beta < 0:  # the one-coefficient fits
        alpha, beta = (0.0, b2 / a22) if alpha < 0 else (b1 / a11, 0.0)
    return AlphaBeta(alpha, beta, name)


def fit_error(rows: list[dict], ab: AlphaBeta, collective: str = "all_reduce") -> float:
    """The largest relative error of the fitted times of `collective` against the measured ones."""
    def model(r):
        steps, nbytes = _terms(collective, r["bytes"], r["world_size"])
        return steps * ab.alpha + nbytes * ab.beta
    return max(abs(model(r) - r["time_s"]) / r["time_s"] for r in rows)


# --- step times ----------------------------------------------------------------------------------

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
        """A GPT-shaped model of `size` parameters ("7B", "350M", 1.3e9): depth from the usual shape (dim = 128 *
        layers, so parameters ~ 12 * layers * dim^2)."""
        n = parse_count(size)
        layers = max(1, round((n / (12 * 128**2)) ** (1 / 3)))
        return cls.gpt(name or (size if isinstance(size, str) else f"{n:.3g}"), layers, 128 * layers, tokens_per_sample, n)


def parse_count(size: str | float) -> float:
    """1.3e9, "1.3B", "350M" -> a number of parameters (workshop.measure.memory.parse_count, imported when called: this
    module imports no torch)."""
    from workshop.measure import memory

    return memory.parse_count(size)


STRATEGIES = ("ddp", "fsdp", "tp_fsdp")


def memory_per_gpu(workload: Workload, strategy: str, devices: int, micro_batch_size: int, tp: int = 1,
                   units: int | None = None) -> dict:
    """Bytes one GPU holds, by part, for `strategy` on `devices` GPUs (tensor parallelism over `tp` of them):
    workshop.measure.memory's planner (`memory.plan`, which says what each part holds) with full activation
    checkpointing. DDP keeps everything whole on every GPU, FSDP shards it over the data-parallel ranks
    (ZeRO-3), TP x FSDP first splits it over the TP ranks. A CNN's activations are not counted: the workload
    does not describe them."""
    from workshop.measure import memory

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    shape = memory.ModelShape(workload.name, workload.parameters, workload.layers, workload.dim, workload.heads)
    p = memory.plan(shape, strategy="ddp" if strategy == "ddp" else "fsdp", world_size=devices,
                    tp=tp if strategy == "tp_fsdp" else 1, micro_batch=micro_batch_size,
                    seq_len=workload.tokens_per_sample, checkpointing="full", units=units)
    return {**p.parts, "total": p.total}


# --- projection ----------------------------------------------------------------------------------

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

    @property
    def label(self) -> str:
        name = {"ddp": "DDP", "fsdp": "FSDP", "tp_fsdp": f"TP{self.tp} x FSDP"}[self.strategy]
        return f"{self.workload.name} {name}"


def _step(strategy: str, w: Workload, compute_s: float, p: int, tp: int, cl: Cluster, units: int, micro_batch_size: int) -> float:
    """Seconds of one step per GPU on `p` GPUs, with the precisions of the module docstring."""
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
    capacity = MEMORY_MARGIN * spec["memory"]
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
            latency = _step(strategy, workload, compute_s, p, t, _strip(cl, bandwidth=False), units, micro_batch_size) - ideal
            bandwidth = _step(strategy, workload, compute_s, p, t, _strip(cl, latency=False), units, micro_batch_size) - ideal
            tokens = p // t * micro_batch_size * workload.tokens_per_sample
            row.update(step_s=step, comm_exposed_s=step - ideal, throughput=tokens / step, efficiency=ideal / step,
                       bound=None if step - ideal <= 0 else "latency" if latency > bandwidth else "bandwidth")
        out.rows.append(row)
    return out


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def format_projection(proj: Projection) -> str:
    w = proj.workload
    unit = "tokens/s" if w.samples_or_tokens == "tokens" else "samples/s"
    cap = MEMORY_MARGIN * GPUS[proj.gpu]["memory"]
    lines = [f"{proj.label}: {w.parameters:,} parameters, {proj.gpu}, micro batch {proj.micro_batch_size} per GPU, "
             f"compute {proj.compute_s * 1e3:.2f} ms per step; memory per GPU against {_gib(cap)} usable",
             f"{'devices':>8} {'nodes':>6} {'memory':>10} {'step (ms)':>10} {'exposed comm (ms)':>18} {unit:>14} "
             f"{'efficiency':>11}"]
    for r in proj.rows:
        head = f"{r['devices']:>8} {r['nodes']:>6} {_gib(r['memory_bytes']):>10}"
        if r["fits"]:
            lines.append(f"{head} {r['step_s'] * 1e3:>10.2f} {r['comm_exposed_s'] * 1e3:>18.2f} {r['throughput']:>14.4g} "
                         f"{r['efficiency']:>11.1%}")
        else:
            alt = f"; fits with {', '.join(r['fits_with'])}" if r["fits_with"] else ""
            lines.append(f"{head}   does not fit{alt}")
    lines.append(scaling_summary(proj))
    return "\n".join(lines)


def scaling_summary(proj: Projection, floor: float = 0.8) -> str:
    """One sentence from the rows: from how many GPUs it fits, and where efficiency first falls below `floor`
    and why (latency, bandwidth), or how much it keeps at the largest count."""
    rows = proj.rows
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        r = rows[-1]
        cap = MEMORY_MARGIN * GPUS[proj.gpu]["memory"]
        return (f"{proj.label} does not fit on up to {r['devices']} {proj.gpu} GPUs: memory, {_gib(r['memory_bytes'])} per "
                f"GPU there against {_gib(cap)} usable.")
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
    on the floor, not a number; published results as labelled stars."""
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
    for case in published or []:
        ax.plot([case.gpus], [case.efficiency], "*", ms=11, color="black", zorder=5)
        ax.annotate(case.short, (case.gpus, case.efficiency), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if published:
        ax.plot([], [], "*", color="black", ms=9, label="published")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("scaling efficiency")
    ax.set_title("projected weak scaling")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left", bbox_to_anchor=(0, 0.1))
    return fig if fig is not None else ax


# --- pipeline parallelism and 3D placements --------------------------------------------------------

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


def _stage_model(model):
    """A ModelShape: a name of workshop.measure.memory.MODELS, a size that names one of them ("70B": Llama 2 70B), or a
    size shaped as workshop.measure.memory.model_shape does."""
    from workshop.measure import memory

    if isinstance(model, str) and model.lower() not in memory.MODELS:
        named = [key for key in memory.MODELS if key.endswith("-" + model.strip().lower())]
        if len(named) == 1:
            return memory.MODELS[named[0]]
    return memory.model_shape(model)


def pp_step(model, dp: int, tp: int, pp: int, microbatches: int, micro_batch_size: int = 1, seq_len: int = 4096,
            gpu: str = "h100", strategy: str = "ddp", mfu: float = 0.4, cluster: Cluster | None = None,
            virtual_stages: int = 1, compute_s: float | None = None) -> PipelineStep:
    """Seconds of one step of `model` (a memory.ModelShape, a name of memory.MODELS or a size) on dp x tp x pp GPUs
    of `gpu`: tensor parallelism over tp GPUs of a node, pp pipeline stages (across nodes once there is more than
    one), and `strategy` ("ddp" or "fsdp") over the dp data-parallel replicas of each stage, outermost; each GPU
    runs `microbatches` micro-batches of `micro_batch_size` sequences of `seq_len` tokens per step, 1F1B or GPipe
    (the same time), interleaved with `virtual_stages` > 1.

    On a GPU of the first stage, which holds ceil(L / pp) layers (memory.stage_layers) and sets the pace, a
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
    from workshop.measure import memory

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
    shape = _stage_model(model)
    w = Workload.gpt(shape.name, shape.layers, shape.dim, seq_len, shape.parameters, shape.heads)
    layers = memory.stage_layers(shape.layers, pp, virtual_stages) if pp > 1 else shape.layers
    n = memory.stage_parameters(shape, pp, virtual_stages) / tp  # parameters of a GPU of the first stage
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
    """One (dp, tp, pp) of `placements`: its memory per GPU (memory.plan, first stage), whether it fits, and
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

    Memory from memory.plan (full activation checkpointing and the `schedule` by default, fp32 AdamW states as
    everywhere in this module) against the GPU's memory x hardware.MEMORY_MARGIN; the step from pp_step with
    compute at `mfu` of the peak. Rows fastest first among those that fit, then those that do not fit (least
    memory first), then those excluded, each with a one-line reason."""
    from workshop.measure import memory

    for s in strategies:
        if s not in ("ddp", "fsdp"):
            raise ValueError(f"the data-parallel strategies of a placement are 'ddp' and 'fsdp', not {s!r}")
    for name, value in (("gpus", gpus), ("global_batch", global_batch), ("micro_batch_size", micro_batch_size),
                        ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(sorted(GPUS))}")
    shape, cl = _stage_model(model), cluster or gpu_cluster(gpu)
    capacity = MEMORY_MARGIN * GPUS[gpu]["memory"]
    tps = [t for t in (2**k for k in range(16)) if t <= 2 * cl.per_node and gpus % t == 0]
    rows = []
    for strategy in strategies:
        for tp in tps:
            for pp in (p for p in _divisors(gpus // tp) if p <= shape.layers):
                dp = gpus // (tp * pp)
                if dp == 1 and strategy != strategies[0]:
                    continue  # one replica: no data-parallel strategy to choose
                m, left = divmod(global_batch, dp * micro_batch_size)
                mem = memory.plan(shape, gpu=gpu, strategy=strategy, world_size=gpus, tp=tp, pp=pp,
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
                    rows.append(Placement(**row, reason=f"does not fit: {mem.total / 1e9:.1f} GB > {capacity / 1e9:.1f}"
                                                        f" GB usable of {GPUS[gpu]['memory'] / 1e9:.0f} GB"))
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
        " memory GB | fits | step s | bubble % | tokens/s per GPU | MFU | reason |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows[:top]:
        cells = [r.dp, r.tp, r.pp, r.microbatches] + ([r.strategy] if strategies else []) + \
            [f"{r.memory_bytes / 1e9:.1f}", "yes" if r.fits else "no"]
        if r.fits:
            cells += [f"{r.step_s:.2f}", f"{r.step.bubble:.1%}".rstrip("%"), f"{r.tokens_per_s:,.0f}", f"{r.mfu:.1%}"]
        else:
            cells += ["", "", "", ""]
        lines.append("| " + " | ".join(str(c) for c in cells + [r.reason]) + " |")
    fitting = sum(r.fits for r in rows)
    shown = len(rows[:top])
    lines += ["", f"{fitting} of {len(rows)} placements fit" + (f"; {shown} shown" if shown < len(rows) else "") + "."]
    return "\n".join(lines)


# --- published results -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Published:
    """A published scaling result and the configuration it was measured on, as the paper states it.

    Efficiency is the per-GPU throughput at `gpus` over that at `base_gpus` (weak scaling). The compute of a step
    is `compute_s` where the paper gives it, else solved so that the model's step at `base_gpus` equals the
    published `base_step_s`. strategy "ddp", "fsdp", or "tp_ddp" (Megatron: TP in the node, DDP across)."""

    short: str
    source: str
    efficiency: float
    gpus: int
    base_gpus: int
    strategy: str
    cluster: Cluster
    workload: Workload
    micro_batch_size: int
    grad_bytes_per_param: int
    gather_bytes_per_param: int = 2
    compute_s: float | None = None
    base_step_s: float | None = None
    overlap: bool = True
    bucket_bytes: float | None = DDP_BUCKET_BYTES
    tp: int = 1
    tp_allreduces_per_layer: int = 4
    setup: str = ""

    def step(self, compute_s: float, p: int) -> float:
        w, cl, n = self.workload, self.cluster, self.workload.parameters
        if self.strategy == "ddp":
            return ddp_step(compute_s, self.grad_bytes_per_param * n, p, cl, self.overlap, self.bucket_bytes)
        if self.strategy == "fsdp":
            return fsdp_step(compute_s, self.gather_bytes_per_param * n, p, cl, w.layers + 1, self.overlap,
                             grad_bytes=self.grad_bytes_per_param * n)
        if p < self.tp:  # the one-GPU baseline of a smaller model, at the same compute per GPU
            return compute_s
        tp = tp_comm(w.activation_bytes_per_sample * self.micro_batch_size, w.layers, self.tp, cl.intra,
                     self.tp_allreduces_per_layer)
        return ddp_step(compute_s + tp, self.grad_bytes_per_param * n / self.tp, p // self.tp, cl, self.overlap,
                        self.bucket_bytes, per_node=cl.per_node // self.tp)

    def predicted(self) -> float:
        compute = self.compute_s
        if compute is None:  # bisection: the step grows with the compute
            lo, hi = 0.0, self.base_step_s
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if self.step(mid, self.base_gpus) < self.base_step_s else (lo, mid)
            compute = (lo + hi) / 2
        return self.step(compute, self.base_gpus) / self.step(compute, self.gpus)


def _goyal() -> Published:
    # ResNet-50: 25,557,032 parameters (torchvision); fp32 training, fp32 gradients
    w = Workload("ResNet-50", 25_557_032, 0.0)
    return Published(
        "Goyal 2017", "Goyal et al. 2017, Accurate, Large Minibatch SGD, arXiv:1706.02677: abstract and sec. 5.5 "
        "(~90% from 8 to 256 GPUs), sec. 4.3 (hardware; backprop of ResNet-50 on one P100 takes 120 ms)",
        0.90, 256, 8, "ddp", Cluster(LINKS["nvlink1-p100"], shared("eth-50g", 8), 8, "Big Basin"), w, 32, 4,
        compute_s=0.120 / BACKWARD_SHARE,
        setup="ResNet-50, 32 images per P100, 8 per server (NVLink), one 50 Gbit Ethernet NIC per server; compute "
              "from the published 120 ms backprop; Caffe2 all-reduced gradient blobs as backprop produced them, "
              "modelled as DDP's 25 MiB buckets")


def _megatron() -> Published:
    # GPT-2 8.3B: 72 layers, hidden 3072, 32 heads, sequence 1024, vocabulary 50257 (Table 1); batch 8 per replica
    layers, h, s, b, vocab = 72, 3072, 1024, 8, 50257
    w = Workload.gpt("GPT-2 8.3B", layers, h, s, 8.3e9, heads=32)
    # FLOPs of a step with the forward recomputed (Narayanan et al. 2021, eq. 3), at the 39 TFLOP/s of one V100
    flops = 96 * b * s * layers * h**2 * (1 + s / (6 * h) + vocab / (16 * layers * h))
    return Published(
        "Megatron 2019", "Shoeybi et al. 2019, Megatron-LM, arXiv:1909.08053: abstract (76% of a 39 TFLOP/s "
        "one-GPU baseline on 512 GPUs), sec. 5 (32 DGX-2H, 300 GB/s NVSwitch, 100 GB/s between servers over 8 "
        "InfiniBand adapters), Table 1; Megatron-LM's training loop (github.com/NVIDIA/Megatron-LM, megatron/training.py, "
        "DDP_impl local) all-reduces the fp16 gradients after the backward (fp32_allreduce off) and recomputes activations",
        0.76, 512, 1, "tp_ddp", Cluster(LINKS["nvlink2-v100"], shared("ib-edr-100", 2), 16, "DGX-2H"), w, b, 2,
        compute_s=flops / 8 / 39e12, overlap=False, bucket_bytes=None, tp=8, tp_allreduces_per_layer=6,
        setup="8.3B GPT-2, 8-way TP x 64-way DP on 512 V100, 16 per node, batch 8 per replica of 1024 tokens")


def _torchtitan(short: str, gpus: int, base: int, tps: float, base_tps: float, gather: int, source: str,
                setup: str) -> Published:
    # Llama 3.1 8B: 32 layers, dim 4096, 8.03e9 parameters; sequence 8192, local batch 2
    w = Workload.gpt("Llama 3.1 8B", 32, 4096, 8192, 8.03e9, heads=32)
    return Published(short, source, tps / base_tps, gpus, base, "fsdp", gpu_cluster("h100"), w, 2, 4,
                     gather_bytes_per_param=gather, base_step_s=2 * 8192 / base_tps, setup=setup)


PUBLISHED = [
    _goyal(),
    _megatron(),
    _torchtitan("torchtitan H100", 128, 8, 5605, 5762, 2,
                "torchtitan, benchmarks/llama3_h100_202412_torchtitan.md, Tables 1 and 3 (FSDP: 5,762 tokens/s per "
                "GPU on 8 H100, 5,605 on 128; 8 per host on NVLink, 400 Gb/s RDMA per GPU)",
                "Llama 3.1 8B, FSDP2, bf16 all-gather and fp32 reduce-scatter (torchtitan's default), 2 x 8192 "
                "tokens per GPU; compute solved from the 8-GPU step"),
    _torchtitan("torchtitan H200", 64, 32, 10753, 10938, 1,
                "torchtitan, benchmarks/llama3_8b_h200_2025-06_torchtitan.md (Trainy: FSDP + Float8, 10,938 "
                "tokens/s per GPU on 4 nodes, 10,753 on 8; 8 H200 per host on NVLink, 400 Gb/s per GPU)",
                "Llama 3.1 8B, FSDP2 with float8 all-gather (1 byte per parameter), fp32 reduce-scatter, 2 x 8192 "
                "tokens per GPU; compute solved from the 32-GPU step"),
]


def validate(cases=None) -> list[dict]:
    """Each published result against the model: rows short, source, setup, gpus, base_gpus, published,
    predicted, difference (in efficiency points, predicted less published)."""
    rows = []
    for c in cases or PUBLISHED:
        pred = c.predicted()
        rows.append({"short": c.short, "source": c.source, "setup": c.setup, "gpus": c.gpus, "base_gpus": c.base_gpus,
                     "published": c.efficiency, "predicted": pred, "difference": pred - c.efficiency})
    return rows


def validation_markdown(rows: list[dict]) -> str:
    lines = ["# The cost model against published scaling results", "",
             "Produced by `python -m workshop.estimate.costmodel validate --out docs/results` and checked by "
             "`tests/test_costmodel.py`: each row feeds `workshop.estimate.costmodel` the published configuration (model, batch "
             "per GPU, GPUs per node, links, precision of the communication) and compares its predicted scaling "
             "efficiency with the published one. No constant is set per row; the hardware is data, with its source "
             "in `workshop/base/hardware.py` (`LINKS`) and `workshop/estimate/costmodel.py` (`PUBLISHED`).", "",
             "| result | GPUs (base) | published | predicted | difference | configuration | source |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['short']} | {r['gpus']} ({r['base_gpus']}) | {r['published']:.1%} | {r['predicted']:.1%} | "
                     f"{r['difference'] * 100:+.1f} points | {r['setup']} | {r['source']} |")
    lines += ["", "Efficiency is the throughput per GPU at the larger count over that at the base (weak scaling: the "
              "same batch per GPU); Megatron's base is one GPU running a 1.2B model at 39 TFLOP/s, so its row compares "
              "the FLOP/s per GPU at 512 GPUs with that.", ""]
    return "\n".join(lines)


# --- predicted against measured --------------------------------------------------------------------

def check_strategies(records: list[dict], link: AlphaBeta | dict, ag_link: AlphaBeta | dict | None = None,
                     rs_link: AlphaBeta | dict | None = None) -> list[dict]:
    """For each `bench strategies` record on 2 or more ranks: the measured DDP and FSDP step times against
    ddp_step and fsdp_step with no overlap, predicted from the parameter bytes, DDP's bucket size, FSDP's units,
    the all-reduce `link` (DDP), the all-gather and reduce-scatter links (FSDP; default `link`), and as compute
    the wrapper's step on a group of its rank alone, measured in the same run (hooks and copies included, no
    communication; the plain model's step where the record has none). A link may be a dict by world size, for
    fits made per rank count. Rows: model, world_size, strategy, compute_s, wrapper (that step over the plain
    model's), measured_s, predicted_s, error, and the communication's part of each: comm_measured_s (the step
    less the wrapper's step alone) and comm_predicted_s."""
    def at(ab, p):
        return ab.get(p, ab.get(0)) if isinstance(ab, dict) else ab
    out = []
    for rec in records:
        res = rec.get("results") or {}
        if rec.get("status", "ok") != "ok" or rec.get("notebook") != "bench-strategies":
            continue
        p = int(res.get("world_size", 1))
        if p < 2:
            continue
        for m in res.get("measurements", []):
            if m["strategy"] not in ("ddp", "fsdp"):
                continue
            compute = (res.get("alone_step_s") or {}).get(m["strategy"], res["compute_step_s"])
            if m["strategy"] == "ddp":
                pred = ddp_step(compute, res["param_bytes"], p, at(link, p), False, bucket_bytes=res["bucket_bytes"])
            else:
                pred = fsdp_step(compute, res["param_bytes"], p, at(ag_link or link, p), res["fsdp_units"], False,
                                 rs_link=at(rs_link or link, p))
            out.append({"model": res["model"], "world_size": p, "strategy": m["strategy"], "compute_s": res["compute_step_s"],
                        "wrapper": compute / res["compute_step_s"], "measured_s": m["step_time_s"], "predicted_s": pred,
                        "error": (pred - m["step_time_s"]) / m["step_time_s"],
                        # the communication alone: what the step takes beyond the wrapper's step on a group of one
                        "comm_measured_s": m["step_time_s"] - compute, "comm_predicted_s": pred - compute})
    return sorted(out, key=lambda r: (r["model"], r["world_size"], r["strategy"]))


def format_check(rows: list[dict]) -> str:
    lines = ["predicted against measured step time",
             f"{'model':>14} {'ranks':>6} {'strategy':>9} {'compute (ms)':>13} {'wrapper':>8} {'measured (ms)':>14} "
             f"{'predicted (ms)':>15} {'error':>8}   {'comm measured':>14} {'comm predicted':>15}"]
    for r in rows:
        lines.append(f"{r['model']:>14} {r['world_size']:>6} {r['strategy']:>9} {r['compute_s'] * 1e3:>13.2f} "
                     f"{r['wrapper']:>7.2f}x "
                     f"{r['measured_s'] * 1e3:>14.2f} {r['predicted_s'] * 1e3:>15.2f} {r['error']:>+8.1%}   "
                     f"{r['comm_measured_s'] * 1e3:>14.2f} {r['comm_predicted_s'] * 1e3:>15.2f}")
    return "\n".join(lines)


def plot_check(rows: list[dict]):
    """Measured and predicted step time of each strategy and rank count, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    labels = [f"{r['strategy']} x{r['world_size']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["measured_s"] * 1e3 for r in rows], 0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], [r["predicted_s"] * 1e3 for r in rows], 0.4, label="predicted")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['error']:+.0%}", (x + 0.2, r["predicted_s"] * 1e3), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("step time (ms)")
    ax.set_title("cost model against measurement")
    ax.legend()
    return fig


CHECK_COMMANDS = """\
export WORKSHOP_RUNS=docs/results/costmodel_check_runs OMP_NUM_THREADS=1   # one thread per rank, as torchrun sets for 2+ ranks
for n in 2 4; do python -m torch.distributed.run --standalone --nproc-per-node $n -m workshop.measure.bench collectives \\
    --sizes 4KiB,64KiB,256KiB,1MiB,4MiB,16MiB; done
for n in 1 2 4; do python -m torch.distributed.run --standalone --nproc-per-node $n -m workshop.measure.bench strategies \\
    --steps 20; done
python -m workshop.estimate.costmodel check docs/results/costmodel_check_runs --out docs/results"""


def calibrate_by_world_size(records: list[dict], collective: str) -> dict:
    """{world_size: AlphaBeta} fitted to each rank count's own `collective` times, and {0: ...} to all of them."""
    rows = collective_rows(records, collective)
    fits = {0: calibrate(rows, f"{collective}, all rank counts", collective)}
    for p in sorted({r["world_size"] for r in rows}):
        mine = [r for r in rows if r["world_size"] == p]
        if len({r["bytes"] for r in mine}) > 1:
            fits[p] = calibrate(mine, f"{collective}, {p} ranks", collective)
    return fits


def check(runs, out=None) -> str:
    """Calibrate all-reduce, all-gather and reduce-scatter on the records under `runs`, each rank count on its own
    measurements, predict the `bench strategies` step times there, and return the comparison; with `out`, also
    write costmodel_check.md and its PNG there."""
    from pathlib import Path

    from workshop.measure import report
    from workshop.measure.metrics import display_path

    records = [r.record for r in report.find_runs(runs)]
    links = {}
    for c in COLLECTIVES:
        if c == "all_reduce" or collective_rows(records, c):
            links[c] = calibrate_by_world_size(records, c)
    compared = check_strategies(records, links["all_reduce"], links.get("all_gather"), links.get("reduce_scatter"))
    if not compared:
        raise ValueError(f"no `bench strategies` record on 2 or more ranks under {display_path(runs)}: run "
                         "python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.measure.bench strategies")
    lines = []
    for c, fits in links.items():
        rows = collective_rows(records, c)
        lines.append(f"{c}: {len(rows)} times")
        for p, ab in fits.items():
            mine = [r for r in rows if p in (0, r["world_size"])]
            lines.append(f"  {ab}; largest error of the fit {fit_error(mine, ab, c):.0%}")
    lines += ["each rank count is predicted with the fits of its own measurements; no overlap assumed", "",
              format_check(compared)]
    lines.append(f"\nlargest error {max(abs(r['error']) for r in compared):.0%}; "
                 f"mean absolute error {sum(abs(r['error']) for r in compared) / len(compared):.0%}")
    text = "\n".join(lines)
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plot_check(compared).savefig(out / "costmodel_check.png", dpi=110)
        rec = next(r for r in records if r.get("notebook") == "bench-strategies")
        hw, v = rec.get("hardware", {}), rec.get("versions", {})
        (out / "costmodel_check.md").write_text("\n".join([
            "# The cost model against measured DDP and FSDP steps", "",
            f"Measured on {hw.get('cpus')} CPU cores ({hw.get('platform')}), gloo, torch {v.get('torch')}, "
            f"python {v.get('python')}, revision {rec.get('git')}. The machine was shared with other work: "
            "`bench collectives` and `bench strategies` time their variants in turns, one call each per round, so "
            "that the load slows them alike, and report the median of the slowest rank.", "",
            f"Produced by these commands; the records they wrote are in `{display_path(runs)}`:", "",
            "```bash", CHECK_COMMANDS, "```", "",
            "Compute is each wrapper's step on a process group of its rank alone, measured in the same run (hooks and "
            "copies, no communication); the alpha-beta model adds the communication: DDP's buckets with the "
            "all-reduce's alpha and beta, FSDP's all-gathers and reduce-scatters with their own, fitted to "
            "`bench collectives` (gloo's reduce-scatter costs more per byte than its all-gather). Each rank count "
            "is predicted with the fits of its own measurements: 4 ranks on 2 cores share them, which no alpha and "
            "beta of a network describe. The last two columns hold the communication alone: the measured step less "
            "that compute, against the model's.", "", "```", text, "```", "",
            "![predicted against measured](costmodel_check.png)", ""]))
    return text


# --- command line ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    from pathlib import Path

    from workshop.base.params import positive

    parser = argparse.ArgumentParser(prog="python -m workshop.estimate.costmodel", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="predicted against measured DDP and FSDP step times of `bench strategies` records")
    c.add_argument("runs", type=Path, help="a runs folder with `bench collectives` and `bench strategies` records")
    c.add_argument("--out", type=Path, help="also write costmodel_check.md and costmodel_check.png here")
    p = sub.add_parser("project", help="throughput, efficiency and memory from 1 to 4096 GPUs of a model of a given size")
    p.add_argument("size", help="parameters, e.g. 7B, 350M, 1.3e9")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--strategy", choices=STRATEGIES, default="fsdp")
    p.add_argument("--micro-batch-size", type=positive(int), default=4, help="sequences per GPU (default 4)")
    p.add_argument("--seq-len", type=positive(int), default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--mfu", type=positive(float), default=0.4, help="fraction of the GPU's peak that compute reaches "
                                                                      "(default 0.4)")
    p.add_argument("--tp", type=positive(int), default=8, help="tensor-parallel size of tp_fsdp (default 8)")
    pl = sub.add_parser("placements", help="every dp x tp x pp of a model on a number of GPUs, fastest first")
    pl.add_argument("model", help="a published model (llama2-70b, gpt3-175b, ...), its size (70B: Llama 2 70B), or "
                                  "another size, shaped as usual")
    pl.add_argument("--gpus", type=positive(int), default=512, help="GPUs in all (default 512)")
    pl.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    pl.add_argument("--global-batch", type=positive(int), default=GLOBAL_BATCH,
                    help=f"sequences per step (default {GLOBAL_BATCH}: Llama 2's 4M tokens)")
    pl.add_argument("--micro-batch-size", type=positive(int), default=1, help="sequences per micro-batch (default 1)")
    pl.add_argument("--seq-len", type=positive(int), default=SEQ_LEN, help=f"tokens per sequence (default {SEQ_LEN})")
    pl.add_argument("--mfu", type=positive(float), default=0.4, help="fraction of the GPU's peak that compute reaches "
                                                                       "(default 0.4)")
    pl.add_argument("--strategy", choices=("ddp", "fsdp", "both"), default="both",
                    help="data-parallel strategy over the replicas (default both)")
    pl.add_argument("--top", type=int, default=10, help="rows to show (default 10; 0: all)")
    v = sub.add_parser("validate", help="the model against published scaling results")
    v.add_argument("--out", type=Path, help="also write costmodel_validation.md here")
    args = parser.parse_args(argv)
    if args.command == "placements" and args.top < 0:
        parser.error(f"--top {args.top}: give how many rows to show, or 0 for all")
    try:
        if args.command == "check":
            print(check(args.runs, args.out))
        elif args.command == "placements":
            strategies = ("ddp", "fsdp") if args.strategy == "both" else (args.strategy,)
            rows = placements(args.model, args.gpus, args.gpu, args.global_batch, args.micro_batch_size, args.seq_len,
                              strategies, args.mfu)
            shape = _stage_model(args.model)
            print(f"{shape.name} ({shape.parameters / 1e9:.3g}B parameters, {shape.layers} layers) on {args.gpus} "
                  f"{args.gpu}: {args.global_batch} sequences of {args.seq_len} tokens per step, micro-batch "
                  f"{args.micro_batch_size}, 1F1B, full activation checkpointing, compute at {args.mfu:.0%} of peak\n")
            print(format_placements(rows, args.top or None))
        elif args.command == "validate":
            rows = validate()
            text = validation_markdown(rows)
            print(text)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "costmodel_validation.md").write_text(text)
        else:
            w = Workload.from_size(args.size, tokens_per_sample=args.seq_len)
            print(format_projection(project(w, args.gpu, args.strategy, args.micro_batch_size, args.mfu, tp=args.tp)))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
