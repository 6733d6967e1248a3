"""The alpha-beta model of collectives, and the step time of DDP, FSDP and tensor parallelism.

A message of n bytes between two ranks takes alpha + n * beta seconds: alpha is the latency of a
message (seconds), beta the inverse of the link's bandwidth (seconds per byte). Ring algorithms on
p ranks (Thakur, Rabenseifner and Gropp 2005, "Optimization of collective communication operations
in MPICH"; Patarasuk and Yuan 2009 for the ring all-reduce) take:

    all-reduce       2(p-1) alpha + 2(p-1)/p * n * beta     (a reduce-scatter, then an all-gather)
    all-gather         (p-1) alpha +  (p-1)/p * n * beta     (n: the bytes of the whole, gathered tensor)
    reduce-scatter     (p-1) alpha +  (p-1)/p * n * beta     (n: the bytes of the whole, unreduced tensor)

alpha and beta come from the all-reduce benchmark's records (`calibrate`, a weighted least-squares
fit of the formula above to every measured size) or from a known link (`LINKS`).

Step time of one optimizer step per rank, `compute_s` being the forward, backward and optimizer
step of the micro batch on one device with no communication:

    DDP      compute + (1 - overlap) * all_reduce(gradient bytes)      gradients bucketed, overlapped with backward
    FSDP     compute + (1 - overlap) * [2 all_gather + reduce_scatter] of the parameters, per unit:
             all-gathers in forward and again in backward (parameters resharded after forward), and a
             reduce-scatter of the gradients: 3(p-1)/p n beta, 1.5x DDP's 2(p-1)/p n beta (ZeRO-3)
    TP       compute / tp + 4 * layers * all_reduce(activation bytes of the micro batch) on the tp ranks:
             Megatron's f and g, 2 all-reduces per layer forward (attention, MLP) and 2 backward

`project` extends a measured or estimated one-device step to 1 ... 4096 devices (weak scaling: the
micro batch per device stays the same), with a faster link inside a node than across nodes.

    ab = costmodel.calibrate(costmodel.allreduce_rows(records))   # AlphaBeta(alpha=..., beta=...)
    costmodel.ddp_step(compute_s=0.05, grad_bytes=4 * 25_600_000, world_size=8, link=ab)
    costmodel.project(costmodel.Workload.from_size("7B", tokens_per_sample=4096), gpu="h100")
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# --- links -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlphaBeta:
    """A link: alpha seconds per message, beta seconds per byte (1 / bandwidth)."""

    alpha: float
    beta: float
    name: str = ""

    @property
    def bandwidth_GBps(self) -> float:
        return 1 / self.beta / 1e9 if self.beta > 0 else math.inf

    def __str__(self) -> str:
        label = f"{self.name}: " if self.name else ""
        return f"{label}alpha {self.alpha * 1e6:.1f} us, beta {self.beta * 1e9:.4f} ns/B ({self.bandwidth_GBps:.2f} GB/s)"


def _link(name: str, alpha_us: float, GBps: float) -> AlphaBeta:
    return AlphaBeta(alpha_us * 1e-6, 1 / (GBps * 1e9), name)


# Peak bandwidth per direction as in workshop.bench.NOMINAL_LINKS; latencies are typical small-message
# all-reduce step times reported by NCCL-tests on such links (a few microseconds inside a node, about ten
# across InfiniBand, tens over Ethernet/TCP). Calibrate on your own cluster for real numbers.
LINKS = {
    "nvlink5-b200": _link("nvlink5-b200", 3, 900),
    "nvlink4-h100": _link("nvlink4-h100", 3, 450),
    "nvlink3-a100": _link("nvlink3-a100", 4, 300),
    "pcie5-x16": _link("pcie5-x16", 6, 64),
    "pcie4-x16": _link("pcie4-x16", 8, 32),
    "ib-ndr-400": _link("ib-ndr-400", 8, 50),
    "ib-hdr-200": _link("ib-hdr-200", 10, 25),
    "eth-100g": _link("eth-100g", 30, 12.5),
    "eth-25g": _link("eth-25g", 50, 3.125),
}

# Dense bf16 peak FLOP/s of one device (vendor data sheets) and the devices a node usually holds.
GPUS = {
    "b200": {"flops": 2250e12, "per_node": 8, "intra": "nvlink5-b200", "inter": "ib-ndr-400"},
    "h100": {"flops": 989e12, "per_node": 8, "intra": "nvlink4-h100", "inter": "ib-ndr-400"},
    "a100": {"flops": 312e12, "per_node": 8, "intra": "nvlink3-a100", "inter": "ib-hdr-200"},
}


def get_link(link: AlphaBeta | str) -> AlphaBeta:
    if isinstance(link, AlphaBeta):
        return link
    if link not in LINKS:
        raise ValueError(f"unknown link {link!r}; give an AlphaBeta or one of {', '.join(sorted(LINKS))}")
    return LINKS[link]


# --- collectives ---------------------------------------------------------------------------------

def _check(nbytes: float, p: int) -> None:
    if p < 1 or int(p) != p:
        raise ValueError(f"the number of ranks must be a whole number >= 1, got {p}")
    if nbytes < 0:
        raise ValueError(f"a message cannot have {nbytes} bytes")


def all_reduce(nbytes: float, p: int, link: AlphaBeta | str) -> float:
    """Seconds of a ring all-reduce of `nbytes` on `p` ranks: 2(p-1) alpha + 2(p-1)/p n beta."""
    _check(nbytes, p)
    ab = get_link(link)
    return 2 * (p - 1) * ab.alpha + 2 * (p - 1) / p * nbytes * ab.beta


def all_gather(nbytes: float, p: int, link: AlphaBeta | str) -> float:
    """Seconds of a ring all-gather whose result has `nbytes`: (p-1) alpha + (p-1)/p n beta."""
    _check(nbytes, p)
    ab = get_link(link)
    return (p - 1) * ab.alpha + (p - 1) / p * nbytes * ab.beta


def reduce_scatter(nbytes: float, p: int, link: AlphaBeta | str) -> float:
    """Seconds of a ring reduce-scatter of an `nbytes` input: (p-1) alpha + (p-1)/p n beta."""
    return all_gather(nbytes, p, link)


# --- calibration ---------------------------------------------------------------------------------

def allreduce_rows(records: list[dict]) -> list[dict]:
    """Every all-reduce measurement in `records`: rows {bytes, time_s, world_size} from
    `python -m workshop.bench allreduce` (results.rows) and notebook 05 (results.allreduce).
    Failed runs and single-rank runs are skipped."""
    rows = []
    for rec in records:
        if rec.get("status", "ok") != "ok":
            continue
        results = rec.get("results") or {}
        measured = results.get("rows") if rec.get("notebook") == "bench-allreduce" else results.get("allreduce")
        p = int((rec.get("dist") or {}).get("world_size", 1))
        if not measured or p < 2:
            continue
        for r in measured:
            if r.get("bytes") and r.get("time_s"):
                rows.append({"bytes": int(r["bytes"]), "time_s": float(r["time_s"]), "world_size": p})
    return rows


def calibrate(rows: list[dict], name: str = "calibrated") -> AlphaBeta:
    """alpha and beta from all-reduce rows {bytes, time_s, world_size} (any world sizes >= 2).

    Least squares of t = 2(p-1) alpha + 2(p-1)/p n beta, weighted by 1/t so that each size counts by
    its relative error (unweighted, the largest messages alone would decide alpha). A coefficient
    that comes out negative is set to 0 and the other refitted: neither can be negative.
    """
    pts = [(2 * (r["world_size"] - 1), 2 * (r["world_size"] - 1) / r["world_size"] * r["bytes"], r["time_s"])
           for r in rows if r["world_size"] >= 2 and r["time_s"] > 0]
    if len(pts) < 2 or len({x2 for _, x2, _ in pts}) < 2:
        raise ValueError("calibration needs all-reduce times of at least two message sizes on 2 or more ranks: run "
                         "python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.bench allreduce")
    # weighted rows: (x1/t, x2/t) . (alpha, beta) ~ 1
    a11 = sum((x1 / t) ** 2 for x1, _, t in pts)
    a12 = sum(x1 * x2 / t**2 for x1, x2, t in pts)
    a22 = sum((x2 / t) ** 2 for _, x2, t in pts)
    b1 = sum(x1 / t for x1, _, t in pts)
    b2 = sum(x2 / t for _, x2, t in pts)
    det = a11 * a22 - a12 * a12
    alpha = (b1 * a22 - b2 * a12) / det if det else -1.0
    beta = (a11 * b2 - a12 * b1) / det if det else -1.0
    if alpha < 0 or beta < 0:  # the one-coefficient fits
        alpha, beta = (0.0, b2 / a22) if alpha < 0 else (b1 / a11, 0.0)
    return AlphaBeta(alpha, beta, name)


def fit_error(rows: list[dict], ab: AlphaBeta) -> float:
    """The largest relative error of the fitted all-reduce times against the measured ones."""
    return max(abs(all_reduce(r["bytes"], r["world_size"], ab) - r["time_s"]) / r["time_s"] for r in rows)


# --- step times ----------------------------------------------------------------------------------

def _exposed(comm_s: float, compute_s: float, overlap: float) -> float:
    """The part of the communication that the step waits for: a fraction `overlap` of it runs behind the
    backward, at most as long as the backward itself (about 2/3 of the compute)."""
    if not 0 <= overlap <= 1:
        raise ValueError(f"overlap is a fraction from 0 to 1, got {overlap}")
    hidden = min(overlap * comm_s, 2 / 3 * compute_s)
    return comm_s - hidden


def ddp_step(compute_s: float, grad_bytes: float, world_size: int, link: AlphaBeta | str, overlap: float = 0.0,
             bucket_bytes: float = 25 * 2**20) -> float:
    """Seconds of a DDP step: compute, and the gradient all-reduce, in buckets of `bucket_bytes`
    (each bucket pays the latency), less what overlaps the backward."""
    if world_size == 1:
        return compute_s
    buckets = max(1, math.ceil(grad_bytes / bucket_bytes))
    comm = buckets * all_reduce(grad_bytes / buckets, world_size, link)
    return compute_s + _exposed(comm, compute_s, overlap)


def fsdp_comm(param_bytes: float, world_size: int, link: AlphaBeta | str, units: int = 1) -> float:
    """Seconds of one FSDP (ZeRO-3) step's communication: per unit (a fully_shard group) an
    all-gather in forward, one in backward, and a reduce-scatter of its gradients."""
    per_unit = param_bytes / units
    return units * (2 * all_gather(per_unit, world_size, link) + reduce_scatter(per_unit, world_size, link))


def fsdp_step(compute_s: float, param_bytes: float, world_size: int, link: AlphaBeta | str, units: int = 1,
              overlap: float = 0.0) -> float:
    """Seconds of an FSDP step: compute, and 2 all-gathers and a reduce-scatter per unit, less what
    prefetching overlaps. Gradients in the parameters' dtype, so grad bytes = param bytes."""
    if world_size == 1:
        return compute_s
    return compute_s + _exposed(fsdp_comm(param_bytes, world_size, link, units), compute_s, overlap)


def tp_step(compute_s: float, activation_bytes: float, layers: int, tp_size: int, link: AlphaBeta | str) -> float:
    """Seconds of a tensor-parallel step: the compute split over `tp_size` ranks, and 4 all-reduces
    per layer (2 forward, 2 backward) of the (batch, seq, dim) activations, not overlapped: the next
    matmul needs their result."""
    if tp_size == 1:
        return compute_s
    return compute_s / tp_size + 4 * layers * all_reduce(activation_bytes, tp_size, link)


# --- workloads and projection --------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """What a step of a model costs: parameters, training FLOPs per sample, and for tensor
    parallelism the layers and the activation bytes per sample of one layer's output."""

    name: str
    parameters: int
    flops_per_sample: float
    samples_or_tokens: str = "samples"
    tokens_per_sample: int = 1
    layers: int = 1
    activation_bytes_per_sample: float = 0.0
    bytes_per_param: int = 2  # bf16 weights and gradients on a GPU

    @classmethod
    def from_size(cls, size: str | float, tokens_per_sample: int = 2048, name: str | None = None) -> Workload:
        """A GPT-shaped model of `size` parameters ("7B", "350M", 1.3e9): 6 FLOPs per parameter per token
        (Kaplan et al. 2020), dimension and depth from the usual shape (dim = 128 * layers, so
        parameters ~ 12 * layers * dim^2)."""
        n = parse_count(size)
        layers = max(1, round((n / (12 * 128**2)) ** (1 / 3)))
        dim = 128 * layers
        return cls(name or (size if isinstance(size, str) else f"{n:.3g}"), int(n), 6 * n * tokens_per_sample,
                   "tokens", tokens_per_sample, layers, tokens_per_sample * dim * 2)


def parse_count(size: str | float) -> float:
    """1.3e9, "1.3B", "350M", "7b", "125k" -> a number of parameters."""
    if isinstance(size, (int, float)):
        n = float(size)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kKmMbBtT]?)\s*", str(size))
        if not m:
            raise ValueError(f"bad model size {size!r}: write a number of parameters such as 7B, 350M or 1.3e9")
        n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"a model has a positive number of parameters, not {size!r}")
    return n


DEVICES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class Projection:
    workload: Workload
    strategy: str
    micro_batch_size: int
    compute_s: float
    rows: list[dict] = field(default_factory=list)  # one per device count: devices, step_s, throughput, efficiency


def project(workload: Workload, gpu: str = "h100", strategy: str = "ddp", micro_batch_size: int = 8, mfu: float = 0.4,
            devices=DEVICES, overlap: float = 0.5, compute_s: float | None = None, intra: AlphaBeta | str | None = None,
            inter: AlphaBeta | str | None = None, per_node: int | None = None, units: int | None = None) -> Projection:
    """Step time, throughput and efficiency of `workload` on each number of devices, weak scaling (the
    micro batch per device fixed). Compute per step: `compute_s`, else FLOPs / (peak x mfu) of the GPU.
    Up to `per_node` devices the ring runs over the intra-node link; beyond, its slowest hop is the
    inter-node one, so the whole ring goes at that speed. strategy "ddp" or "fsdp"."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(sorted(GPUS))}")
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    spec = GPUS[gpu]
    per_node = per_node or spec["per_node"]
    intra, inter = get_link(intra or spec["intra"]), get_link(inter or spec["inter"])
    if compute_s is None:
        compute_s = workload.flops_per_sample * micro_batch_size / (spec["flops"] * mfu)
    nbytes = workload.parameters * workload.bytes_per_param
    out = Projection(workload, strategy, micro_batch_size, compute_s)
    for p in devices:
        link = intra if p <= per_node else inter
        if strategy == "ddp":
            step = ddp_step(compute_s, nbytes, p, link, overlap)
        else:
            step = fsdp_step(compute_s, nbytes, p, link, units or workload.layers + 1, overlap)
        samples = p * micro_batch_size * workload.tokens_per_sample
        out.rows.append({"devices": p, "nodes": math.ceil(p / per_node), "step_s": step, "comm_exposed_s": step - compute_s,
                         "throughput": samples / step, "efficiency": compute_s / step})
    return out


def format_projection(proj: Projection) -> str:
    w = proj.workload
    unit = "tokens/s" if w.samples_or_tokens == "tokens" else "samples/s"
    lines = [f"{w.name}: {w.parameters:,} parameters, {proj.strategy.upper()}, micro batch {proj.micro_batch_size} per device, "
             f"compute {proj.compute_s * 1e3:.2f} ms per step",
             f"{'devices':>8} {'nodes':>6} {'step (ms)':>10} {'exposed comm (ms)':>18} {unit:>14} {'efficiency':>11}"]
    for r in proj.rows:
        lines.append(f"{r['devices']:>8} {r['nodes']:>6} {r['step_s'] * 1e3:>10.2f} {r['comm_exposed_s'] * 1e3:>18.2f} "
                     f"{r['throughput']:>14.4g} {r['efficiency']:>11.1%}")
    return "\n".join(lines)


def plot_projections(projections: list[Projection]):
    """Scaling efficiency against devices (log x), one line per projection."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for proj in projections:
        ax.plot([r["devices"] for r in proj.rows], [r["efficiency"] for r in proj.rows], "o-", ms=3,
                label=f"{proj.workload.name} {proj.strategy.upper()}")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("devices")
    ax.set_ylabel("scaling efficiency")
    ax.set_title("projected weak scaling")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# --- predicted against measured --------------------------------------------------------------------

def check_strategies(records: list[dict], link: AlphaBeta, overlap: float = 0.0) -> list[dict]:
    """For each `bench strategies` record on 2 or more ranks: the measured DDP and FSDP step times
    against ddp_step and fsdp_step predicted from the parameter bytes, DDP's bucket size, FSDP's
    units, `link`, and as compute the wrapper's step on a group of its rank alone, measured in the
    same run (hooks and copies included, no communication; the plain model's step where the record
    has none). Rows: model, world_size, strategy, compute_s, wrapper (that step over the plain
    model's), measured_s, predicted_s, error, and the communication's part of each: comm_measured_s
    (the step less the wrapper's step alone) and comm_predicted_s."""
    out = []
    for rec in records:
        res = rec.get("results") or {}
        if rec.get("status", "ok") != "ok" or rec.get("notebook") != "bench-strategies":
            continue
        p = int(res.get("world_size", 1))
        if p < 2:
            continue
        for m in res.get("measurements", []):
            if m["strategy"] not in ("ddp", "fsdp"):
                continue
            compute = (res.get("alone_step_s") or {}).get(m["strategy"], res["compute_step_s"])
            if m["strategy"] == "ddp":
                pred = ddp_step(compute, res["param_bytes"], p, link, overlap, bucket_bytes=res["bucket_bytes"])
            else:
                pred = fsdp_step(compute, res["param_bytes"], p, link, res["fsdp_units"], overlap)
            out.append({"model": res["model"], "world_size": p, "strategy": m["strategy"], "compute_s": res["compute_step_s"],
                        "wrapper": compute / res["compute_step_s"], "measured_s": m["step_time_s"], "predicted_s": pred,
                        "error": (pred - m["step_time_s"]) / m["step_time_s"],
                        # the communication alone: what the step takes beyond the wrapper's step on a group of one
                        "comm_measured_s": m["step_time_s"] - compute, "comm_predicted_s": pred - compute})
    return sorted(out, key=lambda r: (r["model"], r["world_size"], r["strategy"]))


def format_check(rows: list[dict], link: AlphaBeta) -> str:
    lines = [f"predicted against measured step time; link {link}",
             f"{'model':>14} {'ranks':>6} {'strategy':>9} {'compute (ms)':>13} {'wrapper':>8} {'measured (ms)':>14} "
             f"{'predicted (ms)':>15} {'error':>8}   {'comm measured':>14} {'comm predicted':>15}"]
    for r in rows:
        lines.append(f"{r['model']:>14} {r['world_size']:>6} {r['strategy']:>9} {r['compute_s'] * 1e3:>13.2f} "
                     f"{r['wrapper']:>7.2f}x "
                     f"{r['measured_s'] * 1e3:>14.2f} {r['predicted_s'] * 1e3:>15.2f} {r['error']:>+8.1%}   "
                     f"{r['comm_measured_s'] * 1e3:>14.2f} {r['comm_predicted_s'] * 1e3:>15.2f}")
    return "\n".join(lines)


def plot_check(rows: list[dict]):
    """Measured and predicted step time of each strategy and rank count, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    labels = [f"{r['strategy']} x{r['world_size']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["measured_s"] * 1e3 for r in rows], 0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], [r["predicted_s"] * 1e3 for r in rows], 0.4, label="predicted")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['error']:+.0%}", (x + 0.2, r["predicted_s"] * 1e3), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("step time (ms)")
    ax.set_title("cost model against measurement")
    ax.legend()
    return fig


CHECK_COMMANDS = """\
export WORKSHOP_RUNS=docs/results/costmodel_check_runs OMP_NUM_THREADS=1   # one thread per rank, as torchrun sets for 2+ ranks
for n in 2 4; do python -m torch.distributed.run --standalone --nproc-per-node $n -m workshop.bench allreduce \\
    --sizes 4KiB,64KiB,256KiB,1MiB,4MiB,16MiB; done
for n in 1 2 4; do python -m torch.distributed.run --standalone --nproc-per-node $n -m workshop.bench strategies --steps 20; done
python -m workshop.costmodel check docs/results/costmodel_check_runs --out docs/results"""


def check(runs, out=None, overlap: float = 0.0) -> str:
    """Calibrate on the all-reduce records under `runs`, predict the `bench strategies` step times
    there, and return the comparison; with `out`, also write costmodel_check.md and its PNG there."""
    from pathlib import Path

    from workshop import report
    from workshop.metrics import display_path

    records = [r.record for r in report.find_runs(runs)]
    rows = allreduce_rows(records)
    link = calibrate(rows, name="all-reduce records")
    by_p = {p: calibrate([r for r in rows if r["world_size"] == p], name=f"{p} ranks")
            for p in sorted({r["world_size"] for r in rows}) if len({r["bytes"] for r in rows if r["world_size"] == p}) > 1}
    compared = check_strategies(records, link, overlap)
    if not compared:
        raise ValueError(f"no `bench strategies` record on 2 or more ranks under {display_path(runs)}: run "
                         "python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.bench strategies")
    lines = [f"calibrated on {len(rows)} all-reduce times: {link}; largest error of the fit {fit_error(rows, link):.0%}"]
    lines += [f"  on {p} ranks alone: {ab}" for p, ab in by_p.items()]
    lines += [f"overlap of communication with backward assumed: {overlap:.0%}", "", format_check(compared, link)]
    lines.append(f"\nlargest error {max(abs(r['error']) for r in compared):.0%}; "
                 f"mean absolute error {sum(abs(r['error']) for r in compared) / len(compared):.0%}")
    text = "\n".join(lines)
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plot_check(compared).savefig(out / "costmodel_check.png", dpi=110)
        rec = next(r for r in records if r.get("notebook") == "bench-strategies")
        hw, v = rec.get("hardware", {}), rec.get("versions", {})
        (out / "costmodel_check.md").write_text("\n".join([
            "# The cost model against measured DDP and FSDP steps", "",
            f"Measured on {hw.get('cpus')} CPU cores ({hw.get('platform')}), gloo, torch {v.get('torch')}, "
            f"python {v.get('python')}, revision {rec.get('git')}; the machine was shared with other work, which the "
            "interleaved timing of `bench strategies` spreads over all strategies alike.", "",
            f"Produced by these commands; the records they wrote are in `{display_path(runs)}`:", "",
            "```bash", CHECK_COMMANDS, "```", "",
            "Compute is each wrapper's step on a process group of its rank alone, measured in the same run (hooks and "
            "copies, no communication); the alpha-beta model adds the communication. The last two columns hold the "
            "communication alone: the measured step less that compute, against the model's. On CPU the wrappers' own "
            "work outweighs the communication of this small model, and gloo's all-gather and reduce-scatter carry more "
            "per-call overhead than the all-reduce that alpha and beta were fitted to, so FSDP's communication is the "
            "part predicted worst.", "", "```", text, "```", "",
            "![predicted against measured](costmodel_check.png)", ""]))
    return text


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m workshop.costmodel", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="predicted against measured DDP and FSDP step times of `bench strategies` records")
    c.add_argument("runs", type=Path, help="a runs folder with `bench allreduce` and `bench strategies` records")
    c.add_argument("--out", type=Path, help="also write costmodel_check.md and costmodel_check.png here")
    c.add_argument("--overlap", type=float, default=0.0, help="fraction of communication hidden behind backward (default 0)")
    p = sub.add_parser("project", help="throughput and efficiency from 1 to 4096 GPUs of a model of a given size")
    p.add_argument("size", help="parameters, e.g. 7B, 350M, 1.3e9")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="fsdp")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per GPU (default 4)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of the GPU's peak that compute reaches (default 0.4)")
    p.add_argument("--overlap", type=float, default=0.5, help="fraction of communication hidden behind backward (default 0.5)")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            print(check(args.runs, args.out, args.overlap))
        else:
            w = Workload.from_size(args.size, tokens_per_sample=args.seq_len)
            print(format_projection(project(w, args.gpu, args.strategy, args.micro_batch_size, args.mfu, overlap=args.overlap)))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
