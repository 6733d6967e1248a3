"""notebooks/05_ddp.ipynb as N ranks: 2 local ranks, and 2 nodes x 2 ranks on the local SLURM cluster.
(nbval runs it as one process.)"""

import json

import pytest
from test_slurm import sbatch_two_by_two

from conftest import run_notebook

NB05 = "notebooks/05_ddp.ipynb"
SMALL = ["-p", "split_models", "small_cnn,vit_tiny", "-p", "split_steps", "1", "-p", "allreduce_sizes", "4KiB,1MiB"]
CHECK = [f"{what} matches the single-process run:" for what in
         ("naive all-reduce", "bucketed all-reduce", "torch DDP", "Lightning DDP")]


def check_cell_lines(notebook):
    """The stdout of the NBVAL_CHECK_OUTPUT cell that compares the versions, one line each."""
    cells = json.loads(notebook.read_text())["cells"]
    cell = next(c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).startswith("# NBVAL_CHECK_OUTPUT")
                and "single-process" in "".join(c["source"]))
    return "".join("".join(o.get("text", "")) for o in cell["outputs"]).splitlines()


def assert_all_match(notebook):
    lines = check_cell_lines(notebook)
    for what in CHECK:
        assert any(line.startswith(what) and line.endswith("True") for line in lines), (what, lines)


@pytest.mark.multirank
def test_05_on_two_local_ranks(runs):
    out = run_notebook("--nproc", 2, NB05, *SMALL)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    assert_all_match(run / "05_ddp.ipynb")
    record = json.loads((run / "record.json").read_text())
    assert record["dist"]["world_size"] == 2 and all(record["results"]["matches_single_process"].values())
    assert [r["bytes"] for r in record["results"]["allreduce"]] == [4096, 2**20]


@pytest.mark.slurm
def test_05_on_two_nodes_with_two_ranks_each(slurm, runs):
    run, text, nodes = sbatch_two_by_two(runs, NB05, *SMALL)
    assert "4 rank(s) on 2 node(s)" in text
    assert_all_match(run / "05_ddp.ipynb")
    assert nodes == ["n1", "n1", "n2", "n2"]
