"""Data parallelism: every rank holds the whole model, reads its own shard of each global batch,
and the ranks average their gradients before the optimizer step.

Three ways, from the idea to the library (notebook 05 writes the first in a cell and checks all
three against one process):

    allreduce_gradients(model, world_size)   # naive: after backward, one all-reduce per parameter
    BucketedAllReduce(model, bucket_mb)      # buckets all-reduced asynchronously from gradient hooks
    apply_ddp(model, env)                    # torch.nn.parallel.DistributedDataParallel

With `world_size` ranks each reading `micro_batch_size` samples and `grad_accum_steps` micro steps
per optimizer step, the global batch is micro_batch_size x world_size x grad_accum_steps.

Under all of them is the all-reduce; `ring_allreduce` writes it with send and receive, and
`per_rank_table` shows what a collective left on every rank.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from workshop import check
from workshop.dist import DistEnv


def ring_allreduce(t: torch.Tensor) -> int:
    """Sum `t` over all ranks, in place, with only send and receive: the ring all-reduce (Patarasuk
    and Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations", JPDC 2009;
    Baidu's ring all-reduce, 2017). Returns the bytes this rank sent.

    The flat tensor is cut into n chunks (sizes differ by at most one element). Rank r sends to
    r + 1 and receives from r - 1, n - 1 times in each of two phases:
      reduce-scatter: at step s rank r passes chunk r - s on and adds the chunk r - s - 1 that
        arrives to its own; after n - 1 steps it holds chunk r + 1 summed over all ranks;
      all-gather: at step s rank r passes the summed chunk r + 1 - s on and keeps the summed chunk
        r - s that arrives; after n - 1 steps every rank holds every summed chunk.
    Each step moves one chunk, about S / n bytes of a tensor of S bytes: 2(n - 1) S / n per rank
    in all, nearly 2 S whatever n is, and every link busy at once.
    """
    n, rank = tdist.get_world_size(), tdist.get_rank()
    if not t.is_contiguous():
        raise ValueError("ring_allreduce sums a contiguous tensor in place; pass t.contiguous() and use the result")
    chunks = list(t.view(-1).tensor_split(n))  # n views into t: writing them writes t
    right, left = (rank + 1) % n, (rank - 1) % n
    sent = 0

    def exchange(send: int, receive: int) -> torch.Tensor:
        nonlocal sent
        arrived = torch.empty_like(chunks[receive])
        requests = [tdist.isend(chunks[send], right), tdist.irecv(arrived, left)]  # both posted: no deadlock
        for request in requests:
            request.wait()
        sent += chunks[send].numel() * chunks[send].element_size()
        return arrived

    for s in range(n - 1):  # reduce-scatter
        chunks[(rank - s - 1) % n] += exchange((rank - s) % n, (rank - s - 1) % n)
    for s in range(n - 1):  # all-gather
        chunks[(rank - s) % n].copy_(exchange((rank + 1 - s) % n, (rank - s) % n))
    return sent


def per_rank_table(rows: dict[str, torch.Tensor | None]) -> str:
    """What each rank holds, one row per name and one column per rank, for rank 0 to print: every
    rank's `rows` are gathered (a collective: every rank calls it, with the same names). None
    shows as "-" (a rank that received nothing)."""
    mine = {name: None if t is None else t.tolist() for name, t in rows.items()}
    everyone: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(everyone, mine)

    def show(values) -> str:
        return "-" if values is None else " ".join(f"{v:g}" for v in (values if isinstance(values, list) else [values]))

    cells = {name: [show(ranks[name]) for ranks in everyone] for name in rows}
    width = max(6, *(len(c) for row in cells.values() for c in row))
    label = max(len(name) for name in rows)
    lines = [f"{'':{label}}  " + "  ".join(f"{f'rank {r}':>{width}}" for r in range(len(everyone)))]
    lines += [f"{name:{label}}  " + "  ".join(f"{c:>{width}}" for c in row) for name, row in cells.items()]
    return "\n".join(lines)

def allreduce_gradients(model: nn.Module, world_size: int) -> None:
    """Average every gradient over the ranks: sum with all-reduce, divide by the world size.
    One collective per parameter tensor, and none starts before backward has finished."""
    for p in model.parameters():
        if p.grad is not None:
            tdist.all_reduce(p.grad, op=tdist.ReduceOp.SUM)
            p.grad /= world_size


class BucketedAllReduce:
    """Gradients grouped into buckets of about `bucket_mb` MiB, each all-reduced asynchronously
    as soon as backward has produced all of its gradients: communication overlaps the rest of
    backward, the idea behind DDP (Li et al., "PyTorch Distributed", VLDB 2020, section 3.2.3).
    Needs a process group (`workshop.dist.init()` makes one, of one rank for one process).

        sync = BucketedAllReduce(model, world_size)
        loss.backward()      # hooks launch each bucket's all-reduce while backward goes on
        sync.wait()          # wait for the last ones, copy the averaged gradients back
        optimizer.step()

    Buckets follow the parameters in reverse order of registration, roughly the order in which
    backward produces their gradients. Micro steps inside `with sync.no_sync():` only accumulate
    (no communication), as with DDP's `no_sync()`.
    """

    def __init__(self, model: nn.Module, world_size: int, bucket_mb: float = 1.0):
        self.world_size = world_size
        self.require_sync = True
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets: list[list[nn.Parameter]] = []
        size, cap = 0, bucket_mb * 2**20
        for p in reversed(params):
            if not self.buckets or size + p.numel() * p.element_size() > cap:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._ready = [0] * len(self.buckets)
        self._pending: list[tuple[int, torch.Tensor, object]] = []
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self.require_sync:
            return
        i = self._bucket_of[id(p)]
        self._ready[i] += 1
        if self._ready[i] == len(self.buckets[i]):  # the bucket's last gradient: send it
            flat = torch.cat([q.grad.reshape(-1) for q in self.buckets[i]])
            work = tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, async_op=True)
            self._pending.append((i, flat, work))

    @contextlib.contextmanager
    def no_sync(self):
        """Micro steps inside only accumulate gradients: no communication (like DDP.no_sync)."""
        self.require_sync = False
        try:
            yield
        finally:
            self.require_sync = True

    def wait(self) -> None:
        """Wait for every bucket's all-reduce and write the averaged gradients back."""
        for i, flat, work in self._pending:
            work.wait()
            flat /= self.world_size
            offset = 0
            for q in self.buckets[i]:
                q.grad.copy_(flat[offset: offset + q.numel()].view_as(q.grad))
                offset += q.numel()
        if self.require_sync and len(self._pending) != len(self.buckets):
            raise RuntimeError(f"only {len(self._pending)} of {len(self.buckets)} buckets were all-reduced: "
                               "did every parameter get a gradient?")
        self._pending.clear()
        self._ready = [0] * len(self.buckets)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def apply_ddp(model: nn.Module, env: DistEnv, **kwargs) -> nn.Module:
    """torch's DistributedDataParallel on this rank's device (one process per GPU, or CPU)."""
    from torch.nn.parallel import DistributedDataParallel

    model = model.to(env.device)
    if env.device_type == "cuda":
        index = torch.device(env.device).index
        return DistributedDataParallel(model, device_ids=[index], output_device=index, **kwargs)
    return DistributedDataParallel(model, **kwargs)


def train_steps(model: nn.Module, optimizer, loader, device, *, grad_accum_steps: int = 1,
                sync=None, no_sync=None) -> list[float]:
    """The data-parallel training loop: every `grad_accum_steps` micro batches of this rank's
    shard make one optimizer step. `sync()` averages the gradients over the ranks before the step
    (None when the model does it itself, as DDP does); micro steps that only accumulate run inside
    `no_sync()` when given. Returns the loss of each micro step on this rank."""
    model.train()
    if hasattr(getattr(loader, "sampler", None), "set_epoch"):  # a DataLoader; a list of batches has no sampler
        loader.sampler.set_epoch(0)
    losses = []
    for i, (x, y) in enumerate(loader):
        last_micro = (i + 1) % grad_accum_steps == 0
        with contextlib.nullcontext() if last_micro or no_sync is None else no_sync():
            # divided so that the accumulated gradient is the mean over the micro steps' samples
            loss = F.cross_entropy(model(x.to(device)), y.to(device)) / grad_accum_steps
            check.stop_if_diverged(loss, i // grad_accum_steps, optimizer.param_groups[0]["lr"])  # all ranks together
            loss.backward()
        losses.append(loss.item() * grad_accum_steps)
        if last_micro:
            if sync is not None:
                sync()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return losses


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over all ranks, differentiable: the gradient of a sum that every rank uses is the sum
    of every rank's gradient, so the backward pass all-reduces too."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        tdist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        tdist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are the global batch's, on any device: each rank's per-channel sums of
    x and x^2 and its count are all-reduced (differentiably, so the backward pass sums every rank's share of the
    gradient through the statistics, as torch's SyncBatchNorm does on GPUs), then every rank normalises with the
    same mean and variance. Evaluation uses the running statistics, updated from the global ones."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected a batch of at least 2 dimensions (N, C, ...), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        count = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        totals = _SumOverRanks.apply(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        n = totals[-1]
        mean = totals[:c] / n
        var = totals[c:2 * c] / n - mean * mean  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: a cumulative average, as BatchNorm's
                weight = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.detach(), weight)
                self.running_var.lerp_(var.detach() * n / (n - 1), weight)  # unbiased, as BatchNorm keeps it
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm of `model` normalised with the statistics of the global batch: torch's SyncBatchNorm on
    CUDA (it runs on GPUs only), GlobalBatchNorm elsewhere; the weights, biases and running statistics kept."""
    if any(p.is_cuda for p in model.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            synced = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            sync_batchnorm(child)
    return model


# --- notebook 05's exercises: a student's piece against the reference, and a hint that names the usual mistake ---

def check_gradient_average(average, make_model, x: torch.Tensor, y: torch.Tensor, env: DistEnv) -> check.Match:
    """Exercise 05.1: one backward of a fresh model on this rank's shard of the global batch (x, y) (sample i on rank
    i mod world size), then `average(model)`, must leave every gradient equal to one process's gradient of the whole
    batch. A collective: every rank calls it."""
    reference = make_model()
    F.cross_entropy(reference(x), y).backward()
    expected = [p.grad.detach().clone() for p in reference.parameters()]
    model = make_model()
    n, r = env.world_size, env.rank
    F.cross_entropy(model(x[r::n]), y[r::n]).backward()
    average(model)
    match = check.same_grads(model, expected, rtol=1e-4, atol=1e-6)
    if match:
        return match
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().double()
    low, high = norm.clone(), norm.clone()
    if env.is_distributed:
        tdist.all_reduce(low, op=tdist.ReduceOp.MIN)
        tdist.all_reduce(high, op=tdist.ReduceOp.MAX)
    ratio = (norm / torch.cat([g.flatten() for g in expected]).norm().double()).item()
    if high - low > 1e-6 * high:
        return check.Match(False, "the ranks hold different gradients afterwards: all-reduce every parameter's .grad "
                                  "(op=SUM), on every rank")
    if n > 1 and abs(ratio - n) < 0.01 * n:
        return check.Match(False, f"your gradients are {ratio:.1f}x the reference's: did you divide the sum by the world "
                                  f"size ({n})?")
    if n > 1 and abs(ratio * n - 1) < 0.01:
        return check.Match(False, f"your gradients are 1/{n} of the reference's: divide by the world size once, after "
                                  "the all-reduce has summed them")
    return check.Match(False, f"your gradients are not one process's on the global batch ({match.detail})")


def check_ddp_pieces(model, loader, dataset, batch_size: int, env: DistEnv) -> check.Match:
    """Exercise 05.2: `model` must be wrapped in DistributedDataParallel and `loader` must read, in batches of
    `batch_size`, this rank's shard of `dataset` in order (sample i on rank i mod world size, as the reference's
    global batches are dealt). Every rank calls it."""
    from torch.nn.parallel import DistributedDataParallel

    n, r = env.world_size, env.rank
    read = list(iter(loader.sampler)) if loader.sampler is not None else []
    mine = list(range(r, len(dataset), n))
    if not isinstance(model, DistributedDataParallel):
        return check.Match(False, f"the model is a {type(model).__name__}: wrap it, DistributedDataParallel(model)")
    if loader.batch_size != batch_size:
        return check.Match(False, f"the loader's batches hold {loader.batch_size} samples: give DataLoader "
                                  f"batch_size={batch_size}")
    if read == mine:
        return check.Match(True)
    if n > 1 and len(read) == len(dataset):
        return check.Match(False, f"rank {r} reads all {len(dataset)} samples: give the DataLoader a "
                                  "DistributedSampler(dataset, num_replicas=world size, rank=rank)")
    if sorted(read) == mine:
        return check.Match(False, f"rank {r} reads its samples shuffled: shuffle=False in the DistributedSampler, so that "
                                  "its batches are the reference's")
    return check.Match(False, f"rank {r} reads samples {read[:4]}..., expected {mine[:4]}... (sample i on rank i mod "
                              f"the world size {n})")


def check_shuffled_epochs(orders: list[list[int]], dataset_size: int) -> dict[str, check.Match]:
    """`orders[e]`: the samples this rank's DistributedSampler dealt it in epoch e (after `sampler.set_epoch(e)`).
    Gathered from every rank: in each epoch the ranks' shares together are the data set, each sample once (the same
    permutation on every rank, each its slice), and each epoch reads another order than the one before. For
    `check.require`; a collective: every rank calls it."""
    everyone: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(everyone, orders)
    dealt = [sorted(i for shares in everyone for i in shares[e]) for e in range(len(orders))]
    once = all(d == list(range(dataset_size)) for d in dealt)
    repeated = [e for e in range(1, len(orders)) if orders[e] == orders[e - 1]]
    return {
        "each epoch deals every sample to one rank": check.that(
            once, "the ranks' shares overlap or miss samples: every rank's DistributedSampler needs the same seed, "
                  "num_replicas=world size and its own rank"),
        "each epoch reads a new order": check.that(
            not repeated, f"epoch {repeated[0] if repeated else 0} repeats the order of the one before: call "
                          "sampler.set_epoch(epoch) at the start of every epoch"),
    }


def check_accumulation(accumulate, make_model, micro_batches: list, lr: float, env: DistEnv) -> check.Match:
    """Exercise 05.3: a student's `accumulate(model, optimizer, micro_batches)` on a fresh model in DDP must take the
    step that `train_steps` takes with the same micro-batches accumulated, and all-reduce as few times: once, at the
    last backward (the others inside `model.no_sync()`). The hint names the usual mistakes. Every rank calls it."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def wrapped():
        model = apply_ddp(make_model(), env)
        rounds = []

        def counting(state, bucket):  # DDP calls it for each bucket it all-reduces
            rounds.append(1)
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting)
        return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), rounds

    start = [p.detach().clone() for p in make_model().parameters()]
    mine, optimizer, mine_rounds = wrapped()
    accumulate(mine, optimizer, micro_batches)
    ref, ref_optimizer, ref_rounds = wrapped()
    train_steps(ref, ref_optimizer, micro_batches, env.device, grad_accum_steps=len(micro_batches), no_sync=ref.no_sync)
    if len(mine_rounds) > len(ref_rounds):
        return check.Match(False, f"your step all-reduced {len(mine_rounds)} times, the accumulation needs "
                                  f"{len(ref_rounds)}: run the backward of every micro-batch but the last inside "
                                  "model.no_sync()")
    match = check.same_weights(mine.module, ref.module)
    if match:
        return match
    moved = [torch.cat([(p.detach() - s).flatten() for p, s in zip(m.module.parameters(), start)]).norm().item()
             for m in (mine, ref)]
    n = len(micro_batches)
    if n > 1 and moved[1] > 0 and abs(moved[0] / moved[1] - n) < 0.05 * n:
        return check.Match(False, f"your step moved the weights {moved[0] / moved[1]:.1f}x as far as the reference's: "
                                  f"divide each micro-batch's loss by the number of micro-batches ({n})")
    if not mine_rounds:
        return check.Match(False, "nothing was all-reduced: the last micro-batch's backward runs outside no_sync()")
    return check.Match(False, f"your step is not the accumulated step of the micro-batches ({match.detail})")
