"""workshop.launch.runner without processes: which folder a requeued job continues in, what a resumed run
keeps, what a run folder may hold of the environment, and the process tree a rank stops."""

import json
import os
import subprocess
import time

import pytest

from helpers import REPO
from workshop.base import records
from workshop.launch import runner

NB = REPO / "tests" / "notebooks" / "fail_on_rank.ipynb"


def make_run(root, name, status=None, args=()):
    run = root / name
    (run / "logs").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"notebook": str(NB), "nranks": 2, "papermill_args": list(args)}))
    (run / "logs" / "rank0.log").write_text("first attempt\n")
    (run / "fail_on_rank.ipynb").write_text("{}")
    if status:
        records.write(run, records.Record(notebook=NB.stem, status=status))
    return run


def test_a_requeued_job_continues_in_its_unfinished_folder(tmp_path, monkeypatch, clean_env):
    done = make_run(tmp_path, "job42-fail_on_rank", "ok")
    unfinished = make_run(tmp_path, "job42-fail_on_rank-2", "interrupted")
    older = make_run(tmp_path, "job42-fail_on_rank-1", "failed")
    make_run(tmp_path, "job43-fail_on_rank", "interrupted")
    now = time.time()
    for run, age_s in ((older, 120), (unfinished, 60), (done, 0)):  # job 42's newest folder is ok: never continued
        os.utime(run, (now - age_s, now - age_s))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert runner.requeued_run(NB, tmp_path) is None  # the first start of job 42
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert runner.requeued_run(NB, tmp_path) == unfinished
    (unfinished / "record.json").unlink()  # killed before it wrote a record (a node failed)
    assert runner.requeued_run(NB, tmp_path) == unfinished


def test_resuming_moves_the_earlier_attempt_aside_and_keeps_checkpoints(tmp_path):
    run = make_run(tmp_path, "r", "interrupted", ["-p", "steps", "2"])
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step1.pt").write_text("x")
    assert runner.reuse_run_dir(run, NB, ["-p", "steps", "2"]) == run.resolve()
    assert (run / "attempt1" / "logs" / "rank0.log").read_text() == "first attempt\n"
    assert records.read(run / "attempt1" / "record.json").status == "interrupted"
    assert not (run / "record.json").exists() and (run / "checkpoints" / "step1.pt").exists()
    assert json.loads((run / "run.json").read_text())["attempts"] == 2
    with pytest.raises(runner.RunError, match="was started with the parameters -p steps 2, not -p steps 3"):
        runner.reuse_run_dir(run, NB, ["-p", "steps", "3"])


def test_only_launcher_and_workshop_variables_and_no_secrets():
    env = {"SLURM_JOB_ID": "7", "WORKSHOP_RUNS": "r", "RANK": "0", "MASTER_ADDR": "n1", "HOME": "/home/x",
           "GITHUB_TOKEN": "t", "WORKSHOP_API_KEY": "k", "SLURM_AUTH": "a", "AWS_SECRET_ACCESS_KEY": "s", "PASSWORD": "p"}
    assert runner.safe_environment(env) == {"MASTER_ADDR": "n1", "RANK": "0", "SLURM_JOB_ID": "7", "WORKSHOP_RUNS": "r"}


@pytest.mark.parametrize("env, threads", [
    ({}, None),  # not a SLURM job: torch's default (torchrun sets its own)
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "8", "OMP_NUM_THREADS": "3"}, None),  # the user's choice stands
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "4"}, "4"),  # --cpus-per-task
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "1"}, "1"),  # the batch step: an array task on one CPU
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "2", "SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
      "SLURM_NODEID": "1"}, "1"),  # srun, 2 tasks on each node's 2 CPUs (the local cluster)
    ({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "64", "SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4(x2),2",
      "SLURM_NODEID": "2"}, "32"),  # the third node runs 2 of the step's tasks
])
def test_a_slurm_task_runs_its_share_of_the_cpus_as_threads(env, threads):
    assert runner.slurm_threads(env) == threads


def test_terminate_tree_reaches_a_grandchild_in_its_own_session():
    # like papermill's kernel: started in a session of its own, out of reach of a process-group signal
    parent = subprocess.Popen(["bash", "-c", "setsid sleep 300 & wait"])
    time.sleep(0.5)
    kids = runner.descendants(parent.pid)
    assert kids
    runner.terminate_tree(parent.pid, grace_s=5)
    parent.wait(timeout=10)
    for kid in kids:
        assert not kid.is_running() or kid.status() == "zombie"
