"""ddp.ring_allreduce against torch.distributed.all_reduce, and ddp.per_rank_table, on the ranks
torchrun starts; rank 0 saves what tests/test_ddp.py compares.

    torchrun --standalone --nproc-per-node 3 tests/multirank/ring_allreduce.py OUT.pt

Sizes below, at and above the world size, none of them (but one) a multiple of it: the chunks differ.
"""

import sys

import torch
import torch.distributed as tdist

from workshop import ddp, dist

NUMELS = (1, 2, 3, 7, 1001)

env = dist.init()
cases = []
for numel in NUMELS:
    mine = torch.randn(numel, generator=torch.Generator().manual_seed(100 * numel + env.rank))  # different on every rank
    expected = mine.clone()
    tdist.all_reduce(expected, op=tdist.ReduceOp.SUM)
    ring = mine.clone()
    sent = ddp.ring_allreduce(ring)
    worst = torch.tensor((ring - expected).abs().max().item())
    tdist.all_reduce(worst, op=tdist.ReduceOp.MAX)  # the worst rank's difference
    cases.append({"numel": numel, "ring": ring, "expected": expected, "sent": sent, "worst_diff": worst.item()})

table = ddp.per_rank_table({"rank + 1": torch.tensor([env.rank + 1.0]), "only rank 0": None if env.rank else torch.ones(2)})
if env.is_main:
    torch.save({"world_size": env.world_size, "cases": cases, "table": table}, sys.argv[1])
dist.cleanup()
