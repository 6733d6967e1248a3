"""dist.init(), a DistributedDataParallel step, dist.cleanup(): then no gloo thread may remain in this process (a
group that outlives cleanup() can abort the rank at interpreter exit; see workshop.dist.init). Rank 0 saves the
names of its threads before the group, with it, and after cleanup()."""

import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from workshop import dist


def threads() -> list[str]:
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))


def step() -> None:
    model = DistributedDataParallel(torch.nn.Linear(8, 8))
    model(torch.randn(4, 8)).sum().backward()


before = threads()
env = dist.init()
step()
during = threads()
dist.cleanup()
if env.rank == 0:
    torch.save({"before": before, "during": during, "after": threads()}, sys.argv[1])
