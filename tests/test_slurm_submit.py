"""workshop.launch.slurm on a real SLURM (scripts/local_slurm.sh start): submit from what looks like a
JupyterLab kernel of a portal job, follow the job, open its result."""

import json

import pytest

from helpers import REPO
from workshop.launch import slurm as ws

pytestmark = pytest.mark.slurm
PROBE = "tests/notebooks/probe.ipynb"


@pytest.fixture
def portal_kernel(monkeypatch):
    """The environment of a kernel in JupyterLab that a portal started as a one-task SLURM job with
    8 CPUs. sbatch passes the environment on: without care, the job's ranks would see the portal
    job's CPU count and its Jupyter session (and show progress bars in the job's log)."""
    for key, value in {"SLURM_JOB_ID": "88", "SLURM_JOB_NAME": "sys/dashboard/jupyter", "SLURM_NTASKS": "1",
                       "SLURM_CPUS_PER_TASK": "8", "SLURM_JOB_NODELIST": "n1", "SLURM_NODELIST": "n1",
                       "JPY_SESSION_NAME": str(REPO / "notebooks" / "05_ddp.ipynb")}.items():
        monkeypatch.setenv(key, value)


def test_submit_follow_and_open_from_a_portal_kernel(slurm, runs, portal_kernel, tmp_path, capsys):
    # a notebook saved with submit = True: the job must not submit it again
    nb = json.loads((REPO / PROBE).read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    cell["source"] = "".join(cell["source"]).replace("submit = False", "submit = True")
    saved = tmp_path / "probe.ipynb"
    saved.write_text(json.dumps(nb))

    job, run = ws.submit(saved, nodes=2, ntasks_per_node=1, time="00:05:00", params={"steps": 3})
    assert run == runs / f"job{job}-probe"
    assert ws.status(job) in ws.ACTIVE | {"COMPLETED"}
    assert ws.wait(job, timeout=600, poll_s=2) == "COMPLETED"
    assert ws.status(job) == "COMPLETED"  # squeue still remembers it (no accounting here)

    result = ws.open_result(job)
    shown = capsys.readouterr().out
    assert f"submitted job {job}" in shown and "executed notebook:" in shown and "status ok, 2 rank(s)" in shown
    assert result.notebook == run / "probe.ipynb" and result.notebook.is_file()
    assert result.record["params"] == {"steps": 3, "submit": False} and result.record["slurm_job_id"] == job
    facts = [json.loads((run / f"facts_rank{r}.json").read_text()) for r in range(2)]
    assert [f["world_size"] for f in facts] == [2, 2]  # srun's two tasks, not the portal's one
    assert all(f["slurm_cpus_per_task"] is None and f["jpy_session"] is None and not f["interactive"] for f in facts)
    log = REPO / "runs" / f"slurm-{job}.out"
    assert "probe loop: step 3/3" in log.read_text()  # a log line, no progress bar
    log.unlink()


def test_bad_input_is_refused_before_the_queue(slurm, runs):
    with pytest.raises(ws.SlurmError, match="has no parameter 'stepz'"):
        ws.submit(PROBE, params={"stepz": 3})
    with pytest.raises(ws.SlurmError, match="sbatch refused the job: .*partition"):
        ws.submit(PROBE, partition="no-such-partition")
    assert not runs.exists() or not any(runs.iterdir())
