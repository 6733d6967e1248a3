"""Make one device fast before using more: the same training steps under cumulative variants.

Each variant adds one change to the ones before it in the list (notebook 02 shows each change in a cell):

    naive          fp32; a DataLoader in the training process (no workers), pageable memory
    workers        + DataLoader worker processes, pinned memory, non_blocking copies to the GPU
    bf16           + bf16 autocast (fp16 with a GradScaler on GPUs without bf16)
    channels_last  + model and inputs in channels_last (NHWC) memory format
    compile        + torch.compile(model)
    resident       + the whole data set on the device, cropped and flipped there in batches; no DataLoader
                     (as the fastest CIFAR-10 trainers do: github.com/KellerJordan/cifar10-airbench)

Every variant trains a fresh model (same seed) on the same images with the same augmentation (random crop
with 4 pixels of reflect padding, random horizontal flip; `workshop.data.augment_batch`): in the DataLoader one
image at a time, in `resident` a batch at a time on the device.

    rows = perf.run_variants("resnet18", batch_size=512, steps=50, warmup=5, variants=perf.VARIANTS, env=env)
    print(perf.format_variants(rows))
    perf.plot_speedups(rows)
    metrics.write_record(run, notebook="02_single_device_performance", params=params, results=perf.results(rows))

From the command line (prints the table, writes a record): `python -m workshop.measure.bench single --model resnet18`.

Each row's MFU (model FLOPs utilisation) divides the step's counted FLOPs by the device's peak: see
workshop.measure.flops. On CPU there is no peak to divide by: MFU is left empty.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from workshop.base.hardware import device_type
from workshop.base.tables import gib, table, wrap
from workshop.data import CIFAR_MEAN, CIFAR_STD, PAD, AugmentedImages, augment_batch, load_images
from workshop.dist import DistEnv, get_env
from workshop.measure import metrics
from workshop.measure.flops import count_step_flops, gpu_peak
from workshop.models import count_parameters, get_model
from workshop.train import seeded

VARIANTS = ("naive", "workers", "bf16", "channels_last", "compile", "resident")
CHANGES = {
    "naive": "fp32, DataLoader in the training process, pageable memory",
    "workers": "+ DataLoader workers, pinned memory, non_blocking copies",
    "bf16": "+ bf16 autocast (fp16 with a GradScaler without bf16)",
    "channels_last": "+ channels_last memory format",
    "compile": "+ torch.compile(model)",
    "resident": "+ data set on the device, augmented there in batches, no DataLoader",
}


@dataclass(frozen=True)
class Setup:
    """What one variant does: the changes of every variant up to it, in the order run."""

    name: str
    num_workers: int = 0  # DataLoader worker processes
    pin_memory: bool = False  # page-locked host batches, copied with non_blocking=True
    amp_dtype: str | None = None  # "bfloat16" or "float16" autocast; None: float32
    channels_last: bool = False  # NHWC memory format for the model and its inputs
    compile: bool = False  # torch.compile(model)
    resident: bool = False  # the data set on the device, augmented there; no DataLoader


# --- settings -------------------------------------------------------------------------------------

def default_num_workers(fallback: int) -> int:
    """DataLoader workers: one fewer than the CPUs SLURM gave this task (one core stays with the training
    process), at least 1; `fallback` where SLURM_CPUS_PER_TASK is not set."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return max(1, int(cpus) - 1) if cpus.isdigit() else fallback


def amp_dtype_for(device: str) -> str:
    """float16 on GPUs without bf16 (V100, T4), else bfloat16: Ampere and newer GPUs compute in it natively; CPU
    autocast supports only bfloat16 (fast where `cpu_has_native_bf16()`, slower than float32 elsewhere)."""
    if device_type(device) == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "float16"  # V100, T4: no bf16 tensor cores
    return "bfloat16"


def cpu_has_native_bf16() -> bool:
    """Does this CPU have bf16 instructions (AVX512-BF16 or AMX-BF16)? Without them, oneDNN has no fast bf16
    convolution, and bf16 autocast is slower than float32 (notebook 02 measures by how much)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def device_summary(device: str) -> str:
    """The device in a few words, for the sentences that read a measurement: the GPU's name, or the CPU's vector
    instructions and whether it has bf16 ones."""
    if device_type(device) == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    bf16 = "native bf16 (AVX512-BF16 or AMX)" if cpu_has_native_bf16() else "no bf16 instructions"
    return f"a CPU with {torch.backends.cpu.get_cpu_capability()} vector instructions and {bf16}"


def check_variants(variants) -> list[str]:
    names = [v.strip() for v in (variants.split(",") if isinstance(variants, str) else variants) if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant {', '.join(map(repr, unknown)) or repr(variants)}; choose from {', '.join(VARIANTS)}")
    return names


def variant_setups(variants, device: str, num_workers: int) -> list[Setup]:
    """One Setup per variant, each with the changes of the variants listed before it."""
    on_cuda = device_type(device) == "cuda"
    setup, setups = Setup("naive"), []
    for name in check_variants(variants):
        if name == "workers":
            setup = replace(setup, num_workers=num_workers, pin_memory=on_cuda)  # pinning helps only copies to a GPU
        elif name == "bf16":
            setup = replace(setup, amp_dtype=amp_dtype_for(device))
        elif name == "channels_last":
            setup = replace(setup, channels_last=True)
        elif name == "compile":
            setup = replace(setup, compile=True)
        elif name == "resident":
            setup = replace(setup, resident=True)
        setups.append(replace(setup, name=name))
    return setups


# --- one variant --------------------------------------------------------------------------------------

def train_step(model, optimizer, x, y, amp_dtype: torch.dtype | None = None, scaler=None) -> torch.Tensor:
    """One SGD step; under autocast the convolutions and matmuls run in `amp_dtype`, the loss in float32.
    workshop.train's step with autocast and a GradScaler (the precision variants), returning the loss alone."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x), y)
    if scaler is not None:  # float16: scale the loss so that small gradients do not underflow
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


class VariantRun:
    """A fresh model, its optimizer and an endless stream of batches on the device, set up as `setup` says."""

    def __init__(self, setup: Setup, model_name: str, images, labels, batch_size: int, device: str, seed: int = 0,
                 lr: float = 0.05):
        if len(labels) < batch_size:
            raise ValueError(f"{len(labels)} images are fewer than one batch of {batch_size}")
        self.setup, self.batch_size, self.device = setup, batch_size, torch.device(device)
        with seeded(seed, device):  # the same weights in every variant; the caller's random stream untouched
            model = get_model(model_name).to(self.device)
        if setup.channels_last:
            model = model.to(memory_format=torch.channels_last)  # the weights in NHWC too
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.model = torch.compile(model) if setup.compile else model  # compiles at its first call
        self.amp_dtype = getattr(torch, setup.amp_dtype) if setup.amp_dtype else None
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.generator = torch.Generator(self.device).manual_seed(seed)
        if setup.resident:
            self.images, self.labels = images.to(self.device), labels.to(self.device)  # uint8: 3 KiB an image
        else:
            self.loader = DataLoader(
                AugmentedImages(images, labels), batch_size=batch_size, shuffle=True, drop_last=True,
                num_workers=setup.num_workers, pin_memory=setup.pin_memory, persistent_workers=setup.num_workers > 0,
                generator=torch.Generator().manual_seed(seed),
            )

    def batches(self):
        """(x, y) on the device, forever: one epoch after another."""
        fmt = torch.channels_last if self.setup.channels_last else torch.contiguous_format
        while True:
            if self.setup.resident:
                order = torch.randperm(len(self.labels), device=self.device, generator=self.generator)
                for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
                    idx = order[i:i + self.batch_size]
                    x = augment_batch(self.images[idx], generator=self.generator)
                    yield x.contiguous(memory_format=fmt), self.labels[idx]
            else:
                nb = self.setup.pin_memory  # an asynchronous copy needs page-locked (pinned) memory
                for x, y in self.loader:
                    yield x.to(self.device, non_blocking=nb).contiguous(memory_format=fmt), y.to(self.device, non_blocking=nb)

    def step(self, x, y) -> torch.Tensor:
        return train_step(self.model, self.optimizer, x, y, self.amp_dtype, self.scaler)


def run_variant(setup: Setup, model_name: str, images, labels, batch_size: int, steps: int, warmup: int, device: str,
                seed: int = 0) -> dict:
    """Time `steps` training steps (data loading included) after `warmup` untimed ones; the first step is timed
    on its own: with torch.compile it holds the compilation. Peak memory over the whole variant. Its random draws
    (the weights, augmentation in this process) come from `seed`, the same in every variant, in a stream of its own."""
    if warmup < 1:
        raise ValueError("warmup must be at least 1: the first step compiles, picks kernels and starts the workers")
    gc.collect()
    if device_type(device) == "cuda":
        torch.cuda.empty_cache()
    metrics.reset_peak_memory(device)
    with seeded(seed, device):
        run = VariantRun(setup, model_name, images, labels, batch_size, device, seed=seed)
        batches = run.batches()
        with metrics.Timer(device) as first:
            run.step(*next(batches))
        with metrics.Timer(device) as rest:
            for _ in range(warmup - 1):
                run.step(*next(batches))
        with metrics.Timer(device) as t:
            for _ in range(steps):
                loss = run.step(*next(batches))
    result = {
        "time_s": t.elapsed,
        "step_time_s": t.elapsed / steps,
        "samples_per_s": metrics.throughput(steps * batch_size, t.elapsed),
        "first_step_s": first.elapsed,
        "compile_time_s": first.elapsed - t.elapsed / steps if setup.compile else None,  # first step less a steady one
        "warmup_s": first.elapsed + rest.elapsed,
        "peak_memory_bytes": metrics.peak_memory(device),
        "loss": float(loss),
    }
    del run, batches
    return result


def _change_of(name: str) -> dict:
    """The Setup fields that variant `name` changes, at their naive values: what to drop when it is skipped."""
    return {"workers": dict(num_workers=0, pin_memory=False), "bf16": dict(amp_dtype=None),
            "channels_last": dict(channels_last=False), "compile": dict(compile=False), "resident": dict(resident=False),
            }.get(name, {})


def run_variants(model_name: str, batch_size: int, steps: int, warmup: int, variants=VARIANTS, env: DistEnv | None = None,
                 *, num_workers: int | None = None, dataset: str = "synthetic", compile_on_cpu: bool = False,
                 seed: int = 0, num_samples: int | None = None, data: tuple | None = None) -> list[dict]:
    """One row per variant: the same model, batch size and number of steps under each Setup (cumulative).

    A row holds the variant's settings, status ("ok" or "skipped", with the reason), samples_per_s, speedup
    (over the first measured row, `naive` when it ran), step_time_s, first_step_s, compile_time_s, peak
    memory, FLOPs per step, and MFU (None on CPU). torch.compile on CPU builds C++ kernels with the system
    compiler, minutes for a small CNN on two cores: it runs there only with compile_on_cpu=True. `data`: the
    (images, labels, name) of `load_images`, to train on those instead of loading `dataset`.
    """
    env = env or get_env()
    device = env.device
    num_workers = default_num_workers(2) if num_workers is None else num_workers
    setups = variant_setups(variants, device, num_workers)
    images, labels, data_name = data or load_images(dataset, num_samples or batch_size * (warmup + steps), seed)

    with seeded(seed, device):
        model = get_model(model_name).to(device)
        xb = augment_batch(images[:batch_size]).to(device)
    parameters = count_parameters(model)
    flops = count_step_flops(model, xb, labels[:batch_size].to(device))  # the same in every variant
    del model, xb

    rows, dropped, skipped = [], {}, []
    for setup in setups:
        setup = replace(setup, **dropped)  # a skipped variant's change is not in the ones after it
        row = {"variant": setup.name, "changes": CHANGES[setup.name], **asdict(setup), "model": model_name,
               "parameters": parameters, "data": data_name, "device": device, "batch_size": batch_size, "steps": steps,
               "warmup": warmup, "flops_per_step": flops, "status": "ok", "reason": None, "without": list(skipped)}
        if setup.compile and device_type(device) != "cuda" and not compile_on_cpu:
            row.update(status="skipped", reason="torch.compile on CPU builds C++ kernels with the system compiler, which "
                       "takes longer than this run's budget; measure it with compile_on_cpu=True (--compile-on-cpu)")
            rows.append(row)
            dropped.update(_change_of("compile"))
            skipped.append("compile")
            continue
        try:
            row.update(run_variant(setup, model_name, images, labels, batch_size, steps, warmup, device, seed))
        except (RuntimeError, NotImplementedError) as err:  # e.g. a dtype the device cannot compute in
            row.update(status="skipped", reason=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            rows.append(row)
            dropped.update(_change_of(setup.name))
            skipped.append(setup.name)
            continue
        peak, source = gpu_peak(device, setup.amp_dtype or torch.float32)
        row["peak_flops"], row["peak_source"] = peak, source
        row["achieved_flops"] = flops * steps / row["time_s"]
        row["mfu"] = row["achieved_flops"] / peak if peak else None
        rows.append(row)

    measured = [r for r in rows if r["status"] == "ok"]
    base = next((r for r in measured if r["variant"] == "naive"), measured[0] if measured else None)
    for r in rows:
        r["speedup"] = r["samples_per_s"] / base["samples_per_s"] if r["status"] == "ok" else None
        r["baseline"] = base["variant"] if base else None
    return rows


def results(rows: list[dict], **extra) -> dict:
    """A record's results for the rows of `run_variants`: every row, the fastest variant, `extra` (notebook 02: the
    FLOPs of a step, the trace files), and the measured rows in the keys workshop.measure.report reads (notebook 13)."""
    best = best_variant(rows)
    return {"rows": rows, "best": best["variant"] if best else None, **extra, "measurements": report_measurements(rows)}


def report_measurements(rows: list[dict]) -> list[dict]:
    """The measured variants in the keys of workshop.measure.report: one device each, strategy "single",
    speedups taken against the baseline variant (naive, where it ran)."""
    return [{"model": r["model"], "strategy": "single", "variant": r["variant"], "samples_or_tokens": "samples",
             "world_size": 1, "micro_batch_size": r["batch_size"], "global_batch_size": r["batch_size"],
             "throughput": r["samples_per_s"], "step_time_s": r["step_time_s"], "peak_memory_bytes": r["peak_memory_bytes"],
             "baseline": r["variant"] == r["baseline"]} for r in rows if r["status"] == "ok"]


# --- tables and plots ---------------------------------------------------------------------------------

def setup_of(row: dict) -> Setup:
    """The Setup a row of `run_variants` was measured with."""
    return Setup(**{name: row[name] for name in Setup.__dataclass_fields__})


def best_variant(rows: list[dict]) -> dict | None:
    measured = [r for r in rows if r["status"] == "ok"]
    return max(measured, key=lambda r: r["samples_per_s"]) if measured else None


def format_variants(rows: list[dict]) -> str:
    """The rows as a table, then the skipped variants with their reasons and what each variant changes."""
    if not rows:
        return "no variants"
    r0 = rows[0]
    on_cuda = device_type(r0["device"]) == "cuda"
    lines = [
        wrap(f"{r0['model']} ({r0['parameters']:,} parameters), batch {r0['batch_size']}, {r0['steps']} timed steps "
              f"after {r0['warmup']} warm-up, {r0['data']} data, on {r0['device']}; {r0['flops_per_step'] / 1e9:.2f} "
              "GFLOP per training step"),
        table(["variant", "samples/s", "speedup", "step (ms)", "1st step (s)", "peak memory", "MFU"],
              [[r["variant"], "skipped"] if r["status"] != "ok" else
               [r["variant"], f"{r['samples_per_s']:.0f}", f"{r['speedup']:.2f}x", f"{r['step_time_s'] * 1e3:.2f}",
                f"{r['first_step_s']:.2f}", gib(r["peak_memory_bytes"], 2), f"{r['mfu']:.1%}" if r["mfu"] is not None else ""]
               for r in rows], align="lrrrrrr"),
    ]
    baseline = r0.get("baseline")
    lines.append(wrap(f"speedup: samples/s over {baseline}'s." + (
        " peak memory: torch.cuda.max_memory_allocated over each variant." if on_cuda else
        " peak memory on CPU: the process's peak resident set so far (never reset): not comparable between rows.")))
    compiled = [r for r in rows if r["status"] == "ok" and r["compile_time_s"] is not None]
    for r in compiled:
        lines.append(f"{r['variant']}: compiling took about {r['compile_time_s']:.1f} s (first step less a steady one)")
    peaks = sorted({r["peak_source"] for r in rows if r["status"] == "ok" and r.get("peak_flops")})
    lines += [f"MFU against {p}" for p in peaks] or ["MFU: not meaningful on CPU (no known peak FLOP/s), left empty"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(wrap(f"{r['variant']} skipped: {r['reason']}"))
    changes = []
    for r in rows:
        extra = (f" ({r['num_workers']} workers" + ("" if r["pin_memory"] else "; no pinning: no GPU to copy to") + ")"
                 if r["variant"] == "workers" else "")
        extra = f" ({r['amp_dtype']})" if r["variant"] == "bf16" else extra
        if r.get("without") and r["status"] == "ok":
            extra += f"; without {', '.join(r['without'])} (skipped)"
        changes.append([r["variant"], r["changes"] + extra])
    lines += ["each variant adds its change to those above it:", table(None, changes, align="ll", indent="  ")]
    return "\n".join(lines)


def plot_speedups(rows: list[dict]):
    """Bars of the speedup of each variant over the baseline; skipped variants marked as such."""
    from matplotlib.figure import Figure  # no pyplot: the figure is returned, not shown twice

    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.add_subplot()
    names = [r["variant"] for r in rows]
    values = [r["speedup"] if r["status"] == "ok" else 0.0 for r in rows]
    bars = ax.bar(names, values, color=["tab:gray" if r["variant"] == r.get("baseline") else "tab:blue" for r in rows])
    ax.bar_label(bars, labels=[f"{v:.2f}x" if r["status"] == "ok" else "skipped" for v, r in zip(values, rows)])
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel(f"speedup over {rows[0].get('baseline') if rows else ''}")
    if rows:
        ax.set_title(f"{rows[0]['model']}, batch {rows[0]['batch_size']}, on {rows[0]['device']}: cumulative variants")
    ax.margins(y=0.15)
    ax.tick_params(axis="x", labelrotation=20)
    if not any(math.isfinite(v) and v > 0 for v in values):
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
    return fig


def plot_augmentation(images: torch.Tensor, augmented: torch.Tensor, dy, dx, flip, pad: int = PAD):
    """What `augment_batch` did to each image: above, the stored uint8 image (3, H, W) padded by reflection with its
    crop window drawn in; below, the augmented (normalised) image, titled with whether it was flipped."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = len(images)
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    padded = F.pad(images.float().cpu() / 255, (pad,) * 4, mode="reflect")  # (n, 3, H + 2 pad, W + 2 pad)
    H, W = images.shape[-2:]
    fig = Figure(figsize=(1.3 * n, 3.2), dpi=72, layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        top, bottom = axes[0, i], axes[1, i]
        top.imshow(padded[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        top.add_patch(Rectangle((int(dx[i]) - 0.5, int(dy[i]) - 0.5), W, H, fill=False, color="white", lw=1.5))
        top.set_title(f"crop y{int(dy[i]) - pad:+d} x{int(dx[i]) - pad:+d}", fontsize=8)  # offset from the centre
        bottom.imshow((augmented[i].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        bottom.set_title("flipped" if bool(flip[i]) else "not flipped", fontsize=8)
        top.axis("off")
        bottom.axis("off")
    axes[0, 0].text(-0.15, 0.5, f"stored,\npadded {pad}", transform=axes[0, 0].transAxes, ha="right", va="center", fontsize=8)
    axes[1, 0].text(-0.15, 0.5, "augmented", transform=axes[1, 0].transAxes, ha="right", va="center", fontsize=8)
    return fig


# --- what the rows say ------------------------------------------------------------------------------------

def _why(row: dict, faster: bool, device: str) -> str:
    """Why a variant's change made the step faster or slower on this device: the mechanism, in a clause."""
    on_cuda = device_type(device) == "cuda"
    name = row["variant"]
    if name == "workers":
        if on_cuda:
            return ("the GPU no longer waits while this process loads and augments each batch" if faster else
                    "the input pipeline was not what the GPU waited for")
        cores = os.cpu_count()
        return (f"loading overlaps with the step in another process ({cores} cores here)" if faster else
                f"the workers compete with the training step for this machine's {cores} cores")
    if name == "bf16":
        if on_cuda:
            return ("the convolutions run on the tensor cores in bf16, moving half the bytes" if faster else
                    "this model is too small to keep the tensor cores busy, and autocast adds conversions")
        if cpu_has_native_bf16():
            return ("this CPU computes bf16 natively (AVX512-BF16 or AMX)" if faster else
                    "the conversions to and from bf16 cost more than the bf16 arithmetic saves at this size")
        return ("its bf16 kernels beat float32 here even without bf16 instructions" if faster else
                "this CPU has no bf16 instructions: PyTorch runs bf16 convolutions in generic fallback kernels instead "
                "of oneDNN's (aten::_slow_conv2d_* in a profile), and autocast adds conversions around each one")
    if name == "channels_last":
        return ("the convolution kernels read channels-last (NHWC) without reordering it" if faster else
                "the layers that want NCHW now reorder their inputs, which costs more than the convolutions save")
    if name == "compile":
        return "fused kernels: fewer launches and fewer round trips to memory" if faster else (
            "compiled kernels did not beat the eager ones at this size")
    if name == "resident":
        return ("no DataLoader: each batch is cut from the images in memory and augmented as one tensor operation"
                if faster else "augmenting a batch at once did not beat the loader at this size")
    return ""


def read_variants(rows: list[dict], noise: float = 0.1) -> str:
    """The table of `run_variants` in sentences: each measured variant against the one measured before it (the
    change it adds), faster or slower and why on this device, then the fastest against the baseline. A ratio
    within `noise` (10%) of 1 is called "about the same": on a shared CPU, runs differ by that much."""
    measured = [r for r in rows if r["status"] == "ok"]
    if not measured:
        return "nothing was measured"
    device = measured[0]["device"]
    lines = [f"Measured on {device_summary(device)}:"]
    previous = measured[0]
    for r in rows[1:]:
        if r["status"] != "ok":
            lines.append(f"- {r['variant']}: skipped ({r['reason'].split(';')[0]}).")
            continue
        ratio = previous["step_time_s"] / r["step_time_s"]  # > 1: this change made the step faster
        if abs(ratio - 1) <= noise:
            verdict = f"about as fast as {previous['variant']} ({ratio:.2f}x): its change made no measurable difference here"
        elif ratio > 1:
            verdict = f"{ratio:.1f}x faster than {previous['variant']}. Why here: {_why(r, True, device)}"
        else:
            verdict = f"{1 / ratio:.1f}x slower than {previous['variant']}. Why here: {_why(r, False, device)}"
        lines.append(f"- {r['variant']}: {verdict}.")
        previous = r
    best = best_variant(rows)
    base = next((r for r in measured if r["variant"] == r.get("baseline")), measured[0])
    if best["variant"] == base["variant"]:
        lines.append(f"No variant beat {base['variant']} here.")
    else:
        lines.append(f"Fastest: {best['variant']}, {best['speedup']:.2f}x {base['variant']}'s samples/s.")
    slow_bf16 = next((r for r in measured if r["variant"] == "bf16" and r is not measured[0]
                      and r["step_time_s"] > (1 + noise) * _before(measured, r)["step_time_s"]), None)
    if slow_bf16 is not None:
        later = [r["variant"] for r in measured if measured.index(r) > measured.index(slow_bf16)]
        if later:
            lines.append(f"The variants after bf16 ({', '.join(later)}) keep its autocast and its cost; measure them "
                         "without it with variants=\"" + ",".join(v["variant"] for v in rows if v["variant"] != "bf16")
                         + "\".")
    if device_type(device) != "cuda":
        lines.append("This ran on a CPU, which has no tensor cores and no copy to the device to hide: what these changes "
                     "do on a GPU is measured there, by scripts/gpu_check.sh when a GPU is available.")
    return "\n".join(wrap(line) for line in lines)


def _before(measured: list[dict], row: dict) -> dict:
    return measured[measured.index(row) - 1]
