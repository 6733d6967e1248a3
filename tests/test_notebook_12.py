"""notebooks/12_when_things_go_wrong.ipynb on 2 local ranks: the slowed rank found, the differences of DDP against one
process that need two ranks, the resume on other world sizes (its checked cells as in the committed notebook, a 2 x 2
SLURM run), and no process of the notebook's small worlds left once it has ended. The provoked faults of sections 2
and 3 start worlds of their own, whatever the notebook's world: nbval runs them, with the whole notebook as one
process, and this run leaves them out (provoke = False)."""

import psutil
import pytest

from helpers import assert_checks_as_committed, run_notebook
from workshop.base import records

NB12 = "notebooks/12_when_things_go_wrong.ipynb"
CHILDREN = ("workshop.launch.faults", "workshop.launch.doctor", "workshop.reshard")
CHECKS_OF_FAULTS = "92a06525"  # the checked cell of sections 2 and 3, which provoke = False leaves out


def children_running() -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if any(f"-m {module}" in cmdline for module in CHILDREN) and "WORKSHOP_LAUNCH" in (p.environ() or {}):
            found.append(f"{p.pid} {cmdline}")
    return found


@pytest.mark.multirank
def test_12_on_two_local_ranks(runs):
    out = run_notebook("--nproc", 2, NB12, "-p", "provoke", "False")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    text = (run / "12_when_things_go_wrong.ipynb").read_text()
    assert_checks_as_committed(run / "12_when_things_go_wrong.ipynb", NB12, skip=(CHECKS_OF_FAULTS,))
    assert "sections 2 and 3 not run (provoke = False)" in text
    for line in ("one-GPU batch size per rank differs from one process: True",
                 "BatchNorm per rank differs from one process:          True",
                 "no DistributedSampler: each sample seen 2 times:      True",
                 "rank 1, the slowed one, is found from the times:      True"):
        assert line in text, line
    record = records.read(run / "record.json")
    assert record.status == "ok" and record.dist["world_size"] == 2
    results = record.results
    assert results["straggle"]["found"] == 1 and [r["rank"] for r in results["straggle"]["per_rank"]] == [0, 1]
    assert results["resume"] == {"written_by": 2, "resumed_on": [4, 1], "same_losses": True}
    assert results["ddp_gaps"]["share"] < 1e-5 < results["ddp_gaps"]["whole_per_rank"]
    assert sorted(p.name for p in (run / "reshard" / "fsdp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert children_running() == []
