"""notebooks/05_ddp.ipynb on 2 local ranks (nbval runs it as one process; the committed notebook is a 2 x 2 SLURM
run), as one process a broken bucketed all-reduce that must fail the run, and the calls a student copies (joining the
group, set_epoch, Lightning's Trainer) standing in the open."""

import json
import re
import shutil

import pytest

from helpers import REPO, assert_checks_as_committed, run_notebook
from workshop.base import records

NB05 = "notebooks/05_ddp.ipynb"
SMALL = ["-p", "split_models", "small_cnn,vit_tiny", "-p", "split_steps", "1", "-p", "allreduce_sizes", "4KiB,1MiB",
         "-p", "scaling_steps", "3"]
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
    assert_checks_as_committed(run / "05_ddp.ipynb", NB05)  # the committed notebook ran on 2 nodes x 2 ranks
    text = (run / "05_ddp.ipynb").read_text()
    assert "ring all-reduce matches torch.distributed.all_reduce: True" in text
    assert "2 rank(s) on 1 node(s), 2 per node" in text
    assert "each epoch deals every sample to one rank: True" in text  # the ranks' shuffled shares, after set_epoch
    assert "Lightning with DDPStrategy" in text  # the Trainer written in the open, in a kernel that is one rank
    # the collectives' table shows both ranks: all-reduce of 1 and 2 is 3 on each, rank 1 received rank 0's 1
    cells = [c for c in json.loads(text)["cells"] if c["cell_type"] == "code" and "per_rank_table" in "".join(c["source"])]
    rows = [re.split(r"\s{2,}", line.strip()) for line in "".join(cells[0]["outputs"][0]["text"]).splitlines()[1:]]
    table = {row[0]: row[1:] for row in rows}
    assert table["all-reduce (sum)"] == ["3", "3"] and table["all-gather"] == ["1 2", "1 2"]
    assert table["reduce to 0 (sum)"] == ["3", "-"] and table["broadcast from 0"] == ["1", "1"]
    assert table["reduce-scatter (sum)"] == ["3", "6"] and table["received from r - 1"] == ["2", "1"]
    record = records.read(run / "record.json")
    assert record.dist["world_size"] == 2 and all(record.results["matches_single_process"].values())
    rows = record.results["allreduce"]  # workshop.measure.collectives, as `bench allreduce` runs it
    assert [r["bytes"] for r in rows] == [4096, 2**20]
    assert all(r["time_s"] > 0 and r["busbw_GBps"] == pytest.approx(r["algbw_GBps"]) for r in rows)  # n = 2: 2(n-1)/n = 1
    scaling = record.results["scaling"]  # the same steps timed whole on rank 0 alone, then on both with DDP
    assert [(r["strategy"], r["world_size"]) for r in scaling] == [("single", 1), ("ddp", 2)]
    assert record.results["measurements"] == scaling and all(r["throughput"] > 0 for r in scaling)
    split = {r["model"]: r for r in record.results["step_split"]}  # workshop.measure.throughput, as `bench step-split`
    assert sorted(split) == ["small_cnn", "vit_tiny"] and split["small_cnn"]["grad_bytes"] == 4 * 94_762
    for row in split.values():
        assert row["world_size"] == 2 and row["comm_s"] > 0
        assert 0 < row["efficiency_no_overlap"] <= row["efficiency_overlap"] <= 1


def test_the_calls_a_student_copies_stand_in_the_open():
    """Joining the group, the sampler's epochs and Lightning's Trainer are plain calls in code cells, outside any
    exercise's solution (which the students' copies clear)."""
    cells = json.loads((REPO / NB05).read_text())["cells"]
    code = "\n".join(re.sub(r"### BEGIN SOLUTION.*?### END SOLUTION", "", "".join(c["source"]), flags=re.S)
                     for c in cells if c["cell_type"] == "code")
    for call in ("tdist.init_process_group(", "init_method=", "env = dist.init(env)", "DistributedSampler(",
                 "sampler.set_epoch(epoch)", "L.Trainer(", "num_nodes=num_nodes", "strategy=\"ddp\"", "precision=",
                 "plugins=[dist.lightning_environment(env)]"):
        assert call in code, call
    assert "make_trainer(" not in code  # the Trainer is built in the open here; later notebooks use the helper


def test_a_broken_bucketed_all_reduce_fails_the_run_in_the_check_cell(runs, tmp_path, monkeypatch):
    """The package copied with BucketedAllReduce dividing by world_size + 1, first on PYTHONPATH for the kernel: the
    run must exit non-zero, naming the check cell and the bucketed check. One process is enough (it divides by 2
    there): the launcher collects a failed rank's notebook alike for one rank and for N (test_reliability)."""
    broken = tmp_path / "broken"
    shutil.copytree(REPO / "workshop", broken / "workshop", ignore=shutil.ignore_patterns("__pycache__"))
    ddp_py = broken / "workshop" / "ddp.py"
    source = ddp_py.read_text()
    assert source.count("flat /= self.world_size") == 1
    ddp_py.write_text(source.replace("flat /= self.world_size", "flat /= self.world_size + 1"))
    monkeypatch.setenv("PYTHONPATH", str(broken))
    out = run_notebook(NB05, *SMALL)
    assert out.returncode != 0, out.stdout[-3000:] + out.stderr[-3000:]
    said = out.stdout + out.stderr
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    cells = json.loads((run / "05_ddp.ipynb").read_text())["cells"]
    (failed,) = [c for c in cells if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert "check.require(checks)" in "".join(failed["source"])  # the check cell, not an earlier one
    assert f"failed in cell In [{failed['execution_count']}]" in said and "CheckFailed" in said, said[-3000:]
    lines = check_cell_lines(run / "05_ddp.ipynb")
    assert any(line.startswith("bucketed all-reduce matches") and line.endswith("False") for line in lines), lines
    assert any(line.startswith("naive all-reduce matches") and line.endswith("True") for line in lines), lines
    error = next(o for o in failed["outputs"] if o.get("output_type") == "error")
    assert "bucketed all-reduce:" in error["evalue"] and "differs by" in error["evalue"], error["evalue"]
