"""Tensor parallelism: each layer's weight matrices split over the ranks of a tensor-parallel group
(Megatron-LM, Shoeybi et al. 2019, "Training Multi-Billion Parameter Language Models Using Model
Parallelism", section 3), first from scratch, then with DTensor, then combined with FSDP (2D).

From scratch, on any process group (notebook 08 writes the same in cells first):

    y = copy_to_tp(x, group)        # the paper's f: identity forward, all-reduce backward
    y = reduce_from_tp(x, group)    # the paper's g: all-reduce forward, identity backward
    ColumnParallelLinear(linear, group)   # this rank's rows of W: a slice of the output features
    RowParallelLinear(linear, group)      # this rank's columns of W: a partial sum, all-reduced (g)
    TPFeedForward(ff, group), TPAttention(attention, group)   # a TinyGPT block's halves, split

With DTensor (a plan is data: a dict from module name to a ParallelStyle):

    plan = tinygpt_tp_plan(sequence_parallel=False)  # notebook 08 writes the same dict out in a cell
    apply_tp(model, tp_mesh)                       # parallelize_module(model, tp_mesh, plan)
    same_plan(written_plan, sequence_parallel)     # is a plan written out this one, entry by entry?
    mesh = make_mesh(env, dp_size=2, tp_size=2)    # ("dp", "tp"); tp inside a node
    apply_2d(model, mesh)                          # TP over mesh["tp"], then fully_shard over mesh["dp"]

Sizes are checked before anything is split: `check_tp_size(model, tp_size)` and `ParallelDims(...)` raise
a ValueError naming the numbers. Notebook 08 checks tensor parallelism on 2 CPU ranks (gloo) against one
process; the tests check 2D on 4:

    torchrun --standalone --nproc-per-node 4 tests/multirank/tp_equivalence.py OUT.pt   # 2D on 4 ranks
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from workshop import dist
from workshop.base.progress import quiet
from workshop.dist import DistEnv
from workshop.models import CausalSelfAttention, FeedForward, GPTBlock, KVCache, TinyGPT, causal_attention, lm_loss
from workshop.parallel_dims import build_mesh

# ---------------------------------------------------------------------------------------------
# From scratch: the paper's f and g as autograd functions
# ---------------------------------------------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    """f (Megatron-LM, eq. 3 and figure 3a): the input of a column-parallel layer is the same on
    every rank, so forward copies nothing; each rank's backward only sees the gradient flowing
    through its own slice of the layer, so the gradient of the input is the sum over ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all-reduce is in place; autograd may hold `grad` elsewhere
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """g: a row-parallel layer leaves a partial sum on each rank; forward adds them up; the
    gradient of the sum with respect to each part is the gradient itself, so backward copies."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, group=None) -> torch.Tensor:
    """Megatron's f: identity forward, all-reduce of the gradient backward."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group=None) -> torch.Tensor:
    """Megatron's g: all-reduce forward, identity backward."""
    return _ReduceFromTP.apply(x, group)


def _rank_and_size(group) -> tuple[int, int]:
    return tdist.get_rank(group), tdist.get_world_size(group)


def _split(n: int, tp_size: int, what: str) -> int:
    if n % tp_size:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ValueError(f"tensor-parallel size {tp_size} does not divide the {n} {what}; choose one of {divisors}")
    return n // tp_size


class ColumnParallelLinear(nn.Module):
    """Y = X A with A split by columns, A = [A_1, ..., A_p] (nn.Linear stores A^T, so this rank
    keeps rows of `weight`): rank r computes Y_r = X A_r, its slice of the output features, and
    nothing is communicated forward. `copy_input` puts f in front (the gradient of X is summed over
    the ranks); set it False when one f already serves several column-parallel layers (q, k, v).

    Built from a dense nn.Linear, whose weights every rank holds before the split."""

    def __init__(self, linear: nn.Linear, group=None, copy_input: bool = True):
        super().__init__()
        self.group, self.copy_input = group, copy_input
        rank, tp_size = _rank_and_size(group)
        n = _split(linear.out_features, tp_size, f"output features of {linear}")
        rows = slice(rank * n, (rank + 1) * n)
        self.weight = nn.Parameter(linear.weight.detach()[rows].clone())  # (out / tp, in)
        self.bias = nn.Parameter(linear.bias.detach()[rows].clone()) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out / tp)
        if self.copy_input:
            x = copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Y = X A with A split by rows and X by columns (X = [X_1, ..., X_p], the output of a
    column-parallel layer): rank r computes X_r A_r, a partial sum, and g adds them up. The bias
    is added once, after the sum. Keeps columns of nn.Linear's `weight`."""

    def __init__(self, linear: nn.Linear, group=None):
        super().__init__()
        self.group = group
        rank, tp_size = _rank_and_size(group)
        n = _split(linear.in_features, tp_size, f"input features of {linear}")
        self.weight = nn.Parameter(linear.weight.detach()[:, rank * n:(rank + 1) * n].clone())  # (out, in / tp)
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in / tp) -> (..., out)
        out = reduce_from_tp(F.linear(x, self.weight), self.group)
        return out + self.bias if self.bias is not None else out


class TPFeedForward(nn.Module):
    """The MLP split column-then-row (Megatron-LM figure 3a): Y = GeLU(X A) B with A by columns, B
    by rows. GeLU is applied to each rank's slice on its own, so the block needs one all-reduce
    forward (g, after B) and one backward (f, before A)."""

    def __init__(self, ff: FeedForward, group=None):
        super().__init__()
        self.w1 = ColumnParallelLinear(ff.w1, group)
        self.w2 = RowParallelLinear(ff.w2, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class TPAttention(nn.Module):
    """Self-attention split by heads (Megatron-LM figure 3b): each rank holds the q, k, v
    projections of heads/tp heads (column-parallel) and the matching input columns of the output
    projection (row-parallel). Heads never look at each other, so attention itself needs no
    communication: one f in front of q, k and v together, one g after the output projection."""

    def __init__(self, attention: CausalSelfAttention, group=None):
        super().__init__()
        self.group, self.head_dim = group, attention.head_dim
        heads = attention.wq.out_features // attention.head_dim
        _split(heads, _rank_and_size(group)[1], "attention heads")  # whole heads per rank, or refuse
        self.wq, self.wk, self.wv = (ColumnParallelLinear(w, group, copy_input=False)
                                     for w in (attention.wq, attention.wk, attention.wv))
        self.wo = RowParallelLinear(attention.wo, group)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        x = copy_to_tp(x, self.group)  # one f for q, k and v
        q, k, v = (w(x).view(B, T, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = causal_attention(q, k, v)  # (B, heads / tp, T, hs): this rank's heads
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def megatron_block(block: GPTBlock, group=None) -> GPTBlock:
    """A copy of a TinyGPT block with its attention and MLP split over `group` from scratch;
    the LayerNorms stay whole on every rank. Two all-reduces forward and two backward."""
    block = copy.deepcopy(block)
    block.attention = TPAttention(block.attention, group)
    block.feed_forward = TPFeedForward(block.feed_forward, group)
    return block


# ---------------------------------------------------------------------------------------------
# Size checks: fail at once, naming the numbers
# ---------------------------------------------------------------------------------------------


def check_tp_size(model_or_dims: TinyGPT | dict, tp_size: int) -> None:
    """Refuse a tensor-parallel size that does not split TinyGPT evenly: whole attention heads,
    the hidden size (MLP width) and the vocabulary (embedding and output head) per rank.
    `model_or_dims` is a TinyGPT or a dict with heads, dim, and optionally hidden and vocab_size."""
    if isinstance(model_or_dims, TinyGPT):
        m = model_or_dims
        dims = dict(heads=m.heads, dim=m.dim, hidden=m.layers[0].feed_forward.w1.out_features, vocab_size=m.vocab_size)
    else:
        dims = dict(model_or_dims)
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tensor-parallel size must be a whole number >= 1, got {tp_size!r}")
    names = {"heads": "attention heads", "dim": "model width (dim)", "hidden": "MLP hidden size",
             "vocab_size": "vocabulary entries"}
    for key, what in names.items():
        if key in dims and dims[key] % tp_size:
            n = dims[key]
            fits = [d for d in range(1, n + 1) if all(v % d == 0 for k, v in dims.items() if k in names)]
            # two lines: the model's sizes make one line too wide for a notebook's output
            raise ValueError(f"tensor-parallel size {tp_size} does not divide the {n} {what}\n"
                             f"({', '.join(f'{k} {v}' for k, v in dims.items())}); choose tp_size from {fits}")


def tp_problem(model_or_dims: TinyGPT | dict, tp_size: int) -> str | None:
    """Why `tp_size` does not split the model evenly (check_tp_size's message), or None when it does."""
    try:
        check_tp_size(model_or_dims, tp_size)
    except ValueError as err:
        return str(err)
    return None


def largest_tp_size(model_or_dims: TinyGPT | dict, world_size: int, at_most: int) -> int:
    """The largest tensor-parallel size, at most `at_most` (the ranks of a node), that splits the model evenly and
    divides the world: 3 ranks and 4 attention heads give 1."""
    return max(d for d in range(1, min(world_size, at_most) + 1)
               if world_size % d == 0 and tp_problem(model_or_dims, d) is None)


def make_mesh(env: DistEnv, dp_size: int | None = None, tp_size: int = 1):
    """A 2D device mesh named ("dp", "tp"): tp is the inner dimension, so the ranks of one
    tensor-parallel group are consecutive and, with ranks numbered node by node, on one node
    (TP talks twice per layer forward and backward; it needs NVLink, not the network).
    dp_size defaults to world_size / tp_size."""
    if dp_size is None:
        if not isinstance(tp_size, int) or tp_size < 1 or env.world_size % tp_size:
            divisors = [d for d in range(1, env.world_size + 1) if env.world_size % d == 0]
            raise ValueError(f"tp_size {tp_size} does not divide the world of {env.world_size} ranks; choose one of {divisors}")
        dp_size = env.world_size // tp_size
    return build_mesh(env, dp=dp_size, tp=tp_size)


# ---------------------------------------------------------------------------------------------
# With DTensor: the plan is data
# ---------------------------------------------------------------------------------------------


def tinygpt_tp_plan(sequence_parallel: bool = False) -> dict:
    """The tensor-parallel plan of TinyGPT for `parallelize_module`: module name (`*` matches every
    layer) to ParallelStyle. q, k, v and the MLP's first layer column-wise, the output projection
    and the MLP's second layer row-wise, as in Megatron-LM; the token embedding split by vocabulary
    (row-wise) and the output head by vocabulary (column-wise, logits gathered).

    Each attention module gets its input as one replicated DTensor (PrepareModuleInput with
    use_local_output=False), so the three column-wise projections share one all-reduce backward
    (Megatron's single f), instead of one each.

    With `sequence_parallel` (Korthikanti et al. 2022) the LayerNorms and the residual stream are
    split along the sequence (dimension 1) instead of replicated: each all-reduce becomes an
    all-gather before the split region and a reduce-scatter after it, and activations outside
    attention and MLP take 1/tp of the memory. The sequence length must then be divisible by tp.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

    if not sequence_parallel:
        return {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "layers.*.attention": PrepareModuleInput(input_layouts=(Replicate(), None, None),
                                                     desired_input_layouts=(Replicate(), None, None),
                                                     use_local_output=False),
            "layers.*.attention.wq": ColwiseParallel(),
            "layers.*.attention.wk": ColwiseParallel(),
            "layers.*.attention.wv": ColwiseParallel(),
            "layers.*.attention.wo": RowwiseParallel(),
            "layers.*.feed_forward.w1": ColwiseParallel(),
            "layers.*.feed_forward.w2": RowwiseParallel(),
            "output": ColwiseParallel(output_layouts=Replicate()),
        }
    return {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),  # (B, T / tp, C)
        "pos_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0)),  # (T / tp, C)
        "layers.*.attention_norm": SequenceParallel(),
        "layers.*.attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                 desired_input_layouts=(Replicate(), None, None)),
        "layers.*.attention.wq": ColwiseParallel(),
        "layers.*.attention.wk": ColwiseParallel(),
        "layers.*.attention.wv": ColwiseParallel(),
        "layers.*.attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "layers.*.ffn_norm": SequenceParallel(),
        "layers.*.feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "layers.*.feed_forward.w1": ColwiseParallel(),
        "layers.*.feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }


def same_plan(plan: dict, sequence_parallel: bool = False):
    """Whether `plan` (notebook 08 writes TinyGPT's out in a cell) is `tinygpt_tp_plan(sequence_parallel)` entry by
    entry: the same module names, each with the same style and layouts (a style's repr names them all), in any
    order. A check.Match whose detail names the first entry that differs."""
    from workshop.check import Match

    package = tinygpt_tp_plan(sequence_parallel)
    for name in sorted(set(plan) | set(package)):
        if name not in plan or name not in package:
            return Match(False, f"{name!r} is only in {'the package' if name in package else 'the written'} plan")
        if repr(plan[name]) != repr(package[name]):
            return Match(False, f"{name}: {plan[name]!r} written, {package[name]!r} in the package")
    return Match(True)


def apply_tp(model: TinyGPT, tp_mesh, *, sequence_parallel: bool = False) -> TinyGPT:
    """Tensor parallelism with DTensor: `parallelize_module(model, tp_mesh, tinygpt_tp_plan(...))`,
    in place, after checking that tp_mesh's size splits the model evenly. The weights are taken
    from the mesh's first rank (every rank should start from the same model anyway)."""
    from torch.distributed.tensor.parallel import parallelize_module

    check_tp_size(model, tp_mesh.size())
    return parallelize_module(model, tp_mesh, tinygpt_tp_plan(sequence_parallel))


def apply_2d(model: TinyGPT, mesh, *, dp_dim: str = "dp", tp_dim: str = "tp", sequence_parallel: bool = False,
             reshard_after_forward: bool = True, mp_policy=None) -> TinyGPT:
    """2D parallelism: tensor parallelism over mesh[tp_dim] (inside a node), then FSDP2 over
    mesh[dp_dim] (across nodes): every block's DTensor weights, already split by tp, are sharded
    again over dp and gathered block by block. TP first, because FSDP shards what TP left.
    Lightning's ModelParallelStrategy names the dimensions "data_parallel" and "tensor_parallel"."""
    from workshop.sharding import apply_fsdp

    apply_tp(model, mesh[tp_dim], sequence_parallel=sequence_parallel)
    # FSDP2 warns at every forward of the 2D model that it returns a view: the logits leave as one
    # (DTensor.to_local()), and nothing changes them in place. The forwards are the caller's, after this returns, so
    # the filter cannot be scoped to this call; it names this one message, and setting it again replaces it.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPTinyGPT\) returned a view tensor")
    return apply_fsdp(model, mesh[dp_dim], reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, on every rank (DTensors gathered with full_tensor()), copied to CPU:
    later steps of the model do not change it."""
    from torch.distributed.tensor import DTensor

    # A weight split by tp and by dp gathers in two steps; torch says so once per rank, not our lesson.
    with quiet("torch.distributed.tensor._redistribute"):
        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
                for name, p in model.named_parameters()}


def dp_loader(dataset, batch_size: int, dp_size: int, dp_rank: int, shuffle: bool = False, seed: int = 0):
    """A DataLoader of this rank's data-parallel shard: the ranks of one tensor-parallel group read
    the same samples (they compute one model together), the dp_size groups disjoint ones. With a
    mesh: `dp_loader(ds, 16, mesh["dp"].size(), mesh["dp"].get_local_rank())`; with tp the inner
    mesh dimension, dp_rank = rank // tp_size."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def lightning_2d(sequence_parallel: bool = False):
    """The `parallelize` of `lit.LitLanguageModel` under Lightning's
    ModelParallelStrategy(data_parallel_size, tensor_parallel_size): the strategy builds the 2D mesh
    (dimensions "data_parallel", "tensor_parallel") and calls `configure_model`, where this applies
    `apply_2d`; the optimizer is made afterwards, over the split weights."""
    return functools.partial(apply_2d, dp_dim="data_parallel", tp_dim="tensor_parallel",
                             sequence_parallel=sequence_parallel)


# --- AxoNN (GPUs only) ------------------------------------------------------------------------------

def axonn_problem(env: DistEnv) -> str | None:
    """Why AxoNN's tensor parallelism cannot run on this rank, or None when it can: AxoNN 0.2 creates its process
    groups with NCCL and its layers on CUDA, and is the `gpu` extra of this package."""
    import importlib.util

    if env.device_type != "cuda":
        return "AxoNN requires NCCL and CUDA (its process groups are NCCL's, its layers CUDA's); this rank runs on CPU"
    if importlib.util.find_spec("axonn") is None:
        return "AxoNN is not installed: pip install -e '.[gpu]' (or pip install axonn)"
    return None


def parse_tp_dimensions(text: str, world_size: int) -> tuple[int, int, int]:
    """AxoNN's tensor-parallel grid "rows,columns,depth" (e.g. "2,2,1"); one 0 stands for whatever the others leave of
    the world. The product must be the world size (AxoNN's G_intra_r x G_intra_c x G_intra_d, with no data or
    pipeline parallelism beside it)."""
    try:
        dims = [int(x) for x in str(text).split(",")]
    except ValueError:
        dims = []
    if len(dims) != 3 or any(d < 0 for d in dims) or dims.count(0) > 1:
        raise ValueError(f"tp_dimensions {text!r}: give rows,columns,depth as three whole numbers, at most one of them 0 "
                         f"(the rest of the {world_size} ranks), e.g. \"{world_size},1,1\"")
    if 0 in dims:
        given = (dims[0] or 1) * (dims[1] or 1) * (dims[2] or 1)
        dims[dims.index(0)] = max(1, world_size // given)
    if dims[0] * dims[1] * dims[2] != world_size:
        raise ValueError(f"tp_dimensions {text!r} make a grid of {dims[0]} x {dims[1]} x {dims[2]} = "
                         f"{dims[0] * dims[1] * dims[2]} ranks, but the world has {world_size}")
    return dims[0], dims[1], dims[2]


def axonn_parallelize(build, state: dict, tp_dimensions: tuple[int, int, int]) -> nn.Module:
    """A model whose nn.Linear layers are AxoNN's tensor-parallel Linear on the grid `tp_dimensions` (rows, columns,
    depth): `build()` runs under AxoNN's `auto_parallelize`, which swaps each nn.Linear it can split for one, and the
    whole weights of `state` are loaded, each rank keeping its block of every matrix. Every rank must call it,
    after dist.init on GPUs (AxoNN builds its NCCL groups from the process group already there)."""
    from axonn import axonn as ax
    from axonn.intra_layer import auto_parallelize

    rows, columns, depth = tp_dimensions
    ax.init(G_inter=1, G_data=1, G_intra_r=rows, G_intra_c=columns, G_intra_d=depth)
    with auto_parallelize():
        model = build()
    model.load_state_dict(state)
    return model


def axonn_train(model: nn.Module, optimizer: torch.optim.Optimizer, loader, env: DistEnv) -> list[float]:
    """AxoNN's training loop over `loader` (this rank's share of each global batch): the forward and backward inside
    `optimize_communication` (AxoNN adds its layers' weight gradients when the block ends), `sync_gradients` to
    average the data-parallel layers' gradients, the step. Returns each step's loss of the global batch (the mean of
    the ranks' losses, equal shares). Every rank must call it."""
    from axonn.intra_layer import optimize_communication, sync_gradients

    losses = []
    for x, y in loader:
        optimizer.zero_grad()
        with optimize_communication():
            loss = lm_loss(model(x.to(env.device)), y.to(env.device))
            loss.backward()
        sync_gradients(model, mean=True)
        optimizer.step()
        losses.append(dist.global_mean(loss))
    return losses


def check_mlp_slices(slices, w1: torch.Tensor, w2: torch.Tensor):
    """Exercise 08.1: a student's `slices(w1, w2, rank, ranks)` must give rank r of 1, 2 and 4 ranks its slices of
    Megatron's MLP as nn.Linear stores them: A's columns (w1's rows r*n:(r+1)*n) and B's rows (w2's columns). The
    hint names a row split where a column split belongs, and the other usual mistakes."""
    from workshop.check import Match

    hidden, dim = w1.shape
    for ranks in (1, 2, 4):
        n = hidden // ranks
        for r in range(ranks):
            got = slices(w1, w2, r, ranks)
            a, b = (tuple(got) + (None, None))[:2] if isinstance(got, (tuple, list)) else (None, None)
            want_a, want_b = w1[r * n:(r + 1) * n], w2[:, r * n:(r + 1) * n]
            where = f"rank {r} of {ranks}"
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                return Match(False, f"{where}: return the two slices (A_r, B_r), tensors")
            if a.shape != want_a.shape and ranks > 1 and torch.equal(a, w1[:, r * (dim // ranks):(r + 1) * (dim // ranks)]):
                return Match(False, f"{where}: you split w1 along its columns; A's columns are w1's rows (nn.Linear "
                                    "stores A transposed): a column split of A keeps rows of w1")
            if b.shape != want_b.shape and ranks > 1 and torch.equal(b, w2[r * (dim // ranks):(r + 1) * (dim // ranks)]):
                return Match(False, f"{where}: you split w2 along its rows; B is split by rows, which are w2's columns "
                                    "(nn.Linear stores B transposed)")
            if a.shape != want_a.shape or b.shape != want_b.shape:
                return Match(False, f"{where}: slices of shapes {tuple(a.shape)} and {tuple(b.shape)}, expected "
                                    f"{tuple(want_a.shape)} and {tuple(want_b.shape)} (n = hidden / ranks = {n})")
            other = next((k for k in range(ranks) if k != r and torch.equal(a, w1[k * n:(k + 1) * n])), None)
            if other is not None:
                return Match(False, f"{where}: you took rank {other}'s slice of w1: rank r keeps hidden units r*n to (r+1)*n")
            if not (torch.equal(a, want_a) and torch.equal(b, want_b)):
                return Match(False, f"{where}: the shapes are right, the values are not w1[r*n:(r+1)*n] and "
                                    "w2[:, r*n:(r+1)*n]: the same hidden units on both sides")
    return Match(True)
