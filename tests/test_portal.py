"""The cluster-portal path without a cluster: what a batch rank's kernel sees (node-local Jupyter and
IPython folders, log lines instead of bars, even when submitted from a JupyterLab kernel), and
workshop.launch.slurm's pieces that need no SLURM (the sbatch command, the job's environment, the states
read back where the cluster keeps no accounting, and a plain error where there is no sbatch)."""

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import REPO, run_notebook
from workshop.launch import options, ranks, slurm

PROBE = "tests/notebooks/probe.ipynb"


def test_rank_environment_is_node_local_and_batch(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "local"))
    (tmp_path / "local").mkdir()
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/student/workshop/notebooks/05_ddp.ipynb")
    monkeypatch.delenv("WORKSHOP_PROGRESS", raising=False)
    monkeypatch.delenv("WORKSHOP_LOG_EVERY", raising=False)
    env, tmp = ranks._rank_environment(tmp_path / "run", 3)
    assert tmp.parent == tmp_path / "local" and "rank3" in tmp.name
    for key in ("JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        assert Path(env[key]).parent == tmp
    spec = json.loads((tmp / "jupyter" / "kernels" / ranks.KERNEL / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable  # this environment, whatever kernels are registered
    assert env["JUPYTER_PATH"].split(os.pathsep)[0] == str(tmp / "jupyter")
    assert "JPY_SESSION_NAME" not in env and env["WORKSHOP_PROGRESS"] == "log" and env["WORKSHOP_LOG_EVERY"] == "50"


def test_a_rank_keeps_nothing_in_the_home_folder(runs, monkeypatch, tmp_path):
    """A shared home folder (NFS) breaks IPython's sqlite history and Jupyter's sockets: a rank's
    kernel keeps them in node-local temporary folders, removed when the rank ends. Submitted from a
    JupyterLab kernel (JPY_SESSION_NAME passed on by sbatch), the run still logs lines, no bars."""
    home, local = tmp_path / "home", tmp_path / "local"
    home.mkdir()
    local.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(local))
    # tempfile caches the first temporary folder it finds: one found under this TMPDIR must not outlive the test (a
    # W&B run started later in this process lost its logged steps to it)
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("JPY_SESSION_NAME", str(home / "notebooks" / "probe.ipynb"))
    for key in ("IPYTHONDIR", "JUPYTER_RUNTIME_DIR", "WORKSHOP_PROGRESS", "WORKSHOP_LOG_EVERY"):
        monkeypatch.delenv(key, raising=False)
    out = run_notebook(PROBE, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    facts = json.loads((run / "facts_rank0.json").read_text())
    for key in ("runtime_dir", "ipython_dir", "connection_file"):
        assert Path(facts[key]).is_relative_to(local), (key, facts[key])
    assert facts["python"] == sys.executable and facts["jpy_session"] is None and facts["interactive"] is False
    assert "probe loop: step 5/5" in out.stdout  # the log line of a batch run, in the job's output
    assert not list(local.glob("workshop-*"))  # the rank's folders, removed with the rank
    assert not (home / ".ipython").exists() and not (home / ".local" / "share" / "jupyter" / "runtime").exists()


# --- workshop.launch.slurm without SLURM ---------------------------------------------------------------------

def test_parameters_keep_their_python_types():
    assert slurm.papermill_args({"link": "ib-ndr-400", "steps": 8, "lr": 0.05, "submit": False, "seed": None,
                                 "sizes": [1, 2]}) == [
        "-r", "link", "ib-ndr-400", "-p", "steps", "8", "-p", "lr", "0.05", "-p", "submit", "False",
        "-p", "seed", "None", "-y", '{"sizes": [1, 2]}']
    assert options.parameter_values(slurm.papermill_args({"a": "x", "b": 1, "c": {"d": 1}})) == {"a": "x", "b": 1, "c": {"d": 1}}


def test_sbatch_command_is_relative_to_the_repository():
    cmd = slurm.sbatch_command(REPO / "notebooks" / "05_ddp.ipynb", nodes=2, ntasks_per_node=4, gpus_per_node=4,
                               time="00:30:00", partition="gpu", params={"link": "ib-ndr-400"},
                               extra=["--account=ACCOUNT"])
    assert cmd == ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=00:30:00",
                   "--partition=gpu", "--account=ACCOUNT", "scripts/run_notebook.sh", "notebooks/05_ddp.ipynb",
                   "-r", "link", "ib-ndr-400"]
    assert slurm.shell_command("05_ddp", nodes=2, params={"link": "a b"}) == (
        "sbatch --nodes=2 --ntasks-per-node=1 scripts/run_notebook.sh notebooks/05_ddp.ipynb -r link 'a b' -p submit False")
    with pytest.raises(slurm.SlurmError, match="nodes must be a whole number >= 1"):
        slurm.sbatch_command(REPO / "notebooks" / "05_ddp.ipynb", nodes=0)


def test_offer_without_submit_shows_the_command(capsys):
    assert slurm.offer("06_sharding.ipynb", False, nodes=2, ntasks_per_node=2) is None
    out = capsys.readouterr().out.splitlines()
    assert out == ["submit = False, nothing submitted. With submit = True this cell runs, from the repository's root:",
                   "  sbatch --nodes=2 --ntasks-per-node=2 scripts/run_notebook.sh notebooks/06_sharding.ipynb -p submit False"]


def test_offer_wraps_a_long_command_into_lines_a_shell_reads_as_one(capsys):
    params = {"lrs": "0.01,0.03,0.1,0.3", "batch_sizes": "64", "note": "a b", "sizes": [1, 2, 3]}
    sizes = dict(nodes=2, ntasks_per_node=4, gpus_per_node=4, time="00:30:00", partition="gpu",
                 extra=["--account=ACCOUNT", "--cpus-per-task=16"])
    assert slurm.offer("03_task_parallelism.ipynb", False, params=params, **sizes) is None
    shown = capsys.readouterr().out.splitlines()[1:]
    assert len(shown) > 1 and max(map(len, shown)) <= slurm.WIDTH
    assert all(line.endswith(" \\") for line in shown[:-1]) and not shown[-1].endswith("\\")
    assert all(line.startswith("      ") for line in shown[1:])  # indented under the first
    assert any("-y '{\"sizes\": [1, 2, 3]}'" in line for line in shown)  # an option stays with its value
    # bash reads the lines as one command: the same words as the one-line form
    words = subprocess.run(["bash", "-c", "\n".join(shown).replace("sbatch", "printf '%s\\0'", 1)],
                           capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    nb = slurm.find_notebook("03_task_parallelism.ipynb")
    assert ["sbatch", *words] == slurm.sbatch_command(nb, parsable=False, params=slurm.job_params(nb, params), **sizes)
    # a word longer than a line: a line of its own, the command still whole
    assert slurm.command_lines(["echo", "x" * 200, "y"]).splitlines() == ["echo \\", "    " + "x" * 200 + " \\", "    y"]


def test_notebooks_are_found_from_a_notebooks_folder_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert slurm.find_notebook("05_ddp.ipynb") == REPO / "notebooks" / "05_ddp.ipynb"
    assert slurm.find_notebook("notebooks/05_ddp") == REPO / "notebooks" / "05_ddp.ipynb"
    with pytest.raises(slurm.SlurmError, match="no notebook 99_none.ipynb"):
        slurm.find_notebook("99_none.ipynb")


def test_the_job_does_not_inherit_a_portal_jobs_slurm_variables(monkeypatch):
    for key, value in {"SLURM_JOB_ID": "88", "SLURM_NTASKS": "1", "SLURM_CPUS_PER_TASK": "8", "SLURMD_NODENAME": "n1",
                       "JPY_SESSION_NAME": "x.ipynb", "SBATCH_ACCOUNT": "proj", "WORKSHOP_PYTHON": ""}.items():
        monkeypatch.setenv(key, value)
    env = slurm.job_environment()
    assert not [k for k in env if k.startswith(("SLURM", "JPY_"))]
    assert env["SBATCH_ACCOUNT"] == "proj"  # the user's own sbatch defaults stay
    assert env["WORKSHOP_PYTHON"] == sys.executable and env["PATH"].startswith(str(Path(sys.executable).parent))


def test_without_sbatch_it_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(slurm.SlurmError, match="`sbatch` is not on PATH: this machine is not part of a SLURM cluster"):
        slurm.submit("05_ddp.ipynb", nodes=2)
    with pytest.raises(slurm.SlurmError, match="`squeue` is not on PATH"):
        slurm.status("123")
    out = slurm.main(["status", "123"])
    assert out == 2


def fake_commands(tmp_path, monkeypatch, **scripts):
    """Stand-ins for SLURM's commands on PATH (shell scripts)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")


FORGOTTEN = "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1"
NO_ACCOUNTING = "echo 'Slurm accounting storage is disabled' >&2; exit 1"


def test_status_from_squeue_then_sacct_then_the_record(runs, tmp_path, monkeypatch):
    fake_commands(tmp_path, monkeypatch, squeue="echo RUNNING")
    assert slurm.status("41") == "RUNNING"
    fake_commands(tmp_path, monkeypatch, squeue=FORGOTTEN, sacct="echo 'TIMEOUT'")
    assert slurm.status("41") == "TIMEOUT"
    # no accounting (the local cluster): the run's record says how it ended
    fake_commands(tmp_path, monkeypatch, squeue=FORGOTTEN, sacct=NO_ACCOUNTING)
    assert slurm.status("41") == slurm.ENDED_WITHOUT_RECORD
    run = runs / "job41-05_ddp"
    run.mkdir(parents=True)
    (run / "record.json").write_text(json.dumps({"notebook": "05_ddp", "status": "failed"}))
    assert slurm.status("41") == "FAILED"
    (run / "record.json").write_text(json.dumps({"notebook": "05_ddp", "status": "ok"}))
    assert slurm.status("41") == slurm.wait("41") == "COMPLETED"
    with pytest.raises(slurm.SlurmError, match="not a job id"):
        slurm.status("job41")


def test_an_array_is_running_while_a_task_runs_and_failed_when_one_task_failed(tmp_path, monkeypatch):
    fake_commands(tmp_path, monkeypatch, squeue="printf 'COMPLETED\\nRUNNING\\n'")
    assert slurm.status("41") == "RUNNING"
    fake_commands(tmp_path, monkeypatch, squeue="printf 'COMPLETED\\nFAILED\\nCOMPLETED\\n'")
    assert slurm.status("41") == "FAILED"
    fake_commands(tmp_path, monkeypatch, squeue="printf 'COMPLETED\\nCOMPLETED\\n'")
    assert slurm.status("41") == "COMPLETED"


def test_wait_gives_up_after_its_timeout(tmp_path, monkeypatch):
    fake_commands(tmp_path, monkeypatch, squeue="echo PENDING")
    with pytest.raises(TimeoutError, match="job 7 is still PENDING after 0 s: wait again, or cancel it with scancel 7"):
        slurm.wait("7", timeout=0, poll_s=0.01)


def test_open_result_shows_the_notebook_and_the_record(runs, tmp_path, monkeypatch, capsys):
    fake_commands(tmp_path, monkeypatch, squeue="echo PENDING")
    with pytest.raises(slurm.SlurmError, match=r"job 42 \(PENDING\) has no run folder .* it has not started yet"):
        slurm.open_result("42")
    run = runs / "job42-05_ddp"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"notebook": str(REPO / "notebooks" / "05_ddp.ipynb")}))
    (run / "05_ddp.ipynb").write_text("{}")
    (run / "record.json").write_text(json.dumps({"notebook": "05_ddp", "status": "ok", "dist": {"world_size": 4},
                                                 "params": {"steps": 4}}))
    result = slurm.open_result("42")
    assert result.notebook == run / "05_ddp.ipynb" and result.record["params"] == {"steps": 4}
    shown = capsys.readouterr().out
    assert "executed notebook:" in shown and "status ok, 4 rank(s)" in shown and '"steps": 4' in shown


@pytest.mark.parametrize("notebook", sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.name)
def test_every_notebook_names_the_workshop_kernel(notebook):
    """JupyterLab starts the kernel that `make kernel` registers; papermill, nbval and the runner
    ignore the name and use this interpreter (-k, --nbval-current-env), so no test needs it."""
    assert json.loads(notebook.read_text())["metadata"]["kernelspec"]["name"] == "workshop"
