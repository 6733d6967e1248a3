"""What one training step holds and what it costs to hold less, measured: the set-up, timing, tables and plots of
notebook 07, whose cells keep the measurements themselves (`memory.saved_for_backward` against the formulas of
`workshop.estimate.planner`, `torch.utils.checkpoint`, `CPUOffloadPolicy`, the CUDA allocator's peak).

    model = step_memory.tinygpt("cpu", "full", seed=0)                  # the same weights, every block checkpointed
    x, y = step_memory.token_batch(4, 64, seed=0)                        # (4, 64) tokens and their next tokens
    seconds = metrics.fastest(lambda: step_memory.forward_backward(model, x, y), repeats=10)

Memory here is in MB (1e6 bytes), as the notebook prints it: its models are small and its figures compare bytes.
"""

from __future__ import annotations

import torch
from torch import nn

from workshop import activation_checkpointing, models
from workshop.base.hardware import device_type
from workshop.base.tables import table, wrap
from workshop.measure.metrics import fastest

MB = 1e6
PARTS = ("params", "grads", "optimizer", "activations")  # a step's memory, in the order the notebook stacks it


# --- set-up -----------------------------------------------------------------------------------------

def parse_sizes(sizes: str) -> list[tuple[int, int]]:
    """"64x4,128x8" -> [(64, 4), (128, 8)]: tokens x samples, comma-separated."""
    try:
        return [tuple(int(n) for n in s.lower().split("x", 1)) for s in sizes.split(",")]
    except ValueError:
        raise ValueError(f"sizes = {sizes!r}: write tokens x samples, comma-separated, e.g. 64x4,128x8") from None


def tinygpt(size: str, policy: str = "none", *, seed: int, device="cpu") -> nn.Module:
    """A TinyGPT of `size` seeded with `seed` (every version starts from the same weights), its blocks checkpointed
    by `policy` (`activation_checkpointing.CHECKPOINT_POLICIES`)."""
    torch.manual_seed(seed)
    model = models.tinygpt(size).to(device)
    activation_checkpointing.checkpoint_blocks(model.layers, policy)
    return model


def token_batch(samples: int, length: int, *, seed: int, which: int = 0, device="cpu"):
    """(inputs, targets) of random byte tokens, (samples, length) each, the targets one token on: what a step saves
    depends on the shapes, not on the text. `which` picks another batch of the same seed."""
    t = torch.randint(0, 256, (samples, length + 1), generator=torch.Generator().manual_seed(seed + which))
    return t[:, :-1].to(device), t[:, 1:].to(device)


def image_batch(samples: int, *, seed: int, device="cpu"):
    """(images, labels): `samples` random 32x32 RGB images and labels 0, 1, ..., 9, 0, ... for the ResNet-18 step."""
    images = torch.randn(samples, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(device)
    return images, torch.arange(samples, device=device) % 10


def resnet_stages(resnet: nn.Module) -> dict[str, nn.Module]:
    """ResNet-18's modules by the name `saved_for_backward` counts under: the stem, each block, the head."""
    return {"stem": resnet.stem, **{f"block{i}": b for i, b in enumerate(resnet.layers)}, "head": resnet.head}


# --- timing -----------------------------------------------------------------------------------------

def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward and backward of the next-token loss, the gradients of the last one kept."""
    model.zero_grad(set_to_none=True)
    models.lm_loss(model(x), y).backward()


def adamw_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int, device="cpu") -> dict:
    """AdamW steps of an FSDP2 model on (x, y): one to create the optimizer's states, then the fastest of `repeats`
    (every rank must call it: each step gathers and reduces). Where its shards live ("cpu" under
    CPUOffloadPolicy), the step's seconds and, on CUDA, the allocator's peak during the timed steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        models.lm_loss(model(x), y).backward()
        optimizer.step()

    step()  # the optimizer's states exist from here on
    cuda = device_type(device) == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = fastest(step, repeats, device)
    return {"step_s": seconds, "shards_on": str(next(model.parameters()).to_local().device),
            "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def copy_seconds(nbytes: float, repeats: int, device="cpu") -> float:
    """The fastest copy of `nbytes` (fp32) from the host to `device`, from pinned memory on CUDA (what offload's
    copies use): host to host where the device is the CPU."""
    host = torch.empty(int(nbytes // 4), dtype=torch.float32, pin_memory=device_type(device) == "cuda")
    target = torch.empty_like(host, device=device)
    return fastest(lambda: target.copy_(host), repeats, device)


def sgd_steps(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, global_batch: int, lr: float) -> nn.Module:
    """`model` trained in one process with SGD (momentum 0.9), step k on rows k x global_batch ... of (xs, ys), as
    many steps as whole global batches: the reference a data-parallel run of those batches must equal."""
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for start in range(0, len(xs) - global_batch + 1, global_batch):
        sgd.zero_grad()
        models.lm_loss(model(xs[start:start + global_batch]), ys[start:start + global_batch]).backward()
        sgd.step()
    return model


def rank_loader(xs: torch.Tensor, ys: torch.Tensor, global_batch: int, micro_batch_size: int, rank: int):
    """A DataLoader of this rank's slice of each global batch of (xs, ys), in step order: rows rank x
    micro_batch_size ... of global batch k are its batch k (what `sgd_steps` trains on, split over the ranks)."""
    from torch.utils.data import DataLoader, TensorDataset

    rows = [start + rank * micro_batch_size + i for start in range(0, len(xs) - global_batch + 1, global_batch)
            for i in range(micro_batch_size)]
    return DataLoader(TensorDataset(xs[rows].cpu(), ys[rows].cpu()), batch_size=micro_batch_size)


# --- tables -----------------------------------------------------------------------------------------

def format_anatomy(parts: dict, saved: dict) -> str:
    """Each model's step by part (`parts[name]`: bytes of params, grads, optimizer, activations) with its share, the
    activations against the weights, and what each block saved (`saved[name]`: a `memory.Saved`)."""
    lines = []
    for name, p in parts.items():
        total = sum(p.values())
        lines.append(f"{name:<10} " + "  ".join(f"{k} {v / MB:6.2f} MB ({v / total:4.0%})" for k, v in p.items()))
    lines.append("activations against the weights: " + ", ".join(f"{name} {p['activations'] / p['params']:.2f}x"
                                                                 for name, p in parts.items()))
    for name, s in saved.items():
        by_block = ", ".join(f"{k}={v / MB:.2f}" for k, v in s.by_module.items())  # one word each: kept whole
        lines.append(wrap(f"{name}, MB saved by each block: {by_block}"))
    return "\n".join(lines)


def format_per_layer(rows: list[dict]) -> str:
    """The bytes one block saved (`measured`) against the formula for its code (`derived`) and Korthikanti et al.'s
    16-bit count, per tokens x samples."""
    lines = [f"{'s x b':>9} {'measured':>10} {'derived':>10} {'ratio':>6} {'paper, 16-bit':>14}"]
    for r in rows:
        lines.append(f"{r['tokens']:>4} x {r['samples']:<3} {r['measured'] / MB:7.3f} MB {r['derived'] / MB:7.3f} MB "
                     f"{r['measured'] / r['derived']:6.3f} {r['korthikanti_16bit'] / MB:11.3f} MB")
    return "\n".join(lines)


def format_policies(policies: dict, forward_s: float, repeats: int) -> str:
    """Each checkpointing policy's bytes saved for backward and step time (`policies[name]`: "saved", "step_s"),
    against no checkpointing ("none") and in forwards (`forward_s`: one forward alone)."""
    none = policies["none"]
    rows = []
    for policy, r in policies.items():
        extra = r["step_s"] - none["step_s"]
        rows.append([policy, f"{r['saved'] / MB:.2f} MB", f"{r['saved'] / none['saved']:.0%}",
                     f"{r['step_s'] * 1e3:.1f} ms", f"{extra * 1e3:+.1f} ms", f"{extra / forward_s:.2f}"])
    return (table(["policy", "saved", "of none", "step", "extra", "extra / forward"], rows) +
            f"\none forward alone: {forward_s * 1e3:.1f} ms (rank 0 timed, the fastest of {repeats} each)")


def format_offload(offload: dict) -> str:
    """FSDP2 with and without CPUOffloadPolicy (`adamw_steps`'s dicts by "with" and "without"): where the shards
    live, the step time and, on CUDA, the GPU's peak."""
    lines = []
    for name, r in offload.items():
        peak = f", GPU peak {r['cuda_peak_bytes'] / MB:.1f} MB" if r["cuda_peak_bytes"] is not None else ""
        lines.append(f"{name:>7} CPUOffloadPolicy: shards on {r['shards_on']}, step {r['step_s'] * 1e3:.1f} ms{peak}")
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------------

def plot_anatomy(parts: dict, title: str = ""):
    """Stacked horizontal bars, one per model, of a step's memory by part (MB)."""
    from matplotlib.figure import Figure  # no pyplot: the figure is returned, not shown twice

    fig = Figure(figsize=(7, 3), layout="constrained")
    ax = fig.add_subplot()
    left = [0.0] * len(parts)
    for part in PARTS:
        values = [p[part] / MB for p in parts.values()]
        ax.barh(list(parts), values, left=left, label=part)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("MB per step")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_policies(policies: dict, forward_s: float, title: str = ""):
    """Each checkpointing policy as a point: bytes saved for backward against step time, with the line of no
    checkpointing plus one forward (what full checkpointing should cost)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for policy, r in policies.items():
        ax.scatter(r["saved"] / MB, r["step_s"] * 1e3, s=40)
        ax.annotate(policy, (r["saved"] / MB, r["step_s"] * 1e3), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.axhline((policies["none"]["step_s"] + forward_s) * 1e3, color="grey", ls=":", lw=1,
               label="no checkpointing + one forward")
    ax.margins(x=0.1, y=0.15)  # room for the labels beside the outermost points
    ax.set_xlabel("saved for backward (MB)")
    ax.set_ylabel("step (ms, forward + backward)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig
