"""Notebook 04 (DataParallel): its record on one process, its comparison path with two faked GPUs,
and the real comparison where a node has two or more GPUs.

Without two GPUs the notebook's comparison cells only say what they would measure. The second
test runs them anyway, in this process, with torch told that there are two GPUs: nn.DataParallel
then calls the model itself (no CUDA), the CUDA memory counters read 0, and DDP runs for real as
two gloo ranks on CPU through `workshop.bench ddp`. It checks the cells and their use of
workshop.bench, not any figure.
"""

import json
from unittest import mock

import matplotlib
import nbformat
import pytest
import torch

from conftest import REPO, run_notebook

NB = REPO / "notebooks" / "04_data_parallel.ipynb"
SMALL = {"batch_size": 8, "steps": 2, "warmup": 1, "profile_steps": 1}


def only_run(runs):
    folders = [p for p in runs.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def test_one_process_records_what_it_could_not_measure(runs):
    out = run_notebook(NB, *[arg for name, value in SMALL.items() for arg in ("-p", name, str(value))])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.loads((only_run(runs) / "record.json").read_text())
    assert record["status"] == "ok" and record["dist"]["world_size"] == 1
    results = record["results"]
    assert results["dp_output_matches"] is True
    if torch.cuda.device_count() < 2:
        assert results["one_gpu"] is None and results["data_parallel"] is None and results["ddp"] is None
        assert "2 or more GPUs" in results["note"]


@pytest.mark.multirank
def test_comparison_cells_run_with_two_faked_gpus(runs, clean_env, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real comparison (test_comparison_on_two_gpus)")
    matplotlib.use("Agg")
    monkeypatch.chdir(NB.parent)  # where Jupyter runs the notebook
    cells = [c for c in nbformat.read(NB, as_version=4).cells if c.cell_type == "code"]
    assert "parameters" in cells[0].metadata.get("tags", [])
    namespace = {}
    with mock.patch("torch.cuda.device_count", return_value=2), \
            mock.patch("torch.cuda.reset_peak_memory_stats"), \
            mock.patch("torch.cuda.max_memory_allocated", return_value=0), \
            mock.patch("torch.cuda.empty_cache"):
        exec(cells[0].source, namespace)
        namespace.update(SMALL)  # as papermill injects parameters after the parameters cell
        for cell in cells[1:]:
            exec(cell.source, namespace)
    record = json.loads((only_run(runs) / "record.json").read_text())
    results = record["results"]
    assert results["n_gpus"] == 2 and "note" not in results
    assert results["one_gpu"]["samples_per_s"] > 0 and results["data_parallel"]["samples_per_s"] > 0
    assert results["ddp"]["world_size"] == 2 and results["ddp"]["samples_per_s"] > 0
    assert len(results["data_parallel"]["peak_memory_bytes_per_gpu"]) == 2
    assert len(results["ddp"]["peak_memory_bytes_per_gpu"]) == 2
    assert record["params"]["global_batch_size"] == SMALL["batch_size"]  # 4 per GPU, on 2 GPUs


@pytest.mark.gpu
@pytest.mark.multirank
def test_comparison_on_two_gpus(runs):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 or more GPUs on this node")
    out = run_notebook(NB, "-p", "steps", "10", "-p", "warmup", "3", "-p", "batch_size", "256")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((only_run(runs) / "record.json").read_text())["results"]
    n = torch.cuda.device_count()
    assert results["n_gpus"] == n and results["ddp"]["world_size"] == n
    for way in ("one_gpu", "data_parallel", "ddp"):
        assert results[way]["samples_per_s"] > 0
    peaks = results["data_parallel"]["peak_memory_bytes_per_gpu"]
    assert len(peaks) == n and peaks[0] >= max(peaks[1:])  # the first GPU holds more
