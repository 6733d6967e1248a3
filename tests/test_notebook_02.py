"""Notebook 02 (single-device performance) through scripts/run_notebook.sh, with tiny sizes: every variant has
a row in the record, the traces are in the run's folder, and the GPU parameters file fits the notebook.
(nbval runs it with its defaults.) No timing is checked. And the pieces it shows: the augmentation's draws
(workshop.data), the sentences that read the table (workshop.measure.perf), the quiet profiler and its narrow table
(workshop.measure.profiler)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, run_notebook
from workshop import data
from workshop.base import records
from workshop.launch import options
from workshop.measure import perf

NB = REPO / "notebooks" / "02_single_device_performance.ipynb"
PARAMS = REPO / "notebooks" / "params" / "02_single_device_performance.yaml"
SMALL = {"dataset": "synthetic", "batch_size": 8, "steps": 2, "warmup": 1, "profile_steps": 1}


def test_02_records_every_variant_and_writes_traces(runs):
    out = run_notebook(NB, *[arg for name, value in SMALL.items() for arg in ("-p", name, str(value))])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    record = records.read(run / "record.json")
    assert record.status == "ok" and record.notebook == "02_single_device_performance"
    assert record.params["batch_size"] == 8 and record.params["variants"] == list(perf.VARIANTS)
    rows = record.results["rows"]
    assert [r["variant"] for r in rows] == list(perf.VARIANTS)
    measured = [r for r in rows if r["status"] == "ok"]
    assert measured[0]["variant"] == "naive" and measured[0]["speedup"] == 1.0
    assert all(r["samples_per_s"] > 0 and r["flops_per_step"] == record.results["flops_per_step"] for r in measured)
    assert all(r["reason"] for r in rows if r["status"] != "ok")  # a skipped variant says why
    if not torch.cuda.is_available():
        assert next(r for r in rows if r["variant"] == "compile")["status"] == "skipped"
    assert record.extra["samples_per_s"] == max(r["samples_per_s"] for r in measured)
    for name in record.results["traces"]:
        trace = json.loads((run / name).read_text())  # Chrome trace JSON, as Perfetto opens it
        assert trace["traceEvents"]
    assert "trace_naive_rank0.json" in record.results["traces"]


def test_gpu_parameters_file_names_only_parameters_of_the_notebook(monkeypatch):
    monkeypatch.setenv("WORKSHOP_ALLOW_CPU", "1")  # the names are checked here, not whether a GPU is
    options.check_notebook(NB, ["-f", str(PARAMS)])  # raises RunError on a name the notebook does not have


@pytest.mark.gpu
def test_02_on_a_gpu_measures_compile_and_mfu(runs):
    out = run_notebook(NB, "-p", "batch_size", "128", "-p", "steps", "5", "-p", "warmup", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    rows = records.read(run / "record.json").results["rows"]
    assert all(r["status"] == "ok" and r["mfu"] > 0 for r in rows)
    assert next(r for r in rows if r["variant"] == "compile")["compile_time_s"] is not None


def test_augment_draws_say_what_augment_batch_did():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    out = data.augment_batch(images, pad=2, generator=torch.Generator().manual_seed(5))
    dy, dx, flip = data.augment_draws(6, pad=2, generator=torch.Generator().manual_seed(5))
    mean, std = torch.tensor(data.CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(data.CIFAR_STD).view(1, 3, 1, 1)
    plain = (images.float() / 255 - mean) / std  # normalised, not moved
    padded = torch.nn.functional.pad(plain, (2, 2, 2, 2), mode="reflect")
    for i in range(6):
        crop = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        torch.testing.assert_close(out[i], crop.flip(-1) if flip[i] else crop)
    assert flip.any() and not flip.all()  # both cases were looked at


def _row(variant, step_time_s, status="ok", reason=None):
    return {"variant": variant, "status": status, "reason": reason, "device": "cpu", "step_time_s": step_time_s,
            "samples_per_s": 32 / step_time_s if status == "ok" else None, "baseline": "naive",
            "speedup": 0.03 / step_time_s if status == "ok" else None}


def test_read_variants_reads_what_was_measured():
    rows = [_row("naive", 0.030), _row("workers", 0.029), _row("bf16", 0.203),
            _row("compile", None, "skipped", "torch.compile on CPU builds C++ kernels; measure it"),
            _row("resident", 0.101)]
    text = perf.read_variants(rows)
    assert "workers: about as fast as naive (1.03x)" in text  # within 10%: noise, not a finding
    assert "bf16: 7.0x slower than workers" in text
    assert "resident: 2.0x faster than bf16" in text
    assert "compile: skipped (torch.compile on CPU builds C++ kernels)" in text
    assert "Fastest: workers, 1.03x naive's samples/s." in text
    if not perf.cpu_has_native_bf16():
        assert "no bf16 instructions" in text
        assert 'variants="naive,workers,compile,resident"' in text  # how to see the later rows without bf16
    rows[2]["step_time_s"] = 0.010
    assert "bf16: 2.9x faster than workers" in perf.read_variants(rows)


def test_profiler_on_cpu_prints_nothing_and_its_table_fits_a_notebook():
    code = ("import torch; from workshop.measure import profiler\n"
            "m = torch.nn.Linear(64, 64)\n"
            "with profiler.profile('cpu') as prof:\n"
            "    m(torch.randn(8, 64)).sum().backward()\n"
            "print(profiler.profile_table(prof, row_limit=5))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"})
    assert out.returncode == 0, out.stderr
    assert "USDT" not in out.stderr and "gpuGetDeviceCount" not in out.stderr, out.stderr  # Kineto kept quiet
    lines = out.stdout.splitlines()
    assert lines[0].split()[:2] == ["operator", "self"] and "aten::" in out.stdout
    assert len(lines) == 1 + 5 + 1 and max(map(len, lines)) <= 90
