"""scripts/run_notebook.sh outside SLURM: 1 and 2 local ranks, failures, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, run_notebook, wandb_history
from workshop.base import records

NB01 = "notebooks/01_baseline.ipynb"
FAIL = "tests/notebooks/fail_on_rank.ipynb"
SMALL = ["-p", "epochs", "1", "-p", "num_train", "512", "-p", "num_test", "256", "-p", "profile_steps", "2"]


def only_run(runs):
    folders = [p for p in runs.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


@pytest.mark.multirank
def test_notebook_01_on_two_local_ranks(runs):
    """(One process: nbval runs every notebook so, and bad-input cases run the launcher with one rank.)"""
    nproc = 2
    out = run_notebook("--nproc", nproc, NB01, *SMALL, "-p", "logger", "wandb",
                       env={k: v for k, v in os.environ.items() if not k.startswith("WANDB_")})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = only_run(runs)
    assert (run / "01_baseline.ipynb").is_file()
    assert sorted(p.name for p in (run / "ranks").iterdir()) == [f"01_baseline.rank{r}.ipynb" for r in range(1, nproc)]
    record = records.read(run / "record.json")
    assert record.status == "ok" and record.dist["world_size"] == nproc
    assert record.params["epochs"] == 1 and record.params["num_train"] == 512  # -p reached the notebook
    assert record.results["plain"]["samples_per_s"] > 0
    assert str(run) in out.stdout  # says where the results are
    # W&B, offline, in the run's folder: one run per loop, from rank 0 only, its metrics those of the record
    wandb_runs = {r["name"]: r for r in record.extra["tracking"]["wandb"]}
    assert sorted(wandb_runs) == ["lightning", "plain"]
    folders = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert folders == sorted(Path(r["dir"]).name for r in wandb_runs.values())
    for name in ("plain", "lightning"):
        assert wandb_runs[name]["mode"] == "offline" and wandb_runs[name]["dir"].endswith(wandb_runs[name]["id"])
        val_acc = [step["val_acc"] for step in wandb_history(run / wandb_runs[name]["dir"]) if "val_acc" in step]
        assert val_acc[-1] == pytest.approx(record.results[name]["val_acc"]), name
    for log in (run / "logs").glob("rank*.log"):  # each kernel on Unix sockets in its rank's folder, not on ports
        assert "running over TCP" not in log.read_text()


def test_a_kernel_gets_unix_sockets_that_fit_in_a_socket_path(tmp_path):
    from workshop.launch import ranks

    assert ranks.kernel_sockets(tmp_path) == str(tmp_path / "kernel")
    assert ranks.kernel_sockets(tmp_path / ("x" * ranks.MAX_SOCKET_PATH)) is None  # too long: TCP on localhost


def test_two_runs_of_one_notebook_never_share_a_folder(runs):
    """Two runs started in the same second: the launcher's step 1 (rundir.prepare) makes each its own folder."""
    from workshop.launch import rundir

    first, second = (rundir.prepare(str(REPO / FAIL), 1, []) for _ in range(2))
    assert first != second and sorted(p for p in runs.iterdir() if p.is_dir()) == sorted([first, second])


@pytest.mark.parametrize("args, message", [
    (["notebooks/99_missing.ipynb"], "does not exist"),
    ([FAIL, "-p", "learning_rate", "0.1"], "has no parameter 'learning_rate'"),
    ([FAIL, "-y", "{stepz: 2}"], "has no parameter 'stepz'"),
    (["--nproc", "0", FAIL], "positive integer"),
    (["--nproc", "two", FAIL], "positive integer"),
    ([], "no notebook given"),
])
def test_bad_input_is_refused_before_anything_runs(runs, args, message):
    out = run_notebook(*args, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr
    assert not runs.exists() or not any(runs.iterdir())  # nothing written


def test_unknown_parameter_lists_the_notebooks_parameters(runs):
    out = run_notebook(NB01, "-p", "epoch", "3", timeout=60)
    assert out.returncode == 2
    for name in ("epochs", "batch_size", "dataset"):
        assert name in out.stderr


def test_help_shows_the_header():
    out = run_notebook("--help", timeout=30)
    assert out.returncode == 0 and "sbatch" in out.stdout and "--nproc" in out.stdout
    assert (REPO / "scripts" / "run_notebook.sh").stat().st_mode & 0o111


def test_the_launcher_imports_no_torch(runs):
    """The launcher answers in a fraction of a second: it checks a notebook and its parameters, and makes
    a run folder, without torch or papermill (each takes seconds to import)."""
    code = ("import sys; from workshop.launch import rundir, runner, slurm; "
            f"print(rundir.prepare({NB01!r}, 2, ['-p', 'epochs', '1'])); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'papermill', 'nbformat', 'lightning'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "WORKSHOP_RUNS": str(runs)})
    assert out.returncode == 0, out.stderr
    run, imported = out.stdout.splitlines()
    assert imported == "[]"
    assert json.loads((Path(run) / "run.json").read_text())["parameters"] == {"epochs": 1}
    assert (Path(run) / "parameters.yaml").read_text() == "epochs: 1\n"
