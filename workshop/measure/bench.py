"""Benchmarks that print figures: the all-reduce, a DDP training step, and a step split into its
compute and its communication. They print measurements and write records; none passes or fails.

    allreduce    time torch.distributed.all_reduce of float32 tensors from KiB to MiB: algbw, busbw
    ddp          global samples/s of a model trained with DistributedDataParallel on synthetic data
    step-split   per model: compute time of a step, all-reduce time of its gradients, and the
                 scaling efficiency with no overlap and with perfect overlap of the two
    strategies   one TinyGPT step as compute alone, under DDP and under FSDP2 (fully_shard per block,
                 then the root): step times and tokens/s, for checking workshop.estimate.costmodel
    collectives  all-reduce, all-gather and reduce-scatter of float32 tensors, timed in turns: the three
                 collectives that DDP and FSDP use, for calibrating workshop.estimate.costmodel
    single       one device, before any parallelism: samples/s, speedup, step time, peak memory and
                 MFU of the same training steps under cumulative variants (workers and pinned memory,
                 bf16 autocast, channels_last, torch.compile, data resident on the device); see
                 workshop.measure.perf and notebook 02

Run it as N ranks, like any SPMD program here (workshop.dist.init reads the launcher):

    # locally, one process (the one-device baseline; all-reduce has no partner)
    python -m workshop.measure.bench ddp --model small_cnn --batch-size 64 --steps 20
    # on one node, 2 ranks (gloo on CPU, NCCL on GPUs)
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.measure.bench allreduce
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.measure.bench step-split --batch-size 32
    python -m torch.distributed.run --standalone --nproc-per-node 4 -m workshop.measure.bench strategies --size small
    # under SLURM, 2 nodes x 4 GPUs, inside an sbatch script or an salloc
    srun --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 python -m workshop.measure.bench allreduce --link ib-ndr-400
    # one GPU (one process: `single` refuses more ranks)
    srun --ntasks 1 --gpus 1 --cpus-per-task 8 python -m workshop.measure.bench single --model resnet18 \\
        --batch-size 512 --steps 50

Bandwidths follow NCCL-tests (github.com/NVIDIA/nccl-tests, doc/PERFORMANCE.md): algbw = bytes /
time; busbw = algbw * 2(n-1)/n, the rate each rank's link must carry in a ring all-reduce, which
does not depend on n and compares with the link's peak (NOMINAL_LINKS). GB = 1e9 bytes.

From a notebook (every rank runs the cell: these are collectives):

    rows = bench.allreduce_sweep([2**12, 2**20, 2**26])
    print0(bench.format_allreduce(rows, link="nvlink4-h100"))
    bench.plot_allreduce(rows, link="nvlink4-h100")
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.utils._python_dispatch import TorchDispatchMode

from workshop import dist
from workshop.base import hardware
from workshop.ddp import apply_ddp
from workshop.dist import DistEnv
from workshop.measure import metrics, perf
from workshop.models import MODELS, count_parameters, get_model

# Peak bandwidth of common links, GB/s per direction (1 GB = 1e9 bytes). A ring all-reduce
# sends and receives at once, so busbw approaches the per-direction peak, never the sum of both.
# Inside a node, compare with the GPU-to-GPU link; across nodes, with the network bandwidth per
# GPU (one NIC per GPU on most GPU clusters).
NOMINAL_LINKS = {name: link.GBps for name, link in hardware.LINKS.items()}  # GB/s per direction, per GPU

DEFAULT_SIZES = "4KiB,64KiB,1MiB,16MiB,64MiB"
# Binary units (KiB = 1024) and decimal ones (KB = 1000), as written; matched case-insensitively.
_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
_FLOAT32 = 4  # bytes per element of the tensors all-reduced here
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)  # CIFAR-shaped synthetic samples


# --- counting collectives -----------------------------------------------------------------------

class CollectiveCounter(TorchDispatchMode):
    """Counts the torch.distributed collectives this process calls inside `with CollectiveCounter() as counted:`.
    Collectives are dispatcher ops (c10d.allreduce_, c10d._allgather_base_, ...) whoever calls them (DDP's C++
    reducer, FSDP2, DeepSpeed), so a dispatch mode sees each one. `counted.calls` maps a collective ("all_gather",
    "all_reduce", "broadcast", "reduce_scatter", ...) to {"calls": n, "bytes": b}: b sums, per call, the bytes of the
    whole tensor it gathers, reduces or broadcasts (its largest tensor argument, a list's tensors together). Every
    other op passes through untouched; the mode costs Python time per op, so time steps outside it."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, dict] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, op = func.name().partition("::")
        if namespace == "c10d":
            name = op.split(".")[0].strip("_")
            for suffix in ("_coalesced", "_base", "_into_tensor", "_tensor"):
                name = name.replace(suffix, "")
            name = {"allreduce": "all_reduce", "allgather": "all_gather", "alltoall": "all_to_all"}.get(name, name)
            seen = self.calls.setdefault(name, {"calls": 0, "bytes": 0})
            seen["calls"] += 1
            seen["bytes"] += max((_arg_bytes(a) for a in (*args, *(kwargs or {}).values())), default=0)
        return func(*args, **(kwargs or {}))


def _arg_bytes(arg) -> int:
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    if isinstance(arg, (list, tuple)):
        return sum(_arg_bytes(a) for a in arg if isinstance(a, torch.Tensor))
    return 0


# --- helpers -----------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """Bytes from a size written as "4096", "64KiB", "1 MiB" or "1.5MB" (KiB = 1024, KB = 1000)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or (unit and unit not in _UNITS):
        raise ValueError(f"bad size {text!r}: write a number and a unit, as in 4096, 64KiB, 16MiB or 1GB "
                         f"(units: {', '.join(['B', 'KiB', 'MiB', 'GiB', 'KB', 'MB', 'GB'])})")
    value = float(m.group(1)) * _UNITS[unit or "b"]
    if value != int(value) or value <= 0:
        raise ValueError(f"bad size {text!r}: it must be a whole, positive number of bytes")
    return int(value)


def algbw(nbytes: int, seconds: float) -> float:
    """Algorithm bandwidth in GB/s: the tensor's bytes over the time of its all-reduce."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def busbw(algbw_GBps: float, world_size: int) -> float:
    """Bus bandwidth (NCCL-tests): algbw * 2(n-1)/n. A ring all-reduce of S bytes sends (and
    receives) 2(n-1)/n * S bytes per rank, so this is what each rank's link carried."""
    return algbw_GBps * 2 * (world_size - 1) / world_size


def _max_over_ranks(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise max over the ranks: an iteration lasts as long as its slowest rank."""
    if not env.is_distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.tolist()


def _per_rank(value: float, env: DistEnv) -> list[float]:
    """Every rank's `value`, in rank order, on every rank."""
    if not env.is_distributed:
        return [value]
    t = torch.zeros(env.world_size, dtype=torch.float64, device=env.device)
    t[env.rank] = value
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.tolist()


def _timed_allreduce(buf: torch.Tensor, env: DistEnv) -> float:
    """Seconds of one all-reduce of `buf` on this rank, started together with the other ranks."""
    dist.barrier()  # line the ranks up, or the first one in measures the wait for the last
    with metrics.Timer(env.device) as t:
        tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
    return t.elapsed


def _synthetic_batch(micro_batch_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of random CIFAR-shaped tensors already on the device: the benchmarks measure
    the step, not the input pipeline."""
    x = torch.randn(micro_batch_size, *IMAGE_SHAPE, device=device)  # (B, 3, 32, 32)
    y = torch.randint(0, NUM_CLASSES, (micro_batch_size,), device=device)  # (B,)
    return x, y


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


# --- all-reduce bandwidth --------------------------------------------------------------------------

def allreduce_sweep(sizes: list[int], iters: int = 20, warmup: int = 5, env: DistEnv | None = None) -> list[dict]:
    """Time all_reduce(SUM) of a float32 tensor of each size in bytes, on every rank (a collective).

    Each iteration starts after a barrier and is timed on every rank; the slowest rank's time
    counts, and the median over `iters` iterations is reported, after `warmup` untimed ones
    (first calls set up connections and buffers). One row per size: bytes, time_s, algbw_GBps,
    busbw_GBps. With one rank there is nothing to all-reduce with: no rows.
    """
    env = env or dist.get_env()
    if not env.is_distributed:
        return []
    rows = []
    for nbytes in sizes:
        if nbytes <= 0 or nbytes % _FLOAT32:
            raise ValueError(f"size {nbytes} bytes: the all-reduce is of float32, so give a positive multiple of 4 bytes")
        buf = torch.ones(nbytes // _FLOAT32, dtype=torch.float32, device=env.device)
        for _ in range(warmup):
            _timed_allreduce(buf, env)
        times = _max_over_ranks([_timed_allreduce(buf, env) for _ in range(iters)], env)
        time_s = statistics.median(times)
        alg = algbw(nbytes, time_s)
        rows.append({"bytes": nbytes, "time_s": time_s, "algbw_GBps": alg, "busbw_GBps": busbw(alg, env.world_size)})
        del buf
    return rows


def format_allreduce(rows: list[dict], link: str | None = None, env: DistEnv | None = None) -> str:
    """The sweep as a table; with `link` (a key of NOMINAL_LINKS), busbw as a fraction of its peak."""
    env = env or dist.get_env()
    if not rows:
        return ("one rank: nothing to all-reduce with. Start N ranks: "
                "python -m torch.distributed.run --standalone --nproc-per-node N -m workshop.measure.bench allreduce, or srun")
    peak = NOMINAL_LINKS[link] if link else None
    head = f"{'size':>10} {'bytes':>11} {'time (us)':>11} {'algbw (GB/s)':>13} {'busbw (GB/s)':>13}"
    if peak:
        head += f" {'of ' + link:>18}"
    lines = [f"all_reduce(SUM) of float32 on {env.world_size} ranks ({env.backend}, {env.device}): "
             "median over iterations of the slowest rank's time; GB = 1e9 bytes", head]
    for r in rows:
        line = (f"{metrics.fmt_bytes(r['bytes']):>10} {r['bytes']:>11d} {r['time_s'] * 1e6:>11.1f} "
                f"{r['algbw_GBps']:>13.3f} {r['busbw_GBps']:>13.3f}")
        if peak:
            line += f" {r['busbw_GBps'] / peak:>17.1%}"
        lines.append(line)
    if peak:
        lines.append(f"{link}: nominal peak {peak} GB/s per direction")
    return "\n".join(lines)


def plot_allreduce(rows: list[dict], link: str | None = None):
    """busbw and algbw against message size (log x axis); a dashed line at the link's peak."""
    from matplotlib.figure import Figure  # no pyplot: the figure is returned, not shown twice

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    if rows:
        sizes = [r["bytes"] for r in rows]
        ax.plot(sizes, [r["busbw_GBps"] for r in rows], "o-", label="busbw")
        ax.plot(sizes, [r["algbw_GBps"] for r in rows], "s--", label="algbw", alpha=0.7)
    else:
        ax.text(0.5, 0.5, "one rank: nothing to all-reduce", ha="center", va="center", transform=ax.transAxes)
    if link:
        ax.axhline(NOMINAL_LINKS[link], color="gray", linestyle="--", label=f"{link} peak")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("GB/s")
    ax.set_title("all-reduce bandwidth")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return fig


# --- all-reduce, all-gather and reduce-scatter ------------------------------------------------------

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


def _run_collective(name: str, whole: torch.Tensor, shard: torch.Tensor) -> None:
    """One collective on a tensor of `whole.numel()` elements: all-reduce it, all-gather it from shards, or
    reduce-scatter it into shards, as DDP (all-reduce) and FSDP (all-gather, reduce-scatter) call them."""
    if name == "all_reduce":
        tdist.all_reduce(whole, op=tdist.ReduceOp.SUM)
    elif name == "all_gather":
        tdist.all_gather_single(whole, shard)  # the calls FSDP2 makes
    else:
        tdist.reduce_scatter_single(shard, whole, op=tdist.ReduceOp.SUM)


def collectives_sweep(sizes: list[int], collectives=COLLECTIVES, iters: int = 20, warmup: int = 5,
                      env: DistEnv | None = None) -> list[dict]:
    """Time each collective on float32 tensors of each size in bytes (the whole tensor: the all-reduced one,
    the gathered result, the reduce-scatter's input), every rank at once (a collective).

    The collectives take turns, one call each per iteration, so that a machine busy with other work slows
    them alike; each call starts after a barrier, the slowest rank's time counts, and the median over
    `iters` iterations (after `warmup` rounds) is reported. One row per size and collective: collective,
    bytes, time_s, algbw_GBps. With one rank: no rows."""
    env = env or dist.get_env()
    unknown = [c for c in collectives if c not in COLLECTIVES]
    if unknown:
        raise ValueError(f"unknown collective {unknown}; choose from {', '.join(COLLECTIVES)}")
    if not env.is_distributed:
        return []
    rows = []
    for nbytes in sizes:
        if nbytes <= 0 or nbytes % (_FLOAT32 * env.world_size):
            raise ValueError(f"size {nbytes} bytes: give a positive multiple of 4 x {env.world_size} bytes (float32 "
                             "elements that split evenly over the ranks)")
        whole = torch.ones(nbytes // _FLOAT32, dtype=torch.float32, device=env.device)
        shard = torch.ones(whole.numel() // env.world_size, dtype=torch.float32, device=env.device)
        times = {c: [] for c in collectives}
        for i in range(warmup + iters):
            for c in collectives:
                dist.barrier()
                with metrics.Timer(env.device) as t:
                    _run_collective(c, whole, shard)
                if i >= warmup:
                    times[c].append(t.elapsed)
        for c in collectives:
            time_s = statistics.median(_max_over_ranks(times[c], env))
            rows.append({"collective": c, "bytes": nbytes, "time_s": time_s, "algbw_GBps": algbw(nbytes, time_s)})
    return rows


def format_collectives(rows: list[dict], env: DistEnv | None = None) -> str:
    env = env or dist.get_env()
    if not rows:
        return ("one rank: no collective to time. Start N ranks: "
                "python -m torch.distributed.run --standalone --nproc-per-node N -m workshop.measure.bench collectives")
    lines = [f"float32 collectives on {env.world_size} ranks ({env.backend}, {env.device}), taking turns: median over "
             "iterations of the slowest rank's time; bytes of the whole tensor",
             f"{'collective':>15} {'size':>10} {'time (us)':>11} {'algbw (GB/s)':>13}"]
    for r in rows:
        lines.append(f"{r['collective']:>15} {metrics.fmt_bytes(r['bytes']):>10} {r['time_s'] * 1e6:>11.1f} "
                     f"{r['algbw_GBps']:>13.3f}")
    return "\n".join(lines)


# --- DDP throughput ------------------------------------------------------------------------------

def ddp_throughput(model_name: str, micro_batch_size: int, steps: int, warmup: int, env: DistEnv | None = None) -> dict:
    """Global samples/s of `steps` SGD steps (after `warmup` untimed ones) of `model_name` wrapped
    in DistributedDataParallel, each rank on its own random batch already on its device. With one
    rank the same model runs without DDP: the one-device baseline. A collective: every rank calls it.

    samples_per_s = world_size * micro_batch_size * steps / time, the time of the slowest rank.
    Peak memory is per rank: CUDA bytes allocated on a GPU; on CPU the process's peak resident set
    (Python and the libraries included).
    """
    env = env or dist.get_env()
    torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    model = get_model(model_name, num_classes=NUM_CLASSES).to(env.device)
    parameters = count_parameters(model)
    if env.is_distributed:
        model = apply_ddp(model, env)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch.manual_seed(1 + env.rank)  # each rank its own data, as with a DistributedSampler
    x, y = _synthetic_batch(micro_batch_size, env.device)

    for _ in range(warmup):  # first steps allocate buffers, pick kernels and build DDP's buckets
        perf.train_step(model, optimizer, x, y)
    metrics.reset_peak_memory(env.device)
    dist.barrier()
    with metrics.Timer(env.device) as t:
        for _ in range(steps):
            perf.train_step(model, optimizer, x, y)
    time_s = _max_over_ranks([t.elapsed], env)[0]
    peak = [int(b) for b in _per_rank(float(metrics.peak_memory(env.device)), env)]
    return {
        "model": model_name,
        "parameters": parameters,
        "ddp": env.is_distributed,
        "world_size": env.world_size,
        "device": env.device,
        "backend": env.backend,
        "micro_batch_size": micro_batch_size,
        "global_batch_size": micro_batch_size * env.world_size,
        "steps": steps,
        "warmup": warmup,
        "time_s": time_s,
        "step_time_s": time_s / steps,
        "samples_per_s": metrics.throughput(env.world_size * micro_batch_size * steps, time_s),
        "peak_memory_bytes": peak,  # one entry per rank, in rank order
        # the keys of workshop.measure.report
        "throughput": metrics.throughput(env.world_size * micro_batch_size * steps, time_s),
        "samples_or_tokens": "samples",
        "strategy": "ddp" if env.is_distributed else "single",
    }


def format_ddp(result: dict) -> str:
    how = (f"DistributedDataParallel on {result['world_size']} ranks ({result['backend']}, {result['device']})"
           if result["ddp"] else f"one rank, no DDP: the one-device baseline ({result['device']})")
    peaks = ", ".join(metrics.fmt_bytes(b) for b in result["peak_memory_bytes"])
    return "\n".join([
        f"{result['model']} ({result['parameters']:,} parameters), {how}",
        f"micro_batch_size {result['micro_batch_size']}, global_batch_size {result['global_batch_size']}, "
        f"{result['steps']} steps after {result['warmup']} warm-up",
        f"throughput  {result['samples_per_s']:.1f} samples/s (global)",
        f"step time   {_ms(result['step_time_s'])} ms",
        f"peak memory {peaks} (per rank)",
    ])


def run_ddp(nproc: int, model_name: str, micro_batch_size: int, steps: int, warmup: int, run: Path,
            cpu: bool = False) -> dict:
    """`ddp_throughput` as a separate program on `nproc` ranks started by torchrun on this machine,
    from a one-process notebook (04): its result, its output in run/ddp.log, its record in run/ddp/.
    Each rank gets one intra-op thread, so on CPU a rank stands for one core, as a GPU for one device.
    `cpu`: on the CPU even where there are GPUs."""
    import os
    import subprocess

    Path(run).mkdir(parents=True, exist_ok=True)
    out = Path(run) / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "workshop.measure.bench", "ddp", "--model", model_name, "--batch-size", str(micro_batch_size),
           "--steps", str(steps), "--warmup", str(warmup), "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # torchrun decides this world
    env.update(OMP_NUM_THREADS="1", WORKSHOP_RUN_DIR=str(Path(run) / "ddp"))
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (Path(run) / "ddp.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"the DDP run failed with exit code {proc.returncode}; its output, also in "
                           f"{metrics.display_path(Path(run) / 'ddp.log')}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(out.read_text())


# --- compute against communication ----------------------------------------------------------------

def step_split(model_names: list[str], micro_batch_size: int, steps: int, env: DistEnv | None = None,
               warmup: int = 1) -> list[dict]:
    """Per model: the compute of one training step (forward, backward, SGD step; no communication)
    and the all-reduce of one buffer as large as its gradients, each timed every step on every rank,
    the slowest rank counting, the median over `steps` reported. A collective: every rank calls it.

    The bounds on scaling efficiency (time of one rank's step alone / time of a DDP step):
    - no overlap: compute / (compute + comm), communication after backward (allreduce_gradients);
    - perfect overlap: compute / max(compute, comm), all of it hidden behind backward (DDP at best).
    With one rank comm_s is 0 and both are 1.
    """
    env = env or dist.get_env()
    rows = []
    for name in model_names:
        torch.manual_seed(0)
        model = get_model(name, num_classes=NUM_CLASSES).to(env.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = _synthetic_batch(micro_batch_size, env.device)
        grads = [p for p in model.parameters() if p.requires_grad]
        grad_bytes = sum(p.numel() * p.element_size() for p in grads)
        # one flat buffer, like a single DDP bucket holding every gradient
        buf = torch.zeros(sum(p.numel() for p in grads), dtype=grads[0].dtype, device=env.device)

        compute, comm = [], []
        for i in range(warmup + steps):
            dist.barrier()
            with metrics.Timer(env.device) as t:
                perf.train_step(model, optimizer, x, y)
            comm_s = _timed_allreduce(buf, env) if env.is_distributed else 0.0
            if i >= warmup:
                compute.append(t.elapsed)
                comm.append(comm_s)
        compute_s = statistics.median(_max_over_ranks(compute, env))
        comm_s = statistics.median(_max_over_ranks(comm, env))
        rows.append({
            "model": name,
            "parameters": count_parameters(model),
            "grad_bytes": grad_bytes,
            "world_size": env.world_size,
            "micro_batch_size": micro_batch_size,
            "compute_s": compute_s,
            "comm_s": comm_s,
            "efficiency_no_overlap": compute_s / (compute_s + comm_s),
            "efficiency_overlap": compute_s / max(compute_s, comm_s),
        })
        del model, optimizer, buf
    return rows


def step_split_measurements(rows: list[dict]) -> list[dict]:
    """The split in the keys of workshop.measure.report: per model, the compute alone on one device
    (strategy "single"), and on N ranks the compute followed by the gradients' all-reduce, both
    measured, run one after the other: a DDP step with no overlap (strategy "ddp-no-overlap")."""
    out = []
    for r in rows:
        mbs, n = r["micro_batch_size"], r["world_size"]
        common = {"model": r["model"], "samples_or_tokens": "samples", "micro_batch_size": mbs}
        out.append({**common, "strategy": "single", "world_size": 1, "global_batch_size": mbs, "step_time_s": r["compute_s"],
                    "throughput": mbs / r["compute_s"]})
        if n > 1:
            step = r["compute_s"] + r["comm_s"]
            out.append({**common, "strategy": "ddp-no-overlap", "world_size": n, "global_batch_size": mbs * n,
                        "step_time_s": step, "throughput": n * mbs / step})
    return out


def format_step_split(rows: list[dict], env: DistEnv | None = None) -> str:
    env = env or dist.get_env()
    world_size = rows[0]["world_size"] if rows else env.world_size
    lines = [
        f"one training step split into compute and gradient all-reduce, {world_size} rank(s) ({env.backend}, {env.device}); "
        "median over steps of the slowest rank",
        f"{'model':>10} {'parameters':>11} {'grad size':>10} {'compute (ms)':>13} {'all-reduce (ms)':>16} "
        f"{'comm/compute':>13} {'eff. no overlap':>16} {'eff. overlap':>13}",
    ]
    for r in rows:
        lines.append(
            f"{r['model']:>10} {r['parameters']:>11,} {metrics.fmt_bytes(r['grad_bytes']):>10} {_ms(r['compute_s']):>13} "
            f"{_ms(r['comm_s']):>16} {r['comm_s'] / r['compute_s']:>13.2f} {r['efficiency_no_overlap']:>16.1%} "
            f"{r['efficiency_overlap']:>13.1%}")
    if world_size == 1:
        lines.append("one rank: no all-reduce, so communication is 0. Run with N ranks to measure it: "
                     "python -m torch.distributed.run --standalone --nproc-per-node N -m workshop.measure.bench step-split")
    return "\n".join(lines)


# --- DDP against FSDP ------------------------------------------------------------------------------

STRATEGIES = ("ddp", "fsdp")
DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's default bucket_cap_mb=25


def _state_bytes(model, optimizer) -> int:
    """Bytes this rank holds of parameters, gradients and optimizer state (local shards under FSDP)."""
    def local(t):
        t = getattr(t, "_local_tensor", t)  # a DTensor's shard on this rank
        return t.numel() * t.element_size()
    total = sum(local(p) + (local(p.grad) if p.grad is not None else 0) for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(local(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


def _lm_step(model, optimizer, tokens) -> None:
    from workshop.models import lm_loss

    optimizer.zero_grad(set_to_none=True)
    lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()  # (B, T) inputs, the next tokens as targets
    optimizer.step()


def strategy_steps(size: str = "cpu", micro_batch_size: int = 8, seq_len: int = 64, steps: int = 10, warmup: int = 3,
                   strategies=STRATEGIES, env: DistEnv | None = None) -> dict:
    """Step times of TinyGPT(`size`) trained with AdamW on random tokens, every rank at once (a collective):

    - single: the plain model on every rank, no communication: the compute of a step (on one rank,
      the one-device baseline; on N ranks, `compute_step_s`, not a measurement of its own);
    - ddp: DistributedDataParallel, gradients all-reduced in 25 MiB buckets during backward;
    - fsdp: FSDP2, `fully_shard` on each block, then on the root: parameters all-gathered per block
      in forward and backward, gradients reduce-scattered.

    On N ranks each wrapper also runs on a process group of its rank alone ("<strategy>-alone"):
    its own work (hooks, bucket and all-gather copies) with nobody to communicate with. The
    strategies take turns, one step each, so that a machine busy with other work slows them alike;
    each step starts after a barrier and the slowest rank's time counts; the median over `steps`
    (after `warmup` rounds) is reported. State bytes per rank: parameters, gradients and
    AdamW's moments that the rank holds. Returns the record's results, in the keys of
    workshop.measure.report (one measurement per strategy), with what workshop.estimate.costmodel needs."""
    from torch.distributed.device_mesh import DeviceMesh

    from workshop.models import tinygpt
    from workshop.sharding import apply_fsdp

    env = env or dist.get_env()
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown}; choose from {', '.join(STRATEGIES)}")

    def fresh():
        torch.manual_seed(0)
        return tinygpt(size, max_seq_len=seq_len).to(env.device)

    def wrap(strategy, group):
        model = fresh()
        if strategy == "ddp":
            return apply_ddp(model, env, bucket_cap_mb=DDP_BUCKET_BYTES / 2**20, process_group=group)
        mesh = DeviceMesh.from_group(group, env.device.split(":")[0]) if group is not None else None
        return apply_fsdp(model, mesh)

    models = {"single": fresh()}
    parameters = count_parameters(models["single"])
    param_bytes = sum(p.numel() * p.element_size() for p in models["single"].parameters())
    units = len(models["single"].layers) + 1
    alone = tdist.new_subgroups(group_size=1)[0] if env.is_distributed else None  # each rank a group of its own
    for strategy in strategies:
        if env.is_distributed:  # the wrapper's own work (hooks, copies), with nobody to communicate with
            models[f"{strategy}-alone"] = wrap(strategy, alone)
        models[strategy] = wrap(strategy, None)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    torch.manual_seed(1 + env.rank)  # each rank its own tokens, as with a DistributedSampler
    tokens = torch.randint(0, 256, (micro_batch_size, seq_len + 1), device=env.device)  # (B, T + 1)

    times = {name: [] for name in models}
    for i in range(warmup + steps):
        for name, model in models.items():
            dist.barrier()
            with metrics.Timer(env.device) as t:
                _lm_step(model, optimizers[name], tokens)
            if i >= warmup:
                times[name].append(t.elapsed)
    tokens_per_step = micro_batch_size * seq_len * env.world_size
    step_s = {name: statistics.median(_max_over_ranks(times[name], env)) for name in models}
    rows = [{"strategy": name, "step_time_s": step_s[name], "throughput": tokens_per_step / step_s[name],
             "state_bytes_per_rank": [int(b) for b in _per_rank(float(_state_bytes(models[name], optimizers[name])), env)]}
            for name in ["single", *strategies]]
    return {"model": f"tinygpt-{size}", "samples_or_tokens": "tokens", "world_size": env.world_size,
            "micro_batch_size": micro_batch_size, "global_batch_size": micro_batch_size * env.world_size, "seq_len": seq_len,
            "parameters": parameters, "param_bytes": param_bytes, "bucket_bytes": DDP_BUCKET_BYTES, "fsdp_units": units,
            "steps": steps, "warmup": warmup, "device": env.device, "backend": env.backend,
            "compute_step_s": step_s["single"],
            "alone_step_s": {s: step_s[f"{s}-alone"] for s in strategies if f"{s}-alone" in step_s},
            # the report compares training runs: on N ranks the plain model's step is the compute alone, not a run
            "measurements": rows if not env.is_distributed else rows[1:]}


def format_strategies(result: dict) -> str:
    lines = [f"{result['model']} ({result['parameters']:,} parameters, {metrics.fmt_bytes(result['param_bytes'])}), "
             f"{result['world_size']} rank(s) ({result['backend']}, {result['device']}), "
             f"micro batch {result['micro_batch_size']} x {result['seq_len']} tokens; "
             f"median of the slowest rank over {result['steps']} steps",
             f"compute alone (the plain model on every rank, no communication): {_ms(result['compute_step_s'])} ms per step"
             + "".join(f"; {k} on a group of one rank: {_ms(v)} ms" for k, v in result["alone_step_s"].items()),
             f"{'strategy':>9} {'step (ms)':>10} {'tokens/s':>10} {'state per rank':>15}"]
    for m in result["measurements"]:
        lines.append(f"{m['strategy']:>9} {_ms(m['step_time_s']):>10} {m['throughput']:>10.0f} "
                     f"{metrics.fmt_bytes(max(m['state_bytes_per_rank'])):>15}")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------

def _arg_sizes(text: str) -> list[int]:
    try:
        sizes = [parse_size(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    for s in sizes:
        if s % _FLOAT32:
            raise argparse.ArgumentTypeError(f"size {s} bytes is not a multiple of 4 (the all-reduce is of float32)")
    return sizes


def _arg_models(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(unknown) or text!r}; choose from {', '.join(sorted(MODELS))}")
    return names


def _arg_int(minimum: int):
    """An argparse type: a whole number of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value
    return parse


_arg_positive, _arg_count = _arg_int(1), _arg_int(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workshop.measure.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("allreduce", help="all-reduce time, algbw and busbw against message size")
    p.add_argument("--sizes", type=_arg_sizes, default=_arg_sizes(DEFAULT_SIZES),
                   help=f"comma-separated message sizes (default {DEFAULT_SIZES})")
    p.add_argument("--iters", type=_arg_positive, default=20, help="timed iterations per size (default 20)")
    p.add_argument("--warmup", type=_arg_count, default=5, help="untimed iterations first (default 5)")
    p.add_argument("--link", choices=sorted(NOMINAL_LINKS), help="show busbw as a fraction of this link's nominal peak")

    p = sub.add_parser("ddp", help="global samples/s of DDP training on synthetic data")
    p.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    p.add_argument("--batch-size", type=_arg_positive, default=64, help="micro_batch_size, per rank (default 64)")
    p.add_argument("--steps", type=_arg_positive, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=_arg_count, default=3, help="untimed steps first (default 3)")
    p.add_argument("--json", type=Path, help="also write the result here (rank 0)")

    p = sub.add_parser("step-split", help="compute against gradient all-reduce per model; efficiency bounds")
    p.add_argument("--models", type=_arg_models, default=_arg_models(",".join(MODELS)),
                   help=f"comma-separated model names (default {','.join(MODELS)})")
    p.add_argument("--batch-size", type=_arg_positive, default=32, help="micro_batch_size, per rank (default 32)")
    p.add_argument("--steps", type=_arg_positive, default=5, help="timed steps per model (default 5)")
    p.add_argument("--warmup", type=_arg_count, default=1, help="untimed steps first (default 1)")

    p = sub.add_parser("strategies", help="TinyGPT step time as compute alone, DDP and FSDP2 (checks the cost model)")
    p.add_argument("--size", choices=["cpu", "small", "gpu"], default="cpu", help="TinyGPT size (default cpu)")
    p.add_argument("--batch-size", type=_arg_positive, default=8, help="micro_batch_size in sequences, per rank (default 8)")
    p.add_argument("--seq-len", type=_arg_positive, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--steps", type=_arg_positive, default=10, help="timed steps per strategy (default 10)")
    p.add_argument("--warmup", type=_arg_count, default=3, help="untimed steps first (default 3)")

    p = sub.add_parser("collectives", help="all-reduce, all-gather and reduce-scatter time against size, in turns")
    p.add_argument("--sizes", type=_arg_sizes, default=_arg_sizes(DEFAULT_SIZES),
                   help=f"whole-tensor sizes, comma-separated, multiples of 4 x ranks bytes (default {DEFAULT_SIZES})")
    p.add_argument("--iters", type=_arg_positive, default=20, help="timed iterations per size (default 20)")
    p.add_argument("--warmup", type=_arg_count, default=5, help="untimed iterations first (default 5)")

    p = sub.add_parser("single", help="one device: samples/s, speedup and MFU of cumulative performance variants")
    p.add_argument("--model", type=_arg_model, default="small_cnn", help="small_cnn (default) or resnet18 (or vit_tiny)")
    p.add_argument("--batch-size", type=_arg_positive, default=32, help="samples per step (default 32; GPU: 512)")
    p.add_argument("--steps", type=_arg_positive, default=10, help="timed steps per variant (default 10; GPU: 50)")
    p.add_argument("--warmup", type=_arg_positive, default=2,
                   help="untimed steps first, at least 1: the first compiles, picks kernels, starts workers (default 2)")
    p.add_argument("--variants", type=_arg_variants, default=list(perf.VARIANTS),
                   help=f"comma-separated, each adding to those before it (default {','.join(perf.VARIANTS)})")
    p.add_argument("--num-workers", type=_arg_count, default=None,
                   help="DataLoader workers of the 'workers' variant (default: $SLURM_CPUS_PER_TASK - 1, else 2)")
    p.add_argument("--dataset", choices=["synthetic", "auto", "cifar10"], default="synthetic",
                   help="images to train on (default synthetic; auto: CIFAR-10 where staged)")
    p.add_argument("--compile-on-cpu", action="store_true",
                   help="measure torch.compile on CPU too (it builds C++ kernels: minutes)")
    return parser


def _arg_model(text: str) -> str:
    if text not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose from {', '.join(sorted(MODELS))}")
    return text


def _arg_variants(text: str) -> list[str]:
    try:
        return perf.check_variants(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _write(notebook: str, params: dict, results: dict, env: DistEnv) -> None:
    if env.is_main:
        path = metrics.write_record(metrics.run_dir(notebook, env), notebook=notebook, params=params, results=results, env=env)
        print(f"record: {metrics.display_path(path)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad arguments: a message and exit 2, before any rank waits
    env = dist.init()
    try:
        if args.command == "allreduce":
            if not env.is_distributed:
                print(format_allreduce([], env=env))
                return 0
            rows = allreduce_sweep(args.sizes, iters=args.iters, warmup=args.warmup, env=env)
            dist.print0(format_allreduce(rows, link=args.link, env=env))
            _write("bench-allreduce", {"sizes": args.sizes, "iters": args.iters, "warmup": args.warmup, "link": args.link},
                   {"rows": rows}, env)
        elif args.command == "ddp":
            result = ddp_throughput(args.model, args.batch_size, args.steps, args.warmup, env)
            dist.print0(format_ddp(result))
            if env.is_main and args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                metrics.atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
            _write("bench-ddp", {"model": args.model, "micro_batch_size": args.batch_size, "steps": args.steps,
                                 "warmup": args.warmup}, result, env)
        elif args.command == "strategies":
            result = strategy_steps(args.size, args.batch_size, args.seq_len, args.steps, args.warmup, env=env)
            dist.print0(format_strategies(result))
            _write("bench-strategies", {"size": args.size, "micro_batch_size": args.batch_size, "seq_len": args.seq_len,
                                        "steps": args.steps, "warmup": args.warmup}, result, env)
        elif args.command == "collectives":
            rows = collectives_sweep(args.sizes, iters=args.iters, warmup=args.warmup, env=env)
            dist.print0(format_collectives(rows, env=env))
            if env.is_distributed:
                _write("bench-collectives", {"sizes": args.sizes, "iters": args.iters, "warmup": args.warmup},
                       {"rows": rows}, env)
        elif args.command == "single":
            if env.is_distributed:
                raise SystemExit("workshop.measure.bench single measures one device: run it as one process, "
                                 "not under torchrun/srun -n N")
            num_workers = perf.default_num_workers(2) if args.num_workers is None else args.num_workers
            rows = perf.run_variants(args.model, args.batch_size, args.steps, args.warmup, args.variants, env,
                                     num_workers=num_workers, dataset=args.dataset, compile_on_cpu=args.compile_on_cpu)
            print(perf.format_variants(rows))
            best = perf.best_variant(rows)
            _write("bench-single", {"model": args.model, "batch_size": args.batch_size, "steps": args.steps,
                                    "warmup": args.warmup, "variants": args.variants, "num_workers": num_workers,
                                    "dataset": args.dataset, "compile_on_cpu": args.compile_on_cpu},
                   {"rows": rows, "best": best["variant"] if best else None,
                    "measurements": perf.report_measurements(rows)}, env)
        elif args.command == "step-split":
            rows = step_split(args.models, args.batch_size, args.steps, env, warmup=args.warmup)
            dist.print0(format_step_split(rows, env=env))
            _write("bench-step-split", {"models": args.models, "micro_batch_size": args.batch_size, "steps": args.steps,
                                        "warmup": args.warmup},
                   {"rows": rows, "measurements": step_split_measurements(rows)}, env)
        return 0
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
