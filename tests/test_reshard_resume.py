"""A checkpoint written by 4 ranks resumes on 2 ranks and on one process with the losses of the run that was
never interrupted, for FSDP2 (torch.distributed.checkpoint, one file per rank, resharded on load) and DDP (one
full-state file): `python -m workshop.reshard` trains, saves and resumes; this compares."""

import subprocess
import sys

import pytest
import torch

from helpers import REPO
from workshop import checkpoint, dist, models, reshard, sharding
from workshop.base.world import local_ranks, without_launcher
from workshop.reshard import SAVED, STEPS


def launch(mode: str, folder, world_size: int) -> dict:
    """workshop.reshard in `mode` on `world_size` gloo ranks (torchrun; one rank: a plain process); its losses,
    {strategy: {step: loss}}."""
    args = ("workshop.reshard", mode, str(folder), "fsdp", "ddp")
    if world_size > 1:
        cmd, env = local_ranks(world_size, *args, run="module")
    else:
        cmd, env = [sys.executable, "-m", *args], without_launcher()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return reshard.read_losses(folder, mode, world_size)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The checkpoints of a 4-rank run, and the losses of it and of its resumptions on 2 ranks and on 1."""
    folder = tmp_path_factory.mktemp("reshard")
    losses = {4: launch("train", folder, 4), 2: launch("resume", folder, 2), 1: launch("resume", folder, 1)}
    return folder, losses


# Every world size computes the same global batch's loss and gradient, but sums in another order: a rank's share of
# the batch, then the gradients' reduction over the ranks (and the ranks' losses). fp32 rounding (about 1e-7
# relative each) differs by a few units in the last place after the three steps before the checkpoint and the
# three after it, and FSDP's sharded Adam update against DDP's whole one: about 1e-7 to 1e-6 relative. A resume that
# loses Adam's moments or step count, or takes another batch, moves the loss by 1e-2 or more.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.multirank
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_checkpoint_of_4_ranks_resumes_on_2_and_on_1_with_the_uninterrupted_losses(runs, strategy):
    _, losses = runs
    uninterrupted = losses[4][strategy]
    assert sorted(uninterrupted) == list(range(1, STEPS + 1))
    assert uninterrupted[STEPS] < uninterrupted[1] - 1, uninterrupted  # it learns: the steps after the save matter
    for world_size in (2, 1):
        resumed = losses[world_size][strategy]
        assert sorted(resumed) == list(range(SAVED + 1, STEPS + 1)), f"{world_size} rank(s) resumed at the wrong step"
        torch.testing.assert_close(torch.tensor([resumed[s] for s in sorted(resumed)], dtype=torch.float64),
                                   torch.tensor([uninterrupted[s] for s in sorted(resumed)], dtype=torch.float64),
                                   **TOLERANCE, msg=lambda m: f"{strategy} resumed on {world_size} rank(s): {m}")


@pytest.mark.multirank
def test_fsdp_and_ddp_train_alike(runs):
    _, losses = runs
    torch.testing.assert_close(torch.tensor(list(losses[4]["fsdp"].values())),
                               torch.tensor(list(losses[4]["ddp"].values())), **TOLERANCE)


@pytest.mark.multirank
def test_the_sharded_checkpoint_holds_one_file_per_writing_rank(runs):
    folder, _ = runs
    files = sorted(p.name for p in (folder / "fsdp").iterdir())
    # DCP's FileSystemWriter: __<rank>_<file>.distcp, one file per rank with its default of one thread, and .metadata
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]
    assert (folder / "ddp.pt").is_file()


@pytest.fixture
def one_process(clean_env):
    env = dist.init(dist.DistEnv())
    yield env
    dist.cleanup()


@pytest.mark.multirank
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
