"""torch.profiler, quiet on a machine without GPUs, and its operators in a table a notebook can show.

    with profiler.profile(env.device) as prof:
        for x, y in batches:
            step(x, y)
    print(profiler.profile_table(prof, row_limit=8))
    prof.export_chrome_trace(str(run / "trace.json"))   # open in https://ui.perfetto.dev
"""

from __future__ import annotations

import os

from workshop.base.hardware import device_type
from workshop.base.tables import table


def profile(device: str, **kwargs):
    """torch.profiler.profile recording the CPU, and CUDA kernels on a GPU. On a machine without GPUs, Kineto (the
    profiler's C++ library) prints "USDT ... profiler_start/stop" lines and "ERROR ... gpuGetDeviceCount failed
    with code 35" (it probes for GPUs that are not there) to the process's stderr, at every recording: below its
    log level 6 they reach the notebook. KINETO_LOG_LEVEL is read when Kineto starts, at the first recording, so it
    is set here, once, unless already set (pytorch/pytorch#83383, "PyTorch profiler is spammy"; torchtitan sets it
    too, pytorch/torchtitan#136). On a GPU Kineto's own level stays: its errors there (CUPTI) matter."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    on_cuda = device_type(device) == "cuda"
    if not on_cuda:
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above USDT (5) and ERROR (4): nothing
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    return torch_profile(activities=activities, **kwargs)


def profile_table(prof, row_limit: int = 8, name_width: int = 44) -> str:
    """The operators that took the most time of their own (on the GPU where it ran, else on the CPU), in a table
    about 80 characters wide: name, self time and its share, total time (with the operators it called), calls.
    torch's own `key_averages().table()` has more columns than a notebook's width and wraps there."""
    events = prof.key_averages()
    on_gpu = any(getattr(e, "self_device_time_total", 0) > 0 for e in events)
    self_time = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    total_time = (lambda e: e.device_time_total) if on_gpu else (lambda e: e.cpu_time_total)
    where = "GPU" if on_gpu else "CPU"
    total = sum(self_time(e) for e in events) or 1.0
    body = [[e.key if len(e.key) <= name_width else e.key[:name_width - 3] + "...", f"{self_time(e) / 1e3:.2f}",
             f"{self_time(e) / total:.1%}", f"{total_time(e) / 1e3:.2f}", e.count]
            for e in sorted(events, key=self_time, reverse=True)[:row_limit]]
    body.append(["all operators, over the recorded steps", f"{total / 1e3:.2f}", f"{1:.1%}", "", ""])
    return table(["operator", f"self {where} ms", "share", "total ms", "calls"], body, align="lrrrr")
