"""The SLURM path on a real SLURM (scripts/local_slurm.sh start): sbatch scripts/run_notebook.sh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slurm


def sbatch(runs, *args, timeout=600):
    """Submit from the repository's root with this interpreter and wait for the job to end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(WORKSHOP_PYTHON=sys.executable, WORKSHOP_RUNS=str(runs), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    out = subprocess.run(["sbatch", "--parsable", "--wait", "--time=00:10:00", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    job = out.stdout.strip().split(";")[0]
    log = REPO / "runs" / f"slurm-{job}.out"
    text = log.read_text() if log.exists() else out.stderr
    return out.returncode, job, text


def sbatch_two_by_two(runs, notebook, *args):
    """`notebook` as 2 nodes x 2 ranks on the local cluster, which must succeed: (its run folder,
    rank 0's executed notebook as text, the node of each rank in rank order)."""
    rc, job, log = sbatch(runs, "--nodes=2", "--ntasks-per-node=2", "scripts/run_notebook.sh", notebook, *args)
    assert rc == 0, log[-4000:]
    stem = Path(notebook).stem
    run = runs / f"job{job}-{stem}"
    nodes = [json.loads((run / "logs" / f"rank{r}.status.json").read_text())["node"] for r in range(4)]
    (REPO / "runs" / f"slurm-{job}.out").unlink()
    return run, (run / f"{stem}.ipynb").read_text(), nodes


def test_notebook_01_on_two_nodes(slurm, runs):
    rc, job, log = sbatch(runs, "--nodes=2", "--ntasks-per-node=1", "scripts/run_notebook.sh", "notebooks/01_baseline.ipynb",
                          "-p", "epochs", "1", "-p", "num_train", "512", "-p", "num_test", "256", "-p", "profile_steps", "2")
    assert rc == 0, log[-4000:]
    run = runs / f"job{job}-01_baseline"
    assert (run / "01_baseline.ipynb").is_file() and (run / "ranks" / "01_baseline.rank1.ipynb").is_file()
    nodes = [json.loads((run / "logs" / f"rank{r}.status.json").read_text())["node"] for r in range(2)]
    assert sorted(nodes) == ["n1", "n2"]  # one rank per node
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "ok" and record["slurm_job_id"] == job
    assert (record["dist"]["launcher"], record["dist"]["world_size"], record["dist"]["master_addr"]) == ("slurm", 2, "n1")
    assert (run / "slurm.out").resolve() == (REPO / "runs" / f"slurm-{job}.out").resolve()
    (REPO / "runs" / f"slurm-{job}.out").unlink()


def test_a_failing_rank_fails_the_job(slurm, runs):
    rc, job, log = sbatch(runs, "--nodes=2", "--ntasks-per-node=1", "scripts/run_notebook.sh",
                          "tests/notebooks/fail_on_rank.ipynb", "-p", "fail_rank", "1", timeout=300)
    assert rc != 0
    assert "rank 1 on n2 failed in cell In [4]" in log and "fails on purpose" in log
    record = json.loads((runs / f"job{job}-fail_on_rank" / "record.json").read_text())
    assert record["status"] == "failed"
    (REPO / "runs" / f"slurm-{job}.out").unlink()
