"""pytest set-up shared by tests/ and the nbval run over notebooks/: runs go to a temporary
folder (removed at the end), never into the repository's runs/. `make test` runs the suite on two
pytest-xdist workers, which inherit the controller's folder."""

import os
import shutil
import tempfile

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
