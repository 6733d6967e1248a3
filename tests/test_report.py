"""workshop.measure.report on a runs folder written here: two models, a failed run, a run with nothing
to report, a series with no one-device run; grouping, speedup, efficiency, cost, files, CLI."""

import json
from pathlib import Path

import pytest

from workshop.measure import perf, report, report_plots, throughput


def record(runs, name, notebook, results, status="ok", world_size=1, local_world_size=None, job=None, time="2026-01-01T00:00:00",
           **extra):
    """A record.json with the fields metrics.write_record writes."""
    folder = runs / name
    folder.mkdir(parents=True)
    rec = {"notebook": notebook, "status": status, "time": time, "params": extra.pop("params", {}),
           "dist": {"rank": 0, "world_size": world_size, "local_world_size": local_world_size or world_size},
           "slurm_job_id": job, "results": results, **extra}
    (folder / "record.json").write_text(json.dumps(rec))
    return folder


def gpt(world_size, strategies):
    """bench-strategies results of TinyGPT: tokens/s, 8 sequences per rank."""
    return {"model": "tinygpt-cpu", "samples_or_tokens": "tokens", "world_size": world_size, "micro_batch_size": 8,
            "global_batch_size": 8 * world_size, "measurements": [
                {"strategy": s, "step_time_s": 0.1, "throughput": tps, "state_bytes_per_rank": [1]} for s, tps in strategies]}


@pytest.fixture
def runs(tmp_path):
    runs = tmp_path / "runs"
    # small_cnn, 64 per rank, as `bench ddp` writes it: 1, 2 and 4 ranks (2 nodes of 2)
    for n, sps in ((1, 100.0), (2, 150.0), (4, 240.0)):
        record(runs, f"cnn{n}", "bench-ddp", {"model": "small_cnn", "micro_batch_size": 64, "global_batch_size": 64 * n,
                                             "step_time_s": 64 * n / sps, "samples_per_s": sps, "throughput": sps,
                                             "samples_or_tokens": "samples", "strategy": "ddp" if n > 1 else "single",
                                             "peak_memory_bytes": [2**20 * (10 + r) for r in range(n)],
                                             "memory_kind": "cuda"},
               world_size=n, local_world_size=min(n, 2), job=str(100 + n))
    # TinyGPT: a second model, tokens/s, two strategies on 2 ranks
    record(runs, "gpt1", "bench-strategies", gpt(1, [("single", 1000.0), ("fsdp", 500.0)]))
    record(runs, "gpt2", "bench-strategies", gpt(2, [("ddp", 1600.0), ("fsdp", 800.0)]), world_size=2)
    # a failed run: it has a throughput, which must not be averaged in
    record(runs, "cnn2-failed", "bench-ddp", {"model": "small_cnn", "micro_batch_size": 64, "throughput": 10_000.0},
           status="failed", world_size=2, reason=["rank 1 on n2 failed in cell In [7] (RuntimeError: boom)"])
    # a run that writes no throughput, and a record that is not JSON
    record(runs, "nb05", "05_ddp", {"matches_single_process": {"naive": True}}, world_size=2)
    (runs / "broken").mkdir()
    (runs / "broken" / "record.json").write_text("{not json")
    # the same model with another batch per device and no one-device run: its own series, no speedup
    record(runs, "cnn-big", "bench-ddp", {"model": "small_cnn", "micro_batch_size": 256, "global_batch_size": 512,
                                          "throughput": 500.0, "strategy": "ddp"}, world_size=2)
    return runs


def by_title(rep):
    return {(s.notebook, s.model, s.micro_batch_size): s for s in rep.series}


def test_series_are_kept_apart(runs):
    rep = report.build(runs, sacct=None)
    assert set(by_title(rep)) == {("bench-ddp", "small_cnn", 64), ("bench-ddp", "small_cnn", 256),
                                  ("bench-strategies", "tinygpt-cpu", 8)}
    gpt = by_title(rep)[("bench-strategies", "tinygpt-cpu", 8)]
    assert gpt.unit == "tokens" and all(r.unit == "tokens" for r in gpt.rows)


def test_speedup_and_efficiency_against_the_series_own_baseline(runs):
    cnn = by_title(report.build(runs, sacct=None))[("bench-ddp", "small_cnn", 64)]
    assert [(r.devices, r.nodes) for r in cnn.rows] == [(1, 1), (2, 1), (4, 2)]
    assert cnn.baseline.devices == 1 and cnn.baseline.throughput == 100
    assert [r.speedup for r in cnn.rows] == pytest.approx([1.0, 1.5, 2.4])
    assert [r.efficiency for r in cnn.rows] == pytest.approx([1.0, 0.75, 0.6])
    # the largest rank's peak counts; cost: 4 devices x 1e6 / 240 s, in hours
    assert cnn.rows[2].peak_memory_bytes == 13 * 2**20
    assert cnn.rows[2].device_hours_per_million == pytest.approx(4 * 1e6 / 240 / 3600)
    assert cnn.rows[2].config == "2 x 2 ddp"
    gpt = by_title(report.build(runs, sacct=None))[("bench-strategies", "tinygpt-cpu", 8)]
    speedups = {(r.devices, r.strategy): r.speedup for r in gpt.rows}
    assert speedups == pytest.approx({(1, "single"): 1.0, (1, "fsdp"): 0.5, (2, "ddp"): 1.6, (2, "fsdp"): 0.8})


def test_no_baseline_no_speedup(runs):
    big = by_title(report.build(runs, sacct=None))[("bench-ddp", "small_cnn", 256)]
    assert big.baseline is None and big.rows[0].speedup is None and big.rows[0].efficiency is None
    assert "No one-device run" in report.series_table(big)


def test_failed_runs_are_listed_never_averaged(runs):
    rep = report.build(runs, sacct=None)
    failed = {r.path.name: r for r in rep.failed}
    assert set(failed) == {"cnn2-failed", "broken"}
    assert "boom" in failed["cnn2-failed"].reason and "unreadable" in failed["broken"].reason
    assert all(r.throughput != 10_000.0 for s in rep.series for r in s.rows)
    assert [r.path.name for r in rep.unmeasured] == ["nb05"]
    text = report.markdown(rep)
    assert "## Failed runs" in text and "boom" in text and "cnn2-failed" in text
    assert "FAILED" in report.summary(rep)


def test_filters(runs):
    assert {r.notebook for r in report.find_runs(runs, notebook="bench-strategies")} == {"bench-strategies"}
    assert {r.notebook for r in report.find_runs(runs, notebook="bench")} == {"bench-ddp", "bench-strategies"}
    assert [r.path.name for r in report.find_runs(runs, job="102")] == ["cnn2"]
    with pytest.raises(FileNotFoundError, match="no runs folder"):
        report.find_runs(runs / "nowhere")


def test_sacct_joined_in(runs):
    asked = []

    def fake_sacct(job):
        asked.append(job)
        return {"elapsed_s": 90.0, "gpus": 2}

    rep = report.build(runs, notebook="bench-ddp", sacct=fake_sacct)
    cnn = by_title(rep)[("bench-ddp", "small_cnn", 64)]
    assert sorted(asked) == ["101", "102", "104"] and cnn.rows[0].sacct == {"elapsed_s": 90.0, "gpus": 2}
    table = report.series_table(cnn)
    assert "sacct elapsed" in table and "90.0 s" in table
    assert report._parse_elapsed("1-02:03:04") == 86400 + 2 * 3600 + 3 * 60 + 4
    assert report._parse_elapsed("05:06") == 306


def test_write_report_and_cli(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert report.main([str(runs), "--out", str(out), "--no-sacct"]) == 0
    md = (out / "report.md").read_text()
    for name in report_plots.PLOTS:
        assert (out / name).stat().st_size > 0 and f"]({name})" in md
    assert "| 2 x ddp |" in md and "| 2 x 2 ddp |" in md and "| 1 x single (baseline) |" in md
    assert "report:" in capsys.readouterr().out
    assert report.main([str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no runs folder" in capsys.readouterr().err


def test_empty_folder(tmp_path):
    rep = report.build(tmp_path, sacct=None)
    assert rep.runs == [] and rep.series == []
    path = report.write(rep, tmp_path / "out")
    assert "No records found" in path.read_text()


def test_record_writers_speak_the_report_keys(tmp_path):
    """What notebook 02 / `bench single` and notebook 05 (`throughput.end_to_end_scaling`) write is read as
    measurements; 05's step split (compute and all-reduce timed apart) is a bound, not a measurement."""
    perf_rows = [{"variant": v, "model": "small_cnn", "batch_size": 32, "status": s, "samples_per_s": sps,
                  "step_time_s": 32 / sps if sps else None, "peak_memory_bytes": 1, "baseline": "naive"}
                 for v, s, sps in (("naive", "ok", 100.0), ("bf16", "ok", 150.0), ("compile", "skipped", None))]
    record(tmp_path, "r02", "02_single_device_performance", {"rows": perf_rows,
                                                             "measurements": perf.report_measurements(perf_rows)})
    alone = throughput.end_to_end_scaling("small_cnn", micro_batch_size=4, steps=2, warmup=0)
    assert [(r["strategy"], r["world_size"]) for r in alone] == [("single", 1)]  # one process: no DDP row
    assert alone[0]["throughput"] == pytest.approx(4 * 2 / alone[0]["wall_time_s"])
    # as 2 ranks write it: the same 3 steps of 16 samples per rank, 0.3 s alone and 0.4 s on 2 ranks
    common = {"model": "resnet18", "samples_or_tokens": "samples", "micro_batch_size": 16, "steps": 3, "timed": "whole"}
    scaled = [{**common, "strategy": "single", "world_size": 1, "global_batch_size": 16, "wall_time_s": 0.3,
               "step_time_s": 0.1, "throughput": 160.0},
              {**common, "strategy": "ddp", "world_size": 2, "global_batch_size": 32, "wall_time_s": 0.4,
               "step_time_s": 0.4 / 3, "throughput": 240.0}]
    split = [{"model": "resnet18", "micro_batch_size": 16, "world_size": 2, "compute_s": 0.2, "comm_s": 0.05}]
    record(tmp_path, "r05", "05_ddp", {"step_split": split, "scaling": scaled, "measurements": scaled}, world_size=2)
    rep = report.build(tmp_path, sacct=None)
    s02 = by_title(rep)[("02_single_device_performance", "small_cnn", 32)]
    assert [(r.variant, r.baseline, r.speedup) for r in s02.rows] == [("naive", True, 1.0), ("bf16", False, 1.5)]
    assert s02.rows[1].efficiency is None  # one device: a faster variant is a speedup, not scaling
    s05 = by_title(rep)[("05_ddp", "resnet18", 16)]
    assert [(r.devices, r.strategy, r.wall_time_s) for r in s05.rows] == [(1, "single", 0.3), (2, "ddp", 0.4)]
    assert (s05.rows[1].speedup, s05.rows[1].efficiency) == (pytest.approx(1.5), pytest.approx(0.75))
    assert "\n".join(report.series_table(s) for s in rep.series).count("ddp-no-overlap") == 0


def test_make_run_series_ends_with_the_report(runs, tmp_path):
    """`python -m workshop.launch.runner series` runs the report notebook last, over the series' own folder."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(WORKSHOP_RUNS=str(tmp_path / "made"), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    out = subprocess.run([sys.executable, "-m", "workshop.launch.runner", "series", "notebooks/13_scaling_report.ipynb",
                          "tests/notebooks/fail_on_rank.ipynb"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (series,) = (tmp_path / "made").iterdir()
    folders_by_name = {p.name.split("-", 2)[-1]: p.name for p in series.iterdir()}
    assert sorted(folders_by_name) == ["13_scaling_report", "fail_on_rank"]
    assert out.stdout.index("fail_on_rank.ipynb") < out.stdout.index("13_scaling_report.ipynb")  # the report last
    assert "Executing" not in out.stdout  # papermill's progress is in the run folders, one line a notebook here
    assert (series / folders_by_name["fail_on_rank"] / "logs" / "launcher.log").is_file()
    (report_md,) = series.glob("*-13_scaling_report/report/report.md")
    assert "scaling report:" in out.stdout and report_md.name in out.stdout.split("scaling report:")[1]
    nb = (report_md.parent.parent / "13_scaling_report.ipynb").read_text()
    assert "reporting on:" in nb and series.name in nb  # the series' folder was passed as `runs`


def test_an_empty_plot_is_one_sentence_saying_what_run_fills_it(tmp_path):
    runs = tmp_path / "runs"
    # one run on one device, no peak memory: nothing to scale, nothing in memory; a throughput for the cost
    record(runs, "one", "bench-ddp", {"model": "small_cnn", "micro_batch_size": 64, "throughput": 100.0})
    rep = report.build(runs, sacct=None)
    assert "on 2 or more ranks" in report_plots.missing(rep, "speedup.png")
    assert "05_ddp" in report_plots.missing(rep, "efficiency.png")
    assert "tensor bytes per rank" in report_plots.missing(rep, "memory.png") and report_plots.missing(rep, "cost.png") is None
    assert isinstance(report_plots.figure(rep, "speedup.png"), str) and not isinstance(report_plots.figure(rep, "cost.png"), str)
    path = report.write(rep, tmp_path / "out")
    assert sorted(p.name for p in path.parent.glob("*.png")) == ["cost.png"]
    text = path.read_text()
    assert "![cost](cost.png)" in text and "![speedup]" not in text and "so there is no speedup to plot" in text
    # the full folder fills every plot
    full = report.build(_full_runs(tmp_path), sacct=None)
    assert all(report_plots.missing(full, name) is None for name in report_plots.PLOTS)


def _full_runs(tmp_path):
    runs = tmp_path / "full"
    for n, sps in ((1, 100.0), (2, 150.0)):
        record(runs, f"cnn{n}", "bench-ddp", {"model": "small_cnn", "micro_batch_size": 64, "throughput": sps,
                                             "strategy": "ddp" if n > 1 else "single", "peak_memory_bytes": 2**20,
                                             "memory_kind": "tensors"}, world_size=n)
    return runs


def test_a_resident_set_on_cpu_is_not_charted_as_memory(tmp_path):
    """A CPU process's resident set grows with what ran before it: charted beside a strategy, it would look like
    a saving that is not there. Only tensor bytes (CUDA's, or counted on CPU) are charted."""
    runs = tmp_path / "runs"
    for n in (1, 2):  # a CPU record without memory_kind: its peak is the resident set
        record(runs, f"rss{n}", "bench-ddp", {"model": "small_cnn", "micro_batch_size": 64, "throughput": 100.0 * n,
                                             "strategy": "ddp" if n > 1 else "single", "peak_memory_bytes": 2**30}, world_size=n)
    rep = report.build(runs, sacct=None)
    assert {r.memory_kind for s in rep.series for r in s.rows} == {"resident set"}
    assert "resident set says nothing" in report_plots.missing(rep, "memory.png")
    record(runs, "counted", "bench-ddp", {"model": "small_cnn", "micro_batch_size": 64, "throughput": 180.0, "strategy": "fsdp",
                                         "peak_memory_bytes": 2**20, "memory_kind": "tensors"}, world_size=2)
    rep = report.build(runs, sacct=None)
    assert report_plots.missing(rep, "memory.png") is None
    fig = report_plots.plot_memory(rep)
    assert [b.get_width() for b in fig.axes[0].patches] == [1.0]  # MiB: only the counted one


def test_notebook_07s_activations_and_checkpointing_are_tabled(tmp_path):
    record(tmp_path, "mem", "07_memory", {
        "activation_per_layer": [{"tokens": 64, "samples": 4, "measured": 2_105_344, "derived": 2_105_344}],
        "checkpointing": {"none": {"saved_bytes": 8_000_000, "step_s": 0.020},
                          "full": {"saved_bytes": 1_000_000, "step_s": 0.030}}})
    md = report.markdown(report.build(tmp_path, sacct=None))
    assert "## Activations and checkpointing (notebook 07)" in md
    assert "| `mem` | 64 x 4 | 2.0 MiB | 2.0 MiB | 1.000 |" in md
    assert "| `mem` | full | 976.6 KiB | 12% | 30.0 ms | +10.0 ms |" in md
    record(tmp_path / "other", "nb05", "05_ddp", {"matches_single_process": {"naive": True}})
    assert "Activations and checkpointing" not in report.markdown(report.build(tmp_path / "other", sacct=None))


def test_notebook_09s_bubble_is_tabled(tmp_path):
    record(tmp_path, "pp", "09_pipeline_parallelism", {"bubble": [
        {"schedule": "1f1b", "p": 2, "m": 4, "step_s": 0.05, "measured": 0.213, "theory": 0.2}]})
    md = report.markdown(report.build(tmp_path, sacct=None))
    assert "## Pipeline schedules and their bubble (notebook 09)" in md
    assert "| `pp` | 1f1b | 2 | 4 | 50.0 ms | 21.3% | 20.0% |" in md
    record(tmp_path / "other", "nb05", "05_ddp", {"matches_single_process": {"naive": True}})
    assert "Pipeline schedules" not in report.markdown(report.build(tmp_path / "other", sacct=None))
