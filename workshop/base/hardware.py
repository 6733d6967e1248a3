"""What the hardware can do, from vendors' data sheets, in one place: the links between GPUs and the GPUs.

Read by `workshop.measure.collectives` (a link's peak beside a measured bandwidth), `workshop.measure.flops` (a GPU's
peak for MFU) and `workshop.estimate` (the cost model's projections). Peaks are nominal: a measured collective or
matmul reaches a share of them. This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    name: str
    GBps: float  # peak bandwidth per direction, per GPU, GB/s (1e9 bytes)
    latency_us: float  # per step of a collective, of the order NCCL's tuning model uses
    what: str


# Latencies: a few microseconds inside a node, about ten across InfiniBand, tens over Ethernet/TCP. Calibrate on
# your own cluster for real numbers (python -m workshop.measure.bench collectives).
LINKS = {link.name: link for link in (
    Link("nvlink5-b200", 900, 3, "NVLink 5 (B200): 18 links x 50 GB/s"),
    Link("nvlink4-h100", 450, 3, "NVLink 4 (H100 SXM): 18 links x 25 GB/s"),
    Link("nvlink3-a100", 300, 4, "NVLink 3 (A100 SXM): 12 links x 25 GB/s"),
    Link("nvlink2-v100", 150, 4, "NVSwitch in a DGX-2: 6 NVLink2 x 25 GB/s (\"300 GB/s\" both ways)"),
    Link("nvlink1-p100", 80, 4, "4 NVLink1 x 20 GB/s (P100 white paper: 160 GB/s both ways)"),
    Link("pcie5-x16", 64, 6, "PCIe 5.0 x16: 32 GT/s x 16 lanes, about 63 GB/s after encoding"),
    Link("pcie4-x16", 32, 8, "PCIe 4.0 x16: 16 GT/s x 16 lanes, about 31.5 GB/s after encoding"),
    Link("ib-ndr-400", 50, 8, "InfiniBand NDR, 400 Gb/s per port"),
    Link("ib-hdr-200", 25, 10, "InfiniBand HDR, 200 Gb/s per port"),
    Link("ib-edr-100", 12.5, 10, "InfiniBand EDR, 100 Gb/s per port"),
    Link("eth-100g", 12.5, 30, "100 Gb/s Ethernet (or RoCE)"),
    Link("eth-50g", 6.25, 50, "50 Gb/s Ethernet"),
    Link("eth-25g", 3.125, 50, "25 Gb/s Ethernet"),
)}

# Dense peak TFLOP/s (no 2:4 sparsity) by a part of torch.cuda.get_device_name(); the first key found in the name
# wins, so the specific names come first. "tf32" is the tensor-core rate for float32 convolutions (cuDNN allows
# TF32 by default), "fp32" the rate without tensor cores.
GPU_PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51},
    "H100 NVL": {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60},
    "H200 NVL": {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60},
    "H100": {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},  # H100 SXM
    "H200": {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},  # H200 SXM
    "B200": {"bf16": 2250, "fp16": 2250},  # B200 (DGX B200 data sheet): 2.25 PFLOP/s dense BF16
    "A100": {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5},
    "L40S": {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6},
    "V100": {"fp16": 125, "fp32": 15.7},  # no bf16, no TF32
    "P100": {"fp16": 21.2, "fp32": 10.6},  # P100 SXM2 (NVIDIA Tesla P100 white paper)
}

# Streaming multiprocessors and HBM bandwidth (bytes/s) from the data sheets, by the same names: P100 SXM2 (Tesla
# P100 white paper), V100 SXM (Volta white paper), A100 80GB SXM (A100 data sheet), H100 SXM and H200 SXM (their data
# sheets). The cost model's roofline and overlap terms read them (workshop.estimate.terms).
GPU_SMS = {"P100": 56, "V100": 80, "A100": 108, "H100": 132, "H200": 132}
GPU_HBM_BYTES_PER_S = {"P100": 732e9, "V100": 900e9, "A100": 2039e9, "H100": 3350e9, "H200": 4800e9}


@dataclass(frozen=True)
class Node:
    gpu: str  # a key of GPU_PEAK_TFLOPS
    memory_GB: float  # per GPU
    per_node: int  # GPUs a node usually holds
    intra: str  # its NVLink (a key of LINKS)
    inter: str  # the network per GPU: one 400 or 200 Gb/s NIC each


# The usual node of each GPU the cost model projects for (H100 SXM5 80 GB, H200 SXM 141 GB with the H100's NVLink 4,
# A100 SXM4 80 GB, DGX B200 1,440 GB for 8)
NODES = {
    "b200": Node("B200", 180, 8, "nvlink5-b200", "ib-ndr-400"),
    "h100": Node("H100", 80, 8, "nvlink4-h100", "ib-ndr-400"),
    "h200": Node("H200", 141, 8, "nvlink4-h100", "ib-ndr-400"),
    "a100": Node("A100", 80, 8, "nvlink3-a100", "ib-hdr-200"),
}

# A configuration fits when its estimate stays under this share of the GPU's memory: the CUDA context, NCCL's
# buffers and the caching allocator's fragmentation take the rest (workshop.estimate.planner, the cost model).
MEMORY_MARGIN = 0.9


def device_type(device) -> str:
    """'cuda' for "cuda", "cuda:1" or torch.device("cuda", 1); "cpu" for the CPU: the one place that reads a device's
    kind from its name (a string, a torch.device, or a record's "device" field)."""
    return str(device).split(":")[0] or "cpu"
