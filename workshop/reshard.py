"""The same training run, checkpointed on one number of ranks and resumed on another, as if never interrupted.

    torchrun --standalone --nproc-per-node 4 -m workshop.reshard train DIR fsdp ddp    # steps 1..STEPS, saved after SAVED
    torchrun --standalone --nproc-per-node 2 -m workshop.reshard resume DIR fsdp ddp   # SAVED+1..STEPS on 2 ranks
    python -m workshop.reshard resume DIR fsdp ddp                                     # the same, one process

"train" runs STEPS AdamW steps of a two-block TinyGPT and checkpoints after step SAVED: FSDP2 with
`sharding.save_checkpoint` into DIR/fsdp (torch.distributed.checkpoint: every rank writes its own shards, and a load
on another world reads whichever pieces its new shards need), DDP with `checkpoint.save` into DIR/ddp.pt (rank 0
writes the full state). "resume" builds the same model and optimizer on its own world, loads the checkpoint and runs
the remaining steps. Each writes DIR/losses-<mode>-<world_size>.json: {strategy: {step: loss of the global batch}}.

What makes the resumed run the same run: step s trains on global batch s, the windows (s-1)*GLOBAL_BATCH ..
s*GLOBAL_BATCH-1 of the synthetic text, whatever the world size; rank r takes its contiguous share. Every rank's loss
is a mean over as many tokens, so the mean over the ranks (what FSDP's reduce-scatter and DDP's all-reduce average
the gradients by) is the global batch's loss and gradient: only the order of the sums depends on the world size.
The optimizer's state (Adam's moments and step count) travels in the checkpoint; the model is built from the same
seed. What may change: the number of ranks (any that divides the global batch) and the mesh.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from workshop import checkpoint, data, dist, models, sharding, train
from workshop.dist import DistEnv

SEQ, GLOBAL_BATCH, STEPS, SAVED, LR = 16, 24, 6, 3, 3e-3  # GLOBAL_BATCH divisible by 4, 3, 2 and 1 ranks
MODEL = dict(size="cpu", depth=2, max_seq_len=SEQ)  # the smallest named size, two blocks: seconds on 2 cores
MODEL_NAME = "tinygpt-cpu-depth2"
STRATEGIES = ("fsdp", "ddp")
# How close a resumed run's losses stay to the uninterrupted run's: the world size changes only the order of the sums
# (fp32 rounding, about 1e-7 relative per step); a lost gradient, a wrong scale or another batch differs by 1e-2 or more
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def share(env: DistEnv, global_batch: int) -> slice:
    """This rank's positions in a global batch of `global_batch` samples: the contiguous block rank * n .. (rank + 1)
    * n - 1, n = global_batch / world_size. On any world the ranks together take positions 0 .. global_batch - 1, so
    a step trains on the same samples whatever the number of ranks (a sampler's order for its own world would not)."""
    if global_batch % env.world_size:
        divisors = ", ".join(str(n) for n in range(1, global_batch + 1) if global_batch % n == 0)
        raise ValueError(f"the global batch of {global_batch} samples does not split evenly over {env.world_size} "
                         f"ranks: run on a number of ranks that divides it ({divisors})")
    n = global_batch // env.world_size
    return slice(env.rank * n, (env.rank + 1) * n)


def batch(env: DistEnv, text, step: int):
    """This rank's share of global batch `step` (1-based): (x, y), each (GLOBAL_BATCH / world_size, SEQ)."""
    mine, first = share(env, GLOBAL_BATCH), (step - 1) * GLOBAL_BATCH
    xs, ys = zip(*(text[i] for i in range(first + mine.start, first + mine.stop)))
    return torch.stack(xs).to(env.device), torch.stack(ys).to(env.device)


def build(env: DistEnv, strategy: str):
    """The model (from seed 0) under `strategy` on this world, and its AdamW."""
    with train.seeded(0):  # seed 0 for the weights, the caller's random stream untouched
        model = models.tinygpt(**MODEL).to(env.device)
    if strategy == "fsdp":
        model = sharding.apply_fsdp(model, sharding.shard_mesh(env))
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, torch.optim.AdamW(model.parameters(), lr=LR)


def save(folder: Path, strategy: str, model, optimizer, step: int) -> None:
    if strategy == "fsdp":
        sharding.save_checkpoint(folder / "fsdp", model, optimizer, step=step)
    else:
        if dist.get_env().is_main:
            checkpoint.save(folder / "ddp.pt", model, optimizer, step, model_name=MODEL_NAME)
        dist.barrier()


def load(folder: Path, strategy: str, model, optimizer) -> int:
    if strategy == "fsdp":
        return sharding.load_checkpoint(folder / "fsdp", model, optimizer)
    return checkpoint.load(folder / "ddp.pt", model, optimizer, model_name=MODEL_NAME)


def run(env: DistEnv, mode: str, folder: Path, strategies=STRATEGIES) -> dict[str, dict[int, float]]:
    """"train": steps 1..STEPS, checkpointed after SAVED; "resume": from the checkpoint to STEPS. Every rank
    returns {strategy: {step: the global batch's loss}}; rank 0 also writes it to DIR/losses-<mode>-<world>.json."""
    share(env, GLOBAL_BATCH)  # refuses a world that does not divide the global batch, before any step
    folder = Path(folder)
    text, _, _ = data.get_text_dataset("synthetic", seq_len=SEQ, num_train_tokens=STEPS * GLOBAL_BATCH * SEQ + 1)
    losses = {}
    for strategy in strategies:
        model, optimizer = build(env, strategy)
        start = 1 if mode == "train" else load(folder, strategy, model, optimizer) + 1
        losses[strategy] = {}
        for step in range(start, STEPS + 1):
            x, y = batch(env, text, step)
            optimizer.zero_grad()
            loss = models.lm_loss(model(x), y)
            loss.backward()
            optimizer.step()
            losses[strategy][step] = dist.global_mean(loss)
            if mode == "train" and step == SAVED:
                save(folder, strategy, model, optimizer, step)
    if env.is_main:
        (folder / f"losses-{mode}-{env.world_size}.json").write_text(json.dumps(losses, indent=1))
    return losses


def read_losses(folder: Path, mode: str, world_size: int) -> dict[str, dict[int, float]]:
    losses = json.loads((Path(folder) / f"losses-{mode}-{world_size}.json").read_text())
    return {strategy: {int(step): loss for step, loss in by_step.items()} for strategy, by_step in losses.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in ("train", "resume") or not set(argv[2:]) <= set(STRATEGIES):
        print("usage: python -m workshop.reshard train|resume DIR [fsdp] [ddp]", file=sys.stderr)
        return 2
    env = dist.init()
    try:
        run(env, argv[0], Path(argv[1]), argv[2:] or STRATEGIES)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
