"""A rank that leaves without destroy_process_group (pytorch/pytorch#190489's shape): gloo ranks all-gather
and exit. `bare`: torch alone, so the group is alive at interpreter finalization, where gloo can abort
with "terminate called without an active exception"; `workshop`: the group joined by dist.init(), whose
exit handler leaves it while the interpreter is whole. How often each aborts, on 2 ranks:

    for i in $(seq 50); do python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/multirank/exit_without_cleanup.py bare 2>&1 | grep -c "terminate called"; done | sort | uniq -c
"""

import sys

import torch
import torch.distributed as tdist

if sys.argv[1:] == ["workshop"]:
    from workshop import dist

    dist.init()
elif sys.argv[1:] == ["bare"]:
    tdist.init_process_group("gloo")
else:
    sys.exit("usage: exit_without_cleanup.py bare|workshop")
gathered = [torch.empty(1) for _ in range(tdist.get_world_size())]
tdist.all_gather(gathered, torch.tensor([float(tdist.get_rank())]))
tdist.barrier()
