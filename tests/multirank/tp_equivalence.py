"""Tensor parallelism against one process; rank 0 saves (value, reference) pairs for tests/test_tp.py.

    torchrun --standalone --nproc-per-node 2 tests/multirank/tp_equivalence.py OUT.pt   # TP over 2 ranks
    torchrun --standalone --nproc-per-node 4 tests/multirank/tp_equivalence.py OUT.pt   # and 2D: 2 (dp) x 2 (tp)

With 2 ranks: the from-scratch column/row layers and Megatron block, and the DTensor plan (with and
without sequence parallelism), in forward and gradients; training with the plan; greedy decoding of
the split model (KV cache, no cache, static cache). With 4 ranks: training with FSDP2 x TP (apply_2d)
and with Lightning's ModelParallelStrategy. Every rank computes the one-process reference itself.
"""

import copy
import sys

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from workshop import data, dist, inference, lit, models, tp

STEPS, MICRO, SEQ, LR = 3, 4, 32, 0.1

env = dist.init()
W = env.world_size
pairs = {}  # name -> (tensor-parallel value, one-process reference), gathered whole


def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's piece, concatenated along `dim` in rank order."""
    parts = [torch.empty_like(t) for _ in range(W)]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


def fresh():
    torch.manual_seed(0)
    return models.tinygpt("cpu", max_seq_len=SEQ)


if W == 2:
    # From scratch: column then row on plain nn.Linear layers (with biases), forward and gradients
    torch.manual_seed(1)
    lin1, lin2 = nn.Linear(32, 64), nn.Linear(64, 32)
    x = torch.randn(4, 8, 32, requires_grad=True)
    ref = lin2(F.gelu(lin1(x)))
    ref.square().sum().backward()
    col, row = tp.ColumnParallelLinear(lin1, None), tp.RowParallelLinear(lin2, None)
    xt = x.detach().clone().requires_grad_()
    out = row(F.gelu(col(xt)))
    out.square().sum().backward()
    pairs["mlp.out"] = (out, ref)
    pairs["mlp.x.grad"] = (xt.grad, x.grad)
    pairs["mlp.w1.grad"] = (gather(col.weight.grad, 0), lin1.weight.grad)
    pairs["mlp.b1.grad"] = (gather(col.bias.grad, 0), lin1.bias.grad)
    pairs["mlp.w2.grad"] = (gather(row.weight.grad, 1), lin2.weight.grad)
    pairs["mlp.b2.grad"] = (row.bias.grad, lin2.bias.grad)

    # From scratch: a whole TinyGPT block, attention split by heads
    block = fresh().layers[0]
    h = torch.randn(2, 16, 128, requires_grad=True)
    ref = block(h)
    ref.square().sum().backward()
    mb = tp.megatron_block(block)
    ht = h.detach().clone().requires_grad_()
    out = mb(ht)
    out.square().sum().backward()
    pairs["block.out"] = (out, ref)
    pairs["block.x.grad"] = (ht.grad, h.grad)
    for name in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1"):
        pairs[f"block.{name}.grad"] = (gather(mb.get_submodule(name).weight.grad, 0), block.get_submodule(name).weight.grad)
    for name in ("attention.wo", "feed_forward.w2"):
        pairs[f"block.{name}.grad"] = (gather(mb.get_submodule(name).weight.grad, 1), block.get_submodule(name).weight.grad)
    for name in ("attention_norm", "ffn_norm"):
        pairs[f"block.{name}.grad"] = (mb.get_submodule(name).weight.grad, block.get_submodule(name).weight.grad)
    try:
        tp.ColumnParallelLinear(nn.Linear(8, 7), None)
    except ValueError as err:
        pairs["error.column"] = str(err)

    # The DTensor plan: loss and every gradient
    tokens = torch.randint(256, (2, SEQ), generator=torch.Generator().manual_seed(2))
    dense = fresh()
    loss = models.lm_loss(dense(tokens), tokens)
    loss.backward()
    for sp in (False, True):
        model = tp.apply_tp(fresh(), tp.make_mesh(env, tp_size=W)["tp"], sequence_parallel=sp)
        tp_loss = models.lm_loss(model(tokens), tokens)
        tp_loss.backward()
        pairs[f"plan(sp={sp}).loss"] = (tp_loss.detach(), loss.detach())
        grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in model.named_parameters()}
        for n, p in dense.named_parameters():
            pairs[f"plan(sp={sp}).{n}.grad"] = (grads[n], p.grad)

    # Greedy decoding of the split model equals one device's
    model = fresh().eval()
    prompt = data.encode("The old dog").unsqueeze(0)
    reference_tokens = models.generate(model, prompt, 20)
    split = tp.apply_tp(copy.deepcopy(model), tp.make_mesh(env, tp_size=W)["tp"])
    pairs["decode.kv_cache"] = (models.generate(split, prompt, 20), reference_tokens)
    pairs["decode.no_cache"] = (models.generate(split, prompt, 20, use_cache=False), reference_tokens)
    pairs["decode.static"] = (inference.StaticDecoder(split).generate(prompt, 20), reference_tokens)

# Training: the one-process reference on the global batches, then the parallel versions
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


if W == 2:
    for sp in (False, True):
        model = tp.apply_tp(fresh(), tp.make_mesh(env, tp_size=2)["tp"], sequence_parallel=sp)
        add_state(f"train_tp(sp={sp})", train(model, data.make_loader(train_set, global_batch)))
if W == 4:
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
