"""The scaling report: every run's `record.json` under a runs folder, as tables, plots (workshop.measure.report_plots)
and Markdown.

    python -m workshop.measure.report runs/ --out report/                  # report/report.md and its PNGs
    python -m workshop.measure.report runs/ --notebook bench-strategies     # only some runs (also --sweep, --job)

Nothing here is typed by hand: each number comes from a record. A run that failed is listed as
failed, never dropped nor averaged in. Records are grouped into series that share the notebook,
the model, the unit of throughput and the batch per device; speedup and efficiency are computed
inside a series only, against its one-device baseline, never across series. Where SLURM's
`sacct` answers, each job's elapsed time and allocated GPUs are joined in.

What a record must hold to be measured is `workshop.base.records.Measurement`: a throughput, and what the
report can fill in from the record where a measurement leaves it out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from workshop.base import records
from workshop.base.hardware import device_type
from workshop.measure.metrics import display_path, fmt_bytes
from workshop.measure.report_plots import PLOTS, missing


@dataclass
class Run:
    """One record.json: its folder, notebook, status, and why it failed."""

    path: Path
    record: dict
    notebook: str
    status: str
    reason: str = ""

    @property
    def job(self) -> str | None:
        return self.record.get("slurm_job_id")

    name: str = ""  # the folder relative to the runs folder reported on


@dataclass
class Row:
    """One measurement of a run."""

    run: Run
    model: str
    strategy: str
    unit: str
    devices: int
    nodes: int
    micro_batch_size: float | None
    global_batch_size: float | None
    throughput: float
    step_time_s: float | None = None
    wall_time_s: float | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str = "resident set"  # what peak_memory_bytes counts: "cuda", "tensors" or "resident set"
    epoch_size: float | None = None
    variant: str = ""
    baseline: bool = False
    speedup: float | None = None
    efficiency: float | None = None
    sacct: dict = field(default_factory=dict)

    @property
    def config(self) -> str:
        what = self.strategy + (f" / {self.variant}" if self.variant else "")
        return f"{self.nodes} x {self.devices // max(self.nodes, 1)} {what}" if self.nodes > 1 else f"{self.devices} x {what}"

    @property
    def device_hours_per_million(self) -> float:
        """What a million samples (or tokens) cost: devices x seconds for 1e6 of them, in hours."""
        return self.devices * 1e6 / self.throughput / 3600

    @property
    def device_hours_per_epoch(self) -> float | None:
        return self.devices * self.epoch_size / self.throughput / 3600 if self.epoch_size else None


@dataclass
class Series:
    """Rows that may be compared: same notebook, model, unit and batch per device."""

    notebook: str
    model: str
    unit: str
    micro_batch_size: float | None
    rows: list[Row]

    @property
    def title(self) -> str:
        batch = f"{self.micro_batch_size:g} per device" if self.micro_batch_size else "batch unknown"
        return f"{self.notebook} · {self.model} · {batch} · {self.unit}/s"

    @property
    def baseline(self) -> Row | None:
        return next((r for r in self.rows if r.baseline), None)


@dataclass
class Report:
    root: Path
    runs: list[Run]
    series: list[Series]

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if r.status != "ok"]

    @property
    def unmeasured(self) -> list[Run]:
        measured = {id(row.run) for s in self.series for row in s.rows}
        return [r for r in self.runs if r.status == "ok" and id(r) not in measured]


# --- reading -------------------------------------------------------------------------------------

def still_running(record: dict) -> bool:
    """Whether the launcher that wrote a "running" record is alive: on this host, its pid; elsewhere
    (another node of the cluster) it cannot be seen from here, and counts as gone."""
    import socket

    launcher = record.get("launcher") or {}
    if launcher.get("host") != socket.gethostname() or not isinstance(launcher.get("pid"), int):
        return False
    try:
        os.kill(launcher["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def find_runs(root: Path, notebook: str | None = None, sweep: str | None = None, job: str | None = None) -> list[Run]:
    """Every record.json under `root`, oldest first; unreadable ones as failed runs. Filters: the
    notebook's name (or its start: "bench" takes every benchmark), a sweep id, a SLURM job id."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no runs folder {root}: give the folder that holds the run folders (runs/ by default)")
    runs = []
    this_run = Path(os.environ["WORKSHOP_RUN_DIR"]).resolve() if os.environ.get("WORKSHOP_RUN_DIR") else None
    for path in sorted(root.rglob("record.json")):
        try:
            rec = records.read(path).as_dict()
        except records.RecordError as err:  # unreadable, or not a record of this schema
            runs.append(Run(path.parent, {}, path.parent.name, "failed", str(err), str(path.parent.relative_to(root))))
            continue
        reason = rec.get("reason") or rec.get("error") or ""
        if isinstance(reason, list):
            reason = "; ".join(map(str, reason))
        name = str(rec.get("notebook") or path.parent.name)
        status = str(rec.get("status", "ok"))
        if status == "running" and path.parent.resolve() == this_run:
            continue  # the run that makes this report (notebook 13 over its series)
        if status == "running" and not still_running(rec):  # the launcher's first record, never settled
            status, reason = "incomplete", (f"{reason}; the launcher is gone: killed with SIGKILL, out of memory, or on a "
                                            "failed node (see the ranks' logs in its folder)")
        runs.append(Run(path.parent, rec, name, status, str(reason), str(path.parent.relative_to(root))))
    if notebook:
        runs = [r for r in runs if r.notebook == notebook or r.notebook.startswith(notebook)]
    if sweep:
        runs = [r for r in runs if str(r.record.get("sweep")) == str(sweep) or f"sweep-{sweep}" in r.path.parts]
    if job:
        runs = [r for r in runs if str(r.job) == str(job)]
    return sorted(runs, key=lambda r: (str(r.record.get("time", "")), str(r.path)))


def measurements(run: Run) -> list[Row]:
    """The rows a run measured (`records.Record.measurements`, each with a throughput above 0), the world of
    its record and its params filling in what a measurement leaves out."""
    record = records.Record.from_dict(run.record)  # checked against the schema when it was read
    params, world = record.params, record.dist or {}
    rows = []
    for m in record.measurements():
        if not m.throughput or m.throughput <= 0:
            continue
        devices = int(m.world_size or world.get("world_size") or 1)
        local = int(world.get("local_world_size") or devices)
        nodes = int(m.num_nodes or (max(1, devices // local) if world.get("world_size") == devices else 1))
        mbs = m.micro_batch_size or (m.global_batch_size / devices if m.global_batch_size else None)
        peak = m.peak_memory_bytes
        peak = max((p for p in peak if p is not None), default=None) if isinstance(peak, list) else peak
        on_gpu = device_type(world.get("device", "")) == "cuda"
        rows.append(Row(run=run, model=str(m.model or params.get("model_name") or params.get("model") or "unknown model"),
                        strategy=m.strategy or ("single" if devices == 1 else "distributed"),
                        unit=m.samples_or_tokens or "samples", devices=devices, nodes=nodes, micro_batch_size=mbs,
                        global_batch_size=m.global_batch_size, throughput=m.throughput, step_time_s=m.step_time_s,
                        wall_time_s=m.wall_time_s, peak_memory_bytes=int(peak) if peak else None,
                        epoch_size=m.epoch_size, memory_kind=m.memory_kind or ("cuda" if on_gpu else "resident set"),
                        variant=m.variant or "", baseline=m.baseline is True))
    return rows


def sacct_info(job: str) -> dict:
    """Elapsed time (s) and allocated GPUs of a SLURM job from `sacct`; {} where sacct is not there."""
    if not job or not shutil.which("sacct"):
        return {}
    try:
        out = subprocess.run(["sacct", "-j", str(job), "-X", "-n", "-P", "-o", "Elapsed,AllocTRES"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    if "|" not in line:
        return {}
    elapsed, tres = line.split("|", 1)
    info = {"elapsed_s": _parse_elapsed(elapsed)}
    for item in tres.split(","):
        key, _, value = item.partition("=")
        if key == "gres/gpu" and value.isdigit():
            info["gpus"] = int(value)
    return info


def _parse_elapsed(text: str) -> float | None:
    """sacct's [D-]HH:MM:SS -> seconds."""
    days, _, hms = text.strip().rpartition("-")
    try:
        parts = [float(x) for x in hms.split(":")]
    except ValueError:
        return None
    seconds = sum(v * 60**i for i, v in enumerate(reversed(parts)))
    return seconds + (int(days) * 86400 if days.isdigit() else 0)


def build(root: Path, notebook: str | None = None, sweep: str | None = None, job: str | None = None,
          sacct=sacct_info) -> Report:
    """Read the runs under `root`, group their measurements into series, and give each row its
    speedup and efficiency against its series' one-device baseline. `sacct`: None to skip SLURM."""
    runs = find_runs(root, notebook, sweep, job)
    groups: dict[tuple, list[Row]] = {}
    jobs: dict[str, dict] = {}
    for run in runs:
        if run.status != "ok":
            continue
        for row in measurements(run):
            if sacct and run.job:
                if run.job not in jobs:
                    jobs[run.job] = sacct(run.job)
                row.sacct = jobs[run.job]
            mbs = round(row.micro_batch_size, 6) if row.micro_batch_size else None
            groups.setdefault((row.run.notebook, row.model, row.unit, mbs), []).append(row)
    series = []
    for (nb, model, unit, mbs), rows in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        rows.sort(key=lambda r: (r.devices, r.strategy != "single", r.strategy, r.variant))
        ones = [r for r in rows if r.devices == 1]
        marked = [r for r in ones if r.baseline]
        base = (marked or [r for r in ones if r.strategy == "single"] or ones or [None])[0]
        for r in rows:
            r.baseline = r is base
            if base:
                r.speedup = r.throughput / base.throughput
                # on one device another variant's speedup is no scaling: no efficiency
                r.efficiency = r.speedup / r.devices if r.devices > 1 or r.baseline else None
        rows.sort(key=lambda r: (r.devices, not r.baseline, r.strategy != "single", r.strategy, r.variant))
        series.append(Series(nb, model, unit, mbs, rows))
    return Report(Path(root), runs, series)


# --- tables ----------------------------------------------------------------------------------------

def _f(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.1f} s" if s < 600 else f"{s / 60:.1f} min"


MEMORY_KINDS = {"cuda": "CUDA allocated", "tensors": "tensors", "resident set": "resident set"}  # what a peak counts


def record_digests(report: Report) -> dict[str, list[str]]:
    """Which records the report read: per notebook, the digest (`records.digest`) of each record.json of a run
    folder directly under the runs folder (a sweep's or a benchmark's records inside a run are the run's)."""
    out: dict[str, list[str]] = {}
    for run in report.runs:
        path = run.path / "record.json"
        if run.path.parent == report.root and path.is_file():
            out.setdefault(run.notebook, []).append(records.digest(path))
    return out


def series_table(series: Series) -> str:
    """A Markdown table of one series: configuration, times, throughput, speedup, efficiency, memory, cost."""
    unit = f"{series.unit}/s"
    with_sacct = any(r.sacct for r in series.rows)
    head = ["configuration", "run", "step time", "wall time", unit, "speedup", "efficiency", "peak memory / rank",
            "device-h / epoch", f"device-h / 1M {series.unit}"] + (["sacct elapsed", "GPUs"] if with_sacct else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in series.rows:
        cells = [r.config + (" (baseline)" if r.baseline else ""), f"`{r.run.name}`", _seconds(r.step_time_s),
                 _seconds(r.wall_time_s), f"{r.throughput:,.1f}", _f(r.speedup, ".2f") + ("x" if r.speedup else ""),
                 _f(r.efficiency, ".0%"),
                 f"{fmt_bytes(r.peak_memory_bytes)} ({MEMORY_KINDS[r.memory_kind]})" if r.peak_memory_bytes else "-",
                 _f(r.device_hours_per_epoch, ".3g"), f"{r.device_hours_per_million:.3g}"]
        if with_sacct:
            cells += [_seconds(r.sacct.get("elapsed_s")), str(r.sacct.get("gpus", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    if not series.baseline:
        lines.append("\nNo one-device run in this series: speedup and efficiency need one "
                     "(run the same configuration on 1 device).")
    return "\n".join(lines)


def failed_table(runs: list[Run]) -> str:
    lines = ["| run | notebook | job | why |", "|---|---|---|---|"]
    for r in runs:
        why = (r.reason or "no reason recorded").replace("|", "/").replace("\n", " ")
        lines.append(f"| `{r.name}` | {r.notebook} | {r.job or '-'} | {why[:300]} |")
    return "\n".join(lines)


def memory_tables(runs: list[Run]) -> str | None:
    """Notebook 07's records: the activations a GPT block saved against the formula, and what each
    activation-checkpointing policy kept for backward and cost in step time; None when no run has them."""
    found = [r for r in runs if r.status == "ok" and isinstance(r.record.get("results", {}).get("checkpointing"), dict)]
    if not found:
        return None
    lines = ["| run | tokens x samples | saved per block | formula | ratio |", "|---|---|---|---|---|"]
    for r in found:
        for a in r.record["results"].get("activation_per_layer", []):
            lines.append(f"| `{r.name}` | {a['tokens']} x {a['samples']} | {fmt_bytes(a['measured'])} | "
                         f"{fmt_bytes(a['derived'])} | {a['measured'] / a['derived']:.3f} |")
    lines += ["", "| run | checkpointing | saved for backward | of none | step | extra |", "|---|---|---|---|---|---|"]
    for r in found:
        policies = r.record["results"]["checkpointing"]
        none = policies.get("none", {})
        for name, c in policies.items():
            share = c["saved_bytes"] / none["saved_bytes"] if none.get("saved_bytes") else None
            extra = c["step_s"] - none["step_s"] if c.get("step_s") is not None and none.get("step_s") else None
            lines.append(f"| `{r.name}` | {name} | {fmt_bytes(c['saved_bytes'])} | {_f(share, '.0%')} | "
                         f"{_f(c.get('step_s') and c['step_s'] * 1e3, '.1f')} ms | {_f(extra and extra * 1e3, '+.1f')} ms |")
    return "\n".join(lines)


def pipeline_tables(runs: list[Run]) -> str | None:
    """Notebook 09's records: each schedule's step time and measured bubble against (p-1)/(m+p-1), per number of
    micro-batches; None when no run has them."""
    found = [r for r in runs if r.status == "ok" and isinstance(r.record.get("results", {}).get("bubble"), list)]
    if not found:
        return None
    lines = ["| run | schedule | stages p | micro-batches m | step | bubble measured | (p-1)/(m+p-1) |",
             "|---|---|---|---|---|---|---|"]
    for r in found:
        for b in r.record["results"]["bubble"]:
            lines.append(f"| `{r.name}` | {b['schedule']} | {b['p']} | {b['m']} | {b['step_s'] * 1e3:.1f} ms | "
                         f"{b['measured']:.1%} | {b['theory']:.1%} |")
    return "\n".join(lines)


def summary(report: Report) -> str:
    """A few lines for a terminal or a notebook."""
    ok = sum(r.status == "ok" for r in report.runs)
    lines = [f"{len(report.runs)} record(s) under {display_path(report.root)}: {ok} ok, {len(report.failed)} failed; "
             f"{sum(len(s.rows) for s in report.series)} measurement(s) in {len(report.series)} series"]
    for s in report.series:
        best = max(s.rows, key=lambda r: r.throughput)
        lines.append(f"  {s.title}: {len(s.rows)} row(s)\n    best {best.throughput:,.1f} {s.unit}/s ({best.config})")
    for r in report.failed:
        lines.append(f"  {r.status.upper()} {r.name} ({r.notebook}):\n    {(r.reason or 'no reason recorded')[:110]}")
    return "\n".join(lines)


# --- Markdown --------------------------------------------------------------------------------------

def markdown(report: Report, plots: list[str] = ()) -> str:
    parts = ["# Scaling report", "",
             f"Made by `python -m workshop.measure.report` from the records under `{display_path(report.root)}`: "
             f"{len(report.runs)} run(s), {len(report.failed)} failed (run folders below are relative to it). "
             "Speedup and efficiency are taken inside a series "
             "(same notebook, model and batch per device) against its one-device baseline; device-hours are devices x "
             "time. Peak memory is the tensors allocated on a GPU; on CPU, the tensor bytes a rank holds where the run counted "
             "them (notebook 06), else the process's resident set (Python and libraries included), which the memory "
             "plot leaves out.", ""]
    if not report.runs:
        parts += ["No records found. Run the notebooks (`make run`) or a benchmark, then report again.", ""]
    for s in report.series:
        parts += [f"## {s.title}", "", series_table(s), ""]
    for name in plots:
        parts += [f"![{name[:-4]}]({name})", ""]
    if report.runs:  # an empty plot is never shown: one sentence says what run would fill it
        parts += [f"*{name[:-4]}*: {missing(report, name)}" for name in PLOTS if name not in plots and missing(report, name)]
        parts.append("")
    tables = memory_tables(report.runs)
    if tables:
        parts += ["## Activations and checkpointing (notebook 07)", "", tables, ""]
    tables = pipeline_tables(report.runs)
    if tables:
        parts += ["## Pipeline schedules and their bubble (notebook 09)", "", tables, ""]
    if report.failed:
        parts += ["## Failed runs", "", "Listed, never averaged in.", "", failed_table(report.failed), ""]
    if report.unmeasured:
        parts += ["## Runs without a throughput measurement", "",
                  ", ".join(f"`{r.name}` ({r.notebook})" for r in report.unmeasured), ""]
    return "\n".join(parts)


def write(report: Report, out: Path) -> Path:
    """report.md and the PNGs in `out`; returns the Markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for name, plot in PLOTS.items():
        if not missing(report, name):
            plot(report).savefig(out / name, dpi=110)
            names.append(name)
    path = out / "report.md"
    path.write_text(markdown(report, names))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workshop.measure.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="?", default=None, help="the runs folder (default: $WORKSHOP_RUNS or runs/)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="folder for report.md and the PNGs (default report/)")
    parser.add_argument("--notebook", help="only runs of this notebook (or of names starting so: bench)")
    parser.add_argument("--sweep", help="only runs of this sweep id")
    parser.add_argument("--job", help="only runs of this SLURM job id")
    parser.add_argument("--no-sacct", action="store_true", help="do not ask SLURM's sacct for elapsed time and GPUs")
    args = parser.parse_args(argv)
    from workshop.measure.metrics import runs_root

    try:
        report = build(args.runs or runs_root(), args.notebook, args.sweep, args.job, sacct=None if args.no_sacct else sacct_info)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(report))
    print(f"report: {display_path(write(report, args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
