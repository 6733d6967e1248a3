"""workshop.ddp's ring all-reduce on 1 and 3 ranks (2: notebook 05), workshop.check's verdict on 3 ranks when one
rank differs, and workshop.data_parallel's steps of nn.DataParallel by hand against one process. Naive, bucketed,
torch and Lightning DDP against one process: notebook 05's checked cell, on 2 ranks in test_notebook_05."""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import on_ranks
from workshop import data_parallel, dist, models


@pytest.mark.multirank
def test_ring_allreduce_equals_all_reduce_with_uneven_chunks_and_every_rank_gets_the_checks_verdict(tmp_path, clean_env):
    """On 3 ranks, an odd ring; notebook 05 checks 2 ranks against torch.distributed.all_reduce (test_notebook_05)."""
    nproc = 3
    saved = on_ranks("ring_allreduce.py", tmp_path / "ring.pt", nproc=nproc)
    n = saved["world_size"]
    assert n == nproc
    for case in saved["cases"]:
        numel = case["numel"]
        torch.testing.assert_close(case["ring"], case["expected"], rtol=1e-5, atol=1e-5, msg=f"{numel} elements")
        assert case["worst_diff"] < 1e-4, case
        # rank 0 sends every chunk but chunk 1 in the reduce-scatter, every chunk but chunk 2 in the all-gather
        sizes = [len(c) for c in torch.arange(numel).tensor_split(n)]
        assert case["sent"] == 4 * (2 * numel - sizes[1 % n] - sizes[2 % n]), case
        if numel % n == 0:
            assert case["sent"] == 4 * numel * 2 * (n - 1) / n
    lines = saved["table"].splitlines()
    assert lines[0].split() == [w for r in range(n) for w in ("rank", str(r))]
    assert lines[1].split() == ["rank", "+", "1", *map(str, range(1, n + 1))]
    assert lines[2].split() == ["only", "rank", "0", "1", "1", *["-"] * (n - 1)]
    # a difference on the last rank alone fails the check on rank 0 too; a NaN there stops rank 0 as well
    verdict = saved["check_on_rank0"]
    assert not verdict["weights_ok"] and verdict["weights_detail"] == "equal on this rank, different on another"
    assert verdict["diverged"].startswith("training diverged at step 5: another rank's loss is not finite")


def test_ring_allreduce_on_one_rank_leaves_the_tensor(clean_env):
    from workshop import ddp

    dist.init()
    try:
        t = torch.arange(5.0)
        assert ddp.ring_allreduce(t) == 0
        assert torch.equal(t, torch.arange(5.0))
        with pytest.raises(ValueError, match="contiguous"):
            ddp.ring_allreduce(torch.zeros(4, 4).t())
        assert ddp.per_rank_table({"x": torch.tensor([2.0, 3.0]), "none": None}).splitlines() == [
            "      rank 0", "x        2 3", "none       -"]
    finally:
        dist.cleanup()


def test_the_epochs_check_names_a_missing_set_epoch_and_overlapping_shares(clean_env):
    """Notebook 05's shuffled epochs (the 2-rank run: test_notebook_05), on one rank: the usual mistakes named."""
    from torch.utils.data import DistributedSampler

    from workshop import ddp

    dist.init()
    try:
        sampler = DistributedSampler(range(8), num_replicas=1, rank=0, shuffle=True, seed=0)
        orders = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            orders.append(list(sampler))
        assert all(ddp.check_shuffled_epochs(orders, 8).values())
        forgot = ddp.check_shuffled_epochs([orders[0], orders[0]], 8)["each epoch reads a new order"]
        assert not forgot and "epoch 1 repeats the order of the one before: call sampler.set_epoch" in forgot.detail
        twice = ddp.check_shuffled_epochs([orders[0], [0, 0, *orders[1][2:]]], 8)
        assert not twice["each epoch deals every sample to one rank"] and "the same seed" in \
            twice["each epoch deals every sample to one rank"].detail
    finally:
        dist.cleanup()


def test_scatter_splits_unevenly_and_refuses_too_small_a_batch():
    chunks = data_parallel.scatter(torch.arange(7), 3)
    assert [c.tolist() for c in chunks] == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="at least one sample"):
        data_parallel.scatter(torch.arange(2), 3)


def test_parallel_apply_runs_in_threads_keeps_order_and_raises():
    import threading

    names = data_parallel.parallel_apply(lambda i: (i, threading.current_thread().name), [(0,), (1,), (2,)])
    assert [i for i, _ in names] == [0, 1, 2]
    assert threading.current_thread().name not in {name for _, name in names}
    with torch.no_grad():  # the caller's grad mode reaches the threads
        assert data_parallel.parallel_apply(lambda: torch.is_grad_enabled(), [()]) == [False]

    def fail(i):
        if i == 1:
            raise KeyError("replica 1")
        return i

    with pytest.raises(KeyError, match="replica 1"):
        data_parallel.parallel_apply(fail, [(0,), (1,)])


def dp_step(model, x, y, n):
    """nn.DataParallel's step by hand, as notebook 04 writes it (without the optimizer)."""
    replicas = data_parallel.replicate(model, n)
    outputs = data_parallel.parallel_apply(lambda m, c: m(c), zip(replicas, data_parallel.scatter(x, n)))
    logits = data_parallel.gather([o.detach() for o in outputs]).requires_grad_()
    F.cross_entropy(logits, y).backward()
    data_parallel.parallel_apply(lambda o, g: o.backward(g), zip(outputs, data_parallel.scatter(logits.grad, n)))
    data_parallel.reduce_gradients(replicas, model)
    return logits.detach(), replicas


@pytest.mark.parametrize("n", [1, 2, 3])
def test_dataparallel_by_hand_equals_one_process(n):
    torch.manual_seed(0)
    one = models.get_model("small_cnn", norm="group")
    by_hand = copy.deepcopy(one)
    x, y = torch.randn(10, 3, 32, 32), torch.randint(0, 10, (10,))  # 10 samples: uneven chunks over 3
    logits = one(x)
    F.cross_entropy(logits, y).backward()
    logits_by_hand, replicas = dp_step(by_hand, x, y, n)
    torch.testing.assert_close(logits_by_hand, logits.detach(), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(one.named_parameters(), by_hand.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # the replicas were copies: their weights are the master's, their gradients their own chunk's
    assert all(r is not by_hand for r in replicas)
    assert all(torch.equal(a, b) for r in replicas for a, b in zip(r.parameters(), by_hand.parameters()))
    if n > 1:
        assert not torch.allclose(next(replicas[0].parameters()).grad, next(by_hand.parameters()).grad)


def test_a_mean_instead_of_the_sum_would_be_caught():
    """reduce_gradients sums: each chunk's gradient already carries its 1/B."""
    torch.manual_seed(0)
    master = torch.nn.Linear(3, 2)
    replicas = data_parallel.replicate(master, 2)
    for r, value in zip(replicas, (1.0, 3.0)):
        for p in r.parameters():
            p.grad = torch.full_like(p, value)
    data_parallel.reduce_gradients(replicas, master)
    assert torch.equal(master.weight.grad, torch.full((2, 3), 4.0))


def test_laps_add_up_per_phase():
    laps = data_parallel.Laps()
    laps.lap("a")
    laps.lap("b")
    laps.start()
    laps.lap("a")
    assert set(laps.seconds) == {"a", "b"} and laps.total() == pytest.approx(sum(laps.seconds.values()))
