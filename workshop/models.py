"""Models by name: a small CNN for quick CPU runs, the CIFAR variant of ResNet-18, and a tiny
vision transformer.

    model = models.get_model("small_cnn", num_classes=10)
    model = models.get_model("small_cnn", norm="group")   # per-sample normalisation, see SmallCNN
    model = models.get_model("vit_tiny")
    gpt = models.get_model("tinygpt", size="cpu")           # the language model of notebooks 06 to 10
"""

from __future__ import annotations

import math

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


class KVCache:
    """Keys and values of the tokens seen so far, one pair per layer, so that decoding the next
    token attends to them without recomputing them. `pos` is how many tokens are stored.

    Attention calls `update(layer, k, v)` with the new tokens' (B, heads, T, head_dim) keys and
    values and gets back all of them; the model calls `advance(T)` after its last layer.
    """

    def __init__(self, depth: int):
        self.keys: list[torch.Tensor | None] = [None] * depth
        self.values: list[torch.Tensor | None] = [None] * depth
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def advance(self, n: int) -> None:
        self.pos += n


class StaticKVCache:
    """A KV cache of fixed shape, for compiled decoding: per layer a (B, heads, max_seq_len, head_dim)
    buffer for keys and one for values, allocated at the first `update` (from the keys' shape, so a
    rank that holds some of the heads allocates those) and written in place at `input_pos`, the
    positions of the new tokens, a LongTensor the caller sets before each forward. No shape and no
    Python number changes from one decoding step to the next, so torch.compile compiles the step
    once and CUDA graphs can replay it. Attention reads all max_seq_len slots through a mask: slot
    s is visible to the token at position p when s <= p (slots past the last write are hidden)."""

    def __init__(self, depth: int, max_seq_len: int):
        self.keys: list[torch.Tensor | None] = [None] * depth
        self.values: list[torch.Tensor | None] = [None] * depth
        self.max_seq_len = max_seq_len
        self.input_pos: torch.Tensor | None = None  # (T,) positions of the tokens of the next forward

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            B, H, _, D = k.shape
            self.keys[layer] = k.new_zeros(B, H, self.max_seq_len, D)
            self.values[layer] = v.new_zeros(B, H, self.max_seq_len, D)
            if k.is_cuda:  # CUDA graphs replay fixed addresses: the buffers must stay where they are
                torch._dynamo.mark_static_address(self.keys[layer])
                torch._dynamo.mark_static_address(self.values[layer])
        self.keys[layer].index_copy_(2, self.input_pos, k)
        self.values[layer].index_copy_(2, self.input_pos, v)
        return self.keys[layer], self.values[layer]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(self.max_seq_len, device=q.device) <= self.input_pos[:, None]  # (T, max_seq_len)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V where query i (the last T of the S keys' positions) sees keys
    0 .. S - T + i. q: (B, nh, T, hs); k, v: (B, nh, S, hs) with S >= T."""
    T, S = q.shape[-2], k.shape[-2]
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if T == 1:  # one new token sees everything before it
        return F.scaled_dot_product_attention(q, k, v)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate query, key, value and output projections
    (no biases), so a tensor-parallel plan can split q, k and v by heads (column-wise) and the
    output projection by its input (row-wise). The number of heads is read from the weights'
    shapes, so the same forward runs on a rank that holds only some of the heads."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.head_dim = dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (w(x).view(B, T, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if isinstance(cache, StaticKVCache):
            out = cache.attention(q, k, v)
        else:
            out = causal_attention(q, k, v)  # (B, local heads, T, hs)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """Linear, GELU, linear (no biases): the MLP that Megatron-LM splits column-then-row."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class GPTBlock(nn.Module):
    """Pre-norm decoder block: x + attention(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.feed_forward = FeedForward(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


# name -> (dim, depth, heads, max_seq_len); parameters with the byte vocabulary (256), untied head
TINYGPT_SIZES = {
    "cpu": dict(dim=128, depth=4, heads=4, max_seq_len=128),  # 0.87M: notebook defaults, 2 CPU cores
    "small": dict(dim=512, depth=8, heads=8, max_seq_len=256),  # 25.6M: one GPU, quick
    "gpu": dict(dim=1024, depth=24, heads=16, max_seq_len=512),  # 303M: sharding and MFU on GPUs
}


class TinyGPT(nn.Module):
    """A small decoder-only transformer (GPT-2 shaped, pre-norm, learned positions, no biases in
    the linear layers) over a byte vocabulary, for notebooks 06 to 10.

    `forward(tokens)` maps (B, T) token ids to (B, T, vocab) logits. With a `KVCache` it takes
    only the new tokens and attends to the cached ones as well (see `generate`); a `StaticKVCache`
    does the same at fixed shapes (compiled decoding, `workshop.inference`). `tie_weights`
    shares the embedding with the output head (fewer parameters; an untied head is simpler to
    shard, so it is the default). Sizes by name in TINYGPT_SIZES, or give dim/depth/heads.
    """

    def __init__(self, vocab_size: int = 256, dim: int = 128, depth: int = 4, heads: int = 4,
                 max_seq_len: int = 128, mlp_ratio: int = 4, tie_weights: bool = False):
        super().__init__()
        self.vocab_size, self.dim, self.depth, self.heads = vocab_size, dim, depth, heads
        self.max_seq_len = max_seq_len
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.pos_embeddings = nn.Embedding(max_seq_len, dim)
        self.layers = nn.ModuleList(GPTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        if tie_weights:
            self.output.weight = self.tok_embeddings.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, cache: KVCache | StaticKVCache | None = None) -> torch.Tensor:
        B, T = tokens.shape
        if isinstance(cache, StaticKVCache):
            positions = cache.input_pos  # a tensor: no Python number changes between compiled steps
        else:
            start = cache.pos if cache is not None else 0
            if start + T > self.max_seq_len:
                raise ValueError(f"{start + T} tokens exceed the model's max_seq_len {self.max_seq_len}")
            positions = torch.arange(start, start + T, device=tokens.device)
        x = self.tok_embeddings(tokens) + self.pos_embeddings(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i)
        if isinstance(cache, KVCache):
            cache.advance(T)
        return self.output(self.norm(x))

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward and backward): 6 per weight of the matmuls plus the
        attention scores and their product with the values, 12 * depth * seq_len * dim
        (Kaplan et al. 2020; PaLM appendix B)."""
        matmul_weights = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and "embeddings" not in n)
        return 6 * matmul_weights + 12 * self.depth * seq_len * self.dim


def tinygpt(size: str = "cpu", **overrides) -> TinyGPT:
    """A TinyGPT of a named size (TINYGPT_SIZES), with any constructor argument overridden."""
    if size not in TINYGPT_SIZES:
        raise ValueError(f"unknown TinyGPT size {size!r}; choose one of {sorted(TINYGPT_SIZES)}")
    return TinyGPT(**{**TINYGPT_SIZES[size], **overrides})


def _dims(model: TinyGPT | str) -> tuple[int, int, int, int]:
    """(dim, depth, vocab_size, mlp_ratio) of a TinyGPT, or of a size name without building it."""
    if isinstance(model, str):
        if model not in TINYGPT_SIZES:
            raise ValueError(f"unknown TinyGPT size {model!r}; choose one of {sorted(TINYGPT_SIZES)}")
        return TINYGPT_SIZES[model]["dim"], TINYGPT_SIZES[model]["depth"], 256, 4
    return model.dim, model.depth, model.vocab_size, model.layers[0].feed_forward.w1.out_features // model.dim


def decode_flops_per_token(model: TinyGPT | str, t: int) -> int:
    """Forward FLOPs of one decoding step with a KV cache, for the token at position t - 1 (t keys
    and values in the cache, its own included), batch of one:

      2 N            two FLOPs (a multiply and an add) per weight of the matmuls, N = depth (4 + 2 mlp_ratio)
                     dim^2 + dim vocab (q, k, v, o; the MLP's two; the head; embeddings are look-ups): Kaplan
                     et al. 2020, "Scaling Laws for Neural Language Models", table 1, C_forward ~ 2N + ...
      4 depth t dim  attention: the new query against t keys (q k^T, 2 t dim per layer) and the t weights
                     against t values (2 t dim per layer). The cache saves recomputing the keys and values,
                     not reading them: this term grows with t.

    LayerNorm, GELU, softmax and the residual additions (O(dim) each) are left out."""
    dim, depth, vocab, ratio = _dims(model)
    n_matmul = depth * (4 + 2 * ratio) * dim * dim + dim * vocab
    return 2 * n_matmul + 4 * depth * t * dim


def kv_cache_bytes(model: TinyGPT | str, t: int, batch_size: int = 1, bytes_per_element: int = 4) -> int:
    """Bytes of a KV cache holding t tokens for `batch_size` sequences: a key and a value of `dim`
    elements per token and layer, 2 depth t dim bytes_per_element batch_size (fp32: 4, bf16: 2).
    Tensor parallelism splits it by heads: 1/tp_size per rank."""
    dim, depth, _, _ = _dims(model)
    return 2 * depth * t * dim * bytes_per_element * batch_size


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T, V) logits against (B, T) targets."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def generate(model: TinyGPT, prompt: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True,
             temperature: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue (B, T) prompt tokens by `max_new_tokens`: greedy when temperature is 0, else
    sampled from softmax(logits / temperature). With `use_cache` each step feeds only the newest
    token and reuses the stored keys and values; without it each step re-reads the whole sequence.
    Both give the same tokens. Returns (B, T + max_new_tokens)."""
    cache = KVCache(model.depth) if use_cache else None
    tokens, step_input = prompt, prompt
    for _ in range(max_new_tokens):
        logits = model(step_input, cache)[:, -1]
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)
        tokens = torch.cat([tokens, nxt], dim=1)
        step_input = nxt if use_cache else tokens
    return tokens


MODELS = {"small_cnn": SmallCNN, "resnet18": ResNet18, "vit_tiny": VisionTransformer}  # the image models


def get_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """An image model by name with `num_classes` outputs, or `tinygpt` (keywords as `tinygpt()`)."""
    if name == "tinygpt":
        return tinygpt(**kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {[*sorted(MODELS), 'tinygpt']}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
