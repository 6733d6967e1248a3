"""Memory: the ZeRO paper's accounting (workshop.estimate.zero), bytes of a model and optimizer measured
(workshop.measure.memory), activations saved for backward and activation checkpointing (workshop.activation_checkpointing),
and the memory planner (workshop.estimate.planner)."""

import pytest
import torch

from workshop import activation_checkpointing, models
from workshop.estimate import planner, zero
from workshop.measure import memory, step_memory


def test_zero_paper_worked_example():
    # Rajbhandari et al. 2020, figure 1: 7.5B parameters, mixed-precision Adam (K = 12), 64 devices
    psi, gb = 7.5e9, 1e9
    assert zero.predict(psi, 1, "ddp", preset="mixed_adam").total / gb == pytest.approx(120)
    assert zero.predict(psi, 64, "ddp", preset="mixed_adam").total / gb == pytest.approx(120)
    assert round(zero.predict(psi, 64, "zero1", preset="mixed_adam").total / gb, 1) == 31.4
    assert round(zero.predict(psi, 64, "zero2", preset="mixed_adam").total / gb, 1) == 16.6
    assert round(zero.predict(psi, 64, "zero3", preset="mixed_adam").total / gb, 2) == 1.88


def test_bytes_per_parameter_from_dtypes_and_optimizer():
    assert zero.optimizer_state_bytes("adamw", torch.bfloat16) == 12  # master copy + two moments
    assert zero.optimizer_state_bytes("adamw", torch.float32) == 8
    assert zero.optimizer_state_bytes("sgd_momentum", "fp32") == 4
    assert zero.dtype_bytes(torch.bfloat16) == zero.dtype_bytes("bfloat16") == 2  # a torch.dtype read by its name
    mixed = zero.predict(1000, 4, "zero2", param_dtype=torch.bfloat16, optimizer="adam")
    assert mixed == zero.predict(1000, 4, "zero2", preset="mixed_adam")
    fp32 = zero.predict(1000, 4, "zero1", param_dtype="fp32")
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4000, 4000, 2000)
    assert zero.predict(1000, 4, "zero1", param_dtype="bf16", grad_dtype="fp32").grads == 4000


@pytest.mark.parametrize("kwargs, match", [
    (dict(stage="zero4"), "unknown stage"), (dict(stage="ddp", preset="fp8"), "unknown preset"),
    (dict(stage="ddp", optimizer="lion"), "unknown optimizer"), (dict(stage="ddp", param_dtype="fp6"), "unknown dtype"),
])
def test_bad_arguments_say_what_to_use(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zero.predict(1000, 2, **kwargs)


def test_measure_one_process_adamw_is_the_ddp_prediction_plus_step_scalars():
    model = models.tinygpt("cpu", depth=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 16))
    models.lm_loss(model(x), x).backward()
    optimizer.step()
    got = memory.measure(model, optimizer)
    n, tensors = models.count_parameters(model), len(list(model.parameters()))
    want = zero.predict(n, 1, "ddp", preset="fp32_adam")
    assert (got.params, got.grads) == (want.params, want.grads)
    assert got.optimizer == want.optimizer + 4 * tensors  # exp_avg + exp_avg_sq, and one fp32 `step` per tensor


def test_compare_flags_a_rank_off_by_more_than_ten_percent():
    want = zero.predict(1000, 2, "zero3", preset="fp32_adam")  # 2000 + 2000 + 4000 bytes
    near = {"params": 2000, "grads": 2000, "optimizer": 4300}  # 7.5% over
    far = {"params": 2000, "grads": 2000, "optimizer": 4500}  # 12.5% over
    rows = memory.compare({"a": [near, near], "b": [near, far]}, {"a": want, "b": want})
    assert [r["agrees"] for r in rows] == [True, False]
    assert rows[1]["optimizer"] == 4500 and rows[1]["total"] == 8500 and rows[1]["predicted_total"] == 8000
    assert "within 10%" in memory.format_compare(rows)


def test_train_and_measure_times_the_steps_and_reports_every_rank():
    """One process: a list of one rank, the bytes `measure` gives, no CPU peak (the resident set is no measure)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = []

    def train():
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()
        steps.append(1)

    measured = memory.train_and_measure(train, model, optimizer)
    assert steps == [1] and measured.seconds > 0 and measured.peak_bytes is None
    assert measured.per_rank == [memory.measure(model, optimizer).as_dict()]
    assert measured.per_rank[0]["params"] == measured.per_rank[0]["grads"] == 36 * 4  # 8 x 4 weights + 4 biases, fp32


# --- activations -----------------------------------------------------------------------------------

def layers_of(model):
    return {f"layer{i}": block for i, block in enumerate(model.layers)}


def saved_and_grads(model, tokens):
    model.zero_grad()
    with memory.saved_for_backward(model, layers_of(model)) as saved:
        loss = models.lm_loss(model(tokens), tokens)
    loss.backward()
    return saved, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("seq_len, batch, dim, heads", [(64, 4, 128, 4), (37, 3, 96, 6)])
def test_a_gpt_block_saves_what_its_formula_says(seq_len, batch, dim, heads):
    torch.manual_seed(0)
    model = models.TinyGPT(dim=dim, depth=2, heads=heads)
    saved, _ = saved_and_grads(model, torch.randint(0, 256, (batch, seq_len)))
    want = planner.gpt_layer_activation_bytes(seq_len, batch, dim, heads)
    assert saved.by_module["layer0"] == saved.by_module["layer1"] == want  # exact: each storage counted once
    assert saved.total == sum(saved.by_module.values())
    # Korthikanti's 16-bit count is the same 16 values at 2 bytes, plus dropout masks and the attention matrix
    assert planner.korthikanti_layer_bytes(seq_len, batch, dim, heads) == pytest.approx(
        seq_len * batch * dim * (2 * 16 + 2) + 5 * heads * seq_len**2 * batch)


def test_checkpointing_keeps_less_and_changes_no_gradient():
    torch.manual_seed(0)
    model = models.TinyGPT(dim=64, depth=4, heads=4)
    tokens = torch.randint(0, 256, (2, 32))
    every, reference = saved_and_grads(model, tokens)
    block_input = 2 * 32 * 64 * 4  # what a fully checkpointed block keeps: its input, in fp32
    kept = {}
    for policy in ("full", "every_other", "selective"):
        activation_checkpointing.checkpoint_blocks(model.layers, policy)
        saved, grads = saved_and_grads(model, tokens)
        kept[policy] = saved.by_module
        for got, want in zip(grads, reference):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(kept["full"][name] == block_input for name in layers_of(model))
    assert [kept["every_other"][f"layer{i}"] for i in range(4)] == [block_input, every.by_module["layer1"]] * 2
    assert all(block_input < kept["selective"][name] < every.by_module[name] for name in layers_of(model))
    activation_checkpointing.checkpoint_blocks(model.layers, "none")
    assert saved_and_grads(model, tokens)[0].by_module == every.by_module
    assert model.state_dict().keys() == models.TinyGPT(dim=64, depth=4, heads=4).state_dict().keys()
    with pytest.raises(ValueError, match="unknown checkpointing policy 'some'; use one of"):
        activation_checkpointing.checkpoint_blocks(model.layers, "some")


def test_notebook_07s_batches_and_models_are_the_same_every_time():
    assert step_memory.parse_sizes("64x4, 128X8") == [(64, 4), (128, 8)]
    with pytest.raises(ValueError, match="write tokens x samples"):
        step_memory.parse_sizes("64by4")
    x, y = step_memory.token_batch(3, 16, seed=1)
    assert x.shape == y.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])  # the targets: the next tokens
    assert torch.equal(step_memory.token_batch(3, 16, seed=1)[0], x)
    assert not torch.equal(step_memory.token_batch(3, 16, seed=1, which=1)[0], x)
    full = step_memory.tinygpt("cpu", "full", seed=0)
    assert all("forward" in b.__dict__ for b in full.layers)  # checkpointed: the forward replaced on the block
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), step_memory.tinygpt("cpu", seed=0).parameters()))


def test_the_ranks_loaders_split_the_global_batches_that_the_reference_steps_on():
    xs, ys = step_memory.token_batch(12, 8, seed=0)  # 2 steps of a global batch of 6: 3 ranks x 2 samples
    loaders = [list(step_memory.rank_loader(xs, ys, 6, 2, rank)) for rank in range(3)]
    for k in range(2):
        assert torch.equal(torch.cat([loader[k][0] for loader in loaders]), xs[6 * k:6 * (k + 1)])
    torch.manual_seed(0)
    model = models.TinyGPT(dim=32, depth=1, heads=2)
    before = [p.detach().clone() for p in model.parameters()]
    assert step_memory.sgd_steps(model, xs, ys, 6, lr=0.1) is model
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_notebook_07s_tables_and_figures():
    parts = {"A": {"params": 4e6, "grads": 4e6, "optimizer": 8e6, "activations": 2e6}}
    text = step_memory.format_anatomy(parts, {"A": memory.Saved(2_000_000, {"layer0": 2_000_000})})
    assert "params   4.00 MB ( 22%)" in text and "A 0.50x" in text and "A, MB saved by each block: layer0=2.00" in text
    policies = {"none": {"saved": 8e6, "step_s": 0.010}, "full": {"saved": 1e6, "step_s": 0.013}}
    text = step_memory.format_policies(policies, forward_s=0.003, repeats=5)
    assert "12%" in text and "+3.0 ms" in text and "1.00" in text and "the fastest of 5 each" in text
    assert step_memory.fastest(lambda: None, repeats=3) >= 0
    assert len(step_memory.plot_anatomy(parts).axes[0].patches) == 4
    assert len(step_memory.plot_policies(policies, 0.003).axes[0].collections) == 2


# --- the planner ---------------------------------------------------------------------------------

def test_the_planner_reproduces_korthikanti_et_al_selective_recomputation():
    # section 5: for GPT-3 (a 96, s 2048, h 12288) 5as/h = 80, and selective recomputation keeps 34 of the
    # 34 + 80 bytes per s b h: 70% less; MT-NLG 530B (a 128, h 20480): 5as/h = 64, 65% less
    for name, saved in (("gpt3-175b", 0.70), ("mt-nlg-530b", 0.65)):
        m = planner.MODELS[name]
        none, selective = (planner.transformer_activation_bytes(2048, 1, m.dim, m.heads, m.layers, ck)
                           for ck in ("none", "selective"))
        assert 1 - selective / none == pytest.approx(saved, abs=0.005)
    g = planner.MODELS["gpt3-175b"]
    assert planner.transformer_activation_bytes(2048, 1, g.dim, g.heads, 1) == 2048 * 12288 * (34 + 80)
    # tensor and sequence parallelism split all of it over t; full checkpointing keeps 2 s b h per layer
    # and one layer's worth while it is recomputed
    t8 = planner.transformer_activation_bytes(2048, 1, g.dim, g.heads, g.layers, "none", tp=8)
    assert t8 == pytest.approx(planner.transformer_activation_bytes(2048, 1, g.dim, g.heads, g.layers) / 8)
    full = planner.transformer_activation_bytes(2048, 1, g.dim, g.heads, g.layers, "full")
    assert full == 96 * 2 * 2048 * 12288 + 2048 * 12288 * 114
    assert planner.transformer_activation_bytes(2048, 1, g.dim, g.heads, 1, attention="fused") == 2048 * 12288 * 34


def test_the_planner_breaks_the_memory_down_and_says_what_fits():
    # the ZeRO paper's 7.5B on 64 GPUs with mixed-precision Adam, stage 1: 31.4 GB of states (as `predict`)
    p = planner.plan(7.5e9, strategy="zero1", world_size=64, states="mixed_adam")
    assert (p.parts["params"] + p.parts["grads"] + p.parts["optimizer"]) / 1e9 == pytest.approx(31.4, abs=0.05)
    seventy = dict(model="llama2-70b", gpu="h100", strategy="fsdp", world_size=64, seq_len=4096)
    plain, full = planner.plan(**seventy), planner.plan(**seventy, checkpointing="full")
    assert not plain.fits and full.fits and full.total < full.capacity == 0.9 * 80e9
    assert plain.parts["params"] == 69e9 * 4 / 64 and plain.parts["unsharded"] == pytest.approx(8 * 69e9 / 81)
    offloaded = planner.plan(**seventy, checkpointing="full", offload="params")
    assert offloaded.host == pytest.approx(16 * 69e9 / 64) and offloaded.parts["optimizer"] == 0
    assert offloaded.total == pytest.approx(full.total - offloaded.host)
    tp = planner.plan(**{**seventy, "strategy": "ddp"}, tp=8)  # 8 data-parallel ranks of an 8-way split
    assert tp.parts["optimizer"] == pytest.approx(8 * 69e9 / 8)
    assert "does not fit" in planner.format_plan(plain) and "fits on H100 (74.5 GiB)" in planner.format_plan(full)
    for bad, match in ((dict(gpu="tpu"), "unknown GPU"), (dict(strategy="zero3"), "unknown strategy"),
                       (dict(world_size=6, tp=4), "tensor-parallel groups"), (dict(micro_batch=0), "micro_batch"),
                       (dict(strategy="ddp", offload="params"), "needs strategy fsdp"),
                       (dict(checkpointing="some"), "checkpointing")):
        with pytest.raises(ValueError, match=match):
            planner.plan("7B", **bad)


def test_the_planners_grid_and_record():
    grid = planner.grid("llama2-70b", gpu="h100", world_size=64, tp=1, micro_batch=1, seq_len=4096)
    assert list(grid) == [(ck, s) for ck in planner.CHECKPOINTING for s in planner.PLAN_STRATEGIES]
    assert grid["full", "fsdp"].parts == planner.plan("llama2-70b", world_size=64, seq_len=4096,
                                                      checkpointing="full").parts
    lines = planner.format_grid(grid).splitlines()
    assert lines[0] == "Llama 2 70B on 64 x H100, micro-batch 1 x 4096 tokens, tp 1: GB per GPU"
    assert lines[1].split() == ["checkpointing", *planner.PLAN_STRATEGIES] and len(lines) == 2 + len(planner.CHECKPOINTING)
    assert lines[-1].startswith("full") and lines[-1].endswith("fits")  # fsdp with full checkpointing: the last cell
    record = grid["full", "fsdp"].record()
    assert record["model"] == "Llama 2 70B" and record["fits"] and record["strategy"] == "fsdp"
    assert record["total"] == sum(record["parts"].values()) and record["host"] == 0
    assert len(planner.plot_plan(grid["none", "ddp"]).axes[0].patches) == len(grid["none", "ddp"].parts)


def test_python_m_workshop_estimate_planner(capsys):
    assert planner.main(["70B", "--gpu", "h100", "--strategy", "fsdp", "--world-size", "64",
                         "--checkpointing", "full"]) == 0
    out = capsys.readouterr().out
    assert "activations" in out and out.strip().endswith("fits on H100 (74.5 GiB)")
    planner.main(["70B", "--strategy", "ddp", "--world-size", "64"])
    assert "does not fit" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        planner.main(["seven"])
    assert exit.value.code == 2 and "bad model size 'seven'" in capsys.readouterr().err


# --- the planner with pipeline stages --------------------------------------------------------------

SEVENTY = dict(model="llama2-70b", gpu="h100", seq_len=4096, checkpointing="full")


def test_one_pipeline_stage_changes_nothing():
    for strategy, world_size, tp in (("fsdp", 64, 1), ("ddp", 64, 8), ("zero1", 16, 2)):
        today = planner.plan(**SEVENTY, strategy=strategy, world_size=world_size, tp=tp)
        for extra in (dict(pp=1), dict(pp=1, microbatches=16), dict(pp=1, microbatches=16, schedule="1f1b")):
            assert planner.plan(**SEVENTY, strategy=strategy, world_size=world_size, tp=tp, **extra).parts == today.parts
    plain = planner.plan(**SEVENTY, strategy="fsdp", world_size=64, pp=1)
    assert plain.parts["params"] == 69e9 * 4 / 64 and plain.parts["unsharded"] == 8 * 69e9 / 81
    assert plain.parts["activations"] == planner.transformer_activation_bytes(4096, 1, 8192, 64, 80, "full")
    assert "pipeline" not in planner.format_plan(plain) and "stages" not in planner.format_plan(plain)


def test_a_stage_holds_its_share_of_the_layers_and_the_embedding():
    # Llama 2 70B: 80 layers, embedding and output head of 32,000 x 8192 each; the first of 4 stages holds 20
    # layers and the embedding
    embedding = 32000 * 8192
    assert planner.stage_parameters("llama2-70b", 4) == pytest.approx((69e9 - 2 * embedding) / 4 + embedding)
    assert planner.stage_parameters("llama2-70b", 1) == 69e9
    # without a vocabulary every parameter is in the layers: a stage's states are exactly 1/pp of them
    shape = planner.ModelShape("toy", 8e9, 32, 4096, 32)
    whole = planner.plan(shape, strategy="ddp", world_size=8)
    for pp in (2, 4, 8):
        staged = planner.plan(shape, strategy="ddp", world_size=8, pp=pp)
        for part in ("params", "grads", "optimizer"):
            assert staged.parts[part] == pytest.approx(whole.parts[part] / pp)
    # tensor, pipeline and data parallel together: 16 bytes per parameter of the stage over tp; DDP replicates
    p = planner.plan(**SEVENTY, strategy="ddp", world_size=512, tp=8, pp=4, microbatches=64)
    stage = (69e9 - 2 * embedding) / 4 + embedding
    assert p.parts["params"] + p.parts["grads"] + p.parts["optimizer"] == pytest.approx(16 * stage / 8)
    assert p.settings["dp"] == 16 and p.settings["stage_layers"] == 20 and p.fits
    text = planner.format_plan(p)
    assert "x pipeline parallel 4" in text and "first of 4 stages: 20 of 80 layers" in text and "64 micro-batches" in text
    # fsdp shards a stage over its dp replicas, one unit per layer of the stage and one for the embedding
    f = planner.plan(**SEVENTY, strategy="fsdp", world_size=512, tp=8, pp=4, microbatches=64)
    assert f.parts["optimizer"] == pytest.approx(8 * stage / 8 / 16) and f.parts["unsharded"] == pytest.approx(8 * stage / 8 / 21)


def test_uneven_stages_give_the_first_one_layer_more():
    assert [planner.stage_layers(80, pp) for pp in (1, 4, 16, 32, 80)] == [80, 20, 5, 3, 1]
    assert planner.stage_layers(80, 4, virtual_stages=2) == 20 and planner.stage_layers(80, 3, virtual_stages=2) == 28
    shape = planner.ModelShape("toy", 8e9, 10, 4096, 32)
    assert planner.stage_parameters(shape, 4) == pytest.approx(3 * 8e9 / 10)
    with pytest.raises(ValueError, match="10 layers do not fill 16 pipeline stages"):
        planner.stage_layers(10, 16)


def test_gpipe_holds_every_micro_batch_and_1f1b_at_most_pp():
    shape = planner.MODELS["llama2-70b"]

    def activations(m, schedule, checkpointing="none", **kw):
        return planner.plan(shape, strategy="ddp", world_size=32, tp=8, pp=4, microbatches=m, schedule=schedule,
                           seq_len=4096, checkpointing=checkpointing, **kw).parts["activations"]

    one = planner.transformer_activation_bytes(4096, 1, 8192, 64, 20, "none", tp=8)  # a micro-batch on 20 layers
    for m in (1, 2, 4, 8, 16, 64):
        assert activations(m, "gpipe") == pytest.approx(m * one)
        assert activations(m, "1f1b") == pytest.approx(min(m, 4) * one)
    assert planner.in_flight_microbatches(4, 64, "gpipe") == 64 and planner.in_flight_microbatches(4, 64) == 4
    # full checkpointing: every micro-batch in flight keeps its layers' inputs, one layer is recomputed at a time
    sbh = 4096 * 8192
    assert activations(64, "1f1b", "full") == pytest.approx(4 * 20 * 2 * sbh / 8 + sbh * (34 + 5 * 64 * 4096 / 8192) / 8)
    # interleaved 1F1B, v = 2: pp + (pp - 1) / v micro-batches of the stage, L (1 + (p - 1) / (p v)) layers' worth
    # (Korthikanti et al. 2022, section 4.2.3)
    assert planner.in_flight_microbatches(4, 64, "1f1b", virtual_stages=2) == 4 + 3 / 2
    assert activations(64, "1f1b", virtual_stages=2) == pytest.approx(
        planner.transformer_activation_bytes(4096, 1, 8192, 64, 80 * (1 + 3 / 8), "none", tp=8))


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=512, tp=8, pp=3), "tp x pp = 8 x 3 = 24 GPUs; choose tp x pp dividing 512"),
    (dict(world_size=8, pp=0), "pp must be a whole number"),
    (dict(world_size=8, pp=2, microbatches=0), "microbatches must be a whole number"),
    (dict(world_size=8, pp=2, schedule="zero-bubble"), "unknown pipeline schedule 'zero-bubble'; choose one of gpipe, 1f1b"),
    (dict(world_size=8, pp=2, schedule="gpipe", virtual_stages=2), "needs schedule '1f1b' and pp > 1"),
    (dict(world_size=8, virtual_stages=2), "needs schedule '1f1b' and pp > 1"),
    (dict(world_size=128, pp=128), "80 layers do not fill 128 pipeline stages"),
])
def test_pipeline_settings_refused_with_the_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        planner.plan("llama2-70b", **kwargs)


def test_python_m_workshop_estimate_planner_with_pipeline_stages(capsys):
    assert planner.main(["llama2-70b", "--strategy", "ddp", "--world-size", "512", "--tp", "8", "--pp", "4",
                         "--microbatches", "64", "--seq-len", "4096", "--checkpointing", "full"]) == 0
    out = capsys.readouterr().out
    assert "x pipeline parallel 4" in out and "16 data-parallel ranks" in out and out.strip().endswith("fits on H100 (74.5 GiB)")
    with pytest.raises(SystemExit) as exit:
        planner.main(["llama2-70b", "--world-size", "512", "--tp", "8", "--pp", "3"])
    assert exit.value.code == 2 and "8 x 3 = 24" in capsys.readouterr().err


def test_master_weights_add_an_fp32_copy_even_of_fp32_weights():
    assert zero.optimizer_state_bytes("adamw", torch.float32, master_weights=True) == 12
    assert zero.optimizer_state_bytes("adamw", torch.bfloat16, master_weights=False) == 8
    m = zero.predict(1000, 4, "zero2", master_weights=True)
    assert (m.params, m.grads, m.optimizer) == (4000, 1000, 3000)
