"""Mixture of experts and expert parallelism (workshop.experts): routing, capacity and the balancing loss without
processes; the expert-parallel layer against one process on 2 gloo ranks, once (tests/multirank/
experts_equivalence.py), with planted wrong all-to-all splits that its check must catch."""

import pytest
import torch

from helpers import on_ranks
from workshop import experts


def test_routing_keeps_first_choices_first_up_to_capacity():
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]] * 4)  # every token wants experts 0 then 1
    routed = experts.route(logits, top_k=2, capacity_factor=1.0)  # capacity ceil(4 x 2 / 4) = 2
    assert routed.capacity == 2 and routed.wanted.tolist() == [4, 4, 0, 0] and routed.kept.tolist() == [2, 2, 0, 0]
    assert routed.dropped == 4 and routed.token.tolist() == [0, 1, 0, 1]  # tokens 0 and 1, first choices first
    assert torch.allclose(routed.weight[:2], torch.full((2,), 1 / (1 + torch.e ** -1)))  # renormalized over top-2
    grouped = experts.route(logits, top_k=2, capacity_factor=1.0, groups=2)  # capacity 1 in each group of 2
    assert grouped.capacity == 1 and grouped.token.tolist() == [0, 2, 0, 2]
    assert experts.route(logits, top_k=1).kept.tolist() == [4, 0, 0, 0]  # no capacity: nothing dropped
    balanced = experts.route(torch.eye(4).repeat(2, 1) * 5, top_k=1)
    assert balanced.aux_loss < experts.route(logits, top_k=1).aux_loss  # balance lowers the loss (1 when even)
    with pytest.raises(ValueError, match="do not split into 3 equal routing groups"):
        experts.route(logits, top_k=1, groups=3)


def test_the_one_process_layer_and_the_sizes():
    torch.manual_seed(0)
    moe = experts.MoE(8, 16, num_experts=4, top_k=2)
    x = torch.randn(10, 8)
    out, routed = moe(x)
    by_hand = torch.zeros_like(x)
    for t, e, w in zip(routed.token, routed.expert, routed.weight):
        by_hand[t] += w * moe.experts[str(int(e))](x[t])
    assert torch.allclose(out, by_hand, atol=1e-6) and routed.dropped == 0
    assert experts.capacity(64, 8, 2, 1.25) == 20 and experts.capacity(64, 8, 2, None) is None
    assert experts.largest_ep_size(8, world_size=4, at_most=2) == 2 and experts.largest_ep_size(6, 4, 4) == 2
    with pytest.raises(ValueError, match=r"size 3 does not split 4 experts evenly; choose ep_size from \[1, 2, 4\]"):
        experts.check_ep_size(4, 3)
    with pytest.raises(ValueError, match="top_k 5 of 4 experts"):
        experts.MoE(8, 16, 4, top_k=5)
    table = torch.tensor([[3, 1, 2, 0], [1, 1, 4, 2]])  # 2 ranks x 4 experts: rank 0 holds experts 0, 1
    assert experts.all_to_all_bytes(table, 0, dim=2) == dict(forward=(2 + 2) * 8, backward=(2 + 2) * 8)
    assert experts.balanced_all_to_all_bytes(8, 2, dim=2, ep=2) == 2 * 8 * 2 * 2 * 4 / 2


@pytest.mark.multirank
def test_expert_parallel_layer_on_2_ranks_equals_one_process(tmp_path, clean_env):
    out = on_ranks("experts_equivalence.py", tmp_path / "ep.pt")
    assert out["world_size"] == 2
    saved = out["saved"]
    for ep_size in (2, 1):  # experts split over the ranks; experts replicated (data parallelism)
        assert saved[f"ep {ep_size}"] == (True, ""), ep_size
        counted, derived, dropped = saved[f"ep {ep_size} bytes"]
        assert {k: counted[k] for k in ("forward", "backward")} == derived
        assert dropped > 0  # capacity factor 1: the router is not even
    assert saved["ep 2 bytes"][0]["forward"] > 0 and saved["ep 1 bytes"][0]["forward"] == 0
    ok, detail = saved["planted unsorted"]
    assert not ok and detail.startswith("output differs") and "sort the rows by expert" in detail, detail
    ok, detail = saved["planted split by expert"]
    assert not ok and "which send it" in detail and "counts.view(ep, -1).sum(1)" in detail, detail
