"""What notebook 09 prints and draws of its pipelines: the measured schedules as tables (the bubble per schedule and
number of micro-batches against (p-1)/(m+p-1); the activation bytes each stage held against its micro-batches in
flight), the measured timelines as the pipeline diagram, the 3D mesh that ran, and the cost model's placements of a
large model as a numbered table with the reason for each, and as record rows. Formatting only: the measuring is
`workshop.pipeline`'s (Timeline, LiveActivations, bubble), the estimating `workshop.estimate.placements`'. Imports
no torch.

    dist.print0(pipeline_view.bubble_table(bubble_rows))                # the rows of the record's "bubble"
    fig = pipeline_view.plot_schedules(fastest, bubble_rows, m=4)       # one panel per schedule
    dist.print0(pipeline_view.placements_table(placements.placements("llama2-70b", gpus=512), top=6))
"""

from __future__ import annotations

from workshop.base.tables import fmt_bytes, table, wrap


def bubble_table(rows: list[dict]) -> str:
    """Bubble rows (schedule, p, m, step_s, measured, theory, unequal: the record's "bubble") as a table: the fastest
    step, its measured idle share, (p-1)/(m+p-1), and the bubble that the stages' own times predict."""
    return table(["schedule", "p", "m", "step (ms)", "bubble measured", "(p-1)/(m+p-1)", "from the stages' own times"],
                 [(r["schedule"], r["p"], r["m"], f"{r['step_s'] * 1e3:.1f}", f"{r['measured']:.1%}",
                   f"{r['theory']:.1%}", f"{r['unequal']:.1%}") for r in rows])


def held_table(rows: list[dict]) -> str:
    """Activation rows (schedule, stage, one, peak, formula: the record's "activations_held") as a table: the bytes
    one micro-batch saved, the most held at once, their ratio, and the schedule's micro-batches in flight."""
    return table(["schedule", "stage", "one micro-batch", "peak held", "peak / one", "formula"],
                 [(r["schedule"], r["stage"], fmt_bytes(r["one"]), fmt_bytes(r["peak"]), f"{r['peak'] / r['one']:.2f}",
                   r["formula"]) for r in rows])


def plot_timeline(timelines: list, ax=None, title: str = ""):
    """The pipeline diagram from measured timestamps (`pipeline.Timeline`s, one per stage in stage order): one row
    per stage, a box per forward (light) and backward (dark), numbered by micro-batch; white is the bubble."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(timelines)))
    colours = plt.get_cmap("tab10")
    for row, t in enumerate(timelines):
        for kind, i, begin, end in t.events:
            colour = colours(i % 10)
            ax.barh(row, end - begin, left=begin, color=colour, alpha=0.45 if kind == "F" else 0.95, edgecolor="black",
                    linewidth=0.5)
            ax.text((begin + end) / 2, row, f"{kind}{i}", ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(timelines)), [f"stage {t.stage}" for t in timelines])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the common start")
    ax.set_title(title)
    return ax


def plot_schedules(fastest: dict, rows: list[dict], m: int):
    """The pipeline diagram of each schedule measured at `m` micro-batches, one panel under the other, from the
    fastest step's timelines (`fastest[schedule, m]`), each titled with its measured bubble and the theory's."""
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["m"] == m]
    p = shown[0]["p"]
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 1.4 + 0.9 * p), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], shown):
        plot_timeline(fastest[r["schedule"], m], ax=ax, title=f"{r['schedule']}: p={p}, m={m}, bubble measured "
                      f"{r['measured']:.0%}, theory {r['theory']:.0%}")
    fig.tight_layout()
    return fig


def mesh_3d(sizes: dict[str, int], stage: int, weight) -> str:
    """What a 3D step ran on (`sizes`: {"pp": ..., "dp": ..., "tp": ...}), which of the three dimensions it used,
    and how one weight of this rank's stage is laid out (a DTensor's placements, or whole)."""
    used = [name for name, size in sizes.items() if size > 1]
    subset = f"a {len(used)}D subset ({' x '.join(used)})" if used else "one rank, every dimension of size 1"
    lines = [f"mesh {mesh_name(sizes)}: " + ("all three dimensions" if len(used) == 3 else
             f"{subset};\nall three need dp_size and tp_size above 1 (section 8: 8 ranks, `-p dp_size 2`)")]
    lines.append(f"a weight of stage {stage}: {type(weight).__name__}"
                 + (f" {weight.placements} over ({', '.join(weight.device_mesh.mesh_dim_names)})"
                    if hasattr(weight, "placements") else " (whole: neither dp nor tp splits it)"))
    return "\n".join(lines)


def mesh_name(sizes: dict[str, int]) -> str:
    """"pp 2 x dp 1 x tp 2": a mesh's dimensions and sizes, in order."""
    return " x ".join(f"{name} {size}" for name, size in sizes.items())


def placements_table(rows: list, top: int = 6) -> str:
    """The first `top` of `placements.placements`' rows (fastest first), numbered: dp, tp, pp, micro-batches, the
    data-parallel strategy, memory per GPU, whether it fits, and where it fits its step, bubble, tokens/s per GPU and
    MFU; how many of all the rows fit; then the reason of each, wrapped under its number."""
    shown = rows[:top]

    def fitted(r, text):
        return text if r.fits else ""

    lines = [table(["", "dp", "tp", "pp", "micro-batches", "DP", "memory/GPU", "fits", "step s", "bubble",
                    "tokens/s/GPU", "MFU"],
                   [(f"{i}.", r.dp, r.tp, r.pp, r.microbatches, r.strategy, fmt_bytes(r.memory_bytes),
                     "yes" if r.fits else "no", fitted(r, f"{r.step_s:.2f}"), fitted(r, f"{r.step.bubble:.1%}"),
                     fitted(r, f"{r.tokens_per_s:,.0f}"), fitted(r, f"{r.mfu:.1%}")) for i, r in enumerate(shown, 1)]),
             f"{sum(r.fits for r in rows)} of {len(rows)} placements fit; {len(shown)} shown. Why:"]
    return "\n".join(lines + [wrap(r.reason, f"{i}. ", "   ") for i, r in enumerate(shown, 1)])


def placement_records(rows: list, n: int = 8) -> list[dict]:
    """The first `n` placements as a record keeps them (notebook 09's "placements_70b_512_h100")."""
    return [dict(dp=r.dp, tp=r.tp, pp=r.pp, microbatches=r.microbatches, strategy=r.strategy,
                 memory_bytes=r.memory_bytes, fits=r.fits, step_s=r.step_s, reason=r.reason) for r in rows[:n]]
