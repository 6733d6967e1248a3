"""The scaling report's plots, from a `workshop.measure.report.Report`: speedup and efficiency against devices, memory
per rank by strategy, cost against time to result. A plot with nothing to show is replaced by one sentence that says
what run would fill it (`missing`).

    rep = report.build(runs)
    shown = report_plots.figure(rep, "speedup.png")   # a matplotlib Figure, or the sentence
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workshop.measure.report import Report, Row


def _lines(report: Report):
    """(label, rows) per series and strategy, rows by devices: the lines of the scaling plots."""
    for s in report.series:
        if not s.baseline:
            continue
        by = {}
        for r in s.rows:
            by.setdefault(r.strategy + (f"/{r.variant}" if r.variant else ""), []).append(r)
        for strategy, rows in by.items():
            if any(r.devices > 1 for r in rows):  # a point on one device is no scaling curve
                yield f"{s.model} {strategy} ({s.notebook}, {s.micro_batch_size or '?'}/dev)", s, rows


def plot_speedup(report: Report, efficiency: bool = False):
    """Speedup (or efficiency) against devices, a line per series and strategy, with the ideal."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    top = 1
    for label, s, rows in _lines(report):
        rows = sorted([s.baseline] + [r for r in rows if r is not s.baseline and r.devices > 1], key=lambda r: r.devices)
        ax.plot([r.devices for r in rows], [r.efficiency if efficiency else r.speedup for r in rows], "o-", label=label)
        top = max(top, *(r.devices for r in rows))
    if efficiency:
        ax.axhline(1.0, color="gray", linestyle="--", label="ideal")
        ax.set_ylabel("scaling efficiency (speedup / devices)")
    else:
        ax.plot([1, top], [1, top], color="gray", linestyle="--", label="ideal")
        ax.set_ylabel("speedup against one device")
    ax.set_xlabel("devices")
    ax.set_title("scaling efficiency" if efficiency else "speedup")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    if not any(True for _ in _lines(report)):
        ax.text(0.5, 0.5, "no series measured on more than one device", ha="center", va="center", transform=ax.transAxes)
    return fig


def _charted(row: Row) -> bool:
    """A memory that says something about a strategy: tensor bytes, on a GPU or counted on CPU."""
    return bool(row.peak_memory_bytes) and row.memory_kind in ("cuda", "tensors")


def plot_memory(report: Report):
    """Peak memory per rank of each measured configuration, by strategy."""
    from matplotlib.figure import Figure

    rows = [(f"{s.model} {r.config}", r.peak_memory_bytes) for s in report.series for r in s.rows if _charted(r)]
    fig = Figure(figsize=(6.5, max(2.5, 0.3 * len(rows) + 1)), layout="constrained")
    ax = fig.add_subplot()
    if rows:
        ax.barh(range(len(rows)), [b / 2**20 for _, b in rows])
        ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "no memory measured", ha="center", va="center", transform=ax.transAxes)
    kinds = sorted({r.memory_kind for s in report.series for r in s.rows if _charted(r)})
    ax.set_xlabel("peak memory per rank (MiB): " + ", ".join({"cuda": "CUDA bytes allocated",
                                                             "tensors": "tensor bytes counted on CPU"}[k] for k in kinds))
    ax.set_title("memory per rank by strategy")
    return fig


def plot_cost(report: Report):
    """Cost (device-hours) against time to result (hours), for a million samples or tokens."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for s in report.series:
        xs = [1e6 / r.throughput / 3600 for r in s.rows]
        ys = [r.device_hours_per_million for r in s.rows]
        ax.plot(xs, ys, "o", label=f"{s.model} ({s.notebook}, per 1M {s.unit})")
        # one label per series, at its fastest configuration: a label per point overlaps the others; the series'
        # table names every point
        fastest = max(range(len(s.rows)), key=lambda i: s.rows[i].throughput)
        ax.annotate(s.rows[fastest].config, (xs[fastest], ys[fastest]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time to result (hours per 1M samples or tokens)")
    ax.set_ylabel("cost (device-hours)")
    ax.set_title("cost against time to result")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no measured runs", ha="center", va="center", transform=ax.transAxes)
    return fig


PLOTS = {"speedup.png": plot_speedup, "efficiency.png": lambda r: plot_speedup(r, efficiency=True),
         "memory.png": plot_memory, "cost.png": plot_cost}

_MULTI_RANK = ("run a series on 2 or more ranks beside its one-device run, e.g. "
               "`scripts/run_notebook.sh --nproc 2 notebooks/05_ddp.ipynb`, or "
               "`python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.measure.bench strategies`")


def missing(report: Report, name: str) -> str | None:
    """The one sentence that stands in for plot `name` (a key of PLOTS) when it has nothing to show, saying what
    run would fill it; None when it has something."""
    if name in ("speedup.png", "efficiency.png") and not any(True for _ in _lines(report)):
        return f"No series was measured on more than one device, so there is no {name[:-4]} to plot: {_MULTI_RANK}."
    if name == "memory.png" and not any(_charted(r) for s in report.series for r in s.rows):
        return ("No run recorded the tensor bytes per rank (a GPU's allocated memory, or workshop.measure.memory's count on "
                "CPU; a process's resident set says nothing about a strategy), so there is no memory to plot: "
                "`scripts/run_notebook.sh --nproc 2 notebooks/06_sharding.ipynb` records them.")
    if name == "cost.png" and not report.series:
        return "No run measured a throughput, so there is no cost to plot: run the notebooks (`make run`) or a benchmark."
    return None


def figure(report: Report, name: str):
    """Plot `name` (a key of PLOTS) as a matplotlib Figure, or, when it would be empty, the sentence of `missing`."""
    return missing(report, name) or PLOTS[name](report)
