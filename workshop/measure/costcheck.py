"""The cost model against measurement: alpha and beta of each collective fitted to `bench collectives` records,
and the DDP and FSDP step times of `bench strategies` records predicted from them (`workshop.estimate.steps`, no
overlap) beside the measured ones.

    python -m workshop.measure.costcheck docs/results/costmodel_check_runs --out docs/results

writes costmodel_check.md and costmodel_check.png there; CHECK_COMMANDS are the runs that produce the records.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workshop.base.runs import display_path
from workshop.base.tables import table
from workshop.estimate.network import COLLECTIVES, AlphaBeta, calibrate, fit_error
from workshop.estimate.steps import ddp_step, fsdp_step
from workshop.measure import report


def collective_rows(records: list[dict], collective: str = "all_reduce") -> list[dict]:
    """Every measurement of `collective` in `records`: rows {bytes, time_s, world_size} from
    `python -m workshop.measure.bench collectives` (results.rows, each with its collective), and for the all-reduce also
    `bench allreduce` (results.rows) and notebook 05 (results.allreduce). Failed and single-rank runs are skipped."""
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; choose from {', '.join(COLLECTIVES)}")
    rows = []
    for rec in records:
        if rec.get("status", "ok") != "ok":
            continue
        results = rec.get("results") or {}
        notebook = rec.get("notebook")
        if notebook == "bench-collectives":
            measured = [r for r in results.get("rows") or [] if r.get("collective") == collective]
        elif collective != "all_reduce":
            continue
        else:
            measured = results.get("rows") if notebook == "bench-allreduce" else results.get("allreduce")
        p = int((rec.get("dist") or {}).get("world_size", 1))
        if not measured or p < 2:
            continue
        for r in measured:
            if r.get("bytes") and r.get("time_s"):
                rows.append({"bytes": int(r["bytes"]), "time_s": float(r["time_s"]), "world_size": p})
    return rows


def allreduce_rows(records: list[dict]) -> list[dict]:
    """Every all-reduce measurement in `records` (see collective_rows)."""
    return collective_rows(records, "all_reduce")


def calibrate_by_world_size(records: list[dict], collective: str) -> dict:
    """{world_size: AlphaBeta} fitted to each rank count's own `collective` times, and {0: ...} to all of them."""
    rows = collective_rows(records, collective)
    fits = {0: calibrate(rows, f"{collective}, all rank counts", collective)}
    for p in sorted({r["world_size"] for r in rows}):
        mine = [r for r in rows if r["world_size"] == p]
        if len({r["bytes"] for r in mine}) > 1:
            fits[p] = calibrate(mine, f"{collective}, {p} ranks", collective)
    return fits


def check_strategies(records: list[dict], link: AlphaBeta | dict, ag_link: AlphaBeta | dict | None = None,
                     rs_link: AlphaBeta | dict | None = None) -> list[dict]:
    """For each `bench strategies` record on 2 or more ranks: the measured DDP and FSDP step times against
    ddp_step and fsdp_step with no overlap, predicted from the parameter bytes, DDP's bucket size, FSDP's units,
    the all-reduce `link` (DDP), the all-gather and reduce-scatter links (FSDP; default `link`), and as compute
    the wrapper's step on a group of its rank alone, measured in the same run (hooks and copies included, no
    communication; the plain model's step where the record has none). A link may be a dict by world size, for
    fits made per rank count. Rows: model, world_size, strategy, compute_s, wrapper (that step over the plain
    model's), measured_s, predicted_s, error, and the communication's part of each: comm_measured_s (the step
    less the wrapper's step alone) and comm_predicted_s."""
    def at(ab, p):
        return ab.get(p, ab.get(0)) if isinstance(ab, dict) else ab
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
                pred = ddp_step(compute, res["param_bytes"], p, at(link, p), False, bucket_bytes=res["bucket_bytes"])
            else:
                pred = fsdp_step(compute, res["param_bytes"], p, at(ag_link or link, p), res["fsdp_units"], False,
                                 rs_link=at(rs_link or link, p))
            out.append({"model": res["model"], "world_size": p, "strategy": m["strategy"], "compute_s": res["compute_step_s"],
                        "wrapper": compute / res["compute_step_s"], "measured_s": m["step_time_s"], "predicted_s": pred,
                        "error": (pred - m["step_time_s"]) / m["step_time_s"],
                        # the communication alone: what the step takes beyond the wrapper's step on a group of one
                        "comm_measured_s": m["step_time_s"] - compute, "comm_predicted_s": pred - compute})
    return sorted(out, key=lambda r: (r["model"], r["world_size"], r["strategy"]))


def format_check(rows: list[dict]) -> str:
    head = ["model", "ranks", "strategy", "compute", "wrapper", "measured", "predicted", "error", "comm measured",
            "comm predicted"]
    body = [[r["model"], r["world_size"], r["strategy"], f"{r['compute_s'] * 1e3:.2f}", f"{r['wrapper']:.2f}x",
             f"{r['measured_s'] * 1e3:.2f}", f"{r['predicted_s'] * 1e3:.2f}", f"{r['error']:+.1%}",
             f"{r['comm_measured_s'] * 1e3:.2f}", f"{r['comm_predicted_s'] * 1e3:.2f}"] for r in rows]
    return "predicted against measured step time (ms; wrapper: its step alone over the plain model's)\n" + table(head, body)


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
for n in 2 4; do python -m torch.distributed.run --standalone --nproc-per-node $n -m workshop.measure.bench collectives \\
    --sizes 4KiB,64KiB,256KiB,1MiB,4MiB,16MiB; done
for n in 1 2 4; do python -m torch.distributed.run --standalone --nproc-per-node $n -m workshop.measure.bench strategies \\
    --steps 20; done
python -m workshop.measure.costcheck docs/results/costmodel_check_runs --out docs/results"""



def check(runs, out=None) -> str:
    """Calibrate all-reduce, all-gather and reduce-scatter on the records under `runs`, each rank count on its own
    measurements, predict the `bench strategies` step times there, and return the comparison; with `out`, also
    write costmodel_check.md and its PNG there."""
    records = [r.record for r in report.find_runs(runs)]
    links = {}
    for c in COLLECTIVES:
        if c == "all_reduce" or collective_rows(records, c):
            links[c] = calibrate_by_world_size(records, c)
    compared = check_strategies(records, links["all_reduce"], links.get("all_gather"), links.get("reduce_scatter"))
    if not compared:
        raise ValueError(f"no `bench strategies` record on 2 or more ranks under {display_path(runs)}: run "
                         "python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.measure.bench strategies")
    lines = []
    for c, fits in links.items():
        rows = collective_rows(records, c)
        lines.append(f"{c}: {len(rows)} times")
        for p, ab in fits.items():
            mine = [r for r in rows if p in (0, r["world_size"])]
            lines.append(f"  {ab}; largest error of the fit {fit_error(mine, ab, c):.0%}")
    lines += ["each rank count is predicted with the fits of its own measurements; no overlap assumed", "",
              format_check(compared)]
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
            f"python {v.get('python')}, revision {rec.get('git')}. The machine was shared with other work: "
            "`bench collectives` and `bench strategies` time their variants in turns, one call each per round, so "
            "that the load slows them alike, and report the median of the slowest rank.", "",
            f"Produced by these commands; the records they wrote are in `{display_path(runs)}`:", "",
            "```bash", CHECK_COMMANDS, "```", "",
            "Compute is each wrapper's step on a process group of its rank alone, measured in the same run (hooks and "
            "copies, no communication); the alpha-beta model adds the communication: DDP's buckets with the "
            "all-reduce's alpha and beta, FSDP's all-gathers and reduce-scatters with their own, fitted to "
            "`bench collectives` (gloo's reduce-scatter costs more per byte than its all-gather). Each rank count "
            "is predicted with the fits of its own measurements: 4 ranks on 2 cores share them, which no alpha and "
            "beta of a network describe. The last two columns hold the communication alone: the measured step less "
            "that compute, against the model's.", "", "```", text, "```", "",
            "![predicted against measured](costmodel_check.png)", ""]))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workshop.measure.costcheck", description="The cost model's DDP and "
                                     "FSDP step times against those that `bench strategies` measured.")
    parser.add_argument("runs", type=Path, help="a runs folder with `bench collectives` and `bench strategies` records")
    parser.add_argument("--out", type=Path, help="also write costmodel_check.md and costmodel_check.png here")
    args = parser.parse_args(argv)
    try:
        print(check(args.runs, args.out))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
