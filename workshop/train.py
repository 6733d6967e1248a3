"""The plain PyTorch training loop and evaluation, as notebook 01 writes them out.

    history = train.fit(model, train_loader, test_loader, epochs=2, lr=0.05, device=env.device)
    loss, logits = train.train_step(model, optimizer, x, y)   # one step on one batch, as the benchmarks time it
    with train.seeded(0, env.device):                         # the same weights every run, the caller's stream kept
        model = models.get_model("small_cnn")

With a DistributedSampler in the loader (`data.make_loader(..., env=env)`) and a DDP-wrapped
model the same loop is data-parallel training; `evaluate` then averages over all ranks. In
JupyterLab each epoch shows a progress bar; in a batch job, a line every $WORKSHOP_LOG_EVERY steps.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from workshop import check
from workshop.base.hardware import device_type
from workshop.base.progress import progress


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


@contextmanager
def seeded(seed: int, device="cpu"):
    """torch's random streams seeded with `seed` inside the block and as they were after it: the same initial weights
    (and data) in every run, while the caller's stream (the CPU's, and `device`'s on a GPU) goes on untouched."""
    with torch.random.fork_rng(devices=[torch.device(device)] if device_type(device) == "cuda" else []):
        torch.manual_seed(seed)
        yield


def train_step(model: nn.Module, optimizer, x, y, check_at: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on a batch: forward, loss, backward, optimizer step. Returns the loss and the logits (B, classes),
    detached. With `check_at` (the step's index) a loss that is not finite on any rank stops training before it
    updates the weights (`check.stop_if_diverged`: one scalar all-reduce and a wait for the GPU, so a timed
    benchmark leaves it out)."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)  # (B, num_classes)
    loss = F.cross_entropy(logits, y)
    if check_at is not None:
        check.stop_if_diverged(loss, check_at, optimizer.param_groups[0]["lr"])  # before a NaN step
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def train_epoch(model: nn.Module, loader, optimizer, device, epoch: int = 0) -> dict:
    """One pass over `loader`: forward, loss, backward, step. Returns this rank's mean loss,
    accuracy, sample count and seconds."""
    model.train()
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
    total_loss, correct, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    steps = progress(loader, desc=f"epoch {epoch}")  # a bar in JupyterLab, a line every N steps in a batch job
    for i, (x, y) in enumerate(steps):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, logits = train_step(model, optimizer, x, y, check_at=epoch * len(loader) + i)
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        steps.set_postfix(loss=total_loss / seen, refresh=False)  # shown at the next redraw
    steps.close()
    if device_type(device) == "cuda":
        torch.cuda.synchronize(device)
    return {"loss": total_loss / seen, "acc": correct / seen, "samples": seen, "time_s": time.perf_counter() - t0}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> dict:
    """Mean loss and accuracy over `loader`; summed over all ranks when a process group exists
    (each rank evaluating its own shard)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        sums += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(), (logits.argmax(1) == y).sum().item(), len(y)],
                             dtype=torch.float64, device=device)
    if tdist.is_initialized():
        tdist.all_reduce(sums)
    return {"loss": (sums[0] / sums[2]).item(), "acc": (sums[1] / sums[2]).item()}


def fit(model: nn.Module, train_loader, test_loader, *, epochs: int, lr: float, device, optimizer=None) -> list[dict]:
    """Train for `epochs`, evaluating after each; one dict per epoch."""
    optimizer = optimizer or make_optimizer(model, lr)
    history = []
    for epoch in range(epochs):
        stats = train_epoch(model, train_loader, optimizer, device, epoch)
        val = evaluate(model, test_loader, device)
        history.append({"epoch": epoch, **stats, "val_loss": val["loss"], "val_acc": val["acc"]})
    return history



def check_train_step(step, make_model, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int = 2) -> check.Match:
    """Exercise 01.1: `steps` calls of a student's `step(model, optimizer, x, y)` on a fresh model must leave the
    weights of as many calls of `train_step` (SGD with momentum, `make_optimizer`). Two steps, so that gradients
    left over from the first show in the second. The hint names the usual mistakes."""

    def run(fn, n):
        model = make_model()
        optimizer = make_optimizer(model, lr)
        return model, [fn(model, optimizer, x, y) for _ in range(n)]

    def reference(model, optimizer, a, b):
        return train_step(model, optimizer, a, b)[0]

    mine, losses = run(step, steps)
    ref, ref_losses = run(reference, steps)
    match = check.same_weights(mine, ref)
    if not match:
        if check.same_weights(mine, run(reference, 0)[0]):
            return check.Match(False, "the weights did not move: call loss.backward(), then optimizer.step()")
        if check.same_weights(run(step, 1)[0], run(reference, 1)[0]):
            return check.Match(False, "your first step is right, the second differs: clear the gradients "
                                      "(optimizer.zero_grad()) before each backward, or they add up")
        return check.Match(False, f"your weights are not the reference's after one step ({match.detail})")
    if not all(isinstance(loss, torch.Tensor) and loss.numel() == 1 for loss in losses):
        return check.Match(False, "return the batch's loss, the tensor that F.cross_entropy gave")
    mine_first, ref_first = losses[0].item(), ref_losses[0].item()  # .item(): no warning about requires_grad
    if abs(mine_first - ref_first) > 1e-5 * max(1.0, abs(ref_first)):
        return check.Match(False, f"your first step returned {mine_first:.4f}, the batch's loss is {ref_first:.4f}: "
                                  "return the loss computed in this step")
    return match


def check_amp_step(step, reference, model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp_dtype: torch.dtype | None):
    """Exercise 02.1: a student's `step(model, optimizer, x, y, amp_dtype, scaler)` on a copy of `model` must make
    the update of `reference` (the same signature: notebook 02 passes `workshop.measure.perf.train_step`), loss and
    weights, with the convolutions and matmuls in `amp_dtype`. The hint names a forward left in float32 and weights
    cast to the low precision."""
    import copy

    from workshop.check import Match, compare

    mine, ref = copy.deepcopy(model), copy.deepcopy(model)
    opt_mine, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (mine, ref))
    kind = x.device.type
    scalers = [torch.amp.GradScaler(kind) if amp_dtype == torch.float16 else None for _ in range(2)]
    computed = []
    first = next(m for m in mine.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    hook = first.register_forward_hook(lambda _m, _args, out: computed.append(out.dtype))
    try:
        loss_mine = step(mine, opt_mine, x, y, amp_dtype, scalers[0])
    finally:
        hook.remove()
    loss_ref = reference(ref, opt_ref, x, y, amp_dtype, scalers[1])
    low = [name for name, p in mine.named_parameters() if p.dtype != torch.float32]
    if low:
        return Match(False, f"the weights became {mine.get_parameter(low[0]).dtype}: keep them float32; autocast casts "
                            "each operation's inputs, and the optimizer steps the float32 weights")
    if amp_dtype is not None and computed and computed[0] != amp_dtype:
        return Match(False, f"the first {type(first).__name__} computed in {computed[0]}: run the forward and the loss "
                            f"inside torch.autocast({kind!r}, dtype={amp_dtype}), the backward after it")
    if not isinstance(loss_mine, torch.Tensor):
        return Match(False, "return the loss, a tensor")
    # close, not equal: on a GPU some kernels add in an order that changes from run to run
    same = compare([("loss", loss_mine.detach(), loss_ref)] + [(name, p, q) for (name, p), q in
                   zip(mine.named_parameters(), ref.parameters())], rtol=1e-3, atol=1e-6)
    if not same:
        return Match(False, f"your step's loss or weights are not the reference step's ({same.detail})")
    return Match(True)
