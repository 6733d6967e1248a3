"""Context parallelism (workshop.context_parallel): the layouts, the online softmax and the derivations without
processes; ring attention and the all-gather variant against one process on 2 gloo ranks, once
(tests/multirank/context_parallel_equivalence.py), with a planted wrong rescaling that its check must catch."""

import pytest
import torch

from helpers import on_ranks
from workshop import context_parallel as cpar
from workshop.estimate import planner


def test_layouts_cover_the_sequence_and_zigzag_balances_the_causal_work():
    for cp in (1, 2, 4):
        for layout in cpar.LAYOUTS:
            held = torch.cat([cpar.positions(layout, 32, cp, r) for r in range(cp)])
            assert sorted(held.tolist()) == list(range(32)), (layout, cp)
        zigzag = [cpar.causal_pairs("zigzag", 32, cp, r) for r in range(cp)]
        contiguous = [cpar.causal_pairs("contiguous", 32, cp, r) for r in range(cp)]
        assert sum(zigzag) == sum(contiguous) == 32 * 33 // 2
        assert len(set(zigzag)) == 1 and cpar.imbalance(zigzag) == 1.0
        assert contiguous == sorted(contiguous)  # the later blocks see more keys
    assert cpar.positions("zigzag", 8, 2, 0).tolist() == [0, 1, 6, 7]  # head and tail
    assert cpar.shard(torch.arange(8).view(1, 8), "zigzag", 2, 1, dim=1).tolist() == [[2, 3, 4, 5]]
    with pytest.raises(ValueError, match="does not split into 8 equal pieces .* choose a length divisible by 8"):
        cpar.positions("zigzag", 12, 4, 0)
    with pytest.raises(ValueError, match="unknown layout 'striped'"):
        cpar.chunks("striped", 8, 2, 0)


def test_tiles_leave_out_what_a_causal_mask_hides():
    mine, theirs = cpar.chunks("contiguous", 8, 2, 0), cpar.chunks("contiguous", 8, 2, 1)
    assert cpar.tiles(mine, theirs, causal=True) == []  # rank 0's queries come before rank 1's keys
    assert [t[2] for t in cpar.tiles(theirs, theirs, causal=True)] == [True]
    assert len(cpar.tiles(mine, theirs, causal=False)) == 1


def test_online_softmax_over_blocks_is_softmax_and_its_check_names_a_missing_rescale():
    assert cpar.check_online_update(cpar.online_update)

    def no_rescaled_sum(m, total, acc, scores, v):
        m_new = torch.maximum(m, scores.amax(-1))
        p = torch.exp(scores - m_new.unsqueeze(-1))
        return m_new, total + p.sum(-1), acc * torch.exp(m - m_new).unsqueeze(-1) + p @ v

    def no_rescaled_output(m, total, acc, scores, v):
        m_new = torch.maximum(m, scores.amax(-1))
        p = torch.exp(scores - m_new.unsqueeze(-1))
        return m_new, total * torch.exp(m - m_new) + p.sum(-1), acc + p @ v

    assert "the running sum differs" in cpar.check_online_update(no_rescaled_sum).detail
    assert "acc, too, is rescaled" in cpar.check_online_update(no_rescaled_output).detail


def test_attention_memory_and_flops_as_derived():
    torch.manual_seed(0)
    for causal in (False, True):
        q, k, v = (torch.randn(1, 2, 64, 8, requires_grad=True) for _ in range(3))
        measured, out = cpar.saved_bytes(lambda: cpar.naive_attention(q, k, v, causal))
        assert measured == cpar.naive_saved_bytes(64, 1, 2, 8, causal)
        fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.allclose(out, fused, atol=1e-6)
    fused, _ = cpar.saved_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert fused == cpar.fused_saved_bytes(64, 1, 2, 8)
    assert cpar.attention_flops(64, 1, 2, 8) == 2 * cpar.attention_flops(64, 1, 2, 8, causal=True) == 4 * 64 * 64 * 16
    assert cpar.block_activation_bytes(64, 2, 32, 2, cp=4) == planner.gpt_layer_activation_bytes(16, 2, 32, 2)
    ring, gather = cpar.ring_bytes(64, 1, 2, 8, 4).values()
    assert ring["sent_forward"] == gather["sent_forward"] and ring["kv_held"] * 2 == gather["kv_held"]
    assert cpar.library_problem("cpu").startswith("torch's context_parallel shards only CUDA attention kernels")
    assert cpar.library_problem("cuda:0") is None


@pytest.mark.multirank
def test_ring_and_allgather_attention_on_2_ranks_equal_one_process(tmp_path, clean_env):
    out = on_ranks("context_parallel_equivalence.py", tmp_path / "cp.pt")
    assert out["world_size"] == 2
    saved = out["saved"]
    B, S = 2, 32  # as the script
    for layout in cpar.LAYOUTS:
        for causal in (False, True):
            assert saved[f"ring {layout} causal={causal}"] == (True, ""), (layout, causal)
            name = f"ring {layout} causal={causal}"
            traffic, pairs = saved[f"{name} traffic"], saved[f"{name} pairs"]
            assert [t["pairs"] for t in traffic] == pairs  # scored, counted: exactly what the mask lets through
            for t in traffic:
                assert {k: t[k] for k in ("sent_forward", "sent_backward", "kv_held")} == saved["bytes"]["ring"]
        assert saved[f"allgather {layout}"] == (True, "")
        got = saved[f"allgather {layout} traffic"]
        assert {k: got[k] for k in ("sent_forward", "sent_backward", "kv_held")} == saved["bytes"]["allgather"]
    contiguous = [t["pairs"] for t in saved["ring contiguous causal=True traffic"]]
    zigzag = [t["pairs"] for t in saved["ring zigzag causal=True traffic"]]
    assert cpar.imbalance(contiguous) > 1.4 and cpar.imbalance(zigzag) == 1.0
    ok, detail = saved["planted rescaling"]
    assert not ok and "output differs" in detail and "rescaled by exp(m_old - m_new)" in detail, detail
    tiny = saved["tinygpt"]
    assert abs(tiny["loss"] - tiny["reference"]) < 1e-5 and tiny["worst"] < 1e-5, tiny
    measured, derived = saved["block bytes"]
    assert measured == derived == planner.gpt_layer_activation_bytes(S // 2, B, 32, 2)
