"""One step of a configuration with every term of the cost model: the alpha-beta collectives of
`workshop.estimate.network` arranged by `workshop.estimate.steps`, and the terms of `workshop.estimate.terms`. The
validation against published results (`workshop.estimate.validation`) and the strong-scaling projection
(`workshop.estimate.projection`) both run it.

    DDP, FSDP   each GPU runs `microbatches` micro-batches and reduces once: DDP's buckets overlap the last
                micro-batch's backward (`steps.ddp_step`); FSDP gathers once per step and reduce-scatters after the
                last backward, prefetched unit by unit (`steps.fsdp_step`, as with reshard_after_forward=False)
    ZeRO-3      DeepSpeed's as of early 2021 (`implementation` "deepspeed-2021"): every micro-batch gathers each
                unit before its forward, before the recomputed forward (`recompute`) and before its backward, tensor
                by tensor, synchronously (not behind compute), each tensor at DeepSpeed's cost per operation from
                its issue #1069 and the links' ring all-gather (`terms.deepspeed_gather_seconds`); the gradients'
                reduce-scatter at the links' rate, beside the next unit's backward as FSDP's (`Options.deepspeed_*`
                the alternatives)
    TP x DP     Megatron 2019: TP all-reduces on the critical path, then the gradients' all-reduce, not overlapped
    3D          TP x PP x DP: each micro-batch t = compute + TP all-reduces + the sends between stages; the step
                (m + (p - 1) / v) t (Narayanan et al. 2021, sec. 2.2) + the data-parallel communication not hidden

A step's compute is its GEMMs at `rate` (work per second), scaled by the per-GPU batch's GEMM efficiency against a
reference, plus the elementwise work that tensor parallelism leaves whole, at the pace of the slowest of the step's
GPUs (`terms.straggler_factor`); communication hidden behind compute slows it by `terms.overlap_slowdown` of its
seconds. `Options` switches each term off.

    scaling.step_time(setup, rate=150e12)
"""

from __future__ import annotations

from dataclasses import dataclass

from workshop.estimate import terms
from workshop.estimate.network import AlphaBeta, Cluster, all_gather, reduce_scatter
from workshop.estimate.steps import BACKWARD_SHARE, DDP_BUCKET_BYTES, ddp_step, fsdp_step, tp_comm


@dataclass(frozen=True)
class Setup:
    """One configuration as the model runs it. `work`: per GPU per step, in the row's unit (FLOPs by the paper's
    own count, tokens, or steps); strategy "ddp", "fsdp" (ZeRO-3 too), "tp_dp" (Megatron 2019: tensor parallel in
    the node, DDP across, after the backward) or "3d" (TP x PP x DP, `dp_strategy` "ddp" or "fsdp")."""

    gpus: int
    strategy: str
    cluster: Cluster
    gpu: str  # a key of terms.GPU_FACTS
    work: float
    params: float
    layers: int = 1
    dim: int = 0
    seq: int = 0
    micro_batch: int = 1  # sequences per micro-batch
    microbatches: int = 1  # per step on each GPU (the pipeline's m)
    tp: int = 1
    pp: int = 1
    virtual: int = 1  # interleaved pipeline stages per GPU
    dp_strategy: str = "ddp"
    grad_bytes: float = 4
    gather_bytes: float = 2
    bucket_bytes: float | None = DDP_BUCKET_BYTES
    units: int | None = None  # FSDP units (default: layers + 1)
    tensors: int = 1  # parameter tensors per unit, gathered one by one where the implementation does (DeepSpeed 2021)
    tp_allreduces: int = 4
    recompute: bool = False  # activations recomputed in the backward (a third pass of the forward)
    implementation: str = "fsdp"  # how "fsdp" runs: "fsdp" (prefetched, the links' rate) or "deepspeed-2021"


@dataclass(frozen=True)
class Options:
    """The model's terms and global choices. curve: the per-GPU batch's GEMM efficiency; slowdown_blocks: SMs a
    collective takes from overlapped compute (0: term off); bubble: the pipeline schedule's fill and drain; comm:
    False prices every link at zero (the compute-only control); bandwidth, latency: scales of every link; node_rings:
    a node's GPUs cross the network together (NCCL's rings, one per NIC), else each through its own NIC;
    elementwise: the duplicated elementwise work, its passes scaled (0: off); straggler: the band of identical GPUs'
    step times, the slowest of the step's GPUs setting its pace (0: off); deepspeed: a "deepspeed-2021" setup's own
    gathers (False: run as "fsdp"), tensor by tensor at `deepspeed_op` seconds each besides the links' time, or, if
    `deepspeed_rate` is set, unit by unit at that many bytes/s per GPU (#1174 read per byte); `deepspeed_gathers`
    per unit and micro-batch (None: 3 where activations are recomputed, else 2); its reduce-scatter
    `deepspeed_reduce`: "overlapped" (behind the next unit's backward) or "exposed" (after it), at the links' rate."""

    curve: bool = True
    slowdown_blocks: int = terms.COMM_BLOCKS
    bubble: bool = True
    comm: bool = True
    bandwidth: float = 1.0
    latency: float = 1.0
    node_rings: bool = True
    elementwise: float = 1.0  # scale of the elementwise passes counted (0: term off)
    straggler: float = terms.SPREAD
    deepspeed: bool = True
    deepspeed_op: float = terms.DEEPSPEED_2021_OP
    deepspeed_rate: float | None = None
    deepspeed_gathers: int | None = None
    deepspeed_reduce: str = "overlapped"


MODEL = Options()


def _link(ab: AlphaBeta, o: Options) -> AlphaBeta:
    if not o.comm:
        return AlphaBeta(0.0, 0.0, ab.name)
    return AlphaBeta(ab.alpha * o.latency, ab.beta / o.bandwidth, ab.name)


def efficiency(s: Setup, o: Options) -> float:
    return terms.gemm_efficiency(s.micro_batch * s.seq, s.dim, s.tp, s.gpu) if o.curve and s.dim else 1.0


def elementwise(s: Setup, o: Options) -> float:
    """Seconds per step of the LayerNorms, dropouts and residual additions of this GPU's layers."""
    if not s.dim or not o.elementwise:
        return 0.0
    per_micro_batch = terms.elementwise_seconds(s.micro_batch * s.seq, s.dim, s.layers / s.pp, s.gpu, s.recompute,
                                                o.elementwise)
    return s.microbatches * per_micro_batch


def step_time(s: Setup, rate: float, o: Options = MODEL, ref_efficiency: float = 1.0) -> float:
    """Seconds of one step of `s` on a GPU whose GEMMs do `rate` work per second at the efficiency `ref_efficiency`
    (the base's)."""
    cl = Cluster(_link(s.cluster.intra, o), _link(s.cluster.inter, o), s.cluster.per_node, s.cluster.name)
    pace = terms.straggler_factor(s.gpus, o.straggler)  # every GPU waits for the slowest at each collective
    compute = (s.work / rate * ref_efficiency / efficiency(s, o) + elementwise(s, o)) * pace
    slow = terms.overlap_slowdown(s.gpu, o.slowdown_blocks) if o.comm else 0.0
    n, ring = s.params, None if o.node_rings else 1
    if s.implementation not in ("fsdp", "deepspeed-2021"):
        raise ValueError(f"unknown implementation {s.implementation!r}")
    if s.strategy == "fsdp" and s.implementation == "deepspeed-2021" and o.deepspeed:
        return _deepspeed_2021(s, compute, cl, o, slow, ring)
    if s.strategy in ("ddp", "fsdp"):
        m = s.microbatches
        def run(overlap):
            if s.strategy == "ddp":  # the earlier micro-batches accumulate; the last one's backward hides the buckets
                last = ddp_step(compute / m, s.grad_bytes * n, s.gpus, cl, overlap, s.bucket_bytes, per_node=ring)
                return compute * (m - 1) / m + last
            return fsdp_step(compute, s.gather_bytes * n, s.gpus, cl, s.units or s.layers + 1, overlap,
                             grad_bytes=s.grad_bytes * n, per_node=ring)
        on = run(True)
        return on + slow * (run(False) - on)  # hidden communication slows the compute beside it
    activations = s.micro_batch * s.seq * s.dim * 2  # one layer's (micro_batch, seq, dim) output in 2 bytes
    if s.strategy == "tp_dp":
        tp = tp_comm(activations, s.layers, s.tp, cl.intra, s.tp_allreduces)
        per_node = 1 if ring else max(1, cl.per_node // s.tp)
        return ddp_step(compute + tp, s.grad_bytes * n / s.tp, s.gpus // s.tp, cl, False, None, per_node=per_node)
    if s.strategy != "3d":
        raise ValueError(f"unknown strategy {s.strategy!r}")
    m = s.microbatches
    c = compute / m
    tp = tp_comm(activations, round(s.layers / s.pp), s.tp, cl.intra, s.tp_allreduces)
    p2p = 2 * s.virtual * (cl.inter.alpha + activations / s.tp * cl.inter.beta) if s.pp > 1 else 0.0
    t = c + tp + p2p
    bubble = (s.pp - 1) / s.virtual * t if o.bubble else 0.0
    dp, per_gpu = s.gpus // (s.tp * s.pp), n / (s.tp * s.pp)
    if s.dp_strategy == "ddp":  # after the pipeline's flush, one bucket, not overlapped (Megatron-LM's local DDP)
        dp_s = ddp_step(0.0, s.grad_bytes * per_gpu, dp, cl, False, None, per_node=1)
    else:  # FSDP without resharding: gathered before the first forward, reduce-scattered after the last backward
        units = max(1, round(s.layers / s.pp))

        def run(overlap):
            return fsdp_step(m * c, s.gather_bytes * per_gpu, dp, cl, units, overlap, grad_bytes=s.grad_bytes * per_gpu,
                             per_node=1) - m * c
        on = run(True)
        dp_s = on + slow * (run(False) - on)
    return m * t + bubble + dp_s


def _deepspeed_2021(s: Setup, compute: float, cl: Cluster, o: Options, slow: float, ring: int | None) -> float:
    """A ZeRO-3 step of DeepSpeed before its pull request #1188 (module docstring): per micro-batch and unit,
    `o.deepspeed_gathers` gathers, tensor by tensor at DeepSpeed's cost per operation (or at `o.deepspeed_rate`),
    not overlapped; the forward and backward compute; the reduce-scatter as `o.deepspeed_reduce` says."""
    u, m, p = s.units or s.layers + 1, s.microbatches, s.gpus
    unit_bytes, grad_bytes = s.gather_bytes * s.params / u, s.grad_bytes * s.params / u
    if not o.comm or p == 1:
        ag = 0.0
    elif o.deepspeed_rate is None:
        ag = terms.deepspeed_gather_seconds(all_gather(unit_bytes / s.tensors, p, cl, ring), s.tensors, o.deepspeed_op)
    else:
        ag = terms.synchronous_gather_seconds(unit_bytes, p, o.deepspeed_rate, all_gather(unit_bytes, p, cl, ring))
    rs = reduce_scatter(grad_bytes, p, cl, ring) if p > 1 else 0.0
    f, b = (1 - BACKWARD_SHARE) * compute / (m * u), BACKWARD_SHARE * compute / (m * u)
    gathers = (o.deepspeed_gathers or (3 if s.recompute else 2)) * u * ag
    if o.deepspeed_reduce == "overlapped":  # each unit's reduce-scatter beside the next unit's backward
        on = u * f + b + (u - 1) * max(b, rs) + rs
        hidden = u * (f + b) + u * rs - on
        return m * (gathers + on + slow * hidden)
    if o.deepspeed_reduce != "exposed":
        raise ValueError(f"unknown deepspeed_reduce {o.deepspeed_reduce!r}")
    return m * (gathers + u * (f + b + rs))
