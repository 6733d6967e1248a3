"""Reliability, on local ranks and on the local SLURM cluster: a rank that fails ends every process in bounded time,
and so does a node lost on SLURM (every process of its tasks killed), which is named, and the run resumes on the node
left with the losses of an uninterrupted run; a run interrupted by SIGUSR1 (the time-limit warning) resumes in its own
folder to the weights of an uninterrupted run (on SLURM: a job beside it, so two jobs share the nodes at once); run
folders on a shared cluster (mode, no secrets). Times are printed (pytest -s); the bound of 90 s is the requirement."""

import filecmp
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from helpers import REPO, RUN_NOTEBOOK, run_notebook, slurm_env
from workshop import reshard
from workshop.base import records
from workshop.base import runs as runs_module
from workshop.measure import report

FAIL = "tests/notebooks/fail_on_rank.ipynb"
RESUME = "tests/notebooks/resume_training.ipynb"
RESUME_ARGS = ["-p", "steps", "12", "-p", "checkpoint_every", "4"]
BOUND_S = 90  # every process ends within this many seconds of a fault


def only_run(runs):
    folders = [p for p in runs.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def leftover(run: Path) -> list[str]:
    """Processes that still mention the run: its launcher, its ranks and their papermill. By the whole path: two
    tests' runs of one notebook started in the same second have the same folder name."""
    out = subprocess.run(["pgrep", "-af", str(run)], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


def ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def final_weights(run: Path) -> dict:
    return torch.load(run / "final.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


# --- a rank fails -------------------------------------------------------------------------------

@pytest.mark.multirank
@pytest.mark.parametrize("how", ["raise", "kill", "exit", "hang"])
def test_a_failing_rank_ends_every_process_in_bounded_time(runs, monkeypatch, how):
    monkeypatch.setenv("WORKSHOP_DIST_TIMEOUT", "12")  # how long rank 0 waits for a rank that hangs
    out = run_notebook("--nproc", 2, FAIL, "-p", "fail_rank", "1", "-p", "how", how, timeout=400)
    ended = time.time()
    run = only_run(runs)
    fault = json.loads((run / "fault.rank1.json").read_text())["time"]
    print(f"\n{how}: every process ended {ended - fault:.1f} s after the fault")
    assert out.returncode == 1
    assert ended - fault < BOUND_S
    assert leftover(run) == []
    assert f"RUN FAILED: {run}" in out.stderr and "cell In [4]" in out.stderr
    if how == "hang":  # the rank that waited times out first; the one that hangs is stopped
        assert "rank 0 on" in out.stderr and "Timed out" in out.stderr and "rank 1 on" in out.stderr
        assert "was stopped by SIGTERM" in out.stderr
    else:
        cause = "fails on purpose" if how == "raise" else "the kernel died"
        assert any(line.strip().startswith("rank 1 on") and cause in line for line in out.stderr.splitlines()), out.stderr
    assert str(run / "ranks" / "fail_on_rank.rank1.ipynb") in out.stderr
    record = records.read(run / "record.json")
    assert record.status == "failed" and any("rank 1" in r for r in record.reason)


# --- interrupted and resumed ----------------------------------------------------------------------

def start_run_notebook(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(WORKSHOP_PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    return subprocess.Popen(["bash", str(RUN_NOTEBOOK), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(runs: Path, step: int, timeout_s: float = 400, pattern: str = "*") -> Path:
    """The run folder, once rank 0's log shows `step`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for log in runs.glob(f"{pattern}/logs/rank0.log"):
            if f"step {step} loss" in log.read_text(errors="replace"):
                return log.parent.parent
        time.sleep(0.5)
    raise AssertionError(f"no rank reached step {step} in {timeout_s} s")


def stopped_at(run: Path, lightning: bool) -> int:
    """The step of the newest checkpoint in the run folder."""
    if lightning:
        return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    return int(sorted((run / "checkpoints").glob("step*.pt"), key=lambda p: int(p.stem[4:]))[-1].stem[4:])


@pytest.mark.multirank
def test_an_interrupted_run_resumes_in_its_folder_to_the_same_weights(tmp_path, monkeypatch):
    """Resumed by hand (--resume), with Lightning's checkpoints, to the weights of an uninterrupted run; the plain
    loop's checkpoints resume in the SLURM requeue test below, through the same launcher code."""
    lightning = True
    resume_args = [*RESUME_ARGS, "-p", "lightning", str(lightning)]
    uninterrupted = tmp_path / "uninterrupted"
    out = run_notebook("--nproc", 2, RESUME, *resume_args, env={**os.environ, "WORKSHOP_RUNS": str(uninterrupted)})
    assert out.returncode == 0, out.stderr[-3000:]
    reference = final_weights(only_run(uninterrupted))
    runs = tmp_path / "runs"
    monkeypatch.setenv("WORKSHOP_RUNS", str(runs))
    args = [*resume_args, "-p", "step_sleep_s", "0.5"]
    proc = start_run_notebook("--nproc", 2, RESUME, *args)
    run = wait_for_step(runs, 2)
    proc.send_signal(signal.SIGUSR1)  # what SLURM sends before the time limit
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    record = records.read(run / "record.json")
    assert record.status == "interrupted" and record.extra["checkpointed"], record
    assert "RUN INTERRUPTED" in err and f"--resume {run}" in err
    stopped = stopped_at(run, lightning)
    assert 2 <= stopped < 12
    assert leftover(run) == []

    out = run_notebook("--nproc", 2, "--resume", run, RESUME, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert only_run(runs) == run  # the same folder
    record = records.read(run / "record.json")
    assert record.status == "ok" and record.results["start_step"] == stopped
    assert records.read(run / "attempt1" / "record.json").status == "interrupted"  # kept
    assert (run / "attempt1" / "logs" / "rank0.log").is_file()
    assert_same_weights(final_weights(run), reference)


@pytest.mark.multirank
def test_ctrl_c_records_an_interrupted_run_and_ends_every_process(runs):
    """Ctrl-C in a terminal: SIGINT to the whole foreground process group."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(WORKSHOP_PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    proc = subprocess.Popen(["bash", str(RUN_NOTEBOOK), "--nproc", "2", RESUME, *RESUME_ARGS, "-p", "step_sleep_s", "0.5"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # its own process group, as a terminal's foreground job
                            # and SIGINT at its default, as in a terminal: a test run started in the background
                            # inherits it ignored, and bash cannot trap a signal ignored when it started
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run = wait_for_step(runs, 2)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.time()
    _, err = proc.communicate(timeout=300)
    print(f"\nCtrl-C: every process ended {time.time() - sent:.1f} s after it")
    assert proc.returncode == 3, err[-3000:]
    record = records.read(run / "record.json")
    assert record.status == "interrupted" and record.reason[0].startswith("SIGINT (stopped by the user"), record
    assert "RUN INTERRUPTED" in err
    assert leftover(run) == []


def test_a_run_killed_with_sigkill_is_reported_incomplete(runs):
    """SIGKILL to the launcher and every process below it at once (a node that fails, the OOM killer taking the
    job): nobody can write a final record, so the launcher's first one stays, and the report says incomplete."""
    proc = start_run_notebook(RESUME, *RESUME_ARGS, "-p", "step_sleep_s", "0.5")
    run = wait_for_step(runs, 2)
    assert records.read(run / "record.json").status == "running"
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 30  # a killed process takes a moment to end (and, orphaned, to be reaped)
    while not all(map(ended, tree)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftover(run) == []
    (found,) = report.find_runs(runs)
    assert found.status == "incomplete" and "killed with SIGKILL" in found.reason
    assert "INCOMPLETE" in report.summary(report.build(runs, sacct=None))


# --- run folders on a shared cluster --------------------------------------------------------------

def test_run_folders_are_private_and_hold_no_secrets(runs, monkeypatch):
    secret = "s3cr3t-value-do-not-copy"
    for name in ("MY_API_TOKEN", "WORKSHOP_SECRET_KEY", "DB_PASSWORD", "SLURM_AUTH_INFO"):
        monkeypatch.setenv(name, secret)
    monkeypatch.setenv("WORKSHOP_NOTE", "kept")
    assert run_notebook(FAIL).returncode == 0
    run = only_run(runs)
    assert run.stat().st_mode & 0o777 == 0o700
    for path in run.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path
    environment = json.loads((run / "run.json").read_text())["environment"]
    assert environment["WORKSHOP_NOTE"] == "kept" and "WORKSHOP_RUNS" in environment
    # the launcher made that folder with runs.new_run_dir; the group may read where $WORKSHOP_RUNS_MODE says so
    monkeypatch.setenv("WORKSHOP_RUNS_MODE", "750")
    old = os.umask(0o077)  # the mode asked for, whatever the umask
    try:
        shared = runs_module.new_run_dir("fail_on_rank", runs)
    finally:
        os.umask(old)
    assert shared.stat().st_mode & 0o777 == 0o750 and shared != run


# --- on the local SLURM cluster ---------------------------------------------------------------------

def submit(runs, *args):
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=slurm_env(runs), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def wait_gone(job: str, timeout_s: float) -> float:
    """Wait until the job has left the queue (requeues included); the time it left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
        if out.returncode == 0 and not out.stdout.strip():
            return time.time()
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} still queued after {timeout_s} s")


def node_tasks(job: str, node: str) -> list[psutil.Process]:
    """Every process of `job`'s tasks on `node` (both nodes of the local cluster are this machine: SLURM's variables
    tell them apart), papermill and kernels included."""
    found = []
    for proc in psutil.process_iter():
        try:
            environ = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if environ.get("SLURM_JOB_ID") == job and environ.get("SLURMD_NODENAME") == node and "SLURM_STEP_ID" in environ:
            found.append(proc)
    return found


def step_losses(log: Path) -> dict[int, float]:
    """{step: the global batch's loss} of every step that a rank 0's log of the resume notebook shows."""
    return {int(step): float(loss) for step, loss in re.findall(r"^step (\d+) loss (\S+)\s*$", log.read_text(), re.M)}


LOST_STEPS, LOST_SAVED = 8, 4  # the killed run's steps and its first checkpoint; killed past it, before the second
LOST_ARGS = ["-p", "steps", str(LOST_STEPS), "-p", "checkpoint_every", str(LOST_SAVED), "-p", "step_sleep_s", "0.5"]


@pytest.mark.slurm
def test_on_slurm_a_lost_node_is_named_and_the_run_resumes_on_the_node_left(slurm, runs, tmp_path):
    """2 nodes x 2 tasks; past the first checkpoint, every process of n2's tasks killed at once (SIGKILL: the node
    died, or the out-of-memory killer took them). The job ends within the bound; its last lines and its record name
    n2, say that both of its ranks ended together, and end with the command that resumes the run on the node left.
    That command, run (1 node x 2 tasks), continues from the checkpoint with the losses of an uninterrupted run of 2
    ranks from the same checkpoint (2 local ranks, at the same time), and with the 4 ranks' losses of the steps they
    ran past it: each step trains on the same samples on any world. The record keeps both worlds."""
    began = time.monotonic()
    job = submit(runs, "--time=00:10:00", "--nodes=2", "--ntasks-per-node=2", "scripts/run_notebook.sh", RESUME,
                 *LOST_ARGS)
    run = wait_for_step(runs, LOST_SAVED, pattern=f"job{job}-*")  # its checkpoint written: its line comes after
    reference = tmp_path / "checkpoint"  # the same checkpoint, for 2 ranks never interrupted, started at once
    shutil.copytree(run / "checkpoints", reference)
    reference_run = subprocess.Popen(  # local ranks (slurm_env: no variable of a job), beside the job
        ["bash", str(RUN_NOTEBOOK), "--nproc", "2", RESUME, *LOST_ARGS, "-p", "checkpoint_dir", str(reference)],
        cwd=REPO, env=slurm_env(tmp_path / "reference"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(runs, LOST_SAVED + 1, pattern=f"job{job}-*")  # a step past the checkpoint: both worlds ran it
    killed = node_tasks(job, "n2")
    assert killed, "no process of n2's tasks found"
    for proc in killed:
        proc.kill()
    fault = time.time()
    ended = wait_gone(job, 300)
    print(f"\nSLURM, a lost node: the job left the queue {ended - fault:.1f} s after its tasks were killed")
    assert ended - fault < BOUND_S
    assert leftover(run) == []
    log = (REPO / "runs" / f"slurm-{job}.out").read_text()
    last = log.strip().splitlines()
    print("\n".join(last[-5:]))
    lost = "node n2 was lost: ranks 2 and 3, every rank it ran, ended together without a word"
    assert any(line.strip().startswith(lost) for line in last[-4:]), log[-3000:]
    command = f"scripts/run_notebook.sh --resume {run} {RESUME} {' '.join(LOST_ARGS)}"
    assert last[-1].strip() == "resume with: sbatch --nodes=1 --ntasks-per-node=2 --exclude=n2 [your other options] " \
                               + command, last[-4:]  # the notebook reshards: on the node left
    record = records.read(run / "record.json")
    assert record.status == "failed" and record.reason[0].startswith(lost)
    assert record.extra["lost_nodes"] == {"n2": [2, 3]}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step{LOST_SAVED}.pt"]
    assert filecmp.cmp(run / "checkpoints" / f"step{LOST_SAVED}.pt", reference / f"step{LOST_SAVED}.pt", shallow=False)

    resumed = submit(runs, "--time=00:10:00", *shlex.split(last[-1].strip().removeprefix("resume with: sbatch ")
                                                           .replace(" [your other options]", "")))
    _, err = reference_run.communicate(timeout=300)
    assert reference_run.returncode == 0, err[-3000:]
    wait_gone(resumed, 300)
    print(f"lost, resumed and compared in {time.monotonic() - began:.1f} s")
    record = records.read(run / "record.json")
    assert record.status == "ok" and record.slurm_job_id == resumed and record.dist["world_size"] == 2, record.reason
    assert record.results["start_step"] == LOST_SAVED
    assert record.extra["worlds"] == [{"attempt": 1, "nranks": 4}, {"attempt": 2, "nranks": 2}]
    after = step_losses(run / "logs" / "rank0.log")
    uninterrupted = step_losses(only_run(tmp_path / "reference") / "logs" / "rank0.log")
    on_four = {step: loss for step, loss in step_losses(run / "attempt1" / "logs" / "rank0.log").items()
               if step > LOST_SAVED}
    assert sorted(after) == sorted(uninterrupted) == list(range(LOST_SAVED + 1, LOST_STEPS + 1)), (after, uninterrupted)
    assert on_four and sorted(on_four) == list(range(LOST_SAVED + 1, max(on_four) + 1)), on_four
    for reference_losses in (uninterrupted, on_four):
        steps = sorted(reference_losses)
        torch.testing.assert_close(torch.tensor([after[s] for s in steps], dtype=torch.float64),
                                   torch.tensor([reference_losses[s] for s in steps], dtype=torch.float64),
                                   **reshard.TOLERANCE)
    assert leftover(run) == []
    for done in (job, resumed):
        (REPO / "runs" / f"slurm-{done}.out").unlink()


@pytest.mark.slurm
def test_on_slurm_two_jobs_at_once_and_the_one_warned_of_its_time_limit_requeues_to_the_others_weights(slurm, tmp_path):
    """Two jobs of the resume notebook (the plain loop) on the same two nodes at once: each its own rendezvous port;
    the one that SLURM warns of its time limit requeues, resumes in its folder, and ends with the weights of the one
    that was never interrupted."""
    runs = tmp_path / "runs"
    job_args = ["--time=00:10:00", "--nodes=2", "--ntasks-per-node=1", "scripts/run_notebook.sh", RESUME, *RESUME_ARGS,
                "-p", "step_sleep_s", "0.5"]
    warned = submit(runs, "--requeue", *job_args)
    plain = submit(runs, *job_args)
    run = wait_for_step(runs, 2, pattern=f"job{warned}-*")
    # what --signal=B:USR1@N makes SLURM send to the batch shell near the time limit
    subprocess.run(["scancel", "--batch", "--signal=USR1", warned], check=True)
    for job in (warned, plain):
        wait_gone(job, 900)
    log = (REPO / "runs" / f"slurm-{warned}.out").read_text()
    assert "RUN INTERRUPTED" in log and f"requeueing job {warned}" in log and "restart 1" in log, log[-3000:]
    other = runs / f"job{plain}-resume_training"
    assert sorted(p.name for p in runs.iterdir()) == sorted([run.name, other.name])  # the warned job: the same folder
    first = records.read(run / "attempt1" / "record.json")
    assert first.status == "interrupted" and first.extra["checkpointed"]
    record, reference = records.read(run / "record.json"), records.read(other / "record.json")
    assert record.status == "ok" and record.slurm_job_id == warned and 2 <= record.results["start_step"] < 12
    assert reference.status == "ok" and reference.results["start_step"] == 0, reference
    assert record.dist["master_port"] != reference.dist["master_port"]  # a job's port is its id's (both attempts)
    spans = [json.loads((folder / "logs" / "rank0.status.json").read_text()) for folder in (run / "attempt1", other)]
    print(f"\ntwo jobs {[warned, plain]}: ports {[record.dist['master_port'], reference.dist['master_port']]}, ran at once: "
          f"{max(s['started'] for s in spans) < min(s['ended'] for s in spans)}")
    assert_same_weights(final_weights(run), final_weights(other))
    for job in (warned, plain):
        (REPO / "runs" / f"slurm-{job}.out").unlink()
