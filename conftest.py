"""pytest set-up for tests/ and for the nbval run over notebooks/, so it sits above both: runs go to a temporary
folder (removed at the end), never into the repository's runs/; the fixtures of tests/. `make test` runs the suite
on pytest-xdist workers, which inherit the controller's folder. What test modules share beside fixtures is in
tests/helpers.py."""

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from workshop.base.world import LAUNCHER_PREFIXES, LAUNCHER_VARIABLES

_made = None


def pytest_configure(config):
    global _made
    if "WORKSHOP_RUNS" not in os.environ:
        _made = tempfile.mkdtemp(prefix="workshop-test-runs-")
        os.environ["WORKSHOP_RUNS"] = _made
    os.environ.setdefault("MPLBACKEND", "Agg")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One thread per process while two workers share the cores: the kernels, ranks and jobs a test starts
        # inherit it. With torch's default (a thread per core in every process) the workers' processes spin
        # against each other; nbval of notebook 03 took 175 s beside the other worker, 35 s alone.
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_unconfigure(config):
    if _made:
        shutil.rmtree(_made, ignore_errors=True)


# The files that take longest (seconds on one pytest worker of three, two busy cores, in the last measured run), in
# that order. `make test` hands whole files to its workers in the order collected (--dist loadfile
# --no-loadscope-reorder), so these start first and short files fill the end: none is left running alone while
# the other workers idle. A new file that takes more than about 30 s belongs in this list, by its time.
LONGEST_FIRST = (
    "tests/test_reliability.py",  # 297
    "tests/test_bad_input.py",  # 189
    "tests/test_doctor.py",  # 170
    "notebooks/11_inference.ipynb",  # 132
    "notebooks/12_when_things_go_wrong.ipynb",  # 116
    "tests/test_notebook_03.py",  # 104
    "tests/test_notebook_12.py",  # 101
    "tests/test_browser.py",  # 90
    "tests/test_student_runs.py",  # about 60 (a student copy of each lesson to its last check, at small sizes)
    "tests/test_notebook_11.py",  # 67
    "notebooks/03_task_parallelism.ipynb",  # 66
    "notebooks/01_baseline.ipynb",  # 64
    "tests/test_tp.py",  # 60
    "tests/test_notebook_05.py",  # 60
    "tests/test_notebook_06.py",  # 56
    "tests/test_run_notebook.py",  # 54
    "tests/test_notebook_07.py",  # 50
    "notebooks/05_ddp.ipynb",  # 49
    "tests/test_notebook_08.py",  # 46
    "tests/test_notebook_09.py",  # 46
    "tests/test_notebook_02.py",  # 45
    "tests/test_notebook_04.py",  # 44
    "notebooks/08_tensor_parallelism.ipynb",  # 42
    "tests/test_pipeline.py",  # 42
    "notebooks/02_single_device_performance.ipynb",  # 41
    "tests/test_bench.py",  # 40
    "tests/test_report.py",  # 36
    "notebooks/04_data_parallel.ipynb",  # 31
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: a file's own order stays
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:  # torch only where a test asks for CUDA: the nbval run over notebooks/ imports none here
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A runs/ folder of this test's own."""
    path = tmp_path / "runs"
    monkeypatch.setenv("WORKSHOP_RUNS", str(path))
    return path


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables from the surroundings (a test may run inside a SLURM job or under torchrun)."""
    for key in list(os.environ):
        if key in LAUNCHER_VARIABLES or key.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A SLURM cluster that answers, else skip, or fail when WORKSHOP_REQUIRE_SLURM=1 (CI)."""
    from workshop.launch.regenerate import slurm_answers

    if slurm_answers():
        return True
    msg = "no SLURM cluster answers (start one with `make slurm-up`)"
    if os.environ.get("WORKSHOP_REQUIRE_SLURM") == "1":
        pytest.fail(msg + ", and WORKSHOP_REQUIRE_SLURM=1")
    pytest.skip(msg)


@pytest.fixture
def slurm(slurm_cluster):
    """The local cluster to this test alone: a SLURM test of another pytest worker waits here until this one
    ends. Each expects both nodes free (block placement, 2 tasks on the first node of an uneven job)."""
    with open(Path(tempfile.gettempdir()) / "workshop-tests-slurm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield True
