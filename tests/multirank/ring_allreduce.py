"""ddp.ring_allreduce against torch.distributed.all_reduce, ddp.per_rank_table, and workshop.check's verdicts
(every rank reaches the same one, whichever rank differs), on the ranks torchrun starts; rank 0 saves what
tests/test_ddp.py compares.

    torchrun --standalone --nproc-per-node 3 tests/multirank/ring_allreduce.py OUT.pt

Sizes below, at and above the world size, none of them (but one) a multiple of it: the chunks differ.
"""

import sys

import torch
import torch.distributed as tdist
from torch import nn

from workshop import check, ddp, dist

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


def fresh():
    torch.manual_seed(0)
    return nn.Linear(4, 2)


differs = fresh()
if env.rank == env.world_size - 1:
    with torch.no_grad():
        differs.bias[0] += 1.0  # only the last rank's copy differs
verdicts = {"weights": check.same_weights(differs, fresh())}
try:
    check.stop_if_diverged(torch.tensor(float("nan") if env.rank == env.world_size - 1 else 1.0), step=5)
    verdicts["diverged"] = "no"
except check.Diverged as err:
    verdicts["diverged"] = str(err)

if env.is_main:
    verdicts = {"weights_ok": verdicts["weights"].ok, "weights_detail": verdicts["weights"].detail,
                "diverged": verdicts["diverged"]}
    torch.save({"world_size": env.world_size, "cases": cases, "table": table, "check_on_rank0": verdicts}, sys.argv[1])
dist.cleanup()
