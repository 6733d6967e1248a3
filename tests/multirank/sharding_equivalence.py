"""ZeRO-1, FSDP2 (both reshard settings) and hybrid-sharded training of TinyGPT against one process,
the measured bytes per rank (workshop.measure.memory) for workshop.estimate.zero's prediction, and a sharded
checkpoint's round trip; rank 0 saves it all for tests/test_multirank.py to compare.

    torchrun --standalone --nproc-per-node 2 tests/multirank/sharding_equivalence.py OUT.pt

Every version sees the same global batches: DistributedSampler without shuffling deals window i to
rank i mod world_size, and every rank's loss is a mean over the same number of tokens, so the
mean of the ranks' gradients is the gradient of the global batch.
"""

import sys
import tempfile

import torch
import torch.distributed as tdist

from workshop import data, dist, models, sharding, tp
from workshop.measure import memory

MICRO, STEPS, SEQ, LR = 4, 3, 32, 3e-3

env = dist.init()
global_batch = MICRO * env.world_size
train_set, _, _ = data.get_text_dataset("synthetic", seq_len=SEQ, num_train_tokens=(STEPS + 1) * global_batch * SEQ + 1)


def fresh():
    torch.manual_seed(0)
    return models.tinygpt("cpu").to(env.device)


def train(model, optimizer, loader, steps=STEPS):
    """`steps` optimizer steps; returns the losses (this rank's)."""
    losses = []
    for (x, y), _ in zip(loader, range(steps)):
        optimizer.zero_grad()
        loss = models.lm_loss(model(x.to(env.device)), y.to(env.device))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather(obj):
    out = [None] * env.world_size
    tdist.all_gather_object(out, obj)
    return out


num_params = models.count_parameters(fresh())
states, measured = {}, {}

reference = fresh()
train(reference, torch.optim.AdamW(reference.parameters(), lr=LR), data.make_loader(train_set, global_batch))
states["reference"] = tp.full_state(reference)

shard = data.make_loader(train_set, MICRO, env=env)
mesh = sharding.shard_mesh(env)

model = torch.nn.parallel.DistributedDataParallel(fresh())
optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
train(model, optimizer, shard)
measured["ddp"] = gather(memory.measure(model, optimizer).as_dict())

model, optimizer = sharding.apply_zero1(fresh(), mesh, lr=LR)
train(model, optimizer, shard)
states["zero1"] = tp.full_state(model.module)
measured["zero1"] = gather(memory.measure(model, optimizer).as_dict())

for reshard in (True, False):
    model = sharding.apply_fsdp(fresh(), mesh, reshard_after_forward=reshard)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    train(model, optimizer, shard)
    states[f"fsdp_reshard_{reshard}"] = tp.full_state(model)
    measured[f"fsdp_reshard_{reshard}"] = gather(memory.measure(model, optimizer).as_dict())

model = sharding.apply_fsdp(fresh(), sharding.hybrid_mesh(env))
optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
train(model, optimizer, shard)
states["hybrid"] = tp.full_state(model)

# Lightning: ModelParallelStrategy calls configure_model, which applies the same FSDP2 sharding
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from workshop import lit  # noqa: E402

module = lit.LitLanguageModel(fresh(), lr=LR, parallelize=lambda m, mesh: sharding.apply_fsdp(m, mesh["data_parallel"]))
trainer = dist.make_trainer(env, strategy=ModelParallelStrategy(data_parallel_size=env.world_size, tensor_parallel_size=1),
                            max_steps=STEPS, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=sys.argv[1] + ".lightning")
trainer.fit(module, shard)
states["lightning_fsdp"] = tp.full_state(module.model)

# One backward each: the gradients (gathered) must equal the reference's closely. Adam hides a wrong
# gradient scale (it divides by the gradient's RMS), so the weights alone would not show one.
x, y = next(iter(data.make_loader(train_set, global_batch)))
model = fresh()
models.lm_loss(model(x), y).backward()
grads = {"reference": {n: p.grad.clone() for n, p in model.named_parameters()}}
xs, ys = next(iter(shard))
for name, make in (("zero1", lambda: sharding.apply_zero1(fresh(), mesh, lr=LR)[0]),
                   ("fsdp", lambda: sharding.apply_fsdp(fresh(), mesh)),
                   ("hybrid", lambda: sharding.apply_fsdp(fresh(), sharding.hybrid_mesh(env)))):
    model = make()
    models.lm_loss(model(xs), ys).backward()
    inner = getattr(model, "module", model)
    grads[name] = {n: full(p.grad).detach().cpu().clone() for n, p in inner.named_parameters()}

# The checkpoint round trip: the FSDP model after STEPS steps, saved; a fresh sharded model and
# optimizer load it; both take the next step on the same batch
ckpt_dir = [tempfile.mkdtemp(prefix="dcp-", dir=sys.argv[1].rsplit("/", 1)[0]) if env.is_main else None]
tdist.broadcast_object_list(ckpt_dir)
model = sharding.apply_fsdp(fresh(), mesh)
optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
train(model, optimizer, shard)
sharding.save_checkpoint(ckpt_dir[0], model, optimizer)
next_batch = list(shard)[STEPS:STEPS + 1]
restored = sharding.apply_fsdp(models.tinygpt("cpu").to(env.device), mesh)  # other initial weights
restored_opt = torch.optim.AdamW(restored.parameters(), lr=LR)
sharding.load_checkpoint(ckpt_dir[0], restored, restored_opt)
loss_direct = train(model, optimizer, next_batch, 1) + train(model, optimizer, next_batch, 1)
loss_restored = train(restored, restored_opt, next_batch, 1) + train(restored, restored_opt, next_batch, 1)
checkpoint = {"loss_direct": gather(loss_direct), "loss_restored": gather(loss_restored),
              "direct": tp.full_state(model), "restored": tp.full_state(restored)}

if env.is_main:
    torch.save({"world_size": env.world_size, "num_params": num_params, "states": states, "measured": measured, "grads": grads,
                "checkpoint": checkpoint}, sys.argv[1])
dist.cleanup()
