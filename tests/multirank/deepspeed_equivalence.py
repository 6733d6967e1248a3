"""DeepSpeed ZeRO stages 1, 2 and 3 (`deepspeed.initialize` on the gloo process group, DS_ACCELERATOR=cpu)
against one process: the weights after a few AdamW steps, the first gradients, and the bytes each rank holds
after a backward; rank 0 saves it all for tests/test_multirank.py to compare.

    torchrun --standalone --nproc-per-node 2 tests/multirank/deepspeed_equivalence.py OUT.pt
"""

import sys

import torch
import torch.distributed as tdist

from workshop import data, dist, memory, models, sharding, tp

MICRO, STEPS, SEQ, LR = 4, 3, 32, 3e-3

env = dist.init()
deepspeed = sharding.import_deepspeed(env.device)
global_batch = MICRO * env.world_size
train_set, _, _ = data.get_text_dataset("synthetic", seq_len=SEQ, num_train_tokens=(STEPS + 1) * global_batch * SEQ + 1)
shard = data.make_loader(train_set, MICRO, env=env)


def fresh():
    torch.manual_seed(0)
    return models.tinygpt("cpu").to(env.device)


def engine_for(stage):
    model = fresh()
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 0.0, "steps_per_print": 10**9,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    return sharding.apply_deepspeed(model, torch.optim.AdamW(model.parameters(), lr=LR), config, env)[0]


def gather(obj):
    out = [None] * env.world_size
    tdist.all_gather_object(out, obj)
    return out


reference = fresh()
optimizer = torch.optim.AdamW(reference.parameters(), lr=LR)
for (x, y), _ in zip(data.make_loader(train_set, global_batch), range(STEPS)):
    optimizer.zero_grad()
    models.lm_loss(reference(x), y).backward()
    optimizer.step()
x, y = next(iter(data.make_loader(train_set, global_batch)))
model = fresh()
models.lm_loss(model(x), y).backward()
states, measured = {"reference": tp.full_state(reference)}, {}
grads = {"reference": {n: p.grad for n, p in model.named_parameters()}}

for stage in (1, 2, 3):
    engine = engine_for(stage)
    for (x, y), i in zip(shard, range(STEPS)):
        engine.backward(models.lm_loss(engine(x), y))
        if i == STEPS - 1:
            measured[stage] = gather(memory.measure_deepspeed(engine).as_dict())
        engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        states[stage] = tp.full_state(engine.module)
    engine = engine_for(stage)
    xs, ys = next(iter(shard))
    engine.backward(models.lm_loss(engine(xs), ys))
    grads[stage] = {n: deepspeed.utils.safe_get_full_grad(p).detach().cpu().clone() for n, p in engine.module.named_parameters()}

if env.is_main:
    torch.save({"world_size": env.world_size, "num_params": models.count_parameters(reference), "states": states,
                "grads": grads, "measured": measured}, sys.argv[1])
dist.cleanup()
