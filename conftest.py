"""pytest set-up shared by tests/ and the nbval run over notebooks/: runs go to a temporary
folder, never into the repository's runs/."""

import os
import tempfile


def pytest_configure(config):
    if "WORKSHOP_RUNS" not in os.environ:
        os.environ["WORKSHOP_RUNS"] = tempfile.mkdtemp(prefix="workshop-test-runs-")
    os.environ.setdefault("MPLBACKEND", "Agg")
