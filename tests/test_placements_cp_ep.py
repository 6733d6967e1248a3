"""Context and expert parallelism in the estimates: the planner's activations per rank against what notebook 10's
ring attention keeps, the all-to-all's bytes against the expert-parallel layer's, and the placements of a
long-context run and a mixture of experts."""

import pytest
import torch

from workshop import context_parallel as cpar
from workshop import experts, models
from workshop.estimate import network, placements, planner

CPU = models.TINYGPT_SIZES["cpu"]  # the TinyGPT of notebook 10's check


@pytest.mark.parametrize("cp", [2, 4])
def test_one_block_per_rank_at_cp_is_what_ring_attention_keeps(cp):
    S, dim, heads = 2048, CPU["dim"], CPU["heads"]  # notebook 10's seq_len and model
    got = planner.gpt_layer_activation_bytes(S, 1, dim, heads, cp=cp)
    tokens = S // cp
    assert got == 16 * tokens * dim * 4 + (2 * 2 + heads) * tokens * 4  # 16 fp32 values and the statistics per token
    assert got == {2: 8_421_376, 4: 4_210_688}[cp] == cpar.block_activation_bytes(S, 1, dim, heads, cp)
    # what a block keeps on one rank's S / cp tokens (ring attention keeps as much: the 2-rank test of
    # test_context_parallel counts it inside the ring)
    torch.manual_seed(0)
    block = models.tinygpt("cpu", max_seq_len=S).layers[0]
    x = torch.randn(1, tokens, dim, requires_grad=True)
    measured, _ = cpar.saved_bytes(lambda: block(x), block)
    assert measured == got


def test_activations_with_context_parallelism():
    S, b, h, a, L = 131072, 1, 16384, 128, 8
    for ck in planner.CHECKPOINTING:  # fused attention: every part shrinks by cp
        assert planner.transformer_activation_bytes(S, b, h, a, L, ck, tp=8, attention="fused", cp=16) == \
            pytest.approx(planner.transformer_activation_bytes(S, b, h, a, L, ck, tp=8, attention="fused") / 16)
    # unfused: S / cp queries against all S keys, so the scores shrink by cp, not cp^2
    one = planner.transformer_activation_bytes(S, b, h, a, 1, tp=8, cp=16)
    assert one == pytest.approx(S / 16 * b * h * (34 + 5 * a * S / h) / 8)
    with pytest.raises(ValueError, match="does not split over cp = 3 ranks"):
        planner.gpt_layer_activation_bytes(2048, 1, 128, 4, cp=3)


def test_the_plan_shards_states_over_dp_x_cp_and_splits_the_experts_over_ep():
    base = dict(strategy="fsdp", world_size=64, seq_len=8192, checkpointing="full", attention="fused")
    flat, split = planner.plan("llama2-70b", **base), planner.plan("llama2-70b", cp=4, **base)
    assert split.settings["dp"] == 16 and split.parts["params"] == flat.parts["params"]  # 64 replicas either way
    assert split.parts["activations"] == pytest.approx(flat.parts["activations"] / 4)
    mixtral = planner.MODELS["mixtral-8x7b"]
    assert mixtral.active_parameters == pytest.approx(13e9, rel=0.02)  # the paper's 13B active of 47B
    one, eight = (planner.plan(mixtral, strategy="ddp", world_size=64, ep=ep) for ep in (1, 8))
    dense = mixtral.parameters - mixtral.expert_parameters
    assert eight.parts["params"] == pytest.approx(4 * (dense + mixtral.expert_parameters / 8))  # fp32 weights
    assert one.parts["params"] == pytest.approx(4 * mixtral.parameters)
    for kwargs in (dict(model="llama2-70b", ep=2), dict(model=mixtral, ep=3), dict(model=mixtral, ep=8, world_size=4)):
        with pytest.raises(ValueError, match="ep .* splits the experts"):
            planner.plan(**{"world_size": 64, **kwargs})


def test_all_to_all_bytes_have_one_home_and_match_the_layer():
    assert experts.balanced_all_to_all_bytes is network.moe_all_to_all_bytes
    # the layer's count from a routing table is the cost model's formula on that table (torch -> lists, no copy of it)
    uneven = torch.tensor([[3, 1, 2, 0], [1, 1, 4, 2]])
    assert experts.all_to_all_bytes(uneven, 1, 2)["forward"] == network.routed_all_to_all_bytes(uneven.tolist(), 1, 2)
    assert network.routed_all_to_all_bytes(network.even_routing(64, 2, 8, 4), 3, 32) == network.moe_all_to_all_bytes(
        64, 2, 32, 4)
    # notebook 10's defaults: 64 tokens per rank, top 2, dim 32, fp32, on 2 ranks: half of each way leaves
    assert network.moe_all_to_all_bytes(64, 2, 32, 2, 4) == 2 * 64 * 2 * 32 * 4 / 2
    assert network.moe_all_to_all_bytes(64, 2, 32, 1) == 0
    with pytest.raises(ValueError, match="ep must be"):
        network.moe_all_to_all_bytes(64, 2, 32, 0)
    # a balanced routing table gives the same bytes as the layer counts them (experts.all_to_all_bytes)
    ep, E, tokens, top_k, dim = 4, 8, 64, 2, 32
    table = torch.full((ep, E), tokens * top_k // E)
    for rank in range(ep):
        derived = experts.all_to_all_bytes(table, rank, dim)
        assert derived["forward"] == derived["backward"] == network.moe_all_to_all_bytes(tokens, top_k, dim, ep)


def test_the_all_to_all_on_two_levels():
    h100 = network.gpu_cluster("h100")
    n = 64e6
    assert network.all_to_all_split(n, 16, h100) == (7 / 16 * n, 8 / 16 * n)  # 7 peers in the node, 8 outside
    assert network.all_to_all_split(n, 8, h100) == (7 / 8 * n, 0)
    want = max(7 * h100.intra.alpha + 7 / 16 * n * h100.intra.beta, 8 * h100.inter.alpha + n / 2 * h100.inter.beta)
    assert network.all_to_all(n, 16, h100) == pytest.approx(want)
    assert network.all_to_all(n, 16, h100) > 4 * network.all_to_all(n, 8, h100)  # half of it on the network
    link = network.get_link("ib-ndr-400")  # one link: the pairwise exchange, (p - 1) alpha + (p - 1) / p n beta
    assert network.all_to_all(n, 4, link) == pytest.approx(3 * link.alpha + 3 / 4 * n * link.beta)
    assert network.all_to_all(n, 1, h100) == 0


def test_pp_step_prices_the_ring_and_the_all_to_alls():
    h100 = network.gpu_cluster("h100")
    shape = planner.MODELS["mixtral-8x7b"]
    flat = placements.pp_step(shape, dp=8, tp=1, pp=1, microbatches=2, cluster=h100)
    moe = placements.pp_step(shape, dp=8, tp=1, pp=1, microbatches=2, cluster=h100, ep=8)
    assert flat.ep_s == flat.cp_s == 0
    assert moe.ep_s == pytest.approx(2 * 32 * 6 * network.all_to_all(4096 * 2 * 4096 * 2, 8, h100))
    long = placements.pp_step("llama3-405b", dp=1, tp=8, pp=16, microbatches=16, seq_len=131072, cp=16,
                              strategy="fsdp", cluster=h100)
    assert long.compute_s == pytest.approx(16 * placements.model_flops("llama3-405b", 131072) * 8 / 126 / 128
                                           / (0.4 * network.GPUS["h100"]["flops"]))
    assert long.cp_s == 0  # the ring's blocks (8 of 128 heads' keys and values) hide behind the attention
    with pytest.raises(ValueError, match="ep 2 needs a mixture of experts"):
        placements.pp_step("llama2-70b", dp=8, tp=1, pp=1, microbatches=1, ep=2)


def test_long_context_needs_context_parallelism():
    run = {k: v for k, v in placements.EXAMPLES["long-context"].items() if k != "published"}
    rows = placements.placements(**run)
    assert all(r.dp * r.tp * r.pp * r.cp == 16384 for r in rows)
    best = rows[0]
    assert best.fits and best.cp > 1 and f"CP {best.cp}" in best.reason
    # without CP the 128 sequences feed 128 replicas one micro-batch each: the pipeline stands idle
    why = placements.why(rows).splitlines()
    assert why[0].startswith(f"{best.name} (fsdp) wins")
    without = next(line for line in why if line.startswith("without CP"))
    assert "1 micro-batch: bubble" in without
    llama3 = next(r for r in rows if (r.dp, r.tp, r.pp, r.cp) == (8, 8, 16, 16))  # Llama 3's table 4
    assert llama3.fits and llama3.microbatches == 16
    # on 1,024 GPUs (8 replicas x 16 micro-batches at tp 8) no placement fits without CP; some do with it
    small = placements.placements(**{**run, "gpus": 1024})
    assert small[0].fits and small[0].cp > 1
    assert not any(r.fits for r in small if r.cp == 1)
    assert any(line.startswith("without CP: none of") and "does not fit" in line
               for line in placements.why(small).splitlines())


def test_a_mixture_of_experts_places_its_experts():
    rows = placements.placements(**placements.EXAMPLES["moe"])
    assert {r.ep for r in rows} == {1, 2, 4, 8}
    assert all((r.dp * r.cp) % r.ep == 0 and r.dp * r.tp * r.pp * r.cp == 64 for r in rows)
    best = rows[0]
    assert best.fits and best.ep > 1 and f"EP {best.ep} inside a node: all-to-alls" in best.reason
    assert "without EP: at best" in placements.why(rows)
    text = placements.format_placements(rows, top=2)
    assert text.splitlines()[0].startswith("| dp | tp | pp | ep | micro-batches |")


def test_python_m_workshop_estimate_placements(capsys):
    assert placements.main(["long-context", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "Llama 3 405B" in out and " wins, " in out and "the published placement, dp 8 x tp 8 x pp 16 x cp 16" in out
    assert placements.main(["moe", "--top", "1"]) == 0
    assert "without EP" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        placements.main(["moe", "--top", "-1"])


def test_the_cost_models_placements_command_searches_cp_and_ep(capsys):
    from workshop.estimate import costmodel

    assert costmodel.main(["placements", "mixtral-8x7b", "--gpus", "64", "--ep", "1,2", "--cp", "1,2", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "| ep |" in out and "| cp |" in out and " wins, " in out and "without EP: at best" in out
    with pytest.raises(SystemExit):
        costmodel.main(["placements", "70B", "--cp", "0"])
    assert "give whole numbers of at least 1, comma-separated" in capsys.readouterr().err
