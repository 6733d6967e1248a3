"""2D parallelism against one process; rank 0 saves (value, reference) pairs for tests/test_tp.py.

    torchrun --standalone --nproc-per-node 4 tests/multirank/tp_equivalence.py OUT.pt   # 2 (dp) x 2 (tp)

Training with FSDP2 x TP (apply_2d) and with Lightning's ModelParallelStrategy. Every rank computes the
one-process reference itself. Tensor parallelism on 2 ranks (the column/row layers and the Megatron block
by hand, the DTensor plan with and without sequence parallelism, training with it) is notebook 08's checked
cells, and tensor-parallel decoding notebook 11's, each run on 2 ranks by its test_notebook_NN.
"""

import sys

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from workshop import data, dist, lit, models, tp

STEPS, MICRO, SEQ, LR = 3, 4, 32, 0.1

env = dist.init()
W = env.world_size
if W != 4:
    sys.exit(f"run on 4 ranks (2 dp x 2 tp), not {W}")
pairs = {}  # name -> (tensor-parallel value, one-process reference), gathered whole


def fresh():
    torch.manual_seed(0)
    return models.tinygpt("cpu", max_seq_len=SEQ)


# The one-process reference on the global batches, then the 2D versions
global_batch = MICRO * 2
train_set, _, _ = data.get_text_dataset(seq_len=SEQ, num_train_tokens=STEPS * global_batch * SEQ + 1)
ref = fresh()
opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
for x, y in data.make_loader(train_set, global_batch):
    opt.zero_grad()
    models.lm_loss(ref(x), y).backward()
    opt.step()


def train(model, loader):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        models.lm_loss(model(x), y).backward()
        opt.step()
    return tp.full_state(model)


def add_state(version, state):
    for n, p in ref.named_parameters():
        pairs[f"{version}.{n}"] = (state[n], p.detach())


mesh = tp.make_mesh(env, dp_size=2, tp_size=2)
loader = tp.dp_loader(train_set, MICRO, mesh["dp"].size(), mesh["dp"].get_local_rank())
add_state("train_2d", train(tp.apply_2d(fresh(), mesh), loader))
module = lit.LitLanguageModel(fresh(), lr=LR, optimizer="sgd", parallelize=tp.lightning_2d())
trainer = dist.make_trainer(env, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2),
                            max_steps=STEPS, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=sys.argv[1] + ".lightning")
trainer.fit(module, tp.dp_loader(train_set, MICRO, 2, env.rank // 2))
add_state("train_lightning_2d", tp.full_state(module.model))

if env.is_main:
    saved = {k: v if isinstance(v, str) else tuple(t.detach().cpu() for t in v) for k, v in pairs.items()}
    torch.save({"world_size": W, "pairs": saved}, sys.argv[1])
dist.cleanup()
