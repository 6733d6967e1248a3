"""Collectives measured: the all-reduce's bandwidth against message size, the three collectives that DDP and FSDP
call (all-reduce, all-gather, reduce-scatter) timed in turns, and a counter of the collectives a step calls.

From a notebook (every rank runs the cell: these are collectives):

    rows = collectives.allreduce_sweep([2**12, 2**20, 2**26])
    print0(collectives.format_allreduce(rows, link="nvlink4-h100"))
    collectives.plot_allreduce(rows, link="nvlink4-h100")

    with collectives.CollectiveCounter() as counted:
        step(x, y)
    counted.calls  # {"all_reduce": {"calls": 3, "bytes": 379048}}

From the command line: `python -m workshop.measure.bench allreduce` and `... bench collectives` (see there).

Bandwidths follow NCCL-tests (github.com/NVIDIA/nccl-tests, doc/PERFORMANCE.md): algbw = bytes / time; busbw =
algbw * 2(n-1)/n, the rate each rank's link must carry in a ring all-reduce, which does not depend on n and compares
with the link's peak (NOMINAL_LINKS). GB = 1e9 bytes.
"""

from __future__ import annotations

import re
import statistics

import torch
import torch.distributed as tdist
from torch.utils._python_dispatch import TorchDispatchMode

from workshop import dist
from workshop.base import hardware
from workshop.base.tables import fmt_bytes, table
from workshop.dist import DistEnv
from workshop.estimate.network import COLLECTIVES
from workshop.measure import metrics

# Peak bandwidth of common links, GB/s per direction (1 GB = 1e9 bytes). A ring all-reduce
# sends and receives at once, so busbw approaches the per-direction peak, never the sum of both.
# Inside a node, compare with the GPU-to-GPU link; across nodes, with the network bandwidth per
# GPU (one NIC per GPU on most GPU clusters).
NOMINAL_LINKS = {name: link.GBps for name, link in hardware.LINKS.items()}  # GB/s per direction, per GPU

# Binary units (KiB = 1024) and decimal ones (KB = 1000), as written; matched case-insensitively.
_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
FLOAT32 = 4  # bytes per element of the tensors timed here


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


# --- sizes, bandwidths and the slowest rank -------------------------------------------------------

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


def max_over_ranks(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise max over the ranks (a collective): an iteration lasts as long as its slowest rank."""
    if not env.is_distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.tolist()


def per_rank(value: float, env: DistEnv) -> list[float]:
    """Every rank's `value`, in rank order, on every rank (a collective)."""
    if not env.is_distributed:
        return [value]
    t = torch.zeros(env.world_size, dtype=torch.float64, device=env.device)
    t[env.rank] = value
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.tolist()


def timed_allreduce(buf: torch.Tensor, env: DistEnv) -> float:
    """Seconds of one all-reduce of `buf` on this rank, started together with the other ranks."""
    dist.barrier()  # line the ranks up, or the first one in measures the wait for the last
    with metrics.Timer(env.device) as t:
        tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
    return t.elapsed


# --- all-reduce bandwidth --------------------------------------------------------------------------

def allreduce_sweep(sizes: list[int], iters: int = 20, warmup: int = 5, env: DistEnv | None = None) -> list[dict]:
    """Time all_reduce(SUM) of a float32 tensor of each size in bytes, on every rank (a collective).

    Each iteration starts after a barrier and is timed on every rank; the slowest rank's time
    counts, and the median over `iters` iterations is reported, after `warmup` untimed ones
    (first calls set up connections and buffers). One row per size: bytes, time_s, fastest_s (the fastest
    iteration), algbw_GBps, busbw_GBps. With one rank there is nothing to all-reduce with: no rows.
    """
    env = env or dist.get_env()
    if not env.is_distributed:
        return []
    rows = []
    for nbytes in sizes:
        if nbytes <= 0 or nbytes % FLOAT32:
            raise ValueError(f"size {nbytes} bytes: the all-reduce is of float32, so give a positive multiple of 4 bytes")
        buf = torch.ones(nbytes // FLOAT32, dtype=torch.float32, device=env.device)
        for _ in range(warmup):
            timed_allreduce(buf, env)
        times = max_over_ranks([timed_allreduce(buf, env) for _ in range(iters)], env)
        time_s = statistics.median(times)
        alg = algbw(nbytes, time_s)
        rows.append({"bytes": nbytes, "time_s": time_s, "fastest_s": min(times), "algbw_GBps": alg,
                     "busbw_GBps": busbw(alg, env.world_size)})
        del buf
    return rows


def format_allreduce(rows: list[dict], link: str | None = None, env: DistEnv | None = None) -> str:
    """The sweep as a table; with `link` (a key of NOMINAL_LINKS), busbw as a fraction of its peak."""
    env = env or dist.get_env()
    if not rows:
        return ("one rank: nothing to all-reduce with. Start N ranks: "
                "python -m torch.distributed.run --standalone --nproc-per-node N -m workshop.measure.bench allreduce, or srun")
    peak = NOMINAL_LINKS[link] if link else None
    header = ["size", "bytes", "time (us)", "fastest (us)", "algbw (GB/s)", "busbw (GB/s)"] + ([f"of {link}"] if peak else [])
    body = [[fmt_bytes(r["bytes"]), r["bytes"], f"{r['time_s'] * 1e6:.1f}", f"{r['fastest_s'] * 1e6:.1f}",
             f"{r['algbw_GBps']:.3f}", f"{r['busbw_GBps']:.3f}"] + ([f"{r['busbw_GBps'] / peak:.1%}"] if peak else [])
            for r in rows]
    lines = [f"all_reduce(SUM) of float32 on {env.world_size} ranks ({env.backend}, {env.device}): median over iterations "
             "of the slowest rank's time;", "fastest: the fastest iteration; GB = 1e9 bytes", table(header, body)]
    if peak:
        lines.append(f"{link}: nominal peak {peak} GB/s per direction")
    slower = [(a, b) for a, b in zip(rows, rows[1:]) if a["time_s"] > b["time_s"]]
    if slower:  # latency's noise, larger than the bytes' cost: say so rather than leave it to be puzzled over
        a, b = slower[0]
        lines.append(f"{fmt_bytes(a['bytes'])} took longer than {fmt_bytes(b['bytes'])}: at these sizes an all-reduce "
                     f"costs its latency, {2 * (env.world_size - 1)} steps\nfrom rank to rank, not its bytes, and the "
                     "latency moves with whatever else runs (on ranks that share cores,\nwith the scheduler): compare "
                     "the fastest iterations")
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
        if nbytes <= 0 or nbytes % (FLOAT32 * env.world_size):
            raise ValueError(f"size {nbytes} bytes: give a positive multiple of 4 x {env.world_size} bytes (float32 "
                             "elements that split evenly over the ranks)")
        whole = torch.ones(nbytes // FLOAT32, dtype=torch.float32, device=env.device)
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
            time_s = statistics.median(max_over_ranks(times[c], env))
            rows.append({"collective": c, "bytes": nbytes, "time_s": time_s, "algbw_GBps": algbw(nbytes, time_s)})
    return rows


def format_collectives(rows: list[dict], env: DistEnv | None = None) -> str:
    env = env or dist.get_env()
    if not rows:
        return ("one rank: no collective to time. Start N ranks: "
                "python -m torch.distributed.run --standalone --nproc-per-node N -m workshop.measure.bench collectives")
    body = [[r["collective"], fmt_bytes(r["bytes"]), f"{r['time_s'] * 1e6:.1f}", f"{r['algbw_GBps']:.3f}"] for r in rows]
    return "\n".join([f"float32 collectives on {env.world_size} ranks ({env.backend}, {env.device}), taking turns: median "
                      "over iterations of the slowest rank's time; bytes of the whole tensor",
                      table(["collective", "size", "time (us)", "algbw (GB/s)"], body)])
