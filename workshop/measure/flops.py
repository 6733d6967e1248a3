"""FLOPs of a training step, counted as it runs, and the device's peak FLOP/s they are measured against (MFU).

    step_flops = flops.count_step_flops(model, x, y)       # forward, loss and backward of one batch
    peak, source = flops.gpu_peak(env.device, torch.bfloat16)
    mfu = step_flops * steps / seconds / peak

MFU (model FLOPs utilisation, PaLM, Chowdhery et al. 2022, appendix B): the FLOPs of the model's training step,
counted by torch.utils.flop_counter, times steps per second, over the device's peak FLOP/s for the dtype the
step computes in. The peaks are data sheets' (workshop.base.hardware.GPU_PEAK_TFLOPS); a GPU not in that table gets
a measured matmul's rate. On CPU there is no peak to divide by here: MFU is left empty.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from workshop.base import hardware
from workshop.base.hardware import device_type
from workshop.measure import metrics

_MEASURED: dict = {}  # (device name, dtype) -> FLOP/s of a measured matmul, for GPUs not in the table


def count_step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, backward: bool = True) -> int:
    """FLOPs of one training step (forward, loss, backward) of `model` on (x, y), counted by
    torch.utils.flop_counter.FlopCounterMode on a copy of the model (its weights and BatchNorm statistics stay
    as they are). Matmuls and convolutions count 2 FLOPs per multiply-add; elementwise work counts 0. The
    backward computes two products per layer (gradients of the input and of the weight), so a step is about 3x
    the forward; the first layer needs no input gradient. backward=False: the forward alone."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model)
    with FlopCounterMode(display=False) as counter:
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()
    return int(counter.get_total_flops())


def _dtype_key(dtype) -> str:
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def measured_matmul_flops(device, dtype=torch.bfloat16, n: int = 8192, iters: int = 10) -> float:
    """FLOP/s of an n x n matmul in `dtype` on `device`: a practical peak for a GPU not in hardware.GPU_PEAK_TFLOPS.
    The operands come from a generator of their own: the caller's random stream is not drawn from."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(2):
        a @ b
    with metrics.Timer(device) as t:
        for _ in range(iters):
            a @ b
    return 2 * n**3 * iters / t.elapsed


def gpu_peak(device, dtype) -> tuple[float | None, str]:
    """(peak FLOP/s for `dtype` on `device`, where the number comes from). CPU: (None, why)."""
    if device_type(device) != "cuda":
        return None, "CPU: no peak FLOP/s known here, MFU not meaningful"
    name = torch.cuda.get_device_name(torch.device(device))
    key = _dtype_key(dtype)
    for part, peaks in hardware.GPU_PEAK_TFLOPS.items():
        if part in name:
            if key == "fp32" and torch.backends.cudnn.allow_tf32 and "tf32" in peaks:
                key = "tf32"  # float32 convolutions run on the tensor cores in TF32
            if key == "bf16" and key not in peaks:
                key = "fp16"
            if key not in peaks:  # a rate the data sheet does not give: measured below
                break
            return peaks[key] * 1e12, f"{name}: {key} dense {peaks[key]:g} TFLOP/s (data sheet)"
    if (name, key) not in _MEASURED:
        _MEASURED[name, key] = measured_matmul_flops(device, {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                               "fp16": torch.float16}[key])
    flops = _MEASURED[name, key]
    return flops, f"{name}: {key} {flops / 1e12:.0f} TFLOP/s (measured 8192^3 matmul; not in the data-sheet table)"


def peak_flops(device, dtype=torch.bfloat16) -> float | None:
    """Peak FLOP/s of `device` for `dtype` (see hardware.GPU_PEAK_TFLOPS; a measured matmul for other GPUs); None on CPU."""
    return gpu_peak(device, dtype)[0]
