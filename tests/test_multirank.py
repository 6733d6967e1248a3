"""Data-parallel training on 2 gloo ranks ends with the weights of one process trained on the same global batches."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from workshop import models


def _run(cmd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.multirank
def test_naive_bucketed_ddp_and_lightning_equal_one_process(tmp_path, clean_env):
    out = tmp_path / "versions.pt"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          str(REPO / "tests" / "multirank" / "ddp_equivalence.py"), str(out)])
    saved = torch.load(out, weights_only=True)
    assert saved["world_size"] == 2
    ref = saved["states"]["reference"]
    torch.manual_seed(0)
    untrained = models.SmallCNN(norm="group").state_dict()
    assert any(not torch.allclose(ref[k], untrained[k]) for k in ref)  # the reference did train
    for version in ("naive", "bucketed", "torch_ddp", "lightning_ddp"):
        for name, value in saved["states"][version].items():
            torch.testing.assert_close(value, ref[name], rtol=1e-4, atol=1e-5, msg=f"{version}: {name}")
