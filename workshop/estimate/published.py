"""Published scaling results, each with the configuration its paper states, that the cost model is held to
(`workshop.estimate.validation` predicts and scores them; tests/test_costmodel_validation.py holds the targets).

A row compares two configurations of one source: the base (the paper's own baseline) and the row. Efficiency rows
publish the per-GPU throughput at the row over that at the base; throughput rows publish TFLOP/s per GPU at both,
and the model is calibrated on the base only. Each row carries the facts it passes and where in the paper they
stand; a choice the paper leaves open is a `Choice` of its source, with the value used, why, and the alternatives
that the sensitivity table tries. No constant is set per row: the compute speed comes from the paper (Goyal's
backprop time, Megatron's one-GPU TFLOP/s) or from the base row's published throughput, once per base.

    published.SOURCES["narayanan2021"].rows()      # ZeRO-3 and PTD-P, 175B and 530B (Table 2)
    published.rows()                               # every row of every source
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from workshop.estimate.network import LINKS, Cluster, gpu_cluster, shared
from workshop.estimate.scaling import Setup
from workshop.estimate.steps import BACKWARD_SHARE, DDP_BUCKET_BYTES


@dataclass(frozen=True)
class Row:
    """A published point. kind "efficiency" (published: a fraction) or "throughput" (TFLOP/s per GPU, with the
    base's in `base_published`). The base's compute speed: `compute_rate` (work per second of compute, where the
    paper gives it) or solved from `base_rate` (published work per second per GPU at the base, communication
    included). `lacks`: the term the model does not have that this row depends on, printed where it misses."""

    source: str
    label: str
    series: str
    kind: str
    published: float
    base: Setup
    setup: Setup
    cite: str
    facts: str
    base_published: float = 1.0
    compute_rate: float | None = None  # the base's compute alone: work per second, no communication
    base_rate: float | None = None
    lacks: str = ""


@dataclass(frozen=True)
class Choice:
    """A modelling choice the paper leaves open: the value `used` and `why`, and `alternatives` (label, keyword
    arguments of the source's builder) that the sensitivity table tries."""

    name: str
    used: str
    why: str
    alternatives: tuple[tuple[str, dict], ...]


@dataclass(frozen=True)
class Source:
    key: str
    citation: str
    build: Callable[..., list[Row]]
    choices: tuple[Choice, ...] = ()
    left_out: str = ""  # published points of this source not in the set, and why

    def rows(self, **choices) -> list[Row]:
        return self.build(**choices)


def megatron_flops(batch: int, seq: int, layers: int, dim: int, vocab: int, factor: int = 96) -> float:
    """FLOPs of one step of a GPT (Narayanan et al. 2021, eq. 3): factor B s l h^2 (1 + s/6h + V/16lh), factor 96
    with the forward recomputed, 72 without."""
    return factor * batch * seq * layers * dim**2 * (1 + seq / (6 * dim) + vocab / (16 * layers * dim))


def palm_flops_per_token(params: float, layers: int, dim: int, seq: int) -> float:
    """Model FLOPs per token as MFU counts them (Chowdhery et al. 2022, PaLM, appendix B): 6N + 12 l h s."""
    return 6 * params + 12 * layers * dim * seq


# --- Goyal et al. 2017 --------------------------------------------------------------------------------------------

GOYAL = ("Goyal et al. 2017, Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour, arXiv:1706.02677")
RESNET50 = 25_557_032  # parameters (torchvision's ResNet-50)


def _goyal(bucket_bytes: float | None = DDP_BUCKET_BYTES) -> list[Row]:
    big_basin = Cluster(LINKS["nvlink1-p100"], shared("eth-50g", 8), 8, "Big Basin")
    base = Setup(8, "ddp", big_basin, "p100", work=1.0, params=RESNET50, grad_bytes=4, bucket_bytes=bucket_bytes)
    return [Row("goyal2017", "ResNet-50 data parallel", "DDP", "efficiency", 0.90, base, replace(base, gpus=256),
                "abstract and sec. 5.5: about 90% scaling efficiency from 8 to 256 GPUs",
                "32 images per P100, 8 per Big Basin server on NVLink, one 50 Gbit Ethernet NIC per server (sec. 4.3, "
                "5.5); fp32 gradients; compute from the backprop of one P100, 120 ms (sec. 4.3), as 2/3 of the step",
                compute_rate=BACKWARD_SHARE / 0.120,
                lacks="what slows 32 servers against one beyond the all-reduce and the slowest GPU: step jitter "
                      "between servers, and Gloo's TCP all-reduce reaching less than the NIC's nominal 50 Gbit/s")]


# --- Shoeybi et al. 2019, Megatron-LM ----------------------------------------------------------------------------

MEGATRON = ("Shoeybi et al. 2019, Megatron-LM: Training Multi-Billion Parameter Language Models Using Model "
            "Parallelism, arXiv:1909.08053")
MEGATRON_FACTS = ("32 DGX-2H, 16 V100 per server on NVSwitch (300 GB/s), 100 GB/s between servers over 8 InfiniBand "
                  "adapters (sec. 5); vocabulary 51,200, sequence 1024, batch 8 per model replica, 512 for model + "
                  "data parallel (sec. 5.1); one-GPU baseline 1.2B (40 layers, hidden 1536) at 39 TFLOP/s (sec. 5.1.1); "
                  "8.3B: 72 layers, hidden 3072 (Table 1)")
TP_DUPLICATES = ("what the GEMM roofline and the duplicated elementwise passes miss of the per-GPU work shrinking: "
                 "kernel launches and the lower efficiency of narrow GEMMs (App. D.2: 'the per-GPU computation "
                 "decreases and the memory bandwidth and communication overheads begin to dominate')")
HEADS = "the attention heads' GEMM shapes and softmax size (Table 7)"


def _megatron(flops_factor: int = 96, grad_bytes: int = 2, tp_allreduces: int = 6) -> list[Row]:
    dgx2 = Cluster(LINKS["nvlink2-v100"], shared("ib-edr-100", 2), 16, "DGX-2H")

    def setup(gpus, tp, layers, dim, params):
        w = megatron_flops(8, 1024, layers, dim, 51200, flops_factor) / tp
        return Setup(gpus, "tp_dp", dgx2, "v100", w, params, layers, dim, 1024, micro_batch=8, tp=tp,
                     grad_bytes=grad_bytes, bucket_bytes=None, tp_allreduces=tp_allreduces,
                     recompute=tp_allreduces == 6)

    base = setup(1, 1, 40, 1536, 1.2e9)
    big = setup(8, 8, 72, 3072, 8.3e9)
    rate = 39e12 / 1  # FLOP/s of the one-GPU baseline

    def row(label, series, eff, s, cite, lacks=TP_DUPLICATES):
        return Row("megatron2019", label, series, "efficiency", eff, base, s, cite, MEGATRON_FACTS,
                   compute_rate=rate, lacks=lacks)

    return [
        row("8.3B, TP 8", "TP, weak", 0.77, big, "sec. 5.1.1: 8-way model parallel reaches 77% of linear scaling"),
        row("8.3B, TP 8 x DP 64", "TP x DP", 0.74, replace(big, gpus=512),
            "sec. 5.1.1: 74% on 512 GPUs (the abstract's 76% is 15.1 PFLOP/s over 512 x 39 TFLOP/s)",
            lacks="a data-parallel all-reduce that costs less than the model's: from 8 GPUs (77%) to 512 (74%) the "
                  "paper loses less than the model charges for it"),
        row("8.3B, TP 8, 16 heads", "heads at TP 8", 0.82, big, "Table 7: 16 attention heads, 82%",
            lacks=HEADS),
        row("8.3B, TP 8, 24 heads", "heads at TP 8", 0.80, big, "Table 7: 24 attention heads, 80%",
            lacks=HEADS),
        *[row(f"1.2B strong, TP {t}", "TP, strong", speedup / t, replace(base, gpus=t, tp=t, work=base.work / t),
              f"Table 8: speedup {speedup} on {t} GPUs at a fixed batch of 8")
          for t, speedup in ((2, 1.64), (4, 2.34), (8, 2.98))],
    ]


# --- torchtitan (Liang et al.), H100, and Trainy's H200 run in torchtitan's benchmarks -----------------------------

TORCHTITAN = ("torchtitan, benchmarks/llama3_h100_202412_torchtitan.md (github.com/pytorch/torchtitan, December "
              "2024)")
TRAINY = "torchtitan, benchmarks/llama3_8b_h200_2025-06_torchtitan.md (Trainy, June 2025)"
JITTER = ("what slows more hosts against fewer beyond FSDP's collectives and the slowest GPU of a static 8% band "
          "(terms.straggler_factor, Sinha et al. 2022): step-to-step jitter between hosts (the slowest GPU changing "
          "from step to step, which a static band does not grow with), for which no measured distribution is cited "
          "here. The published throughput is one reading per count, and the counts may not share hardware: "
          "torchtitan's authors found that their runs spanned regions, a 128-GPU run faster than the 8-GPU one for "
          "that reason (torchtitan issue #619), so a loss of 2 points lies within such differences")


def _llama8b(gpus, cluster, gpu, gather, grad) -> Setup:
    return Setup(gpus, "fsdp", cluster, gpu, work=2 * 8192, params=8.03e9, layers=32, dim=4096, seq=8192,
                 micro_batch=2, gather_bytes=gather, grad_bytes=grad)


def _torchtitan(float8_gather: int = 2, reduce_bytes: int = 4) -> list[Row]:
    base = _llama8b(8, gpu_cluster("h100"), "h100-hbm2e", 2, reduce_bytes)
    facts = ("Llama 3.1 8B, FSDP, local batch 2 of 8192 tokens, selective activation checkpointing (Tables 1, 3); "
             "8 H100 (96 GB HBM2e, 2.4 TB/s, 500 W) per host on NVLink, 400 Gb/s RDMA per GPU (Hardware)")
    out = []
    for label, at8, at128, gather in (("FSDP", 5762, 5605, 2), ("FSDP + compile", 6667, 6514, 2),
                                      ("FSDP + compile + Float8", 8532, 8380, float8_gather)):
        b = replace(base, gather_bytes=gather)
        out.append(Row("torchtitan", f"Llama 3.1 8B, {label}", label, "efficiency", at128 / at8, b,
                       replace(b, gpus=128), f"Tables 1 and 3: {at8:,} tokens/s per GPU on 8 GPUs, {at128:,} on 128",
                       facts, base_rate=at8, lacks=JITTER))
    return out


def _trainy(reduce_bytes: int = 4) -> list[Row]:
    h200 = Cluster(LINKS["nvlink4-h100"], LINKS["ib-ndr-400"], 8, "H200")
    base = _llama8b(32, h200, "h200", 1, reduce_bytes)
    return [Row("trainy2025", "Llama 3.1 8B, FSDP + Float8", "FSDP + Float8", "efficiency", 10753 / 10938, base,
                replace(base, gpus=64), "Results table: 10,938 tokens/s per GPU on 4 nodes, 10,753 on 8",
                "Llama 3.1 8B, local batch 2 of 8192 tokens, compile, float8 with FSDP's float8 all-gather "
                "(1 byte per parameter) (Configuration); 8 H200 per host on NVLink, 400 Gb/s per GPU (Hardware)",
                base_rate=10938, lacks=JITTER)]


# --- Narayanan et al. 2021, Table 2: ZeRO-3 against PTD-P at a fixed global batch --------------------------------

NARAYANAN = ("Narayanan et al. 2021, Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM, "
             "arXiv:2104.04473")
NARAYANAN_FACTS = ("DGX A100 80 GB, 8 per node on NVLink/NVSwitch, 8 x 200 Gb/s HDR InfiniBand per node (sec. 5); "
                   "vocabulary 51,200, sequence 2048 (sec. 5.1); FLOPs by eq. 3; {shape}: by eq. 2 these give the "
                   "table's {n}B parameters")
ZERO3_LACKS = ("what else slows DeepSpeed's gathers as the GPUs double: from 768 GPUs on the published step takes as "
               "long on twice the GPUs, while the model's gathers grow only by the ring's latency (p - 1 steps per "
               "tensor), not enough to offset the compute halving. Candidates, none measured in a source cited here: "
               "each synchronous gather waiting for the slowest of p ranks to launch it, and torch's all_gather into "
               "a list of p tensors copying them out one by one")
DEEPSPEED = ("ZeRO-3 without model parallelism, fp16 gathers and gradients, activations recomputed (eq. 3); 'We "
             "integrated ZeRO into our codebase using the DeepSpeed Python library' (sec. 5.2): DeepSpeed's ZeRO-3 as "
             "of the paper (arXiv:2104.04473, April 2021), before DeepSpeed's pull request #1188 (June 2021) batched "
             "its gathers (implementation 'deepspeed-2021', terms.deepspeed_gather_seconds)")
SHAPES = {175: (96, 12288, 174.6e9), 530: (105, 20480, 529.6e9)}


def _narayanan(virtual: int = 1, dp_grad_bytes: int = 4, tp_allreduces: int = 6, zero3_tensors: int = 12) -> list[Row]:
    a100 = gpu_cluster("a100")
    out = []
    for size, z_rows, p_rows, pp in ((175, ((384, 1536, 4, 144), (768, 1536, 2, 88), (1536, 1536, 1, 44)),
                                      ((384, 153), (768, 149), (1536, 141)), 12),
                                     (530, ((640, 2560, 4, 138), (1120, 2240, 2, 98), (2240, 2240, 1, 48)),
                                      ((560, 171), (1120, 167), (2240, 159)), 35)):
        layers, dim, n = SHAPES[size]
        facts = NARAYANAN_FACTS.format(shape=f"{layers} layers, hidden {dim}", n=n / 1e9)

        def zero3(gpus, batch, mb):  # every unit as a layer's tensors: the last (embeddings, final LayerNorm) has 4
            return Setup(gpus, "fsdp", a100, "a100-80", megatron_flops(batch, 2048, layers, dim, 51200) / gpus, n,
                         layers, dim, 2048, micro_batch=mb, gather_bytes=2, grad_bytes=2, tensors=zero3_tensors,
                         recompute=True, implementation="deepspeed-2021")

        def ptdp(gpus):
            dp = gpus // (8 * pp)
            batch = 1536 if size == 175 else 2240
            return Setup(gpus, "3d", a100, "a100-80", megatron_flops(batch, 2048, layers, dim, 51200) / gpus, n,
                         layers, dim, 2048, micro_batch=1, microbatches=batch // dp, tp=8, pp=pp, virtual=virtual,
                         grad_bytes=dp_grad_bytes, tp_allreduces=tp_allreduces, recompute=True)

        zb = zero3(*z_rows[0][:3])
        for gpus, batch, mb, tflops in z_rows[1:]:
            out.append(Row("narayanan2021", f"ZeRO-3 {size}B, {gpus} GPUs", f"ZeRO-3 {size}B", "throughput", tflops, zb,
                           zero3(gpus, batch, mb), f"Table 2: ZeRO-3 {size}B, {z_rows[0][3]} TFLOP/s per GPU on "
                           f"{z_rows[0][0]} GPUs, {tflops} on {gpus} (batch {batch}, micro-batch {mb})",
                           facts + "; " + DEEPSPEED,
                           base_published=z_rows[0][3], base_rate=z_rows[0][3] * 1e12, lacks=ZERO3_LACKS))
        pb = ptdp(p_rows[0][0])
        for gpus, tflops in p_rows[1:]:
            out.append(Row("narayanan2021", f"PTD-P {size}B, {gpus} GPUs", f"PTD-P {size}B", "throughput", tflops, pb,
                           ptdp(gpus), f"Table 2: PTD-P {size}B, {p_rows[0][1]} TFLOP/s per GPU on {p_rows[0][0]} "
                           f"GPUs, {tflops} on {gpus} (model-parallel size {8 * pp}, micro-batch 1)",
                           facts + f"; global batch {1536 if size == 175 else 2240} fixed (Table 2); model-parallel "
                           f"size {8 * pp} as TP 8 inside a node x PP {pp} (sec. 3.3)",
                           base_published=p_rows[0][1], base_rate=p_rows[0][1] * 1e12))
    return out


# --- Llama 3 (Llama Team, AI @ Meta 2024), Table 4 -----------------------------------------------------------------

LLAMA3 = "Llama Team, AI @ Meta 2024, The Llama 3 Herd of Models, arXiv:2407.21783"


def _llama3(micro_batch: int = 1, virtual: int = 8) -> list[Row]:
    layers, dim, n, seq = 126, 16384, 405e9, 8192

    def setup(gpus, dp, per_dp):
        tokens = per_dp * dp * seq
        return Setup(gpus, "3d", gpu_cluster("h100"), "h100", tokens * palm_flops_per_token(n, layers, dim, seq) / gpus,
                     n, layers, dim, seq, micro_batch=micro_batch, microbatches=per_dp // micro_batch, tp=8, pp=16,
                     virtual=virtual, dp_strategy="fsdp", grad_bytes=4, gather_bytes=2, tp_allreduces=4)

    base = setup(8192, 64, 32)
    return [Row("llama3", "405B, 16,384 GPUs", "Llama 3 405B", "throughput", 400, base, setup(16384, 128, 16),
                "Table 4: 430 TFLOP/s per GPU on 8,192 GPUs (DP 64, batch 32 per DP group), 400 on 16,384 (DP 128, 16)",
                "405B: 126 layers, model dimension 16,384 (Table 3); TP 8, PP 16, sequence 8192, 16M tokens per batch "
                "(Table 4); interleaved schedule, bubble (PP - 1) / (V M), one layer less on the first and last stages "
                "so that their first and last chunks hold only the embedding and the output: one layer per chunk, V = "
                "8; no activation checkpointing; FSDP gathers once per step, reduce-scatters in fp32 (sec. 3.3.2); "
                "8 H100 per server on NVLink, 400 Gb/s RoCE per GPU (sec. 3.3.1)",
                base_published=430, base_rate=430e12)]


SOURCES = {s.key: s for s in (
    Source("goyal2017", GOYAL, _goyal, (
        Choice("DDP bucket", "25 MiB (PyTorch DDP's default)", "the paper all-reduces gradient blobs as backprop "
               "produces them without giving their size",
               (("one bucket", {"bucket_bytes": None}), ("one per layer (54)", {"bucket_bytes": RESNET50 * 4 / 54}))),)),
    Source("megatron2019", MEGATRON, _megatron, (
        Choice("FLOP count", "96 B s l h^2 (...)", "activations are recomputed (Narayanan et al. 2021, eq. 3); the "
               "paper does not say which count its 39 TFLOP/s used", (("72: no recomputation", {"flops_factor": 72}),)),
        Choice("gradient precision", "fp16 (2 bytes)", "Megatron-LM's DDP_impl local all-reduces the fp16 gradients "
               "(fp32_allreduce off by default)", (("fp32", {"grad_bytes": 4}),)),
        Choice("TP all-reduces per layer", "6", "2 forward, 2 backward, 2 in the recomputed forward",
               (("4: no recomputation", {"tp_allreduces": 4}),))),
           left_out="Figure 5's other bars (2, 4 GPUs; 64, 128, 256 GPUs): the text gives no values and transcriptions "
                    "of the figure disagree"),
    Source("torchtitan", TORCHTITAN, _torchtitan, (
        Choice("Float8 row's all-gather", "bf16 (2 bytes)", "Tables 1 and 3 do not say that FSDP's float8 all-gather "
               "was on", (("float8 (1 byte)", {"float8_gather": 1}),)),
        Choice("reduce-scatter precision", "fp32 (4 bytes)", "torchtitan's default mixed-precision reduce dtype",
               (("bf16", {"reduce_bytes": 2}),))),
           left_out="Tables 4 to 6 (70B and 405B at one GPU count each): no second count to scale against"),
    Source("trainy2025", TRAINY, _trainy, (
        Choice("reduce-scatter precision", "fp32 (4 bytes)", "torchtitan's default mixed-precision reduce dtype",
               (("bf16", {"reduce_bytes": 2}),)),)),
    Source("narayanan2021", NARAYANAN, _narayanan, (
        Choice("PTD-P schedule", "1F1B, not interleaved", "Table 2 names no interleaving",
               (("interleaved, 2 stages per GPU", {"virtual": 2}),)),
        Choice("PTD-P gradient precision", "fp32 (4 bytes)", "Megatron-LM reduces its fp32 main gradients",
               (("fp16", {"dp_grad_bytes": 2}),)),
        Choice("PTD-P TP all-reduces per layer", "6", "activations recomputed (eq. 3 counts the recomputation)",
               (("4", {"tp_allreduces": 4}),)),
        Choice("ZeRO-3 tensors gathered per layer", "12", "a Megatron GPT layer's 2 LayerNorms, QKV, projection and 2 "
               "MLP matrices, weight and bias each; #1069 saw 320-element gathers (a LayerNorm's share), so small "
               "tensors were gathered too", (("4: only the weight matrices", {"zero3_tensors": 4}),))),
           left_out="Table 1 (weak scaling over model sizes: model and batch change with the GPUs) and the figures"),
    Source("llama3", LLAMA3, _llama3, (
        Choice("micro-batch", "1 sequence", "Table 4 gives the batch per DP group, not the micro-batch",
               (("2 sequences", {"micro_batch": 2}),)),
        Choice("pipeline chunks per GPU V", "8", "derived from sec. 3.3.2's first and last chunks (see the facts)",
               (("4", {"virtual": 4}), ("1: not interleaved", {"virtual": 1})))),
           left_out="the CP 16 row of Table 4 (131,072 tokens, 380 TFLOP/s): at that length attention is more than "
                    "half of the FLOPs the paper's count (PaLM's) gives, and it runs at the speed of its own kernels, "
                    "of which no measurement is cited here, while the model prices every FLOP at the base's GEMM "
                    "speed; placements.py searches cp but is not scored"),
)}

LEFT_OUT = ("Not in the set: the PyTorch FSDP paper (Zhao et al. 2023) and MegaScale's Megatron-LM baseline (Jiang "
            "et al. 2024), whose batch sizes and networks could not be confirmed from the papers here.")


def rows() -> list[Row]:
    """Every row of every source, with the choices used."""
    return [r for s in SOURCES.values() for r in s.rows()]
