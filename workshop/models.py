"""Models by name: a small CNN for quick CPU runs, the CIFAR variant of ResNet-18, and a tiny
vision transformer.

    model = models.get_model("small_cnn", num_classes=10)
    model = models.get_model("small_cnn", norm="group")   # per-sample normalisation, see SmallCNN
    model = models.get_model("vit_tiny")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head: about 0.1M parameters, a few seconds an epoch on CPU.

    `norm="batch"` (the default) normalises with BatchNorm2d, whose statistics come from the
    batch a rank sees: under data parallelism each rank normalises its own micro batch, so N ranks
    of micro_batch_size B do not compute what one process with batch N*B does. `norm="group"`
    uses GroupNorm (8 groups), whose statistics come from each sample alone: data-parallel
    training then equals one-process training exactly (up to float rounding). Both have the
    same parameter count (a weight and a bias per channel).
    """

    def __init__(self, num_classes: int = 10, width: int = 32, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"unknown norm {norm!r}; choose 'batch' (BatchNorm2d) or 'group' (GroupNorm, 8 groups)")

        def block(cin, cout):
            norm_layer = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(8, cout)
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm_layer, nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes)
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al. 2016, CIFAR variant): a 3x3 stem and no max-pool,
    so the 32x32 image is not shrunk to 8x8 before the first block. 11.2M parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


class Attention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017), the softmax(QK^T / sqrt(d)) V product
    left to F.scaled_dot_product_attention, which picks a fused kernel where there is one."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # queries, keys and values in one matmul
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x)). LayerNorm normalises each token
    of each sample on its own, so the block computes the same whatever the batch."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A tiny ViT for 32x32 images (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"):
    4x4 patches make 64 tokens, plus a class token whose final state feeds the linear head.
    dim 192, depth 6, 3 heads, MLP ratio 4 (the ViT-Ti width, half its depth): 2,693,578
    parameters for 10 classes. LayerNorm only, no BatchNorm: every sample is normalised on its
    own, so data-parallel training equals one-process training exactly.
    """

    def __init__(self, num_classes: int = 10, dim: int = 192, depth: int = 6, heads: int = 3, patch: int = 4,
                 image_size: int = 32):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by patch {patch}")
        num_patches = (image_size // patch) ** 2
        # a patch x patch convolution with stride patch = one linear map of each flattened patch
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))  # learned, one per token
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_classes)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, T, C), T = (H / patch) * (W / patch)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, T + 1, C)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])  # the class token


MODELS = {"small_cnn": SmallCNN, "resnet18": ResNet18, "vit_tiny": VisionTransformer}


def get_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
