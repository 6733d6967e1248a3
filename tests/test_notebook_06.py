"""notebooks/06_sharding.ipynb on 2 local ranks; nbval runs it as one process; the committed notebook is a 2 x 2 SLURM
run. An uneven layout (sbatch --ntasks=3 over 2 nodes), where the hybrid section steps aside, is checked where it is
decided: sharding.hybrid_layout_problem (test_sharding), dist.describe (test_dist), and 3 srun tasks over the local
cluster's 2 nodes (test_doctor)."""

import json

import pytest
import yaml

from helpers import REPO, assert_checks_as_committed, run_notebook
from workshop.base import records

NB06 = "notebooks/06_sharding.ipynb"
CHECK = [f"{what} matches the single-process run:" for what in
         ("ZeRO-1 by hand", "ZeroRedundancyOptimizer", "FSDP2 (reshard)", "FSDP2 (no reshard)", "hybrid sharding",
          "Lightning FSDP2", "DeepSpeed ZeRO-1", "DeepSpeed ZeRO-2", "DeepSpeed ZeRO-3")]
CHECK += ["measured bytes per rank within 10% of the ZeRO model:", "checkpoint round trip gives the same next losses:"]


def check_cell_lines(notebook):
    """The stdout of the final NBVAL_CHECK_OUTPUT cell, one line each."""
    cells = json.loads(notebook.read_text())["cells"]
    cell = [c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).startswith("# NBVAL_CHECK_OUTPUT")][-1]
    return "".join("".join(o.get("text", "")) for o in cell["outputs"]).splitlines()


def assert_all_true(notebook):
    lines = check_cell_lines(notebook)
    for what in CHECK:
        assert any(line.startswith(what) and line.endswith("True") for line in lines), (what, lines)


def assert_sharded_memory(record, world_size):
    """Every rank's parameters and gradients are 1/world_size of DDP's under FSDP2."""
    per_rank = record.results["measured_per_rank"]
    ddp = per_rank["ddp"][0]
    for version in ("fsdp2_reshard_True", "fsdp2_reshard_False"):
        assert len(per_rank[version]) == world_size
        for rank in per_rank[version]:
            assert rank["params"] * world_size == ddp["params"] and rank["grads"] * world_size == ddp["grads"]
    # ZeRO-1: whole tensors per rank, so only about 1/world_size of the optimizer states, and all of the rest
    zero1 = per_rank["zero1"]
    assert all(rank["params"] == ddp["params"] and rank["optimizer"] < ddp["optimizer"] for rank in zero1)
    assert sum(rank["optimizer"] for rank in zero1) == pytest.approx(ddp["optimizer"], rel=0.01)
    # the report's memory per rank on CPU is these tensor bytes, not the process's resident set
    peaks = {m["strategy"]: m["peak_memory_bytes"] for m in record.results["measurements"]}
    assert peaks["fsdp2_reshard_True"] < peaks["zero1"] < peaks["ddp"] == ddp["total"]
    held = record.results["params_held_after_forward"]
    assert held["reshard"] < held["no_reshard"] == ddp["params"]
    # DeepSpeed after a backward: stages 1 and 2 keep a gradient partition, stage 3 a parameter partition too
    for stage in (1, 2, 3):
        for rank in per_rank[f"deepspeed_zero{stage}"]:
            assert rank["grads"] * world_size == ddp["grads"]
            assert rank["params"] * (world_size if stage == 3 else 1) == ddp["params"]
    # ... and every step of stages 1 and 2 reduces the gradients and then gathers the parameters: twice DDP's tensors
    steps = record.results["zero_against_ddp"]
    for version in ("zero1", "zero2"):
        assert steps[version]["collective_bytes"] == pytest.approx(2 * steps["ddp"]["collective_bytes"], rel=0.01)
        assert steps[version]["collectives"]["all_gather"]["bytes"] == pytest.approx(ddp["params"], rel=0.01)


def test_gpu_params_file_names_notebook_parameters():
    params = yaml.safe_load((REPO / "notebooks" / "params" / "06_sharding.yaml").read_text())
    cell = next(c for c in json.loads((REPO / NB06).read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
    names = {line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines() if "=" in line}
    assert params["size"] == "gpu" and params["mixed_precision"] is True
    assert set(params) <= names


@pytest.mark.multirank
def test_06_on_two_local_ranks(runs):
    out = run_notebook("--nproc", 2, NB06)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    assert_all_true(run / "06_sharding.ipynb")
    assert_checks_as_committed(run / "06_sharding.ipynb", NB06)  # the committed notebook ran on 2 nodes x 2 ranks
    record = records.read(run / "record.json")
    assert record.dist["world_size"] == 2 and all(record.results["matches_single_process"].values())
    assert_sharded_memory(record, 2)
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
