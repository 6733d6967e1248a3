"""The network: links and a two-level cluster, collectives on them priced with alpha and beta, and the fit of alpha
and beta to measured times.

A message of n bytes over one link takes alpha + n * beta seconds: alpha the latency of a step (seconds), beta
the inverse of the link's bandwidth (seconds per byte). A cluster has two levels: `per_node` GPUs joined by a
fast link (NVLink), and nodes joined by a network of which each GPU has a share (`inter`, bandwidth per GPU).

Collectives on p = N nodes x g GPUs, n bytes (NCCL's algorithms; Thakur, Rabenseifner and Gropp 2005 for the
ring; Sanders, Speck and Traeff 2009 for the double binary tree; latencies counted as NCCL's tuning model counts
them, src/graph/tuning.cc: every step of the ring pays one hop, the steps that cross nodes the network's):

    ring all-reduce     latency  (2(p-1) - 2N) alpha_intra + 2N alpha_inter
                        bytes    2(p-1)/p n * max((g-1)/g beta_intra, beta_inter / g)
    tree all-reduce     latency  2 [(g-1) alpha_intra + log2(N) alpha_inter]      (a chain in the node, trees across)
                        bytes    2 n * max((g-1)/g beta_intra, beta_inter / g)
    all-gather,         latency  (p-1-N) alpha_intra + N alpha_inter             (ring; n: the whole tensor)
    reduce-scatter      bytes    (p-1)/p n * max((g-1)/g beta_intra, beta_inter / g)
    all-to-all          max((g-1) (alpha_intra + n/p beta_intra), (p-g) (alpha_inter + n/p beta_inter))
                        (pairwise exchange; n: what one rank sends in all, n/p to each rank, itself included)

The bytes term: NCCL runs one ring (or tree) per NIC of a node, so a node's g GPUs cross the network together
at g times a GPU's share, while inside the node each GPU forwards (g-1)/g of the traffic over NVLink; the
slower of the two sets the pace. The all-reduce takes whichever of ring and tree is faster for its size and
scale, as NCCL's tuner does: the ring for large messages on few nodes, the tree where the ring's latency,
linear in p, takes over (2(p-1) hops: on 4096 H100 of LINKS, 30 ms per operation against 0.2 ms for the tree).
Inside one node (N = 1) it is the ring. On one link (an AlphaBeta) these are the plain ring formulas.

    network.all_reduce(100e6, 16, network.gpu_cluster("h100"))   # seconds, on 2 nodes of 8 H100
    network.calibrate(rows)          # AlphaBeta(alpha=..., beta=...) from rows {bytes, time_s, world_size}

The all-to-all has no ring: every rank sends a different piece to every other (Thakur, Rabenseifner and Gropp 2005,
the pairwise exchange for long messages: p - 1 steps of n/p bytes). NCCL posts the p - 1 sends together; those to
the g - 1 peers of the node go over NVLink while those to the p - g ranks of other nodes go through the GPU's NIC at
the same time, so the slower of the two sets the pace. Mixture-of-experts layers run two per layer forward (dispatch
the tokens to their experts, combine the outputs back) and two backward (`moe_all_to_all_bytes`):

    network.all_to_all(64e6, 16, network.gpu_cluster("h100"))         # seconds, 16 ranks on 2 nodes of 8
    network.moe_all_to_all_bytes(tokens=4096, top_k=2, dim=4096, ep=8, value_bytes=2)   # bytes leaving a rank
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from workshop.base import hardware

# --- links and clusters --------------------------------------------------------------------------


@dataclass(frozen=True)
class AlphaBeta:
    """A link: alpha seconds per message (per step of a collective), beta seconds per byte (1 / bandwidth)."""

    alpha: float
    beta: float
    name: str = ""

    @property
    def bandwidth_GBps(self) -> float:
        return 1 / self.beta / 1e9 if self.beta > 0 else math.inf

    def __str__(self) -> str:
        label = f"{self.name}: " if self.name else ""
        return f"{label}alpha {self.alpha * 1e6:.1f} us, beta {self.beta * 1e9:.4f} ns/B ({self.bandwidth_GBps:.2f} GB/s)"


def _link(name: str, alpha_us: float, GBps: float) -> AlphaBeta:
    return AlphaBeta(alpha_us * 1e-6, 1 / (GBps * 1e9), name)


# The links and GPUs of workshop.base.hardware (data sheets), as the model uses them: alpha-beta links, and per GPU its
# dense bf16 peak, memory and usual node.
LINKS = {name: _link(name, link.latency_us, link.GBps) for name, link in hardware.LINKS.items()}
GPUS = {key: {"flops": hardware.GPU_PEAK_TFLOPS[node.gpu]["bf16"] * 1e12, "memory": node.memory_GB * 1e9,
              "per_node": node.per_node, "intra": node.intra, "inter": node.inter} for key, node in hardware.NODES.items()}


def get_link(link: AlphaBeta | str) -> AlphaBeta:
    if isinstance(link, AlphaBeta):
        return link
    if link not in LINKS:
        raise ValueError(f"unknown link {link!r}; give an AlphaBeta or one of {', '.join(sorted(LINKS))}")
    return LINKS[link]


def shared(link: AlphaBeta | str, gpus: int) -> AlphaBeta:
    """A network link shared by `gpus` GPUs (one NIC per node, or fewer NICs than GPUs): each GPU's share."""
    ab = get_link(link)
    return AlphaBeta(ab.alpha, ab.beta * gpus, f"{ab.name}/{gpus}")


@dataclass(frozen=True)
class Cluster:
    """Two levels: `per_node` GPUs joined by `intra`; nodes joined by a network of which each GPU has `inter`."""

    intra: AlphaBeta
    inter: AlphaBeta
    per_node: int
    name: str = ""

    def __str__(self) -> str:
        return f"{self.name or 'cluster'}: {self.per_node} GPUs per node; inside {self.intra}; across, per GPU {self.inter}"


_ONE_LEVEL = 2**40  # a single link: every rank in one "node"


def gpu_cluster(gpu: str) -> Cluster:
    """The usual cluster of `gpu` (GPUS): 8 per node, its NVLink, one NIC per GPU."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(sorted(GPUS))}")
    spec = GPUS[gpu]
    return Cluster(get_link(spec["intra"]), get_link(spec["inter"]), spec["per_node"], gpu)


def _cluster(link: Cluster | AlphaBeta | str) -> Cluster:
    if isinstance(link, Cluster):
        return link
    ab = get_link(link)
    return Cluster(ab, ab, _ONE_LEVEL, ab.name)


def only(cl: Cluster, term: str) -> Cluster:
    """The cluster with only its latencies (`term` "latency": every beta 0) or only its bandwidths ("bandwidth":
    every alpha 0): a step priced on each tells which of the two it waits for."""
    if term not in ("latency", "bandwidth"):
        raise ValueError(f"term is 'latency' or 'bandwidth', not {term!r}")

    def part(ab):
        return AlphaBeta(ab.alpha if term == "latency" else 0.0, ab.beta if term == "bandwidth" else 0.0, ab.name)
    return replace(cl, intra=part(cl.intra), inter=part(cl.inter))


# --- collectives ---------------------------------------------------------------------------------

def _check(nbytes: float, p: int) -> None:
    if p < 1 or int(p) != p:
        raise ValueError(f"the number of ranks must be a whole number >= 1, got {p}")
    if nbytes < 0:
        raise ValueError(f"a message cannot have {nbytes} bytes")


def _shape(p: int, cl: Cluster, per_node: int | None) -> tuple[int, int]:
    """(g, N): ranks of the group per node, and nodes. `per_node` overrides the cluster's for a group that holds
    fewer GPUs of each node (the data-parallel group of tensor-parallel ranks)."""
    g = max(1, min(per_node or cl.per_node, p))
    return g, math.ceil(p / g)


def _bytes_beta(cl: Cluster, g: int, N: int) -> float:
    """Seconds per byte of the slower level: (g-1)/g of the bytes over NVLink, 1/g through each GPU's NIC."""
    if N == 1:
        return cl.intra.beta
    return max((g - 1) / g * cl.intra.beta, cl.inter.beta / g)


def _ring(nbytes: float, p: int, cl: Cluster, per_node: int | None, rounds: int) -> float:
    """A ring of `rounds` passes (1: all-gather or reduce-scatter, 2: all-reduce)."""
    if p == 1:
        return 0.0
    g, N = _shape(p, cl, per_node)
    steps = rounds * (p - 1)
    inter_steps = 0 if N == 1 else min(rounds * N, steps)
    latency = (steps - inter_steps) * cl.intra.alpha + inter_steps * cl.inter.alpha
    return latency + rounds * (p - 1) / p * nbytes * _bytes_beta(cl, g, N)


def all_reduce_times(nbytes: float, p: int, link: Cluster | AlphaBeta | str, per_node: int | None = None) -> dict:
    """Seconds of each all-reduce algorithm that applies: {"ring": ..., "tree": ...} (no tree inside a node)."""
    _check(nbytes, p)
    cl = _cluster(link)
    times = {"ring": _ring(nbytes, p, cl, per_node, 2)}
    g, N = _shape(p, cl, per_node)
    if N > 1:
        times["tree"] = (2 * ((g - 1) * cl.intra.alpha + math.ceil(math.log2(N)) * cl.inter.alpha)
                         + 2 * nbytes * _bytes_beta(cl, g, N))
    return times


def all_reduce(nbytes: float, p: int, link: Cluster | AlphaBeta | str, per_node: int | None = None) -> float:
    """Seconds of an all-reduce of `nbytes` on `p` ranks: the faster of ring and tree (one link: the ring,
    2(p-1) alpha + 2(p-1)/p n beta)."""
    return min(all_reduce_times(nbytes, p, link, per_node).values())


def all_gather(nbytes: float, p: int, link: Cluster | AlphaBeta | str, per_node: int | None = None) -> float:
    """Seconds of a ring all-gather whose result has `nbytes` (one link: (p-1) alpha + (p-1)/p n beta)."""
    _check(nbytes, p)
    return _ring(nbytes, p, _cluster(link), per_node, 1)


def reduce_scatter(nbytes: float, p: int, link: Cluster | AlphaBeta | str, per_node: int | None = None) -> float:
    """Seconds of a ring reduce-scatter of an `nbytes` input: the all-gather's steps, the other way round."""
    return all_gather(nbytes, p, link, per_node)


def all_to_all_split(nbytes: float, p: int, link: Cluster | AlphaBeta | str,
                     per_node: int | None = None) -> tuple[float, float]:
    """(bytes one rank sends to the other ranks of its node, bytes it sends to other nodes) in an all-to-all on `p`
    ranks of a send buffer of `nbytes`, nbytes / p to each rank: (g - 1) / p and (p - g) / p of it; the 1 / p for
    itself stays. g: the group's ranks per node (`per_node` where the group holds fewer GPUs of each node)."""
    _check(nbytes, p)
    g, _ = _shape(p, _cluster(link), per_node)
    return (g - 1) / p * nbytes, (p - g) / p * nbytes


def all_to_all(nbytes: float, p: int, link: Cluster | AlphaBeta | str, per_node: int | None = None) -> float:
    """Seconds of an all-to-all whose send buffer on each rank has `nbytes`: the sends inside the node (g - 1
    messages on NVLink) and those across nodes (p - g through the GPU's share of the network) at the same time,
    the slower of the two (module docstring). One link: (p - 1) alpha + (p - 1) / p n beta."""
    if p == 1:
        _check(nbytes, p)
        return 0.0
    cl = _cluster(link)
    g, _ = _shape(p, cl, per_node)
    intra, inter = all_to_all_split(nbytes, p, cl, per_node)
    return max((g - 1) * cl.intra.alpha + intra * cl.intra.beta, (p - g) * cl.inter.alpha + inter * cl.inter.beta)


def even_routing(tokens: float, top_k: int, experts: int, ep: int) -> list[list[float]]:
    """The routing table (ep rows of `experts` counts) of a router that spreads each rank's `tokens` x `top_k`
    assignments evenly over the experts, none dropped (GShard, Lepikhin et al. 2020)."""
    return [[tokens * top_k / experts] * experts for _ in range(ep)]


def routed_all_to_all_bytes(routing: list[list[float]], rank: int, dim: int, value_bytes: int = 4) -> float:
    """Bytes that leave rank `rank` in one mixture-of-experts layer's forward, from its ep group's routing table
    (ep rows of E counts: row i, column e, the rows rank i sends to expert e, which lives on rank e // (E / ep)):
    dispatch sends the rank's rows for experts elsewhere, combine sends back the rows the other ranks sent to its
    experts, `dim` values of `value_bytes` each. Backward sends the gradients of both, as many again."""
    ep, experts = len(routing), len(routing[0])
    home = [e // (experts // ep) for e in range(experts)]
    out = sum(n for e, n in enumerate(routing[rank]) if home[e] != rank)
    back = sum(row[e] for i, row in enumerate(routing) if i != rank for e in range(experts) if home[e] == rank)
    return (out + back) * dim * value_bytes


def moe_all_to_all_bytes(tokens: int, top_k: int, dim: int, ep: int, value_bytes: int = 4) -> float:
    """`routed_all_to_all_bytes` of an even router (`even_routing`): 2 tokens top_k dim value_bytes (ep - 1) / ep,
    on every rank. Backward sends as many again. `all_to_all_split` says how much of it crosses nodes."""
    for name, value in (("tokens", tokens), ("top_k", top_k), ("dim", dim), ("ep", ep), ("value_bytes", value_bytes)):
        if not isinstance(value, int) or value < (0 if name == "tokens" else 1):
            raise ValueError(f"{name} must be a whole number of at least {0 if name == 'tokens' else 1}, got {value!r}")
    return routed_all_to_all_bytes(even_routing(tokens, top_k, ep, ep), 0, dim, value_bytes)


# --- calibration ---------------------------------------------------------------------------------

# The collectives priced here, by the names that `python -m workshop.measure.bench collectives` records them under
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


def _terms(collective: str, n: float, p: int) -> tuple[float, float]:
    """(steps, bytes per rank): the coefficients of alpha and beta in a ring collective on one link."""
    rounds = 2 if collective == "all_reduce" else 1
    return rounds * (p - 1), rounds * (p - 1) / p * n


def calibrate(rows: list[dict], name: str = "calibrated", collective: str = "all_reduce") -> AlphaBeta:
    """alpha and beta from rows {bytes, time_s, world_size} of `collective` (any world sizes >= 2).

    Least squares of t = steps alpha + bytes beta (all-reduce: 2(p-1) alpha + 2(p-1)/p n beta; all-gather and
    reduce-scatter: (p-1) alpha + (p-1)/p n beta), weighted by 1/t so that each size counts by its relative error
    (unweighted, the largest messages alone would decide alpha). A coefficient that comes out negative is set to
    0 and the other refitted: neither can be negative.
    """
    pts = [(*_terms(collective, r["bytes"], r["world_size"]), r["time_s"])
           for r in rows if r["world_size"] >= 2 and r["time_s"] > 0]
    if len(pts) < 2 or len({x2 for _, x2, _ in pts}) < 2:
        raise ValueError(f"calibration needs {collective} times of at least two message sizes on 2 or more ranks: run "
                         "python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.measure.bench collectives")
    # weighted rows: (x1/t, x2/t) . (alpha, beta) ~ 1
    a11 = sum((x1 / t) ** 2 for x1, _, t in pts)
    a12 = sum(x1 * x2 / t**2 for x1, x2, t in pts)
    a22 = sum((x2 / t) ** 2 for _, x2, t in pts)
    b1 = sum(x1 / t for x1, _, t in pts)
    b2 = sum(x2 / t for _, x2, t in pts)
    det = a11 * a22 - a12 * a12
    alpha = (b1 * a22 - b2 * a12) / det if det else -1.0
    beta = (a11 * b2 - a12 * b1) / det if det else -1.0
    if alpha < 0 or beta < 0:  # the one-coefficient fits
        alpha, beta = (0.0, b2 / a22) if alpha < 0 else (b1 / a11, 0.0)
    return AlphaBeta(alpha, beta, name)


def fit_error(rows: list[dict], ab: AlphaBeta, collective: str = "all_reduce") -> float:
    """The largest relative error of the fitted times of `collective` against the measured ones."""
    def model(r):
        steps, nbytes = _terms(collective, r["bytes"], r["world_size"])
        return steps * ab.alpha + nbytes * ab.beta
    return max(abs(model(r) - r["time_s"]) / r["time_s"] for r in rows)

