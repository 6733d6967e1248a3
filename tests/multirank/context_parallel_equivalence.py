"""Context parallelism against one process; rank 0 saves what tests/test_context_parallel.py asserts.

    torchrun --standalone --nproc-per-node 2 tests/multirank/context_parallel_equivalence.py OUT.pt

Ring attention and the all-gather variant, contiguous and zig-zag, causal and not, against one process's attention
on the whole sequence (output and gradients of q, k, v); a planted wrong online-softmax rescaling; what each rank
scored, sent and held against the derivations; a TinyGPT with ring attention against one process (loss, gradients);
one block's activation bytes per rank against the formula. Every rank computes the one-process reference itself.
"""

import sys

import torch
import torch.distributed as tdist

from workshop import context_parallel as cpar
from workshop import dist, models

B, H, S, D = 2, 2, 32, 8

env = dist.init()
cp, rank = env.world_size, env.rank
saved = {}
g = torch.Generator().manual_seed(0)
q, k, v, dout = (torch.randn(B, H, S, D, generator=g) for _ in range(4))


def ring(layout, causal, update=cpar.online_update, traffic=None):
    return lambda a, b, c: cpar.ring_attention(a, b, c, None, layout, causal, update, traffic)


for layout in cpar.LAYOUTS:
    for causal in (False, True):
        traffic = cpar.Traffic()
        match = cpar.check_attention(ring(layout, causal, traffic=traffic), q, k, v, dout, layout=layout, causal=causal)
        saved[f"ring {layout} causal={causal}"] = (bool(match), match.detail)
        gathered = [None] * cp
        tdist.all_gather_object(gathered, traffic.as_dict())
        saved[f"ring {layout} causal={causal} traffic"] = gathered
        saved[f"ring {layout} causal={causal} pairs"] = [cpar.causal_pairs(layout, S, cp, r, causal) for r in range(cp)]
    traffic = cpar.Traffic()
    gather = lambda a, b, c: cpar.allgather_attention(a, b, c, None, layout, True, traffic)
    match = cpar.check_attention(gather, q, k, v, dout, layout=layout, causal=True)
    saved[f"allgather {layout}"] = (bool(match), match.detail)
    saved[f"allgather {layout} traffic"] = traffic.as_dict()
saved["bytes"] = cpar.ring_bytes(S, B, H, D, cp)


def no_rescaled_output(m, total, acc, scores, values):  # planted: acc keeps the old maximum's scale
    m_new = torch.maximum(m, scores.amax(dim=-1))
    p = torch.exp(scores - m_new.unsqueeze(-1))
    return m_new, total * torch.exp(m - m_new) + p.sum(dim=-1), acc + p @ values


planted = cpar.check_attention(ring("zigzag", True, no_rescaled_output), q, k, v, dout, layout="zigzag", causal=True)
saved["planted rescaling"] = (bool(planted), planted.detail)

# A TinyGPT with ring attention (zig-zag): this rank's tokens, gradients summed over the ranks, against one process
torch.manual_seed(0)
model = models.tinygpt("cpu", dim=32, depth=2, heads=2, max_seq_len=S)
tokens, targets = torch.randint(256, (B, S), generator=g), torch.randint(256, (B, S), generator=g)
models.lm_loss(model(tokens), targets).backward()
pos = cpar.positions("zigzag", S, cp, rank)
cp_model = cpar.apply_cp(model, None, "zigzag")
cp_model.zero_grad()
loss = models.lm_loss(cpar.cp_forward(cp_model, tokens[:, pos], pos), targets[:, pos])
loss.backward()
for w in cp_model.parameters():
    tdist.all_reduce(w.grad)
    w.grad /= cp  # the mean over the sequence: each rank's loss is the mean over its 1/cp of it
reference = dict(model.named_parameters())
worst = max(float((w.grad - reference[n].grad).abs().max()) for n, w in cp_model.named_parameters())
tdist.all_reduce(loss)
saved["tinygpt"] = dict(loss=float(loss) / cp, reference=float(models.lm_loss(model(tokens), targets)), worst=worst)

# One block's activation bytes per rank, measured and derived
block = cpar.apply_cp(model.layers[0], None, "zigzag")
x = torch.randn(B, S // cp, 32, requires_grad=True)
measured, _ = cpar.saved_bytes(lambda: block(x), block)
saved["block bytes"] = (measured, cpar.block_activation_bytes(S, B, 32, 2, cp))

if env.is_main:
    torch.save({"world_size": cp, "saved": saved}, sys.argv[1])
dist.cleanup()
