"""The launcher's run folders and ranks without processes: which folder a requeued job continues in, what a resumed run
keeps, what a run folder may hold of the environment, and the process tree a rank stops."""

import json
import os
import re
import socket
import subprocess
import time

import pytest

from helpers import REPO
from workshop.base import records, runs
from workshop.base.runs import RunError
from workshop.launch import ranks, rundir, runner

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
    assert rundir.requeued_run(NB, tmp_path) is None  # the first start of job 42
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert rundir.requeued_run(NB, tmp_path) == unfinished
    (unfinished / "record.json").unlink()  # killed before it wrote a record (a node failed)
    assert rundir.requeued_run(NB, tmp_path) == unfinished


def test_resuming_moves_the_earlier_attempt_aside_and_keeps_checkpoints(tmp_path):
    run = make_run(tmp_path, "r", "interrupted", ["-p", "steps", "2"])
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step1.pt").write_text("x")
    assert rundir.reuse_run_dir(run, NB, ["-p", "steps", "2"]) == run.resolve()
    assert (run / "attempt1" / "logs" / "rank0.log").read_text() == "first attempt\n"
    assert records.read(run / "attempt1" / "record.json").status == "interrupted"
    assert not (run / "record.json").exists() and (run / "checkpoints" / "step1.pt").exists()
    assert json.loads((run / "run.json").read_text())["attempts"] == 2
    with pytest.raises(RunError, match="was started with the parameters -p steps 2, not -p steps 3"):
        rundir.reuse_run_dir(run, NB, ["-p", "steps", "3"])


def test_only_launcher_and_workshop_variables_and_no_secrets():
    env = {"SLURM_JOB_ID": "7", "WORKSHOP_RUNS": "r", "RANK": "0", "MASTER_ADDR": "n1", "HOME": "/home/x",
           "GITHUB_TOKEN": "t", "WORKSHOP_API_KEY": "k", "SLURM_AUTH": "a", "AWS_SECRET_ACCESS_KEY": "s", "PASSWORD": "p"}
    assert rundir.safe_environment(env) == {"MASTER_ADDR": "n1", "RANK": "0", "SLURM_JOB_ID": "7", "WORKSHOP_RUNS": "r"}


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
    assert ranks.slurm_threads(env) == threads


def test_terminate_tree_reaches_a_grandchild_in_its_own_session():
    # like papermill's kernel: started in a session of its own, out of reach of a process-group signal
    parent = subprocess.Popen(["bash", "-c", "setsid sleep 300 & wait"])
    time.sleep(0.5)
    kids = ranks.descendants(parent.pid)
    assert kids
    ranks.terminate_tree(parent.pid, grace_s=5)
    parent.wait(timeout=10)
    for kid in kids:
        assert not kid.is_running() or kid.status() == "zombie"


def test_run_folders_are_named_once_and_found_by_notebook_and_job(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKSHOP_RUNS", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert runs.new_run_dir("05_ddp").name == "job42-05_ddp" and runs.new_run_dir("05_ddp").name == "job42-05_ddp-2"
    monkeypatch.delenv("SLURM_JOB_ID")
    timed = runs.new_run_dir("05_ddp")
    assert re.fullmatch(runs.TIME_PATTERN + "-05_ddp", timed.name)
    assert runs.run_name("05_ddp", started="abc") == "abc-05_ddp"
    (tmp_path / f"sweep-{timed.name}").mkdir()  # a sweep's folder, named after a run's: not a run
    (tmp_path / "job42-05_ddp_other").mkdir()  # another notebook
    assert [p.name for p in runs.find_runs("05_ddp")] == sorted([timed.name, "job42-05_ddp", "job42-05_ddp-2"])
    assert [p.name for p in runs.find_runs("05_ddp", "42")] == ["job42-05_ddp", "job42-05_ddp-2"]
    assert [p.name for p in runs.find_runs(job_id="42")] == ["job42-05_ddp", "job42-05_ddp-2", "job42-05_ddp_other"]
    assert runs.find_runs(job_id="4") == []


@pytest.mark.parametrize("argv, parsed", [
    (["--nproc", "2", "nb.ipynb", "-p", "a", "1"], (2, None, "nb.ipynb", ["-p", "a", "1"])),
    (["--nproc=3", "--resume", "r", "nb.ipynb"], (3, "r", "nb.ipynb", [])),
    (["nb.ipynb"], (None, None, "nb.ipynb", [])),
])
def test_the_launchers_options_are_read_once_with_the_rank_count_a_number(argv, parsed):
    assert runner.parse_launch(argv) == parsed


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_rank_count_that_is_not_a_positive_integer_is_refused_where_it_is_read(value):
    with pytest.raises(RunError, match=f"the number of ranks must be a positive integer, got '{value}'"):
        runner.parse_launch(["--nproc", value, "nb.ipynb"])


# --- a node lost -------------------------------------------------------------------------------------------------

def lost_run(root, nranks=4):
    """A run of 4 ranks on n1 and n2 whose n2 died: ranks 2 and 3 left only where they started; 0 and 1 were stopped."""
    run = make_run(root, "job7-fail_on_rank", "running")
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "nranks": nranks, "slurm_job_id": "7"}))
    for rank in range(nranks):
        node = "n1" if rank < 2 else "n2"
        rundir.started_path(run, rank).write_text(json.dumps({"rank": rank, "node": node, "started": "t"}))
        if node == "n1":
            rundir.status_path(run, rank).write_text(json.dumps(
                {"rank": rank, "node": node, "returncode": -15, "notebook": f"nb{rank}", "ended_s": rank,
                 "stopped_by": "SIGTERM", "error": "stopped by SIGTERM (another rank failed, or the job was cancelled)"}))
    return run


def test_a_lost_node_is_named_with_every_rank_it_ran_and_the_command_that_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2(x2)")
    monkeypatch.setattr(rundir, "_node_state", lambda node: ", which SLURM marks DOWN*" if node == "n2" else "")
    run = lost_run(tmp_path)
    assert rundir.collect(run, 1) == 1
    reason = records.read(run / "record.json").reason
    assert reason[0].startswith("node n2, which SLURM marks DOWN* was lost: ranks 2 and 3, every rank it ran, ended "
                                "together without a word")
    assert not any(r.startswith("rank 2") or r.startswith("rank 3") for r in reason)  # said once, as the node's
    assert reason[1].startswith("rank 0 on n1 was stopped by SIGTERM")  # stopped, not a cause: not "first"
    assert reason[-1] == (f"resume with: sbatch --nodes=2 --ntasks-per-node=2 --exclude=n2 [your other options] "
                          f"scripts/run_notebook.sh --resume {run} tests/notebooks/fail_on_rank.ipynb")
    assert records.read(run / "record.json").extra["lost_nodes"] == {"n2": [2, 3]}
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].strip() == reason[-1] and "node n2" in err[1]


def test_a_rank_alone_that_ended_without_a_word_is_not_a_lost_node(tmp_path, clean_env):
    run = lost_run(tmp_path)
    rundir.status_path(run, 3).write_text(json.dumps({"rank": 3, "node": "n2", "returncode": 1, "notebook": "nb3"}))
    assert rundir.lost_nodes(rundir._all_statuses(run, 4)) == {}
    assert rundir.collect(run, 1) == 1
    reason = records.read(run / "record.json").reason
    assert reason[0].startswith("rank 2 on n2 did not finish") and not any("resume with" in r for r in reason)


def test_a_run_that_another_live_launcher_writes_is_not_resumed(tmp_path, clean_env):
    run = make_run(tmp_path, "r", "interrupted")
    other = subprocess.Popen(["sleep", "60"])
    try:
        records.write(run, records.Record(notebook=NB.stem, status="running",
                                          extra={"launcher": {"host": socket.gethostname(), "pid": other.pid}}))
        assert rundir.live_writer(run) == f"its launcher, pid {other.pid} on {socket.gethostname()}, is running; " \
                                          f"kill -INT {other.pid} stops it"
        with pytest.raises(RunError, match="is being written by another run now: two runs must not write one"):
            rundir.reuse_run_dir(run, NB, [])
    finally:
        other.kill()
        other.wait()
    assert rundir.live_writer(run) is None  # its launcher gone (killed with its node, say): resumable


def test_a_notebook_that_reshards_resumes_on_another_number_of_ranks_and_the_run_keeps_both_worlds(tmp_path, clean_env):
    run = make_run(tmp_path, "r", "failed")  # ran as 2 ranks
    with pytest.raises(RunError, match=r"ran as 2 rank\(s\), not 1: resume with the same number of ranks \(fail_on_rank"
                                       r".ipynb does not declare"):
        rundir.reuse_run_dir(run, NB, [], nranks=1)
    nb = json.loads(NB.read_text())
    nb["metadata"]["workshop"] = {"reshards": "DCP checkpoints; batches by global sample index"}
    elastic = tmp_path / NB.name
    elastic.write_text(json.dumps(nb))
    (run / "run.json").write_text(json.dumps({**json.loads((run / "run.json").read_text()), "notebook": str(elastic)}))
    assert rundir.reuse_run_dir(run, elastic, [], nranks=1) == run.resolve()
    meta = rundir.read_meta(run)
    assert meta["nranks"] == 1 and meta["worlds"] == [{"attempt": 1, "nranks": 2}, {"attempt": 2, "nranks": 1}]
    # the resumed attempt ends well: the notebook's own record keeps both worlds too
    (run / "logs").mkdir()
    rundir.status_path(run, 0).write_text(json.dumps({"rank": 0, "node": "n1", "returncode": 0, "notebook": "nb0"}))
    records.write(run, records.Record(notebook=NB.stem, status="ok"))
    assert rundir.collect(run, 0) == 0
    assert records.read(run).extra["worlds"] == meta["worlds"]


def test_every_lesson_restarts_on_the_nodes_left(tmp_path, clean_env, monkeypatch, capsys):
    """A lesson reads nothing an earlier attempt left: its run lost on 2 nodes x 2 ranks resumes on the node left."""
    lessons = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert len(lessons) >= 13
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2(x2)")
    for lesson in lessons:
        assert rundir.reshards(lesson) == rundir.RESTARTS, lesson.name
        run = tmp_path / lesson.stem
        (run / "logs").mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"notebook": str(lesson), "nranks": 4, "papermill_args": [],
                                                  "slurm_job_id": "7"}))
        records.write(run, records.Record(notebook=lesson.stem, status="failed"))
        assert rundir.resume_command(run, rundir.read_meta(run), exclude=["n2"]).startswith(
            "sbatch --nodes=1 --ntasks-per-node=2 --exclude=n2 ")
        assert rundir.reuse_run_dir(run, lesson, [], nranks=2) == run.resolve()
        assert rundir.read_meta(run)["worlds"] == [{"attempt": 1, "nranks": 4}, {"attempt": 2, "nranks": 2}]
        assert f"on 2 rank(s), where it ran on 4: {lesson.name} says it keeps no state" in capsys.readouterr().err
