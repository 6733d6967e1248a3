"""Expert parallelism against one process; rank 0 saves what tests/test_experts.py asserts.

    torchrun --standalone --nproc-per-node 2 tests/multirank/experts_equivalence.py OUT.pt

A MoE layer split over the ranks (ep 2) and replicated over them (dp 2, pure data parallelism), each against one
process on the global batch (outputs, routing, balancing loss, gradients); the bytes its all-to-alls sent, counted
and derived from the routing table; two planted wrong dispatches. Every rank computes the one-process reference.
"""

import sys

import torch

from workshop import dist, experts

DIM, HIDDEN, E, K, N = 16, 32, 4, 2, 24  # N tokens per rank

env = dist.init()
W = env.world_size
saved = {}
g = torch.Generator().manual_seed(0)
x_all, weights = torch.randn(W * N, DIM, generator=g), torch.randn(W * N, DIM, generator=g)


def fresh():
    torch.manual_seed(0)
    return experts.MoE(DIM, HIDDEN, E, K, capacity_factor=1.0)  # a capacity of the even share: some are dropped


def run(ep_size, dispatch=experts.dispatch):
    mesh = experts.make_mesh(env, ep_size)
    layer = experts.apply_ep(fresh(), mesh["ep"], dispatch)
    match = experts.check_ep(layer, fresh(), x_all, weights, rank=env.rank, world_size=W,
                             dp_group=mesh["dp"].get_group())
    return layer, mesh, match


for ep_size in (W, 1):
    layer, mesh, match = run(ep_size)
    saved[f"ep {ep_size}"] = (bool(match), match.detail)
    table = experts.routing_table(layer)  # of the checked step: one forward, one backward
    kept = fresh()(x_all, groups=W)[1]
    derived = experts.all_to_all_bytes(table, mesh["ep"].get_local_rank(), DIM)
    saved[f"ep {ep_size} bytes"] = (layer.traffic.as_dict(), derived, kept.dropped)


def unsorted(rows, counts, group, traffic=None):  # planted: splits by rank, but the rows were never put in expert order
    return experts.dispatch(rows.flip(0), counts, group, traffic)


def split_by_expert(rows, counts, group, traffic=None):  # planted: the first ep experts' counts as the send splits
    ep = group.size()
    received_counts = torch.empty_like(counts)
    torch.distributed.all_to_all_single(received_counts, counts, group=group)
    receive = received_counts.view(ep, -1).sum(1).tolist()
    return experts.all_to_all(rows, receive, counts[:ep].tolist(), group, traffic), received_counts.view(ep, -1)


for name, wrong in (("unsorted", unsorted), ("split by expert", split_by_expert)):
    _, _, match = run(W, wrong)
    saved[f"planted {name}"] = (bool(match), match.detail)

if env.is_main:
    torch.save({"world_size": W, "saved": saved}, sys.argv[1])
dist.cleanup()
