"""notebooks/10_long_sequences_and_experts.ipynb on 2 local ranks (nbval runs it as one process; the committed notebook
is a 2 x 2 SLURM run): its checked cells as committed, and its record's counts. The ring, the all-gather and the
expert-parallel layer against one process, and the planted mistakes, are asserted once in tests/test_context_parallel.py
and tests/test_experts.py."""

import pytest

from helpers import assert_checks_as_committed, run_notebook
from workshop.base import records

NB10 = "notebooks/10_long_sequences_and_experts.ipynb"


@pytest.mark.multirank
def test_10_on_two_local_ranks(runs):
    out = run_notebook("--nproc", 2, NB10, "-p", "seq_lens", "256,512", "-p", "timing_repeats", "1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    assert_checks_as_committed(run / "10_long_sequences_and_experts.ipynb", NB10)
    record = records.read(run / "record.json")
    assert record.status == "ok" and record.dist["world_size"] == 2
    results = record.results
    assert all(results["matches_single_process"].values()) and results["mesh"]["cp"] == 2
    moved = results["all_to_all_bytes"]
    assert moved["counted"]["forward"] == moved["derived"]["forward"] > 0  # rank 0 sent what its routing table says
    assert results["imbalance"]["zigzag"]["pairs"] == 1 < results["imbalance"]["contiguous"]["pairs"]
