"""The same training on 2 gloo ranks and in one process ends with the same weights."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "tests" / "multirank" / "lightning_ddp.py"


def _run(cmd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.multirank
def test_lightning_ddp_through_make_trainer_matches_one_process(tmp_path, clean_env):
    ref, ddp = tmp_path / "ref.pt", tmp_path / "ddp.pt"
    _run([sys.executable, str(SCRIPT), str(ref)])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT), str(ddp)])
    a, b = torch.load(ref, weights_only=True), torch.load(ddp, weights_only=True)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["steps"] == b["steps"] == 8
    for name in a["state"]:
        torch.testing.assert_close(b["state"][name], a["state"][name], rtol=1e-4, atol=1e-5, msg=name)
    # and training moved the weights: the comparison is not between two untouched models
    torch.manual_seed(0)
    assert not torch.allclose(a["state"]["0.weight"], torch.nn.Conv2d(3, 8, 3, padding=1).weight)
