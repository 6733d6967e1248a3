"""The SLURM path on a real SLURM (scripts/local_slurm.sh start): sbatch scripts/run_notebook.sh, as one
2 x 2 job of a small probe notebook; the GPU layouts on the cluster's placeholder GPUs. A failing rank, a lost
node, a requeue, two jobs at once (test_reliability), a job array (test_notebook_03) and a submission from a
portal's kernel (test_slurm_submit) are tested beside it."""

import json
import re
from pathlib import Path

import pytest

from helpers import REPO, sbatch
from workshop.base import records
from workshop.base.world import slurm_port

pytestmark = pytest.mark.slurm
PROBE = "tests/notebooks/probe.ipynb"


def test_two_nodes_with_two_ranks_each(slurm, runs):
    """One job of 2 nodes x 2 tasks: where each rank ran, the world it joined, and where it all went."""
    rc, job, log = sbatch(runs, "--nodes=2", "--ntasks-per-node=2", "scripts/run_notebook.sh", PROBE, "-p", "steps", "3")
    assert rc == 0, log[-4000:]
    run = runs / f"job{job}-probe"
    assert (run / "probe.ipynb").is_file() and (run / "parameters.yaml").read_text() == "steps: 3\n"
    assert sorted(p.name for p in (run / "ranks").iterdir()) == [f"probe.rank{r}.ipynb" for r in (1, 2, 3)]
    nodes = [json.loads((run / "logs" / f"rank{r}.status.json").read_text())["node"] for r in range(4)]
    assert nodes == ["n1", "n1", "n2", "n2"]  # block placement: ranks 0, 1 on the first node
    facts = [json.loads((run / f"facts_rank{r}.json").read_text()) for r in range(4)]
    assert [(f["rank"], f["world_size"]) for f in facts] == [(r, 4) for r in range(4)]
    record = records.read(run / "record.json")
    assert record.status == "ok" and record.slurm_job_id == job
    world = record.dist
    assert (world["launcher"], world["world_size"], world["local_world_size"], world["node_rank"], world["master_addr"]) \
        == ("slurm", 4, 2, 0, "n1")
    assert world["master_port"] == slurm_port(job, "0")  # the job's own port: two jobs never share one
    assert "probe loop: step 3/3" in log  # rank 0's progress as log lines, in the job's output
    assert (run / "slurm.out").resolve() == (REPO / "runs" / f"slurm-{job}.out").resolve()
    (REPO / "runs" / f"slurm-{job}.out").unlink()


def test_gpu_layouts_on_the_placeholder_gpus_are_said_in_one_line(slurm):
    """The local cluster's GPUs are placeholders, but SLURM sets CUDA_VISIBLE_DEVICES and SLURM_GPUS_ON_NODE as on a
    GPU cluster: the layout check (torch-free, a second per task) says each mistake from them on CPU."""
    import subprocess
    import sys

    from workshop.base.world import without_launcher

    def said(*options):
        env = without_launcher()
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        done = subprocess.run(["srun", "--nodes=1", "--ntasks-per-node=2", "--time=00:01:00", *options, sys.executable,
                               "-m", "workshop.launch.preflight"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)
        return done.returncode, sorted({line for line in done.stderr.splitlines() if not line.startswith("srun:")})

    node = re.compile(r"\bn[12]\b")  # whichever node SLURM gave the step
    rc, lines = said("--gpus-per-task=1")
    assert rc == 0 and len(lines) == 2 and all(node.sub("N", line).startswith(
        "warning: N: each of its 2 tasks sees one GPU (CUDA_VISIBLE_DEVICES=") for line in lines), lines
    rc, lines = said("--gpus-per-node=1")
    assert rc == 2 and [node.sub("N", line) for line in lines] == [
        "error: N runs 2 tasks but has 1 GPU(s) (CUDA_VISIBLE_DEVICES=0): local rank 1 would have none of its own; ask "
        "for one task per GPU, #SBATCH --ntasks-per-node=1 (or --gpus-per-node=2)"], lines
