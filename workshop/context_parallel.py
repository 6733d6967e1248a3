"""Context parallelism: one sequence split over the ranks along its length. Attention is the only layer whose tokens
look at each other; it gets the keys and values of the other ranks either round a ring, one block at a time, folded
into an online softmax (ring attention: Liu et al. 2023, "Ring Attention with Blockwise Transformers for
Near-Infinite Context"; the online softmax: Milakov and Gimelshein 2018, FlashAttention, Dao et al. 2022), or
gathered whole (the variant Llama 3 trained its long-context stage with: "The Llama 3 Herd of Models", 2024,
section 3.3.2). Everything else in a block works token by token and runs on this rank's tokens unchanged.

Why long sequences need it (derived; notebook 10 counts them):
    attention_flops(S, B, H, d, causal)          4 B H S^2 d forward; half of it under a causal mask
    naive_saved_bytes(S, B, H, d, q_len=S)       what softmax(QK^T)V written with plain ops keeps: the B H T S scores
    fused_saved_bytes(S, B, H, d)                what a fused kernel keeps: q, k, v, the output and one log-sum-exp

Which positions rank r of cp holds (`positions`, `shard`): "contiguous" (block r), or "zigzag" (chunks r and
2cp-1-r of 2cp, the head-and-tail layout), under which a causal mask gives every rank the same work.

From scratch, on any process group (notebook 10 writes the forward in cells first):
    m, total, acc = online_update(m, total, acc, scores, v)  # a block of keys folded into the running max, sum, output
    out = ring_attention(q, k, v, group, layout="zigzag", causal=True, traffic=t)  # backward goes round the ring too
    out = allgather_attention(q, k, v, group, layout="zigzag", causal=True, traffic=t)
    check_attention(fn, q, k, v, dout, group=group, layout=..., causal=...)  # check.Match against one process
    model = apply_cp(tinygpt, group, "zigzag"); logits = cp_forward(model, tokens[:, idx], idx)

q, k, v are (B, H, T, d) with T = S / cp, this rank's positions in `positions(layout, S, cp, rank)` order. A `Traffic`
counts what a rank did: the query-key pairs it scored, seconds computing and waiting, bytes sent, key/value bytes held.
torch's own `context_parallel` runs on CUDA only (`library_problem` says why in one line; `library_attention`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from workshop.check import Match, agree, compare
from workshop.models import CausalSelfAttention, TinyGPT
from workshop.pipeline import LiveActivations

LAYOUTS = ("contiguous", "zigzag")
_KV, _GRAD = 1, 2  # message tags: a block of keys and values, the gradient accumulator that travels with it

# ---------------------------------------------------------------------------------------------
# Why: attention's FLOPs and memory against the sequence length
# ---------------------------------------------------------------------------------------------


def attention_flops(seq_len: int, batch: int, heads: int, head_dim: int, causal: bool = False,
                    q_len: int | None = None) -> int:
    """Forward FLOPs of attention's two matmuls, QK^T and PV, for q_len queries (default all) against seq_len keys:
    2 x 2 B H T S d (a multiply and an add per term). A causal mask halves what a kernel that skips masked tiles
    computes (FlashAttention-2, Dao 2023, section 3.1); backward is about twice the forward."""
    q_len = seq_len if q_len is None else q_len
    return 4 * batch * heads * q_len * seq_len * head_dim // (2 if causal else 1)


def naive_saved_bytes(seq_len: int, batch: int, heads: int, head_dim: int, causal: bool = False,
                      q_len: int | None = None, value_bytes: int = 4) -> int:
    """Bytes that `naive_attention` keeps for backward: q (B H T d), k and v (B H S d), the probabilities
    softmax(QK^T / sqrt(d)), B H T S (softmax's backward needs them and so does PV's), and with a causal mask the
    boolean mask itself, T S bytes. T = q_len queries (default S): the all-gather variant keeps T = S / cp per rank,
    so its scores shrink by cp, not cp^2."""
    q_len = seq_len if q_len is None else q_len
    vectors = (q_len + 2 * seq_len) * batch * heads * head_dim * value_bytes
    return vectors + batch * heads * q_len * seq_len * value_bytes + (q_len * seq_len if causal else 0)


def fused_saved_bytes(seq_len: int, batch: int, heads: int, head_dim: int, value_bytes: int = 4) -> int:
    """Bytes a fused attention kernel (`F.scaled_dot_product_attention`) keeps for backward: q, k, v and the output
    (B H S d each) and one float32 log-sum-exp per query and head; the scores are recomputed in backward."""
    return 4 * batch * heads * seq_len * head_dim * value_bytes + batch * heads * seq_len * 4


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V with plain operations: the (B, H, S, S) scores are materialized and kept."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if causal:
        S = q.shape[-2]
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def saved_bytes(run, module: nn.Module | None = None) -> tuple[int, object]:
    """(bytes of the tensors autograd saved for backward while `run()` ran, each storage once, the parameters of
    `module` not counted; what `run()` returned): `pipeline.LiveActivations`' count."""
    with LiveActivations(module if module is not None else nn.Module()) as live:
        result = run()
    return live.peak, result


# ---------------------------------------------------------------------------------------------
# Layouts: which positions each rank holds
# ---------------------------------------------------------------------------------------------


def chunks(layout: str, seq_len: int, cp: int, rank: int) -> list[tuple[int, int]]:
    """This rank's pieces of the sequence as (first position, length), in the order its rows hold them."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    pieces = cp if layout == "contiguous" else 2 * cp
    if seq_len % pieces:
        raise ValueError(f"a sequence of {seq_len} tokens does not split into {pieces} equal pieces ({layout} layout "
                         f"over {cp} ranks); choose a length divisible by {pieces}")
    n = seq_len // pieces
    if layout == "contiguous":
        return [(rank * n, n)]
    return [(rank * n, n), ((2 * cp - 1 - rank) * n, n)]  # head and tail: an early chunk and a late one


def positions(layout: str, seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """The positions of this rank's tokens, in the order its rows hold them."""
    return torch.cat([torch.arange(start, start + n, device=device) for start, n in chunks(layout, seq_len, cp, rank)])


def shard(x: torch.Tensor, layout: str, cp: int, rank: int, dim: int = 2) -> torch.Tensor:
    """This rank's share of a whole sequence `x` along `dim` (2 for (B, H, S, d); 1 for tokens (B, S))."""
    return x.index_select(dim, positions(layout, x.shape[dim], cp, rank, device=x.device))


def causal_pairs(layout: str, seq_len: int, cp: int, rank: int, causal: bool = True) -> int:
    """Query-key pairs this rank must score: every key for every query, or under a causal mask the keys at or
    before each query's position, sum over its positions p of (p + 1)."""
    mine = positions(layout, seq_len, cp, rank)
    return int((mine + 1).sum()) if causal else len(mine) * seq_len


# ---------------------------------------------------------------------------------------------
# Ring attention from scratch
# ---------------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """What one rank did in a context-parallel attention, forward and backward: query-key pairs scored (per batch
    element and head), seconds computing (`_clock`) and waiting for blocks, bytes sent, the most key/value bytes held
    at once."""

    pairs: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0
    sent_forward: int = 0
    sent_backward: int = 0
    kv_held: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def online_update(m, total, acc, scores, v):
    """Fold one block of keys into a running softmax (FlashAttention, Dao et al. 2022, algorithm 1): m (B, H, T) is
    the running maximum of each query's scores, total (B, H, T) the running sum of exp(score - m), acc (B, H, T, d)
    the running sum of exp(score - m) v. When a block raises the maximum, what was summed under the old one is
    rescaled by exp(m_old - m_new), both total and acc; softmax(scores) V is acc / total at the end. scores:
    (B, H, T, n) with -inf where masked; v: (B, H, n, d)."""
    m_new = torch.maximum(m, scores.amax(dim=-1))
    p = torch.exp(scores - m_new.unsqueeze(-1))
    rescale = torch.exp(m - m_new)
    return m_new, total * rescale + p.sum(dim=-1), acc * rescale.unsqueeze(-1) + p @ v


def tiles(mine: list[tuple[int, int]], theirs: list[tuple[int, int]], causal: bool):
    """The tiles of the score matrix a rank computes against one block: (query rows, key columns, diagonal) for each
    of its chunks against each of the block's. Chunks are equal and aligned, so a chunk of keys is entirely before a
    chunk of queries (every pair counts), the same chunk (a triangle counts: `diagonal`), or entirely after (left out
    under a causal mask: the work a contiguous layout's first ranks do not have)."""
    found, row = [], 0
    for q_start, q_len in mine:
        col = 0
        for k_start, k_len in theirs:
            if not causal or k_start < q_start:
                found.append((slice(row, row + q_len), slice(col, col + k_len), False))
            elif k_start == q_start:
                found.append((slice(row, row + q_len), slice(col, col + k_len), True))
            col += k_len
        row += q_len
    return found


def _scores(q, k, diagonal: bool, scale: float):
    s = q @ k.transpose(-2, -1) * scale
    if diagonal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _clock(t: torch.Tensor) -> float:
    """Seconds of this rank's own work: on CPU this thread's CPU time (ranks that share cores do not count each
    other's turns, nor gloo's threads theirs), on CUDA the wall clock once the kernels launched so far have run."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
        return time.perf_counter()
    return time.thread_time()


class _Ring:
    """This rank's neighbours in the ring, and the isend/irecv that move a tensor one hop: to rank + 1, from
    rank - 1."""

    def __init__(self, group):
        self.group = group
        self.cp, self.rank = tdist.get_world_size(group), tdist.get_rank(group)
        self.next, self.prev = (_global_rank(group, (self.rank + step) % self.cp) for step in (1, -1))

    def send(self, t, tag):
        return tdist.isend(t, dst=self.next, group=self.group, tag=tag)

    def receive(self, t, tag):
        return tdist.irecv(t, src=self.prev, group=self.group, tag=tag)


def _global_rank(group, rank: int) -> int:
    return rank if group in (None, tdist.group.WORLD) else tdist.get_global_rank(group, rank)


def _wait(works, traffic: Traffic) -> None:
    t0 = time.perf_counter()
    for w in works:
        w.wait()
    traffic.wait_s += time.perf_counter() - t0


class _RingAttention(torch.autograd.Function):
    """Forward: the key/value blocks go round the ring (isend to the next rank, irecv from the one before, posted
    before the block in hand is computed, so the transfer overlaps the compute), folded into the online softmax.
    Backward: the blocks go round again, each with the gradient of its keys and values, which every rank adds to
    and passes on; after cp hops the gradients are home. Keeps q, k, v, the output and the log-sum-exp, as a fused
    kernel does: a rank holds two blocks of keys and values at a time, never the whole sequence."""

    @staticmethod
    def forward(ctx, q, k, v, group, layout, causal, update, traffic):
        ring = _Ring(group)
        S, scale = q.shape[2] * ring.cp, q.shape[-1] ** -0.5
        mine = chunks(layout, S, ring.cp, ring.rank)
        m = q.new_full(q.shape[:-1], float("-inf"))
        total, acc = q.new_zeros(q.shape[:-1]), torch.zeros_like(q)
        kv = torch.stack([k, v])  # one message per hop
        traffic.kv_held = max(traffic.kv_held, kv.nbytes * (2 if ring.cp > 1 else 1))
        for step in range(ring.cp):
            works = []
            if step < ring.cp - 1:  # the next block is on its way while this one is computed
                incoming = torch.empty_like(kv)
                works = [ring.send(kv, _KV), ring.receive(incoming, _KV)]
                traffic.sent_forward += kv.nbytes
            t0 = _clock(q)
            for rows, cols, diagonal in tiles(mine, chunks(layout, S, ring.cp, (ring.rank - step) % ring.cp), causal):
                s = _scores(q[:, :, rows], kv[0][:, :, cols], diagonal, scale)
                m[:, :, rows], total[:, :, rows], acc[:, :, rows] = update(
                    m[:, :, rows], total[:, :, rows], acc[:, :, rows], s, kv[1][:, :, cols])
                traffic.pairs += s.shape[-2] * (s.shape[-2] + 1) // 2 if diagonal else s.shape[-2] * s.shape[-1]
            traffic.compute_s += _clock(q) - t0
            if works:
                _wait(works, traffic)
                kv = incoming
        # (B, T, H, d) in memory, (B, H, T, d) in shape: the caller's transpose and reshape to (B, T, H d) is a view
        out = (acc / total.unsqueeze(-1)).transpose(1, 2).contiguous().transpose(1, 2)
        lse = m + total.log()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = (group, layout, causal, traffic)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, layout, causal, traffic = ctx.setup
        ring = _Ring(group)
        S, scale = q.shape[2] * ring.cp, q.shape[-1] ** -0.5
        mine = chunks(layout, S, ring.cp, ring.rank)
        delta = (dout * out).sum(dim=-1, keepdim=True)  # D_i = dO_i . O_i (FlashAttention-2, algorithm 2)
        dq, kv, sending = torch.zeros_like(q), torch.stack([k, v]), []
        for step in range(ring.cp):
            works, arriving = [], None
            if step > 0:  # the gradients of this block's keys and values, as far as the ranks before added them
                arriving = torch.empty_like(kv)
                works.append(ring.receive(arriving, _GRAD))
            if step < ring.cp - 1:
                incoming = torch.empty_like(kv)
                works += [ring.send(kv, _KV), ring.receive(incoming, _KV)]
                traffic.sent_backward += kv.nbytes
            t0 = _clock(q)
            dkv = torch.zeros_like(kv)
            for rows, cols, diagonal in tiles(mine, chunks(layout, S, ring.cp, (ring.rank - step) % ring.cp), causal):
                qr, kc, vc, do = q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], dout[:, :, rows]
                p = torch.exp(_scores(qr, kc, diagonal, scale) - lse[:, :, rows].unsqueeze(-1))  # the probabilities
                dkv[1][:, :, cols] += p.transpose(-2, -1) @ do
                ds = p * (do @ vc.transpose(-2, -1) - delta[:, :, rows])
                dq[:, :, rows] += ds @ kc * scale
                dkv[0][:, :, cols] += ds.transpose(-2, -1) @ qr * scale
            traffic.compute_s += _clock(q) - t0
            _wait(works, traffic)
            if arriving is not None:
                dkv += arriving
            if ring.cp > 1:  # on to the next rank; the last hop brings each block's gradients home
                sending.append((ring.send(dkv, _GRAD), dkv))  # the tensor lives until its send is waited for
                traffic.sent_backward += dkv.nbytes
            if step < ring.cp - 1:
                kv = incoming
        if ring.cp > 1:
            dkv = torch.empty_like(kv)
            _wait([ring.receive(dkv, _GRAD), *(work for work, _ in sending)], traffic)
        return dq, dkv[0], dkv[1], None, None, None, None, None


def ring_attention(q, k, v, group=None, layout: str = "contiguous", causal: bool = False, update=online_update,
                   traffic: Traffic | None = None) -> torch.Tensor:
    """Ring attention of this rank's queries (B, H, T, d) against the whole sequence, whose keys and values come round
    the ring of `group`'s ranks; differentiable (the backward goes round the ring as well). `update` folds one block
    into the running softmax (`online_update`; exercise 10.1 writes it). Every rank of the group must call it."""
    group = group or tdist.group.WORLD
    return _RingAttention.apply(q, k, v, group, layout, causal, update, traffic or Traffic())


# ---------------------------------------------------------------------------------------------
# The all-gather variant: every rank gathers all keys and values, then attends to them at once
# ---------------------------------------------------------------------------------------------


class _GatherBlocks(torch.autograd.Function):
    """All-gather of every rank's block, stacked in rank order: (cp, ...). Backward: each rank gets the sum over
    ranks of its block's gradient, a reduce-scatter, written as an all-to-all (gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(tdist.get_world_size(group))]
        tdist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        mine = [torch.empty_like(grad[0]) for _ in range(grad.shape[0])]
        tdist.all_to_all(mine, [g.contiguous() for g in grad.unbind(0)], group=ctx.group)
        return torch.stack(mine).sum(0), None


def allgather_attention(q, k, v, group=None, layout: str = "contiguous", causal: bool = False,
                        traffic: Traffic | None = None) -> torch.Tensor:
    """Attention of this rank's queries against all keys and values, gathered whole first (Llama 3's context
    parallelism: it works with any mask, and with grouped-query attention the keys and values are small). Each
    rank sends its block to the cp - 1 others in a ring all-gather, and the gradients come back by reduce-scatter:
    the ring's bytes forward, fewer backward, but the whole sequence's keys and values held at once."""
    group = group or tdist.group.WORLD
    cp, rank = tdist.get_world_size(group), tdist.get_rank(group)
    S = q.shape[2] * cp
    kv = _GatherBlocks.apply(torch.stack([k, v]), group)  # (cp, 2, B, H, T, d)
    B, H, T, d = q.shape
    k_all, v_all = (kv[:, i].permute(1, 2, 0, 3, 4).reshape(B, H, cp * T, d) for i in (0, 1))
    key_pos = torch.cat([positions(layout, S, cp, j, q.device) for j in range(cp)])
    mask = key_pos[None, :] <= positions(layout, S, cp, rank, q.device)[:, None] if causal else None
    if traffic is not None:
        traffic.pairs += int(mask.sum()) if causal else T * S
        traffic.sent_forward += (cp - 1) * kv[0].nbytes
        traffic.sent_backward += (cp - 1) * kv[0].nbytes
        traffic.kv_held = max(traffic.kv_held, kv.nbytes)
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)


def ring_bytes(seq_len: int, batch: int, heads: int, head_dim: int, cp: int, value_bytes: int = 4) -> dict:
    """Bytes one rank sends and the key/value bytes it holds at once, for `ring_attention` and `allgather_attention`
    over cp ranks; a block of keys and values is 2 B H (S / cp) d values. Ring: cp - 1 blocks forward; backward
    cp - 1 blocks again (not kept from the forward) and cp gradient blocks (the last hop takes them home); two
    blocks held. All-gather: cp - 1 blocks each way (all-gather, reduce-scatter); all cp blocks held."""
    block = 2 * batch * heads * (seq_len // cp) * head_dim * value_bytes
    return {"ring": dict(sent_forward=(cp - 1) * block, sent_backward=(2 * cp - 1) * block if cp > 1 else 0,
                         kv_held=block * (2 if cp > 1 else 1)),
            "allgather": dict(sent_forward=(cp - 1) * block, sent_backward=(cp - 1) * block, kv_held=cp * block)}


# ---------------------------------------------------------------------------------------------
# Checks: against one process's attention on the whole sequence
# ---------------------------------------------------------------------------------------------


def reference(q, k, v, dout, causal: bool):
    """One process's attention on the whole sequence: (output, dq, dk, dv) for the output gradient `dout`."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def check_attention(attention, q, k, v, dout, *, group=None, layout: str = "contiguous", causal: bool = False,
                    rtol: float = 1e-4, atol: float = 1e-5) -> Match:
    """`attention(q, k, v)` on this rank's share (`layout`) of the whole q, k, v (B, H, S, d), the same on every rank,
    against one process on the whole sequence: the output, then the gradients of q, k and v for the output gradient
    `dout`. A Match agreed by all ranks, whose detail names what differs and where to look. Every rank must call it."""
    group = group or tdist.group.WORLD
    cp, rank = tdist.get_world_size(group), tdist.get_rank(group)
    want = [shard(t, layout, cp, rank) for t in reference(q, k, v, dout, causal)]
    mine = [shard(t, layout, cp, rank).detach().clone().requires_grad_() for t in (q, k, v)]
    where = f"{layout}, {'causal' if causal else 'no mask'}"
    try:
        out = attention(*mine)
        out.backward(shard(dout, layout, cp, rank))
    except Exception as err:  # the student's code, say: the other ranks are told, not left waiting for this one
        return agree(Match(False, f"{where}: {type(err).__name__}: {err}"))
    forward = compare([("output", out, want[0])], rtol, atol)
    if not forward:
        return Match(False, f"{where}: {forward.detail}: the forward differs; when a block raises the running "
                            "maximum, both the running sum and the output so far are rescaled by exp(m_old - m_new)")
    grads = compare([(f"d{n}", t.grad, w) for n, t, w in zip("qkv", mine, want[1:])], rtol, atol)
    if not grads:
        return Match(False, f"{where}: {grads.detail}: the output matches, its backward does not")
    return Match(True)


def check_online_update(update) -> Match:
    """Exercise 10.1: a student's `update(m, total, acc, scores, v)`, folded over blocks of keys, must give softmax(S) V
    (one process, no communication). The hint names the usual mistakes: no rescaling of the sum or of the output."""
    g = torch.Generator().manual_seed(0)
    scores, v = torch.randn(1, 2, 6, 12, generator=g) * 3, torch.randn(1, 2, 12, 4, generator=g)
    scores[..., 4:8] += 6  # a later block raises the maximum: the rescaling matters
    m, total, acc = torch.full((1, 2, 6), float("-inf")), torch.zeros(1, 2, 6), torch.zeros(1, 2, 6, 4)
    for cols in (slice(0, 4), slice(4, 8), slice(8, 12)):
        m, total, acc = update(m, total, acc, scores[..., cols], v[:, :, cols])
    if not all(isinstance(t, torch.Tensor) for t in (m, total, acc)):
        return Match(False, "return the three running tensors (m, total, acc)")
    want_l = torch.exp(scores - scores.amax(-1, keepdim=True)).sum(-1)
    if not torch.allclose(m, scores.amax(-1)):
        return Match(False, "m is not the running maximum of the scores: m_new = max(m, scores.amax(-1))")
    if not torch.allclose(total, want_l, rtol=1e-4):
        return Match(False, "the running sum differs: rescale the old sum by exp(m - m_new), then add this block's "
                            "exp(scores - m_new).sum(-1)")
    if not torch.allclose(acc / total.unsqueeze(-1), torch.softmax(scores, -1) @ v, rtol=1e-4, atol=1e-5):
        return Match(False, "acc / total is not softmax(scores) @ v: acc, too, is rescaled by exp(m - m_new) before "
                            "this block's exp(scores - m_new) @ v is added")
    return Match(True)


# ---------------------------------------------------------------------------------------------
# In a model: TinyGPT's attention with ring attention, and torch's context_parallel
# ---------------------------------------------------------------------------------------------


class RingSelfAttention(nn.Module):
    """A TinyGPT attention (the same q, k, v and output projections) whose causal attention is `ring_attention` over
    `group`: it takes this rank's tokens (B, T, dim) in the order `layout` holds them."""

    def __init__(self, attention: CausalSelfAttention, group, layout: str):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = attention.wq, attention.wk, attention.wv, attention.wo
        self.head_dim, self.group, self.layout = attention.head_dim, group, layout
        self.traffic = Traffic()

    def forward(self, x, cache=None, layer: int = 0):
        B, T, _ = x.shape
        q, k, v = (w(x).view(B, T, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = ring_attention(q, k, v, self.group, self.layout, causal=True, traffic=self.traffic)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def apply_cp(model: TinyGPT, group=None, layout: str = "zigzag") -> TinyGPT:
    """Context parallelism on a copy of a TinyGPT (or of one of its blocks): every attention becomes ring attention
    over `group` (a process group or a 1D DeviceMesh). The weights stay whole on every rank: their gradients are
    summed over the group (each rank's tokens give a part), as data parallelism sums them."""
    group = group.get_group() if hasattr(group, "get_group") else (group or tdist.group.WORLD)
    model = copy.deepcopy(model)
    for block in (model.layers if isinstance(model, TinyGPT) else [model]):
        block.attention = RingSelfAttention(block.attention, group, layout)
    return model


def cp_forward(model: TinyGPT, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of this rank's tokens (B, T) at positions `pos` of the sequence, through a model that
    `apply_cp` prepared: TinyGPT's forward with the positions this rank holds instead of 0 .. T - 1."""
    x = model.tok_embeddings(tokens) + model.pos_embeddings(pos)
    for layer in model.layers:
        x = layer(x)
    return model.output(model.norm(x))


def library_problem(device) -> str | None:
    """Why torch's `context_parallel` cannot run here (one line), or None on CUDA."""
    if torch.device(device).type != "cuda":
        return ("torch's context_parallel shards only CUDA attention kernels (flash, memory-efficient, cuDNN); CPU "
                "attention has no sharding strategy registered, so it runs on GPUs only")
    return None


def library_attention(q, k, v, dout, mesh, causal: bool):
    """torch's context_parallel on CUDA, as notebook 10 calls it: the whole q, k, v, dout (the same on every rank)
    copied and sharded in place along the sequence (head and tail, as "zigzag", when the length divides 2 cp),
    scaled_dot_product_attention run inside it (float32 takes the memory-efficient kernel), the output and the
    gradients gathered whole again: (out, dq, dk, dv)."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard

    lq, lk, lv, ldout = buffers = [t.detach().clone() for t in (q, k, v, dout)]
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers=set(buffers)):
        out = F.scaled_dot_product_attention(*(t.requires_grad_() for t in (lq, lk, lv)), is_causal=causal)
        out.backward(ldout)
    return context_parallel_unshard(mesh, [out.detach(), lq.grad, lk.grad, lv.grad], [2, 2, 2, 2])


def block_activation_bytes(seq_len: int, batch: int, dim: int, heads: int, cp: int, value_bytes: int = 4) -> int:
    """Bytes one TinyGPT block keeps for backward on each of cp ranks, derived from its code: the one-process
    block's count (`workshop.estimate.planner.gpt_layer_activation_bytes`) at S / cp tokens, since ring attention
    keeps what a fused kernel keeps, for this rank's tokens only."""
    from workshop.estimate.planner import gpt_layer_activation_bytes

    return gpt_layer_activation_bytes(seq_len, batch, dim, heads, value_bytes=value_bytes, cp=cp)


def imbalance(values) -> float:
    """The most any rank did over the mean (1: balanced); what the slowest rank makes every other wait for."""
    values = [float(x) for x in values]
    mean = sum(values) / len(values)
    return max(values) / mean if mean else math.nan
