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
    # an earlier save in the folder, by four ranks: its shards go, or they would sit beside this one's
    (tmp_path / "ckpt").mkdir()
    for r in range(4):
        (tmp_path / "ckpt" / f"__{r}_0.distcp").write_bytes(b"earlier")
    sharding.save_checkpoint(tmp_path / "ckpt", model, optimizer)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [".metadata", "__0_0.distcp"]
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


# --- workshop.measure.sharded: notebook 06's bench (its 2-rank run: test_notebook_06) --------------------------------


def bench_on(env, steps=2):
    from workshop.measure import sharded

    train_set, _, _ = data.get_text_dataset("synthetic", seq_len=16, num_train_tokens=(steps + 1) * 4 * 16 + 1)
    loader = data.make_loader(train_set, 4)
    return sharded.Bench(env, "cpu", seed=0, lr=3e-3, steps=steps, shard=loader), loader


def test_the_bench_holds_a_version_against_the_one_process_run(env):
    bench, loader = bench_on(env)
    with pytest.raises(RuntimeError, match="hold_against"):
        bench.same_weights(bench.fresh_model())
    torch.manual_seed(1)
    expected = torch.rand(1)
    torch.manual_seed(1)
    reference = bench.fresh_model()  # the seed's weights, the caller's random stream untouched
    assert torch.equal(torch.rand(1), expected)
    losses = bench.train(reference, torch.optim.AdamW(reference.parameters(), lr=bench.lr), loader)
    assert len(losses) == bench.steps and all(p.grad is not None for p in reference.parameters())
    bench.hold_against(reference, next(iter(loader)))

    same = bench.fresh_model()
    bench.train(same, torch.optim.AdamW(same.parameters(), lr=bench.lr), loader)
    assert bench.same_weights(same) and bench.same_first_grads(bench.fresh_model())
    untrained = bench.fresh_model()
    assert not bench.same_weights(untrained)
    with torch.no_grad():
        next(untrained.parameters()).mul_(2)  # another model: other first gradients
    assert not bench.same_first_grads(untrained)


def test_the_record_keeps_the_keys_the_report_and_the_notebook_test_read():
    from workshop.check import Match
    from workshop.measure import sharded
    from workshop.measure.memory import Measured

    rank = {"params": 4.0, "grads": 4.0, "optimizer": 8.0, "total": 16.0}
    measured = {"ddp": Measured(2.0, None, [rank, rank]), "zero1": Measured(4.0, 1000, [rank, rank])}
    params = dict(size="cpu", steps=2, global_batch_size=8, micro_batch_size=4, seq_len=16)
    results = sharded.results(params, checks={"ZeRO-1 by hand": Match(True)}, measured=measured, rows=[],
                              memory_match=Match(False, "off"), held={True: 1, False: 2}, checkpoint_match=Match(True),
                              reference_losses=[5.5], zero_against_ddp={})
    assert results["matches_single_process"] == {"ZeRO-1 by hand": True} and results["memory_agrees"] is False
    assert results["params_held_after_forward"] == {"reshard": 1, "no_reshard": 2}
    assert results["measured_per_rank"]["zero1"] == [rank, rank]
    ddp, zero1 = results["measurements"]
    assert ddp["strategy"] == "ddp" and ddp["model"] == "tinygpt-cpu" and ddp["throughput"] == 2 * 8 * 16 / 2.0
    assert (ddp["peak_memory_bytes"], ddp["memory_kind"]) == (16.0, "tensors")  # on CPU: the largest rank's tensors
    assert (zero1["peak_memory_bytes"], zero1["memory_kind"], zero1["step_time_s"]) == (1000, "cuda", 2.0)
    assert sharded.format_parts(rank) == "params 4 B, grads 4 B, optimizer 8 B"


def test_zero_against_ddp_as_text_gives_multiples_of_ddp():
    from workshop.measure import sharded

    calls = {"all_reduce": {"calls": 2, "bytes": 2048}}
    rows = {"ddp": {"step_time_s": 0.01, "collectives": calls, "collective_bytes": 2048},
            "zero1": {"step_time_s": 0.03, "collectives": calls, "collective_bytes": 4096}}
    ddp, zero1 = sharded.format_zero_against_ddp(rows).splitlines()[1:]
    assert ddp.split()[:6] == ["ddp", "10.0", "ms", "1.00", "2.0", "KiB"] and "all_reduce 2 (2.0 KiB)" in ddp
    assert zero1.split()[:4] == ["zero1", "30.0", "ms", "3.00"] and zero1.split()[6] == "2.00"
    alone = {v: {**row, "collective_bytes": 0} for v, row in rows.items()}  # one process sends nothing
    assert "nan" in sharded.format_zero_against_ddp(alone).splitlines()[1]
