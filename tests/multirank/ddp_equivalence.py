"""Naive, bucketed, torch DDP and Lightning DDP training, and the one-process reference; rank 0
saves every version's final weights for tests/test_multirank.py to compare.

    torchrun --standalone --nproc-per-node 2 tests/multirank/ddp_equivalence.py OUT.pt

Every version sees the same global batches: micro_batch_size x world_size x grad_accum_steps
consecutive samples per optimizer step (DistributedSampler without shuffling deals sample i to
rank i mod world_size). The model normalises per sample (GroupNorm), so it is exact.
"""

import sys

import torch
import torch.nn.functional as F

from workshop import check, data, ddp, dist, lit, models, train

MICRO, ACCUM, STEPS, LR = 8, 2, 3, 0.05

env = dist.init()
global_batch = MICRO * env.world_size * ACCUM
train_set, _, _ = data.get_dataset("synthetic", num_train=STEPS * global_batch, num_test=8)


def fresh():
    torch.manual_seed(0)
    return models.SmallCNN(norm="group").to(env.device)


results = {}

model = fresh()  # the reference: one process, the whole global batch at once
opt = train.make_optimizer(model, LR)
for x, y in data.make_loader(train_set, global_batch):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
results["reference"] = model

model = fresh()
opt = train.make_optimizer(model, LR)
ddp.train_steps(model, opt, data.make_loader(train_set, MICRO, env=env), env.device, grad_accum_steps=ACCUM,
                sync=lambda: ddp.allreduce_gradients(model, env.world_size))
results["naive"] = model

model = fresh()
opt = train.make_optimizer(model, LR)
buckets = ddp.BucketedAllReduce(model, env.world_size, bucket_mb=0.05)
assert len(buckets.buckets) > 1
ddp.train_steps(model, opt, data.make_loader(train_set, MICRO, env=env), env.device, grad_accum_steps=ACCUM,
                sync=buckets.wait, no_sync=buckets.no_sync)
results["bucketed"] = model

model = ddp.apply_ddp(fresh(), env)
opt = train.make_optimizer(model, LR)
ddp.train_steps(model, opt, data.make_loader(train_set, MICRO, env=env), env.device, grad_accum_steps=ACCUM,
                no_sync=model.no_sync)
results["torch_ddp"] = model.module

module = lit.LitClassifier(fresh(), lr=LR)
trainer = dist.make_trainer(env, max_steps=STEPS, accumulate_grad_batches=ACCUM, use_distributed_sampler=False,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=sys.argv[1] + ".lightning")
trainer.fit(module, data.make_loader(train_set, MICRO, env=env))
results["lightning_ddp"] = module.model

# workshop.check: every rank reaches the same verdict, whichever rank differs
differs = fresh()
if env.rank == env.world_size - 1:
    with torch.no_grad():
        differs.head[-1].bias[0] += 1.0  # only the last rank's copy differs
verdicts = {"weights": check.same_weights(differs, fresh())}
try:
    check.stop_if_diverged(torch.tensor(float("nan") if env.rank == env.world_size - 1 else 1.0), step=5)
    verdicts["diverged"] = "no"
except check.Diverged as err:
    verdicts["diverged"] = str(err)

if env.is_main:
    states = {name: {k: v.detach().cpu() for k, v in m.state_dict().items()} for name, m in results.items()}
    torch.save({"world_size": env.world_size, "states": states, "check_on_rank0": {
        "weights_ok": verdicts["weights"].ok, "weights_detail": verdicts["weights"].detail,
        "diverged": verdicts["diverged"]}}, sys.argv[1])
dist.cleanup()
