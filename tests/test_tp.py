"""Tensor parallelism (workshop.tp) and fixed-shape decoding (workshop.inference): the size checks, and 2D training
(FSDP2 x TP, by hand and with Lightning) against one process on 4 gloo ranks (tests/multirank/tp_equivalence.py).
Tensor parallelism on 2 ranks against one process is notebook 08's checked cells (test_notebook_08), tensor-parallel
decoding notebook 11's (test_notebook_11)."""


import pytest
import torch

from helpers import on_ranks
from workshop import data, dist, inference, models, tp
from workshop.measure import metrics
from workshop.parallel_dims import ParallelDims


def test_tp_size_that_does_not_split_the_model_is_refused():
    model = models.tinygpt("cpu")  # 4 heads, dim 128, hidden 512, vocabulary 256
    tp.check_tp_size(model, 4)
    with pytest.raises(ValueError, match=r"tensor-parallel size 3 does not divide the 4 attention heads\n\(.*\); choose "
                                         r"tp_size from \[1, 2, 4\]"):
        tp.check_tp_size(model, 3)
    with pytest.raises(ValueError, match="tensor-parallel size 8 does not divide the 4 attention heads"):
        tp.check_tp_size(model, 8)
    with pytest.raises(ValueError, match="tensor-parallel size 4 does not divide the 6 MLP hidden size"):
        tp.check_tp_size(dict(heads=8, dim=64, hidden=6), 4)
    with pytest.raises(ValueError, match="whole number >= 1, got 0"):
        tp.check_tp_size(model, 0)
    with pytest.raises(ValueError, match=r"tensor-parallel size 2 does not divide the 7 output features .* \[1, 7\]"):
        tp._split(7, 2, "output features of Linear(8, 7)")  # how ColumnParallelLinear and RowParallelLinear refuse


def test_the_largest_tp_size_that_fits_a_layout():
    model = models.tinygpt("cpu")  # 4 heads
    assert tp.tp_problem(model, 2) is None and "does not divide the 4 attention heads" in tp.tp_problem(model, 3)
    assert tp.largest_tp_size(model, world_size=4, at_most=2) == 2  # 2 nodes x 2 ranks: TP inside a node
    assert tp.largest_tp_size(model, world_size=3, at_most=3) == 1  # 3 ranks: 3 does not divide the 4 heads, 1 does
    assert tp.largest_tp_size(model, world_size=6, at_most=6) == 2  # 3 and 6 do not divide the heads, 2 does
    assert tp.largest_tp_size(model, world_size=8, at_most=8) == 4


def test_mesh_whose_product_is_not_the_world_is_refused():
    dims = ParallelDims(8, pp=2, dp=2, tp=2)
    assert (dims.names, dims.shape) == (("pp", "dp", "tp"), (2, 2, 2))
    with pytest.raises(ValueError, match=r"pp_size 2 x dp_size 2 x tp_size 2 = 8 ranks, but the world has 4;\nchoose sizes"):
        ParallelDims(4, pp=2, dp=2, tp=2)  # pipeline.make_mesh's check
    with pytest.raises(ValueError, match="tp_size must be a whole number >= 1, got 0"):
        ParallelDims(4, pp=2, dp=2, tp=0)
    with pytest.raises(ValueError, match=r"dp_size 3 x tp_size 2 = 6 ranks, but the world has 4;\nchoose \(dp_size, tp_size\) "
                                         r"from \[\(1, 4\), \(2, 2\), \(4, 1\)\]"):
        tp.make_mesh(dist.DistEnv(world_size=4, local_world_size=4), dp_size=3, tp_size=2)
    with pytest.raises(ValueError, match=r"tp_size 3 does not divide the world of 4 ranks; choose one of \[1, 2, 4\]"):
        tp.make_mesh(dist.DistEnv(world_size=4, local_world_size=4), tp_size=3)  # 3 does not divide 4


def test_plan_names_every_split_module():
    model = models.tinygpt("cpu")
    names = {n for n, _ in model.named_modules()}
    for sp in (False, True):
        plan = tp.tinygpt_tp_plan(sequence_parallel=sp)
        for key in plan:
            assert key.replace("*", "0") in names, key
    assert type(tp.tinygpt_tp_plan()["layers.*.attention.wq"]).__name__ == "ColwiseParallel"
    assert type(tp.tinygpt_tp_plan()["layers.*.feed_forward.w2"]).__name__ == "RowwiseParallel"
    assert type(tp.tinygpt_tp_plan(sequence_parallel=True)["layers.*.ffn_norm"]).__name__ == "SequenceParallel"


def test_a_written_plan_is_compared_with_the_package_s_entry_by_entry():
    """Notebook 08 writes TinyGPT's plans out in cells; tp.same_plan holds them against tinygpt_tp_plan."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    for sp in (False, True):
        assert tp.same_plan(dict(reversed(tp.tinygpt_tp_plan(sp).items())), sp)  # the order does not matter
    no_norm = {name: style for name, style in tp.tinygpt_tp_plan(True).items() if name != "norm"}
    assert tp.same_plan(no_norm, True).detail == "'norm' is only in the package plan"
    assert not tp.same_plan(tp.tinygpt_tp_plan(True))  # the sequence-parallel plan is not the plain one
    wrong = tp.tinygpt_tp_plan() | {"layers.*.feed_forward.w2": ColwiseParallel()}  # a row split written as a column
    assert tp.same_plan(wrong).detail.startswith("layers.*.feed_forward.w2: ColwiseParallel(")
    extra = tp.tinygpt_tp_plan() | {"layers.*.ffn_norm": RowwiseParallel(output_layouts=Shard(1))}
    assert "'layers.*.ffn_norm' is only in the written plan" in tp.same_plan(extra).detail


def test_static_cache_decoding_equals_generate():
    torch.manual_seed(0)
    model = models.tinygpt("cpu", max_seq_len=64).eval()
    decoder = inference.StaticDecoder(model)
    for text in ("The dog", "A small cat sings"):
        prompt = data.encode(text).unsqueeze(0)
        assert torch.equal(decoder.generate(prompt, 16), models.generate(model, prompt, 16))
    batch = torch.randint(256, (3, 5))
    assert torch.equal(decoder.generate(batch, 8), models.generate(model, batch, 8))  # a new batch size
    sampled = [decoder.generate(batch, 8, temperature=1.0, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1])
    with pytest.raises(ValueError, match="prompt 60 \\+ 8 new tokens exceed max_seq_len 64"):
        decoder.generate(torch.zeros(1, 60, dtype=torch.long), 8)


def test_prompts_file(tmp_path):
    prompts = inference.read_prompts()
    assert len(prompts) >= 3 and all(p.strip() for p in prompts)
    (tmp_path / "p.txt").write_text("# a comment\n\nThe cat\n", encoding="utf-8")
    assert inference.read_prompts(tmp_path / "p.txt") == ["The cat"]
    (tmp_path / "empty.txt").write_text("\n# only a comment\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no prompt"):
        inference.read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="no prompts file"):
        inference.read_prompts(tmp_path / "missing.txt")


def test_timing_units():
    t = metrics.Timing(new_tokens=10, batch_size=2, seconds=0.5)
    assert (t.tokens_per_s, t.ms_per_token) == (40.0, 50.0)


def _launch(nproc, out):
    saved = on_ranks("tp_equivalence.py", out, nproc)
    assert saved["world_size"] == nproc
    return saved["pairs"]


def _assert_pairs(pairs, prefixes):
    for prefix in prefixes:
        names = [k for k in pairs if k.startswith(prefix)]
        assert names, prefix
        for name in names:
            value, reference = pairs[name]
            torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.multirank
def test_2d_on_four_ranks_equals_one_process(tmp_path, clean_env):
    pairs = _launch(4, tmp_path / "tp4.pt")
    _assert_pairs(pairs, ["train_2d.", "train_lightning_2d."])


@pytest.mark.parametrize("text, world, grid", [("0,1,1", 4, (4, 1, 1)), ("2,0,1", 4, (2, 2, 1)), ("1,1,0", 2, (1, 1, 2)),
                                               ("2,2,1", 4, (2, 2, 1)), ("0,1,1", 1, (1, 1, 1))])
def test_axonn_tp_dimensions_fill_in_the_rest_of_the_world(text, world, grid):
    assert tp.parse_tp_dimensions(text, world) == grid


@pytest.mark.parametrize("text, message", [
    ("4,1", "three whole numbers"), ("0,0,1", "at most one of them 0"), ("a,b,c", "three whole numbers"),
    ("2,2,2", "2 x 2 x 2 = 8 ranks, but the world has 4")])
def test_axonn_tp_dimensions_that_do_not_fit_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        tp.parse_tp_dimensions(text, 4)


def test_axonn_steps_aside_on_cpu_naming_nccl_and_cuda():
    from workshop import dist

    assert "AxoNN requires NCCL and CUDA" in tp.axonn_problem(dist.DistEnv(device="cpu"))
