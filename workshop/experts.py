"""Mixture of experts and expert parallelism. A mixture-of-experts layer (Shazeer et al. 2017, "Outrageously Large
Neural Networks") puts E MLPs where a transformer block has one, and a router that sends each token to its top k:
E times the parameters, k times the FLOPs per token. GShard (Lepikhin et al. 2020) placed the experts on different
devices, moved each token to its experts with an all-to-all and back with another, gave each expert a capacity and
the router a loss that balances the load; Switch Transformer (Fedus et al. 2021) routes to one expert, Mixtral
(Jiang et al. 2024) to 2 of 8.

One process, the reference:

    moe = MoE(dim=64, hidden=128, num_experts=4, top_k=2, capacity_factor=1.25)
    out, routed = moe(x, groups=1)   # x (N, dim); routed: a Routing (assignments kept, dropped, balancing loss)

`groups` is GShard's: the tokens cut into that many equal groups, each routed with its own capacity and balancing
loss, which is what each rank of an expert-parallel run does with its own tokens.

Over ranks: each rank routes its own tokens (data parallelism), the experts are split over an expert-parallel group:

    mesh = make_mesh(env, ep_size=2)            # ("dp", "ep"), ep inner: the all-to-alls stay inside a node
    layer = apply_ep(moe, mesh["ep"])           # this rank's experts; the router whole on every rank
    out, routed = layer(x_local)                # dispatch: counts, then tokens, all_to_all; combine: back
    sync_gradients(layer, dp_group=mesh["dp"].get_group())   # router over every rank, experts over dp replicas

`layer.traffic` counts the bytes its all-to-alls sent to other ranks; `all_to_all_bytes` derives them from the
routing table and `balanced_all_to_all_bytes` for a router that spreads tokens evenly; `check_ep` holds an
expert-parallel layer against the one-process layer (outputs, routing, balancing loss, every gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from workshop.check import Match, agree, compare
from workshop.estimate.network import moe_all_to_all_bytes, routed_all_to_all_bytes
from workshop.models import FeedForward
from workshop.parallel_dims import build_mesh

# ---------------------------------------------------------------------------------------------
# Routing: top-k, the balancing loss, capacity and dropped tokens
# ---------------------------------------------------------------------------------------------


@dataclass
class Routing:
    """Where the tokens of one forward went: the kept assignments (token, expert, gate weight), slot-major (every
    token's first choice before any second choice), and per expert the assignments wanted and kept."""

    token: torch.Tensor  # (A,) the token of each kept assignment
    expert: torch.Tensor  # (A,) its expert
    weight: torch.Tensor  # (A,) its gate weight (differentiable: the router learns through it)
    wanted: torch.Tensor  # (E,) assignments each expert was chosen for
    kept: torch.Tensor  # (E,) assignments it took, at most its capacity per group
    aux_loss: torch.Tensor  # the load-balancing loss, mean over groups
    capacity: int | None  # per expert and group; None: no limit

    @property
    def dropped(self) -> int:
        """Assignments over capacity: their tokens get nothing from that expert (the residual carries them)."""
        return int((self.wanted - self.kept).sum())


def capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int | None:
    """GShard's expert capacity: an expert takes at most ceil(capacity_factor x tokens x top_k / E) of a group's
    assignments (capacity_factor 1: exactly the even share); None or 0: no limit, nothing dropped."""
    return math.ceil(capacity_factor * tokens * top_k / num_experts) if capacity_factor else None


def route(logits: torch.Tensor, top_k: int, capacity_factor: float | None = None, groups: int = 1) -> Routing:
    """Route N tokens given the router's logits (N, E): each to its top_k experts, with gate weights the softmax's
    probabilities renormalized over the k chosen (Mixtral; with k = 1 the probability itself, as Switch keeps it, or
    the router would get no gradient). The load-balancing loss is Switch Transformer's (Fedus et al. 2021, eq. 4),
    E sum_i f_i P_i, f_i the share of a group's assignments that chose expert i, P_i its mean probability: 1 when
    balanced. Over capacity, the first choices go first, then the second ones, each in token order."""
    N, E = logits.shape
    if N % groups:
        raise ValueError(f"{N} tokens do not split into {groups} equal routing groups")
    n = N // groups
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_e = probs.topk(top_k, dim=-1)  # (N, k)
    gates = top_p / top_p.sum(-1, keepdim=True) if top_k > 1 else top_p
    share = F.one_hot(top_e, E).sum(1).float().view(groups, n, E).mean(1) / top_k  # f_i per group
    aux = (E * (share * probs.view(groups, n, E).mean(1)).sum(-1)).mean()
    expert, weight = top_e.t().reshape(-1), gates.t().reshape(-1)  # slot-major
    token = torch.arange(N, device=logits.device).repeat(top_k)
    wanted = torch.bincount(expert, minlength=E)
    limit = capacity(n, E, top_k, capacity_factor)
    if limit is not None:
        key = (token // n) * E + expert  # (group, expert): a capacity each
        place = F.one_hot(key, groups * E).cumsum(0).gather(1, key[:, None]).squeeze(1) - 1  # its place in the queue
        keep = place < limit
        token, expert, weight = token[keep], expert[keep], weight[keep]
    return Routing(token, expert, weight, wanted, torch.bincount(expert, minlength=E), aux, limit)


class MoE(nn.Module):
    """A mixture-of-experts MLP on one process: a router (a linear layer to E logits) and E FeedForward experts.
    forward(x (N, dim), groups) returns (out (N, dim), Routing): each token's output is the gate-weighted sum of its
    kept experts' outputs (zero where all were dropped)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int = 2, capacity_factor: float | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} of {num_experts} experts: choose 1 ... {num_experts}")
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleDict({str(e): FeedForward(dim, hidden) for e in range(num_experts)})

    def forward(self, x: torch.Tensor, groups: int = 1):
        routed = route(self.router(x), self.top_k, self.capacity_factor, groups)
        out = torch.zeros_like(x)
        for e, expert in self.experts.items():  # an expert with no token still runs: its gradient is zero, not None
            mine = routed.expert == int(e)
            out = out.index_add(0, routed.token[mine], expert(x[routed.token[mine]]) * routed.weight[mine, None])
        return out, routed


# ---------------------------------------------------------------------------------------------
# Expert parallelism: all-to-all, dispatch and combine
# ---------------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Bytes the all-to-alls of an expert-parallel layer sent to other ranks (rows kept on this rank not counted):
    forward (dispatch and combine), backward (their gradients), and the counts exchanged before the tokens."""

    forward: int = 0
    backward: int = 0
    counts: int = 0

    def as_dict(self) -> dict:
        return dict(forward=self.forward, backward=self.backward, counts=self.counts)


class SplitMismatch(ValueError):
    """The rows a rank is told to expect from each other rank are not what that rank sends."""


def _check_splits(output_splits, input_splits, group, device) -> None:
    # A rank that expects other numbers than its peers send would hang or scramble the rows; a production layer
    # trusts its splits, a lesson's exercise checks them (one extra exchange of ep integers), on every rank at once.
    ep, me = tdist.get_world_size(group), tdist.get_rank(group)
    sent = torch.tensor((list(input_splits) + [0] * ep)[:ep], dtype=torch.int64, device=device)  # NCCL: a GPU's
    expected = torch.empty_like(sent)
    tdist.all_to_all_single(expected, sent, group=group)
    problem = ""
    if len(input_splits) != ep or len(output_splits) != ep:
        problem = f"rank {me} gives {len(input_splits)} input and {len(output_splits)} output splits for {ep} ranks"
    elif list(map(int, output_splits)) != expected.tolist():
        problem = (f"rank {me} expects {list(map(int, output_splits))} rows from ranks 0..{ep - 1}, which send it "
                   f"{expected.tolist()}: a rank's output splits are the input splits the others send it")
    bad = torch.tensor([1.0 if problem else 0.0], device=device)
    tdist.all_reduce(bad, op=tdist.ReduceOp.MAX, group=group)
    if bad.item():
        raise SplitMismatch(problem or "another rank's all-to-all splits disagree with what its peers send")


class _AllToAll(torch.autograd.Function):
    """Rows to every rank of the group: input_splits[j] rows to rank j, output_splits[j] rows from it. The gradient
    goes back the same way, the splits swapped."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, traffic):
        ctx.setup = (output_splits, input_splits, group, traffic)
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        tdist.all_to_all_single(out, x.contiguous(), list(output_splits), list(input_splits), group=group)
        if traffic is not None:
            traffic.forward += _away(input_splits, group) * _row_bytes(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits, group, traffic = ctx.setup
        dx = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        tdist.all_to_all_single(dx, grad.contiguous(), list(input_splits), list(output_splits), group=group)
        if traffic is not None:
            traffic.backward += _away(output_splits, group) * _row_bytes(grad)
        return dx, None, None, None, None


def _away(splits, group) -> int:
    return sum(splits) - splits[tdist.get_rank(group)]


def _row_bytes(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:]) * x.element_size()


def all_to_all(x: torch.Tensor, output_splits, input_splits, group=None, traffic: Traffic | None = None,
               verify: bool = True) -> torch.Tensor:
    """`torch.distributed.all_to_all_single` on the rows of x, differentiable: input_splits[j] rows go to rank j of
    `group`, output_splits[j] come from it. With `verify`, the splits are first checked against what the other ranks
    send (SplitMismatch on every rank, instead of a hang). Every rank of the group must call it."""
    group = group or tdist.group.WORLD
    if verify:
        _check_splits(output_splits, input_splits, group, x.device)
    return _AllToAll.apply(x, list(map(int, output_splits)), list(map(int, input_splits)), group, traffic)


def dispatch(rows: torch.Tensor, counts: torch.Tensor, group=None, traffic: Traffic | None = None):
    """Send each row to the rank of its expert. rows (A, dim) sorted by expert, counts (E,) rows per expert; expert e
    lives on rank e // (E / ep). First the counts (each rank gets the E / ep counts of its own experts from every
    rank), so that each rank knows how many rows will come; then the rows. Returns (the rows received, grouped by
    the rank they came from and within that by expert; their counts (ep, E / ep))."""
    group = group or tdist.group.WORLD
    ep = tdist.get_world_size(group)
    received_counts = torch.empty_like(counts)
    tdist.all_to_all_single(received_counts, counts, group=group)  # the counts first
    if traffic is not None:
        traffic.counts += (ep - 1) * (counts.numel() // ep) * counts.element_size()
    send = counts.view(ep, -1).sum(1).tolist()  # rows for each rank: the counts of its experts
    receive = received_counts.view(ep, -1).sum(1).tolist()
    return all_to_all(rows, receive, send, group, traffic), received_counts.view(ep, -1)


def combine(y: torch.Tensor, counts: torch.Tensor, received_counts: torch.Tensor, group=None,
            traffic: Traffic | None = None) -> torch.Tensor:
    """The experts' outputs back to the ranks their rows came from, in the order they were sent: dispatch's all-to-all
    with the splits swapped."""
    ep = tdist.get_world_size(group or tdist.group.WORLD)
    return all_to_all(y, counts.view(ep, -1).sum(1).tolist(), received_counts.sum(1).tolist(), group, traffic)


class ExpertParallelMoE(nn.Module):
    """A MoE layer whose experts are split over the ranks of `group`: this rank keeps experts first ... first + E/ep - 1
    (named as in the whole layer, `experts.<e>`), the router whole. Each rank routes its own tokens; `dispatch` (the
    package's, or exercise 10.2's) moves the rows to their experts, `combine` brings the outputs back."""

    def __init__(self, moe: MoE, group=None, dispatch=dispatch):
        super().__init__()
        self.group = group or tdist.group.WORLD
        ep, rank = tdist.get_world_size(self.group), tdist.get_rank(self.group)
        check_ep_size(moe.num_experts, ep)
        self.num_experts, self.top_k, self.capacity_factor = moe.num_experts, moe.top_k, moe.capacity_factor
        self.local = moe.num_experts // ep
        self.first = rank * self.local
        self.router = moe.router
        self.experts = nn.ModuleDict({str(e): moe.experts[str(e)] for e in range(self.first, self.first + self.local)})
        self.dispatch, self.traffic = dispatch, Traffic()
        self.received = torch.zeros(ep, self.local, dtype=torch.int64)  # the last forward's rows, per source and expert

    def forward(self, x: torch.Tensor):
        routed = route(self.router(x), self.top_k, self.capacity_factor)
        order = torch.argsort(routed.expert, stable=True)  # rows by expert, so by the rank that holds it
        counts = torch.bincount(routed.expert, minlength=self.num_experts)
        received, self.received = self.dispatch(x[routed.token[order]], counts, self.group, self.traffic)
        y = self.run_experts(received, self.received)
        back = combine(y, counts, self.received, self.group, self.traffic)
        return torch.zeros_like(x).index_add(0, routed.token[order], back * routed.weight[order, None]), routed

    def run_experts(self, received: torch.Tensor, received_counts: torch.Tensor) -> torch.Tensor:
        """Each local expert on its rows (they come grouped by source rank, then expert), outputs in the same order."""
        local = torch.arange(self.local, device=received.device).repeat(received_counts.shape[0])
        which = torch.repeat_interleave(local, received_counts.flatten().to(received.device))
        by_expert = torch.argsort(which, stable=True)
        parts = received[by_expert].split(received_counts.sum(0).tolist())
        out = torch.cat([expert(part) for expert, part in zip(self.experts.values(), parts)])
        return out[torch.argsort(by_expert)]


def check_ep_size(num_experts: int, ep_size: int) -> None:
    if not isinstance(ep_size, int) or ep_size < 1 or num_experts % ep_size:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(f"expert-parallel size {ep_size} does not split {num_experts} experts evenly; choose ep_size "
                         f"from {divisors}")


def largest_ep_size(num_experts: int, world_size: int, at_most: int) -> int:
    """The largest expert-parallel size that divides the experts and the world, at most `at_most` (a node's ranks:
    every token crosses the all-to-all twice a layer, and inside a node it runs on NVLink)."""
    return max(d for d in range(1, min(at_most, world_size) + 1) if num_experts % d == 0 and world_size % d == 0)


def make_mesh(env, ep_size: int):
    """("dp", "ep"): ep inner (consecutive ranks, one node), dp the replicas of each expert across nodes."""
    if not isinstance(ep_size, int) or ep_size < 1 or env.world_size % ep_size:
        raise ValueError(f"ep_size {ep_size} does not divide the world of {env.world_size} ranks")
    return build_mesh(env, dp=env.world_size // ep_size, ep=ep_size)


def apply_ep(moe: MoE, mesh_or_group=None, dispatch=dispatch) -> ExpertParallelMoE:
    """Expert parallelism: `moe`'s experts split over a 1D mesh (or process group), the router replicated."""
    group = mesh_or_group.get_group() if hasattr(mesh_or_group, "get_group") else mesh_or_group
    return ExpertParallelMoE(moe, group, dispatch)


def sync_gradients(layer: ExpertParallelMoE, dp_group=None) -> None:
    """Data parallelism beside expert parallelism: the router is on every rank and saw only this rank's tokens, so its
    gradient is summed over all ranks; an expert's gradient already holds every token of its expert-parallel group
    (the all-to-all's backward brought them), and is summed over the dp replicas of that expert. Sums, for a loss
    that is the sum of the ranks' shares (each divided by the global number of tokens)."""
    for p in layer.router.parameters():
        tdist.all_reduce(p.grad)
    if dp_group is not None and tdist.get_world_size(dp_group) > 1:
        for p in layer.experts.parameters():
            tdist.all_reduce(p.grad, group=dp_group)


# ---------------------------------------------------------------------------------------------
# Counting: tokens per expert and per rank, the all-to-all's bytes
# ---------------------------------------------------------------------------------------------


def routing_table(layer: ExpertParallelMoE) -> torch.Tensor:
    """(ep, E): the rows each rank of the layer's group (row) sent to each expert (column) in its last forward, on
    every rank: each rank knows the rows it received for its experts; gathered, they are the whole table."""
    parts = [torch.empty_like(layer.received) for _ in range(tdist.get_world_size(layer.group))]
    tdist.all_gather(parts, layer.received.contiguous(), group=layer.group)
    return torch.cat(parts, dim=1)


def all_to_all_bytes(table: torch.Tensor, rank: int, dim: int, value_bytes: int = 4) -> dict:
    """Bytes rank `rank`'s all-to-alls send to other ranks in one step of the layer, forward and backward: the cost
    model's `network.routed_all_to_all_bytes` on the routing table (ep, E) the step counted."""
    sent = int(routed_all_to_all_bytes(table.cpu().tolist(), rank, dim, value_bytes))
    return dict(forward=sent, backward=sent)


# The same for a router that spreads a rank's tokens x top_k assignments evenly over the experts, none dropped:
# 2 tokens top_k dim value_bytes (ep - 1) / ep forward, as much backward; what the planner prices.
balanced_all_to_all_bytes = moe_all_to_all_bytes


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_ep(layer: ExpertParallelMoE, reference: MoE, x_all: torch.Tensor, weights: torch.Tensor, *, rank: int,
             world_size: int, dp_group=None, aux_weight: float = 0.01, rtol: float = 1e-4, atol: float = 1e-6) -> Match:
    """One step of an expert-parallel layer against the one-process layer on the global batch. x_all (W n, dim) and
    the loss's weights (W n, dim) are the same on every rank; rank `rank` of the world takes rows rank n ... The loss
    is sum(out * weights) plus aux_weight times the balancing loss, the reference's with groups = W (each rank's
    tokens a routing group). Compares the outputs, the assignments kept per expert, the balancing loss, and the
    gradients of the input (through dispatch's backward), the router and this rank's experts. A Match agreed by all
    ranks; every rank must call it."""
    n = len(x_all) // world_size
    mine = slice(rank * n, (rank + 1) * n)
    x_ref, x = x_all.detach().clone().requires_grad_(), x_all[mine].detach().clone().requires_grad_()
    ref_out, ref_routed = reference(x_ref, groups=world_size)
    ((ref_out * weights).sum() + aux_weight * ref_routed.aux_loss).backward()
    try:
        out, routed = layer(x)
        ((out * weights[mine]).sum() + aux_weight * routed.aux_loss / world_size).backward()
        sync_gradients(layer, dp_group)
    except SplitMismatch as err:
        return agree(Match(False, f"{err}; send splits are the rows for each rank's experts, "
                                  "counts.view(ep, -1).sum(1)"))
    aux, kept = routed.aux_loss.detach().clone(), routed.kept.clone()
    tdist.all_reduce(aux)
    tdist.all_reduce(kept)
    counted = compare([("aux loss", aux / world_size, ref_routed.aux_loss), ("kept per expert", kept, ref_routed.kept)],
                      0, 1e-6)
    if not counted:
        return Match(False, f"routing: {counted.detail}")
    forward = compare([("output", out, ref_out[mine])], rtol, atol)
    if not forward:
        return Match(False, f"{forward.detail}: rows reached the wrong experts or came back to the wrong tokens; "
                            "sort the rows by expert, split them by the rank that holds each expert")
    ref_params = dict(reference.named_parameters())
    grads = compare([("input.grad", x.grad, x_ref.grad[mine])]
                    + [(f"{name}.grad", p.grad, ref_params[name].grad) for name, p in layer.named_parameters()],
                    rtol, atol)
    if not grads:
        return Match(False, f"{grads.detail}: the outputs match, the gradients do not (the router's are summed over "
                            "every rank, each expert's over its data-parallel replicas)")
    return Match(True)
