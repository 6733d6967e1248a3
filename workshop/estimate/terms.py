"""The terms of the cost model that the alpha-beta collectives leave out, each with its source, and the GPU facts
they read. `workshop.estimate.validation` switches each off in a sensitivity run to show what it buys.

    gemm_efficiency   the per-GPU batch's compute efficiency: when a step is split over more GPUs at a fixed global
                      batch, each GPU's matrix multiplications shrink. The roofline (Williams, Waterman and Patterson,
                      "Roofline", CACM 2009): a GEMM of (M x K) by (K x N) in 2-byte numbers does 2MKN FLOPs on
                      2(MK + KN + MN) bytes of HBM, so it runs at min(peak, intensity x bandwidth); a layer's four
                      GEMMs (QKV, output projection, the MLP's two) weighted by their FLOPs. M is the tokens of a
                      micro-batch, so the curve falls only when they are few.
    overlap_slowdown  communication kernels slowing the compute they overlap with: an NCCL collective runs as
                      thread blocks on the GPU's SMs, so the compute beside it gets the SMs it leaves. An H100's
                      ncclAllGather launched 24 blocks on its 132 SMs while FSDP's prefetch overlapped a GEMM
                      (NVIDIA developer forums, "Compute-communication overlap causes severe GEMM performance
                      degradation because of tail effect", thread 337991, measured with Nsight Systems; the GEMM
                      there slowed more, by a wave tail). The share taken is blocks / SMs, for as long as
                      communication is hidden behind compute.
    elementwise_seconds
                      the work tensor parallelism does not split: Megatron's TP duplicates LayerNorm, dropout and
                      the residual additions on every GPU of the group (Shoeybi et al. 2019, sec. 3), memory-bound
                      work on (micro_batch, seq, dim) activations. Per layer, counted in passes over that tensor in
                      2 bytes: forward 2 LayerNorms x 2 (read, write) + 2 dropouts x 2.5 (read, write, a 1-byte mask)
                      + 2 residual additions x 3 (read two, write one) = 15; backward 2 x 3 + 2 x 2.5 + 2 x 3 = 17;
                      the forward again where activations are recomputed. At the HBM's bandwidth.
    straggler_factor  GPUs in lockstep wait for the slowest: a synchronous step (every collective a barrier) ends
                      when its slowest GPU does. Identical GPUs are not equally fast: Sinha et al., "Not All GPUs Are
                      Created Equal: Characterizing Variability in Large-Scale, Accelerator-Rich Systems", SC22
                      (arXiv:2208.11035v3, abstract), measure "8% (max 22%) average performance variation" between
                      GPUs of one cluster and SKU, over more than 90% of the GPUs of five clusters, from manufacturing
                      variability and power management (the SC22 programme's abstract, over four of the clusters,
                      gives 32%, max 72%). The abstract does not define the variation; read here as the width of a
                      band in which each GPU's step time lies, uniformly, a static band (the same GPU slow at every
                      step): the slowest of N lies on average at N / (N + 1) of the band, one GPU at 1 / 2, so N GPUs
                      in lockstep take (1 + spread N / (N + 1)) / (1 + spread / 2) of one GPU's mean time.
    deepspeed_gather_seconds
                      DeepSpeed's ZeRO-3 as of early 2021 gathered each parameter tensor by itself, synchronously,
                      at a cost per operation. DeepSpeed issue #1069 (github.com/deepspeedai/DeepSpeed/issues/1069,
                      comment of 2021-06-21, Nsight trace on one node of 8 A100): "all_gathers for one parameter takes
                      about 0.5ms to finish ... The pre_launch typically takes 130us, the launch takes 250us about,
                      and there is a torch.cuda.synchronize() sync point"; the fix proposed "batching, to reduce the
                      number of all_gather ops". DeepSpeed pull request #1188 (2021-06-25): "the async version is not
                      async at all, because each all_gather calls torch.cuda.synchronize()", and its new
                      `_allgather_params_coalesced`: before it, gathers neither overlapped compute nor each other.
                      So a tensor's gather takes 130 + 250 us of DeepSpeed's own (less the ring's latency on the one
                      node it was timed on, which the link prices) and the ring all-gather of its bytes on the GPUs
                      of the step (`network.all_gather`: NCCL's ring, p - 1 steps). The check: DeepSpeed issue #1174
                      (2021-06-19, same author, DeepSpeed 0.3.16, bing_bert of about 5.1B parameters, 8 A100 with
                      NVLink) timed the forward at about 480 ms under ZeRO-3 against about 60 ms under ZeRO-2. That
                      model has 1,040 parameter tensors (64 BERT layers of 16: query, key, value, the attention's
                      output, the two feed-forward matrices, each weight and bias, 2 LayerNorms of 2; and 16 in the
                      embeddings, pooler and heads, DeepSpeedExamples' bing_bert/nvidia/modelingpreln.py); at this
                      cost they take 425 ms of gathers, against the 420 ms ZeRO-3 added (test_costmodel_validation).
                      Read instead as a rate per byte (`gather_rate`: 7/8 x 2 bytes x 5e9 / 0.42 s = 20.8 GB/s per
                      GPU), #1174's 420 ms fits as well alone, but leaves no room for #1069's cost per operation; that
                      reading is an alternative in the sensitivity table. What a step pays (`scaling`, for the rows whose
                      facts say DeepSpeed of that time): every unit gathered before its forward, again before the
                      recomputed forward where activations are recomputed, and before its backward (ZeRO-3 frees what
                      each forward used); the gradients' reduce-scatter at the links' rate, beside the next unit's
                      backward, as no source cited here prices DeepSpeed's.

    terms.gemm_efficiency(tokens=2048, dim=12288, tp=8, gpu="a100-80")    # 1.0: compute-bound
    terms.overlap_slowdown("h100")                                        # 24 / 132
    terms.elementwise_seconds(tokens=8192, dim=3072, layers=72, gpu="v100", recompute=True)
    terms.straggler_factor(8)                                             # 1.0299: the slowest of 8
    terms.DEEPSPEED_2021_OP * 1e6                                         # 352 us per tensor (#1069)
    terms.DEEPSPEED_2021_RATE / 1e9                                       # 20.8 GB/s per GPU (#1174 per byte)
"""

from __future__ import annotations

from dataclasses import dataclass

from workshop.base import hardware


@dataclass(frozen=True)
class GpuFacts:
    """What the terms need of a GPU: dense fp16/bf16 peak (FLOP/s), HBM bandwidth (bytes/s), SMs (data sheets)."""

    name: str
    peak: float
    hbm: float
    sms: int


# Peaks, SMs and HBM bandwidth from workshop.base.hardware (its data sheets); "h100-hbm2e" is the H100 with 96 GB of
# HBM2e at 2.4 TB/s that torchtitan's benchmark describes its GPUs as.
_PEAK, _SMS, _HBM = hardware.GPU_PEAK_TFLOPS, hardware.GPU_SMS, hardware.GPU_HBM_BYTES_PER_S


def _from_sheet(name: str, gpu: str, precision: str, hbm: float | None = None) -> GpuFacts:
    return GpuFacts(name, _PEAK[gpu][precision] * 1e12, hbm or _HBM[gpu], _SMS[gpu])


GPU_FACTS = {g.name: g for g in (
    _from_sheet("p100", "P100", "fp16"),
    _from_sheet("v100", "V100", "fp16"),
    _from_sheet("a100-80", "A100", "bf16"),
    _from_sheet("h100", "H100", "bf16"),
    _from_sheet("h100-hbm2e", "H100", "bf16", hbm=2400e9),
    _from_sheet("h200", "H200", "bf16"),
)}

# Thread blocks an NCCL collective occupies while it runs (the forum thread above, on an H100)
COMM_BLOCKS = 24


def _facts(gpu: str) -> GpuFacts:
    if gpu not in GPU_FACTS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(sorted(GPU_FACTS))}")
    return GPU_FACTS[gpu]


def gemm_efficiency(tokens: float, dim: int, tp: int = 1, gpu: str = "h100") -> float:
    """The share of the GPU's peak a transformer layer's GEMMs reach on a micro-batch of `tokens` (module
    docstring): 1.0 while they are compute-bound; 1.0 too for a model without a width (dim 0)."""
    if dim <= 0:
        return 1.0
    if tokens <= 0 or tp < 1:
        raise ValueError(f"tokens and tp must be positive, got {tokens} and {tp}")
    g = _facts(gpu)
    ridge = g.peak / g.hbm  # FLOP per byte where bandwidth stops limiting
    flops = seconds = 0.0
    for k, n in ((dim, 3 * dim / tp), (dim / tp, dim), (dim, 4 * dim / tp), (4 * dim / tp, dim)):
        m = tokens
        intensity = m * k * n / (m * k + k * n + m * n)  # 2MKN FLOPs over 2(MK + KN + MN) bytes
        flops += m * k * n
        seconds += m * k * n / min(1.0, intensity / ridge)
    return flops / seconds


def overlap_slowdown(gpu: str, blocks: int = COMM_BLOCKS) -> float:
    """The share of the compute lost while a collective overlaps it: `blocks` of the GPU's SMs (module docstring)."""
    if blocks < 0:
        raise ValueError(f"blocks must be >= 0, got {blocks}")
    return min(1.0, blocks / _facts(gpu).sms)


FORWARD_PASSES, BACKWARD_PASSES = 15, 17  # per layer, over the (micro_batch, seq, dim) activations (module docstring)


def elementwise_seconds(tokens: float, dim: int, layers: float, gpu: str, recompute: bool = False,
                        scale: float = 1.0) -> float:
    """Seconds of a micro-batch's LayerNorms, dropouts and residual additions on `layers` layers, whole on every GPU
    of a tensor-parallel group (module docstring); `scale` multiplies the passes counted."""
    passes = FORWARD_PASSES * (2 if recompute else 1) + BACKWARD_PASSES
    return scale * passes * tokens * dim * 2 * layers / _facts(gpu).hbm


# The band of step times of identical GPUs: Sinha et al. 2022's average over clusters (module docstring)
SPREAD = 0.08


def straggler_factor(gpus: int, spread: float = SPREAD) -> float:
    """The expected step time of `gpus` GPUs in lockstep over one GPU's mean: the slowest of them, each GPU's time
    uniform on a band of width `spread` (module docstring); 1.0 for one GPU or a spread of 0 (term off)."""
    if gpus < 1 or spread < 0:
        raise ValueError(f"gpus must be >= 1 and spread >= 0, got {gpus} and {spread}")
    return (1 + spread * gpus / (gpus + 1)) / (1 + spread / 2)


def gather_rate(params: float, gpus: int, zero3_forward: float, zero2_forward: float, value_bytes: float = 2) -> float:
    """Bytes per second each GPU receives in ZeRO-3's gathers, read as a rate per byte from a forward timed under
    ZeRO-3 and under ZeRO-2 on `gpus` GPUs (module docstring: the alternative reading of #1174): (gpus - 1) / gpus of
    the parameters' bytes over the time ZeRO-3 adds."""
    if gpus < 2 or zero3_forward <= zero2_forward:
        raise ValueError(f"need 2 GPUs or more and a ZeRO-3 forward slower than ZeRO-2's, got {gpus}, "
                         f"{zero3_forward} and {zero2_forward}")
    return (gpus - 1) / gpus * value_bytes * params / (zero3_forward - zero2_forward)


# DeepSpeed issue #1174 read per byte: 5B parameters on 8 A100, forward 480 ms under ZeRO-3, 60 ms under ZeRO-2
DEEPSPEED_2021_RATE = gather_rate(5e9, 8, 0.480, 0.060)
# DeepSpeed issue #1069: pre_launch 130 us + launch 250 us per parameter tensor, timed on one node of 8 A100, less
# the 7 steps of latency the ring on that node's NVLink has (the link's part, priced by network.all_gather)
DEEPSPEED_2021_OP = 130e-6 + 250e-6 - 7 * hardware.LINKS["nvlink3-a100"].latency_us * 1e-6


def deepspeed_gather_seconds(tensor_seconds: float, tensors: int, op: float = DEEPSPEED_2021_OP) -> float:
    """Seconds of gathering `tensors` parameter tensors one after another, each synchronous (module docstring):
    DeepSpeed's own `op` per tensor and `tensor_seconds`, the links' all-gather of one tensor."""
    if tensors < 1 or op < 0:
        raise ValueError(f"tensors must be >= 1 and op >= 0, got {tensors} and {op}")
    return tensors * (op + tensor_seconds)


def synchronous_gather_seconds(param_bytes: float, gpus: int, rate: float, link_seconds: float = 0.0) -> float:
    """Seconds of a gather of `param_bytes` on `gpus` GPUs that nothing overlaps, read per byte: the (gpus - 1) / gpus
    of it each GPU receives at `rate` bytes per second, or `link_seconds` (the links' own time) where that is slower."""
    if gpus < 1 or rate <= 0:
        raise ValueError(f"gpus must be >= 1 and rate > 0, got {gpus} and {rate}")
    return max((gpus - 1) / gpus * param_bytes / rate, link_seconds)
