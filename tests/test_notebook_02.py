"""Notebook 02 (single-device performance) through scripts/run_notebook.sh, with tiny sizes: every variant has
a row in the record, the traces are in the run's folder, and the GPU parameters file fits the notebook.
(nbval runs it with its defaults.) No timing is checked."""

import json

import pytest
import torch

from conftest import REPO, run_notebook
from workshop import perf, runner

NB = REPO / "notebooks" / "02_single_device_performance.ipynb"
PARAMS = REPO / "notebooks" / "params" / "02_single_device_performance.yaml"
SMALL = {"dataset": "synthetic", "batch_size": 8, "steps": 2, "warmup": 1, "profile_steps": 1}


def test_02_records_every_variant_and_writes_traces(runs):
    out = run_notebook(NB, *[arg for name, value in SMALL.items() for arg in ("-p", name, str(value))])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "ok" and record["notebook"] == "02_single_device_performance"
    assert record["params"]["batch_size"] == 8 and record["params"]["variants"] == list(perf.VARIANTS)
    rows = record["results"]["rows"]
    assert [r["variant"] for r in rows] == list(perf.VARIANTS)
    measured = [r for r in rows if r["status"] == "ok"]
    assert measured[0]["variant"] == "naive" and measured[0]["speedup"] == 1.0
    assert all(r["samples_per_s"] > 0 and r["flops_per_step"] == record["results"]["flops_per_step"] for r in measured)
    assert all(r["reason"] for r in rows if r["status"] != "ok")  # a skipped variant says why
    if not torch.cuda.is_available():
        assert next(r for r in rows if r["variant"] == "compile")["status"] == "skipped"
    assert record["samples_per_s"] == max(r["samples_per_s"] for r in measured)
    for name in record["results"]["traces"]:
        trace = json.loads((run / name).read_text())  # Chrome trace JSON, as Perfetto opens it
        assert trace["traceEvents"]
    assert "trace_naive_rank0.json" in record["results"]["traces"]


def test_gpu_parameters_file_names_only_parameters_of_the_notebook(monkeypatch):
    monkeypatch.setenv("WORKSHOP_ALLOW_CPU", "1")  # the names are checked here, not whether a GPU is
    runner.check_notebook(NB, ["-f", str(PARAMS)])  # raises RunError on a name the notebook does not have


@pytest.mark.gpu
def test_02_on_a_gpu_measures_compile_and_mfu(runs):
    out = run_notebook(NB, "-p", "batch_size", "128", "-p", "steps", "5", "-p", "warmup", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    rows = json.loads((run / "record.json").read_text())["results"]["rows"]
    assert all(r["status"] == "ok" and r["mfu"] > 0 for r in rows)
    assert next(r for r in rows if r["variant"] == "compile")["compile_time_s"] is not None
