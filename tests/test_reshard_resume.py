"""workshop.reshard (`python -m workshop.reshard`: train, save, resume) as one process: FSDP2 and DDP train alike, and a
checkpoint of another model is refused with what differs. That a checkpoint resumes on other world sizes with the
losses of the run that was never interrupted (written on 2 ranks, resumed on 4 and on 1; one file per writing rank)
is notebook 12's checked cell, asserted as one process by nbval and on 2 ranks by test_notebook_12."""

import subprocess
import sys

import pytest
import torch

from helpers import REPO
from workshop import checkpoint, dist, models, reshard, sharding
from workshop.base.world import without_launcher
from workshop.reshard import STEPS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The checkpoints of a one-process run, and its losses, {strategy: {step: loss}}."""
    folder = tmp_path_factory.mktemp("reshard")
    done = subprocess.run([sys.executable, "-m", "workshop.reshard", "train", str(folder), "fsdp", "ddp"], cwd=REPO,
                          env=without_launcher(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder, reshard.read_losses(folder, "train", 1)


# FSDP's sharded Adam update against DDP's whole one: fp32 rounding, about 1e-7 to 1e-6 relative; a strategy that
# lost a gradient or an update would differ by 1e-2 or more.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def test_fsdp_and_ddp_train_alike(runs):
    _, losses = runs
    assert sorted(losses["fsdp"]) == list(range(1, STEPS + 1))
    assert losses["fsdp"][STEPS] < losses["fsdp"][1] - 1, losses  # it learns
    torch.testing.assert_close(torch.tensor(list(losses["fsdp"].values())), torch.tensor(list(losses["ddp"].values())),
                               **TOLERANCE)


@pytest.fixture
def one_process(clean_env):
    env = dist.init(dist.DistEnv())
    yield env
    dist.cleanup()


@pytest.mark.parametrize("overrides, says", [
    (dict(depth=1), r"layers\.1\.attention\.wk\.weight is not in this model"),  # DCP alone would load it silently
    (dict(depth=2, dim=64), r"layers\.0\.attention\.wk\.weight is \(128, 128\) there, \(64, 64\) here"),
    (dict(depth=3), r"layers\.2\.attention\.wk\.weight is not in the checkpoint"),
], ids=["fewer blocks", "narrower", "more blocks"])
def test_a_model_of_another_shape_is_refused_with_what_differs(runs, one_process, overrides, says):
    folder, _ = runs
    model = sharding.apply_fsdp(models.tinygpt("cpu", **{"max_seq_len": 16, **overrides}),
                                sharding.shard_mesh(one_process))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with pytest.raises(checkpoint.CheckpointMismatch, match=f"holds another model than this one: .*{says}.*"
                                                            "resume with the model that saved it"):
        sharding.load_checkpoint(folder / "fsdp", model, optimizer)
    with pytest.raises(checkpoint.CheckpointMismatch, match="resume with the model that saved it"):
        checkpoint.load(folder / "ddp.pt", models.tinygpt("cpu", **{"max_seq_len": 16, **overrides}),
                        model_name="tinygpt-cpu-depth2")
