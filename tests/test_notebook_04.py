"""Notebook 04 (DataParallel): its record on one process, and the real comparison where a node
has two or more GPUs (without them the comparison cells only say what they would measure)."""

import json

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
