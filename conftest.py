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


def pytest_collection_modifyitems(config, items):
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
