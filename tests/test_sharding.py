"""workshop.sharding and the Lightning strategies in one process (a process group of one). Every sharded version
against one process on 2 ranks, its first gradients, its bytes against the ZeRO model and the checkpoint's round trip:
notebook 06's checked cells (test_notebook_06)."""

import dataclasses

import pytest
import torch

from workshop import data, dist, lit, models, sharding


@pytest.fixture
def env(clean_env):
    env = dist.init(dist.DistEnv())
    yield env
    dist.cleanup()


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_cpu_offload", "FSDPStrategy"])
def test_the_fsdp_strategy_on_cpu_says_what_to_use_instead(strategy):
    if strategy == "FSDPStrategy":
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = FSDPStrategy()
    with pytest.raises(ValueError, match="ModelParallelStrategy"):
        dist.make_trainer(dist.DistEnv(), strategy=strategy)


def test_model_parallel_strategy_trains_fsdp2_on_cpu(env, tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    train_set, _, _ = data.get_text_dataset("synthetic", seq_len=32, num_train_tokens=8 * 4 * 32 + 1)
    torch.manual_seed(0)
    module = lit.LitLanguageModel(models.tinygpt("cpu", depth=2), lr=3e-3,
                                  parallelize=lambda m, mesh: sharding.apply_fsdp(m, mesh["data_parallel"]))
    trainer = dist.make_trainer(env, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                                max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data.make_loader(train_set, 4))
    from torch.distributed.tensor import DTensor

    assert all(isinstance(p, DTensor) for p in module.model.parameters())
    assert trainer.global_step == 4


def test_one_process_fsdp_checkpoint_round_trip(env, tmp_path):
    x = torch.randint(0, 256, (2, 16))
    torch.manual_seed(0)
    model = sharding.apply_fsdp(models.tinygpt("cpu", depth=2), sharding.shard_mesh(env))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    models.lm_loss(model(x), x).backward()
    optimizer.step()
    sharding.save_checkpoint(tmp_path / "ckpt", model, optimizer)
    fresh = sharding.apply_fsdp(models.tinygpt("cpu", depth=2), sharding.shard_mesh(env))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    sharding.load_checkpoint(tmp_path / "ckpt", fresh, fresh_opt)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a.full_tensor(), b.full_tensor(), rtol=0, atol=0, msg=name)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"].full_tensor(),
                       fresh_opt.state_dict()["state"][0]["exp_avg"].full_tensor())


def test_bad_input_is_refused_with_a_reason(env, tmp_path):
    with pytest.raises(FileNotFoundError, match="save one with save_checkpoint"):
        sharding.load_checkpoint(tmp_path / "none", torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="model.layers"):
        sharding.apply_fsdp(torch.nn.Linear(2, 2), sharding.shard_mesh(env))
    with pytest.raises(ValueError, match="same number of tasks on every node"):
        sharding.hybrid_mesh(dataclasses.replace(env, world_size=3, local_world_size=2))


def test_hybrid_layout_needs_equal_ranks_per_node():
    from workshop.dist import DistEnv
    from workshop.sharding import hybrid_layout_problem

    assert hybrid_layout_problem(DistEnv(world_size=4, local_world_size=2)) is None
    assert hybrid_layout_problem(DistEnv(world_size=1, local_world_size=1)) is None
    # sbatch --ntasks=3 on 2 nodes: 2 tasks on the first, 1 on the second
    problem = hybrid_layout_problem(DistEnv(world_size=3, local_world_size=2))
    assert "world size 3 is not a multiple of the ranks per node 2" in problem and "--ntasks-per-node" in problem


def test_a_missing_deepspeed_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    with pytest.raises(ImportError, match="pip install deepspeed"):
        sharding.import_deepspeed("cpu")
