"""Notebook 04 (DataParallel): on one process, DataParallel by hand on CPU threads against one process
and DDP on 2 CPU ranks; the real comparison where a node has two or more GPUs."""

import json
import re

import pytest
import torch

from helpers import REPO, run_notebook
from workshop.base import records

NB = REPO / "notebooks" / "04_data_parallel.ipynb"
SMALL = {"batch_size": 8, "steps": 2, "warmup": 1, "profile_steps": 1}


def only_run(runs):
    folders = [p for p in runs.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def test_one_process_measures_dataparallel_by_hand_against_ddp_on_cpu(runs):
    out = run_notebook(NB, *[arg for name, value in SMALL.items() for arg in ("-p", name, str(value))])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = only_run(runs)
    record = records.read(run / "record.json")
    assert record.status == "ok" and record.dist["world_size"] == 1
    results = record.results
    assert results["dp_output_matches"] is True
    cpu = results["cpu"]
    assert cpu["ddp_world_size"] == 2 and cpu["global_batch_size"] == SMALL["batch_size"]
    assert set(cpu["dp_by_hand_phases_s"]) == {"replicate", "scatter", "forward (threads)", "gather + loss",
                                               "backward (threads)", "reduce gradients", "optimizer step"}
    for key in ("one_process_step_s", "dp_by_hand_step_s", "ddp_step_s"):
        assert cpu[key] > 0, key
    assert cpu["dp_by_hand_step_s"] == pytest.approx(sum(cpu["dp_by_hand_phases_s"].values()))
    text = (run / "04_data_parallel.ipynb").read_text()
    for what in ("outputs", "summed gradients", "weights after the step"):
        assert re.search(rf"DataParallel by hand, {what} match one process on the same batch: +True", text), what
    if torch.cuda.device_count() < 2:
        assert results["gpu"] is None
        printed = "".join("".join(o.get("text", "")) for c in json.loads(text)["cells"] for o in c.get("outputs", []))
        assert printed.count("not measured here") == 1  # one line, not a block per GPU cell


@pytest.mark.gpu
@pytest.mark.multirank
def test_comparison_on_two_gpus(runs):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 or more GPUs on this node")
    out = run_notebook(NB, "-p", "steps", "10", "-p", "warmup", "3", "-p", "batch_size", "256")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = records.read(only_run(runs) / "record.json").results["gpu"]
    n = torch.cuda.device_count()
    assert results["ddp"]["world_size"] == n
    for way in ("one_gpu", "data_parallel", "ddp"):
        assert results[way]["samples_per_s"] > 0
    peaks = results["data_parallel"]["peak_memory_bytes_per_gpu"]
    assert len(peaks) == n and peaks[0] >= max(peaks[1:])  # the first GPU holds more
