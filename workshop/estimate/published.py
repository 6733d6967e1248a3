"""Published scaling results with the hardware they were measured on, and the cost model's prediction of each:
the model is held to them (tests/test_costmodel.py) and the comparison is written to
docs/results/costmodel_validation.md.

    published.validate()      # rows: published and predicted efficiency, and their difference
    python -m workshop.estimate.costmodel validate --out docs/results
"""

from __future__ import annotations

from dataclasses import dataclass

from workshop.estimate.network import LINKS, Cluster, gpu_cluster, shared
from workshop.estimate.steps import BACKWARD_SHARE, DDP_BUCKET_BYTES, Workload, ddp_step, fsdp_step, tp_comm


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
    """The `validate` rows as docs/results/costmodel_validation.md, with how it was made and what it means."""
    lines = ["# The cost model against published scaling results", "",
             "Produced by `python -m workshop.estimate.costmodel validate --out docs/results` and checked by "
             "`tests/test_costmodel.py`: each row feeds the cost model (`workshop.estimate`) the published configuration "
             "(model, batch per GPU, GPUs per node, links, precision of the communication) and compares its predicted "
             "scaling efficiency with the published one. No constant is set per row; the hardware is data, with its "
             "source in `workshop/base/hardware.py` (`LINKS`) and `workshop/estimate/published.py` (`PUBLISHED`).", "",
             "| result | GPUs (base) | published | predicted | difference | configuration | source |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['short']} | {r['gpus']} ({r['base_gpus']}) | {r['published']:.1%} | {r['predicted']:.1%} | "
                     f"{r['difference'] * 100:+.1f} points | {r['setup']} | {r['source']} |")
    lines += ["", "Efficiency is the throughput per GPU at the larger count over that at the base (weak scaling: the "
              "same batch per GPU); Megatron's base is one GPU running a 1.2B model at 39 TFLOP/s, so its row compares "
              "the FLOP/s per GPU at 512 GPUs with that.", ""]
    return "\n".join(lines)

