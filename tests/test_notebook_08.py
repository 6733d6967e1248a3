"""notebooks/08_tensor_parallelism.ipynb on 2 local ranks (tp 2), its checked cells against the committed notebook
(a 2 x 2 SLURM run: dp 2 across the nodes, tp 2 within). nbval runs it as one process; a tp_size that does not fit is
refused (test_bad_input, test_tp). On a world whose size does not divide the heads (3 ranks) the notebook asks
tp.largest_tp_size and tp.tp_problem what it can split, which test_tp checks."""

import json

import pytest

from helpers import REPO, assert_checks_as_committed, run_notebook
from workshop.base import records

NB08 = "notebooks/08_tensor_parallelism.ipynb"
SMALL = ["-p", "steps", "2", "-p", "seq_len", "16"]
CHECK = ["MLP split by hand matches", "Megatron block matches", "DTensor plan matches", "sequence-parallel plan matches",
         "tp.apply_tp's plan is the one written above", "tp.apply_tp's sequence-parallel plan is sp_plan",
         "TP training matches", "2D training matches", "Lightning 2D matches"]


def test_the_plan_is_written_and_applied_in_the_open():
    """The DTensor API as a student writes it in a script: the plan a dict of ParallelStyles in a cell, applied with
    parallelize_module there; tp.apply_tp, used later, is checked to hold the same plan (tp.same_plan)."""
    cells = ["".join(c["source"]) for c in json.loads((REPO / NB08).read_text())["cells"] if c["cell_type"] == "code"]
    code = "\n".join(cells)
    for written in ('plan = {', '"layers.*.attention.wq": ColwiseParallel()', '"layers.*.feed_forward.w2": RowwiseParallel()',
                    '"layers.*.ffn_norm": SequenceParallel()', "parallelize_module(fresh_model(), mesh[\"tp\"], plan)",
                    "tp.same_plan(plan, sequence_parallel)"):
        assert written in code, written
    assert "tinygpt_tp_plan" not in code  # the package's plan is compared, not shown in place of the written one


def assert_all_match(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    cell = next(c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).startswith("# NBVAL_CHECK_OUTPUT")
                and "single-process" in "".join(c["source"]))
    lines = "".join("".join(o.get("text", "")) for o in cell["outputs"]).splitlines()
    for what in CHECK:
        assert any(line.startswith(what) and line.endswith("True") for line in lines), (what, lines)


def assert_record(run, world_size, dp_size, tp_size):
    record = records.read(run / "record.json")
    assert record.status == "ok" and record.dist["world_size"] == world_size
    assert (record.params["dp_size"], record.params["tp_size"]) == (dp_size, tp_size)
    results = record.results
    assert all(results["matches_dense"].values()) and all(results["matches_single_process"].values())
    assert results["package_plan_is_written_plan"] == {"plan": True, "plan_sequence_parallel": True}
    assert results["block_allreduces"] == {"forward": 2, "backward": 2}
    assert results["collectives_layer0"]["plan"] == {"forward": {"all_reduce": 2}, "backward": {"all_reduce": 2}}


@pytest.mark.multirank
def test_08_on_two_local_ranks(runs):
    out = run_notebook("--nproc", 2, NB08, *SMALL)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    text = (run / "08_tensor_parallelism.ipynb").read_text()
    assert "2 rank(s) on 1 node(s), 2 per node" in text and "mesh dp 1 x tp 2" in text
    assert "rank 0 holds 65,536 of the MLP's 131,072 weights (1/2)" in text
    assert_all_match(run / "08_tensor_parallelism.ipynb")
    assert_checks_as_committed(run / "08_tensor_parallelism.ipynb", NB08)  # the committed notebook ran on 2 nodes x 2 ranks
    assert_record(run, 2, 1, 2)
