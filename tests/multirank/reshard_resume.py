"""A checkpoint written on one number of ranks resumes on another with the uninterrupted run's losses;
rank 0 writes the losses for tests/test_reshard_resume.py to compare.

    torchrun --standalone --nproc-per-node 4 tests/multirank/reshard_resume.py train DIR fsdp ddp   # steps 1..STEPS
    torchrun --standalone --nproc-per-node 2 tests/multirank/reshard_resume.py resume DIR fsdp ddp  # SAVED+1..STEPS
    python tests/multirank/reshard_resume.py resume DIR fsdp ddp                                    # the same, one process

"train" runs STEPS steps and checkpoints after step SAVED: FSDP2 with `sharding.save_checkpoint` into DIR/fsdp
(torch.distributed.checkpoint: every rank writes its own shards), DDP with `checkpoint.save` into DIR/ddp.pt (rank 0
writes the full state). "resume" builds the same model and optimizer on its own world, loads the checkpoint and runs
the remaining steps. Each writes DIR/losses-<mode>-<world_size>.json: {strategy: {step: loss of the global batch}}.

Step s trains on global batch s, the windows (s-1)*GLOBAL_BATCH .. s*GLOBAL_BATCH-1 of the synthetic text, whatever
the world size; rank r takes its contiguous share, windows r*GLOBAL_BATCH/world_size onward. Every rank's loss is a
mean over as many tokens, so the mean over the ranks (what FSDP's reduce-scatter and DDP's all-reduce average the
gradients by) is the global batch's loss and gradient: only the order of the sums depends on the world size.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from workshop import checkpoint, data, dist, models, sharding

SEQ, GLOBAL_BATCH, STEPS, SAVED, LR = 16, 8, 6, 3, 3e-3  # GLOBAL_BATCH divisible by 4, 2 and 1 ranks
MODEL = dict(size="cpu", depth=2, max_seq_len=SEQ)  # the smallest named size, two blocks: seconds on 2 cores
MODEL_NAME = "tinygpt-cpu-depth2"

mode, folder, strategies = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
if mode not in ("train", "resume") or not set(strategies) <= {"fsdp", "ddp"}:
    raise SystemExit(f"usage: {sys.argv[0]} train|resume DIR fsdp|ddp ...")

env = dist.init()
if GLOBAL_BATCH % env.world_size:
    raise SystemExit(f"GLOBAL_BATCH {GLOBAL_BATCH} is not divisible by the world size {env.world_size}")
train_set, _, _ = data.get_text_dataset("synthetic", seq_len=SEQ, num_train_tokens=STEPS * GLOBAL_BATCH * SEQ + 1)


def batch(step: int):
    """This rank's share of global batch `step` (1-based): (x, y), each (GLOBAL_BATCH / world_size, SEQ)."""
    share = GLOBAL_BATCH // env.world_size
    first = (step - 1) * GLOBAL_BATCH + env.rank * share
    xs, ys = zip(*(train_set[i] for i in range(first, first + share)))
    return torch.stack(xs).to(env.device), torch.stack(ys).to(env.device)


def build(strategy: str):
    torch.manual_seed(0)
    model = models.tinygpt(**MODEL).to(env.device)
    if strategy == "fsdp":
        model = sharding.apply_fsdp(model, sharding.shard_mesh(env))
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, torch.optim.AdamW(model.parameters(), lr=LR)


def save(strategy: str, model, optimizer, step: int) -> None:
    if strategy == "fsdp":
        sharding.save_checkpoint(folder / "fsdp", model, optimizer, step=step)
    else:
        if env.is_main:
            checkpoint.save(folder / "ddp.pt", model, optimizer, step, model_name=MODEL_NAME)
        dist.barrier()


def load(strategy: str, model, optimizer) -> int:
    if strategy == "fsdp":
        return sharding.load_checkpoint(folder / "fsdp", model, optimizer)
    return checkpoint.load(folder / "ddp.pt", model, optimizer, model_name=MODEL_NAME)


losses = {}
for strategy in strategies:
    model, optimizer = build(strategy)
    start = 1 if mode == "train" else load(strategy, model, optimizer) + 1
    losses[strategy] = {}
    for step in range(start, STEPS + 1):
        x, y = batch(step)
        optimizer.zero_grad()
        loss = models.lm_loss(model(x), y)
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        tdist.all_reduce(total)  # the sum of the ranks' means; / world_size: the global batch's mean
        losses[strategy][step] = total.item() / env.world_size
        if mode == "train" and step == SAVED:
            save(strategy, model, optimizer, step)

if env.is_main:
    (folder / f"losses-{mode}-{env.world_size}.json").write_text(json.dumps(losses, indent=1))
dist.cleanup()
