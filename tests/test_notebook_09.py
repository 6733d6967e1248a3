"""notebooks/09_pipeline_parallelism.ipynb on 2 local ranks (2 stages), its checked cells against the committed notebook
(a 2 x 2 SLURM run: pp 2 x tp 2). nbval runs it as one process, a pipeline of one stage; the equivalences on 2, 4 and
8 ranks, 3D included, are asserted once in tests/test_pipeline.py."""

import json

import pytest

from helpers import REPO, assert_checks_as_committed, run_notebook
from workshop.base import records

NB09 = "notebooks/09_pipeline_parallelism.ipynb"


def test_the_library_is_called_in_the_open():
    """torch.distributed.pipelining as a student writes it in a script: the stage wrapped, the schedules built and
    stepped in a cell of the notebook, not inside the package."""
    cells = ["".join(c["source"]) for c in json.loads((REPO / NB09).read_text())["cells"] if c["cell_type"] == "code"]
    library = next(c for c in cells if "from torch.distributed.pipelining import" in c)
    for call in ("PipelineStage(stage, s, p, env.device, group=pp_group)", "n_microbatches=microbatches",
                 "loss_fn=models.lm_loss", "ScheduleGPipe(", "Schedule1F1B(", "ScheduleInterleaved1F1B(",
                 "schedule.step(tokens_all, target=targets_all", "schedule.step(target=targets_all"):
        assert call in library, call
    assert not any("pipeline.library_schedule" in c or "pipeline.library_step" in c for c in cells)
    assert not any("textwrap" in c for c in cells)  # lines are wrapped by workshop.base.tables.wrap


@pytest.mark.multirank
def test_09_on_two_local_ranks(runs):
    out = run_notebook("--nproc", 2, NB09, "-p", "bubble_microbatches", "1,4", "-p", "timing_repeats", "1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    text = (run / "09_pipeline_parallelism.ipynb").read_text()
    assert "mesh pp 2 x dp 1 x tp 1" in text and "stage 1: blocks [2, 3], norm and head" in text
    assert "stage 0: F0 F1 B0 F2 B1 F3 B2 B3" in text  # 1F1B's warm-up of p - s - 1 forwards
    assert "rank 0 holds stages 0 and 2 of 4" in text
    assert "image/png" in text  # the pipeline diagram
    assert_checks_as_committed(run / "09_pipeline_parallelism.ipynb", NB09)
    record = records.read(run / "record.json")
    assert record.status == "ok" and record.dist["world_size"] == 2
    results = record.results
    assert all(results["matches_single_process"].values()) and all(results["library_matches_scratch"].values())
    assert {(b["schedule"], b["m"]) for b in results["bubble"]} == {(s, m) for s in ("gpipe", "1f1b") for m in (1, 4)}
    assert all(b["theory"] == (2 - 1) / (b["m"] + 2 - 1) for b in results["bubble"])
    held = {(h["schedule"], h["stage"]): h["peak"] / h["one"] for h in results["activations_held"]}
    assert held == {("gpipe", 0): 4, ("gpipe", 1): 4, ("1f1b", 0): 2, ("1f1b", 1): 1}
    assert results["mesh"] == {"pp": 2, "dp": 1, "tp": 1}
