"""The memory per GPU of training a GPT-shaped model, before any run: parameters, gradients and optimizer states
(`workshop.estimate.zero`), FSDP's gathered units, and the activations that backward needs, counted as Korthikanti et
al. 2022 do, with and without activation checkpointing (`workshop.activation_checkpointing` applies it; notebook 07
measures what these formulas count):

    planner.plan("llama2-70b", gpu="h100", strategy="fsdp", world_size=64, checkpointing="full").fits
    python -m workshop.estimate.planner 70B --gpu h100 --strategy fsdp --world-size 64 --checkpointing full
    planner.widget("llama2-70b", "h100", "fsdp", 64, 1, 1, 4096, "full", "none")   # in JupyterLab: sliders, a bar

With pipeline parallelism over pp stages (Huang et al. 2019, GPipe; Narayanan et al. 2021, "Efficient
Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", section 2.2), world_size = dp x tp x pp
and a GPU of the first stage, the most loaded one, holds

    states       of ceil(L / pp) of the L layers, and the embedding (V x h)        `stage_parameters`
    activations  of the micro-batches in flight on those layers                     `in_flight_microbatches`
                 GPipe: all m; 1F1B: at most pp (a micro-batch's activations stay until its backward, and
                 the first stage runs its first backward after pp forwards); interleaved 1F1B with v chunks
                 per GPU: pp + (pp - 1) / v, so L (1 + (pp - 1) / (pp v)) layers' worth (Korthikanti et al.
                 2022, section 4.2.3)

    planner.plan("llama2-70b", strategy="ddp", world_size=512, tp=8, pp=4, microbatches=64, seq_len=4096,
                 checkpointing="full").fits
    python -m workshop.estimate.planner llama2-70b --strategy ddp --world-size 512 --tp 8 --pp 4 --microbatches 64

With context parallelism over cp ranks (`workshop.context_parallel`), world_size = dp x tp x pp x cp and a rank
keeps the activations of seq_len / cp tokens: attention's queries are its own, its keys the whole sequence's, so
unfused attention's scores shrink by cp, not cp^2. The cp ranks hold the same weights and sum their gradients, so the
states shard over dp x cp (Megatron-LM's data-parallel group "with context parallel", torchtitan's dp_shard_cp); a
mixture of experts splits its experts over ep of those ranks (torchtitan's expert parallelism; `workshop.experts`):

    planner.gpt_layer_activation_bytes(2048, 1, 128, 4, cp=2)   # one TinyGPT block's bytes per rank, cp 2
    planner.plan("llama3-405b", strategy="fsdp", world_size=16384, tp=8, pp=16, cp=16, seq_len=131072,
                 attention="fused", checkpointing="full", microbatches=16).fits
    planner.plan("mixtral-8x7b", strategy="fsdp", world_size=64, ep=8, seq_len=4096, checkpointing="full")
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workshop.base import hardware
from workshop.base.tables import gib, table
from workshop.estimate import zero

# --- model shapes ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What a GPT-shaped model's memory depends on: its parameters, layers, width and heads; and its vocabulary
    (0: not known), which sizes the embedding and the output head, vocab x dim parameters each, that a pipeline
    puts on its first and last stage."""

    name: str
    parameters: float
    layers: int
    dim: int
    heads: int
    vocab: int = 0
    kv_heads: int = 0  # grouped-query attention's key/value heads (0: as many as heads): the bytes CP moves
    experts: int = 0  # a mixture of experts: experts per layer (0: dense), each token to top_k of them
    top_k: int = 0
    expert_parameters: float = 0.0  # of all experts of all layers, within `parameters`

    @property
    def active_parameters(self) -> float:
        """Parameters a token passes through: the dense ones and top_k of the experts of each layer."""
        if not self.experts:
            return self.parameters
        return self.parameters - self.expert_parameters * (1 - self.top_k / self.experts)


# Published shapes: GPT-3 (Brown et al. 2020, table 2.1), MT-NLG (Smith et al. 2022), Llama 2 (Touvron et al. 2023).
# All are counted as GPT blocks (multi-head attention, a 4h MLP of two matrices): Llama's SwiGLU MLP (three
# matrices) and the 70B's grouped-query attention are not modelled, so Llama's activations are an estimate.
# Vocabularies: GPT-2's BPE of 50,257 tokens for GPT-3 and MT-NLG, Llama's 32,000.
MODELS = {
    "gpt3-175b": ModelShape("GPT-3 175B", 175e9, 96, 12288, 96, 50257),
    "mt-nlg-530b": ModelShape("MT-NLG 530B", 530e9, 105, 20480, 128, 50257),
    "llama2-7b": ModelShape("Llama 2 7B", 6.74e9, 32, 4096, 32, 32000),
    "llama2-13b": ModelShape("Llama 2 13B", 13.0e9, 40, 5120, 40, 32000),
    "llama2-70b": ModelShape("Llama 2 70B", 69.0e9, 80, 8192, 64, 32000),
    # Llama 3 405B (Llama Team, AI @ Meta 2024, "The Llama 3 Herd of Models", arXiv:2407.21783, table 3): 126
    # layers, model dimension 16,384, 128 attention heads, 8 key/value heads, vocabulary 128,000
    "llama3-405b": ModelShape("Llama 3 405B", 405e9, 126, 16384, 128, 128000, kv_heads=8),
    # Mixtral 8x7B (Jiang et al. 2024, "Mixtral of Experts", arXiv:2401.04088, table 1 and section 2): 32 layers,
    # dim 4096, 32 heads, 8 key/value heads, vocabulary 32,000, 8 experts, top 2, 47B parameters; each expert a
    # SwiGLU MLP of hidden_dim 14,336 (3 matrices), so the experts hold 32 x 8 x 3 x 4096 x 14336 of them and a
    # token passes through about 13B, as the paper says
    "mixtral-8x7b": ModelShape("Mixtral 8x7B", 47e9, 32, 4096, 32, 32000, kv_heads=8, experts=8, top_k=2,
                               expert_parameters=32 * 8 * 3 * 4096 * 14336),
}
PLAN_STRATEGIES = ("ddp", "zero1", "zero2", "fsdp")
SCHEDULES = ("gpipe", "1f1b")
CHECKPOINTING = ("none", "selective", "full")
OFFLOAD = ("none", "optimizer", "params")


def parse_count(size: str | float) -> float:
    """1.3e9, "1.3B", "350M", "7b", "125k" -> a number of parameters."""
    if isinstance(size, (int, float)):
        n = float(size)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kKmMbBtT]?)\s*", str(size))
        if not m:
            raise ValueError(f"bad model size {size!r}: write a number of parameters such as 7B, 350M or 1.3e9, "
                             f"or name one of {', '.join(MODELS)}")
        n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"a model has a positive number of parameters, not {size!r}")
    return n


def model_shape(model: str | float | ModelShape) -> ModelShape:
    """A model by name (MODELS), or by its number of parameters ("70B"), shaped as usual: width 128 x layers,
    so parameters ~ 12 x layers x width^2, and heads of 128 dimensions each."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str) and model.lower() in MODELS:
        return MODELS[model.lower()]
    n = parse_count(model)
    layers = max(1, round((n / (12 * 128**2)) ** (1 / 3)))
    return ModelShape(model if isinstance(model, str) else f"{n:.3g}", n, layers, 128 * layers, layers)


def find_model(model: str | float | ModelShape) -> ModelShape:
    """A model by name (MODELS), by a size that names exactly one of them ("70B": Llama 2 70B), or else by its
    size, shaped as `model_shape` does."""
    if isinstance(model, str) and model.lower() not in MODELS:
        named = [key for key in MODELS if key.endswith("-" + model.strip().lower())]
        if len(named) == 1:
            return MODELS[named[0]]
    return model_shape(model)


# --- activations ----------------------------------------------------------------------------------

def gpt_layer_activation_bytes(seq_len: int, batch: int, dim: int, heads: int, mlp_ratio: int = 4,
                               value_bytes: int = 4, cp: int = 1) -> int:
    """Bytes one `models.GPTBlock` saves for backward, derived from its code (fp32, no dropout, attention by
    `scaled_dot_product_attention`'s fused kernel), with s = seq_len, b = batch, h = dim, a = heads; with context
    parallelism on each of `cp` ranks, s = seq_len / cp: ring attention (`workshop.context_parallel`) keeps what the
    fused kernel keeps, for this rank's queries, keys and values only (the blocks that pass round the ring are not
    kept), and every other layer works token by token:

        values of s*b*h each          first LayerNorm: its input 1, its output 1 (the input of wq, wk, wv)
                                      attention: q, k, v 3, its output 1 (the input of wo, the same storage)
                                      second LayerNorm: its input 1, its output 1 (the input of w1)
                                      MLP: w1's output mlp_ratio (GELU's input), GELU's output mlp_ratio
                                      (w2's input): 8 + 2 * mlp_ratio = 16 values in all
        fp32 statistics               each LayerNorm's mean and 1/std, 2 * 2 * s * b; the attention's
                                      log-sum-exp per head, a * s * b

    Korthikanti et al. 2022 (`korthikanti_layer_bytes`) count s*b*h*(34 + 5*a*s/h) bytes in 16-bit: the same
    16 values at 2 bytes (32), 2 dropout masks of 1 byte (2), and the a*s*s attention scores, softmax and
    dropout (5*a*s*s*b) that a fused attention kernel never stores: it recomputes them in backward."""
    seq_len = _tokens_per_rank(seq_len, cp)
    values = (8 + 2 * mlp_ratio) * seq_len * batch * dim * value_bytes
    statistics = (2 * 2 + heads) * seq_len * batch * 4
    return values + statistics


def _tokens_per_rank(seq_len: int, cp: int) -> int:
    if not isinstance(cp, int) or cp < 1 or seq_len % cp:
        raise ValueError(f"a sequence of {seq_len} tokens does not split over cp = {cp!r} ranks; choose a cp that "
                         f"divides it")
    return seq_len // cp


def korthikanti_layer_bytes(seq_len: int, batch: int, dim: int, heads: int) -> float:
    """Activation bytes of one transformer layer in 16-bit with dropout and unfused attention, without
    recomputation: s*b*h*(34 + 5*a*s/h) (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", section 4.1, equation 1)."""
    return seq_len * batch * dim * (34 + 5 * heads * seq_len / dim)


def transformer_activation_bytes(seq_len: int, batch: int, dim: int, heads: int, layers: int,
                                 checkpointing: str = "none", tp: int = 1, attention: str = "unfused",
                                 cp: int = 1) -> float:
    """Bytes of activations a transformer keeps for backward, in 16-bit (Korthikanti et al. 2022, table 2), with
    tensor and sequence parallelism over `tp` ranks, per layer s b h (34 + 5 a s / h) / t; with context parallelism
    over `cp` ranks, s / cp tokens per rank, each query's scores against all s keys: s b h (34 + 5 a s / h) / (t cp):

        "none"       every layer keeps all of it
        "selective"  every layer keeps s b h 34 / t: the attention's a s^2 scores, softmax and dropout are
                     recomputed (so does a fused attention kernel, `attention="fused"`, without asking)
        "full"       every layer keeps its input, 2 s b h / t, and one layer at a time holds all of it again
                     while backward recomputes it"""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"unknown checkpointing {checkpointing!r}; use one of {', '.join(CHECKPOINTING)}")
    if attention not in ("unfused", "fused"):
        raise ValueError(f"attention is 'unfused' or 'fused', not {attention!r}")
    sbh = _tokens_per_rank(seq_len, cp) * batch * dim  # this rank's tokens
    scores = 0 if attention == "fused" else 5 * heads * seq_len / dim  # against all seq_len keys
    full = sbh * (34 + scores) / tp
    if checkpointing == "none":
        return layers * full
    if checkpointing == "selective":
        return layers * sbh * 34 / tp
    return layers * 2 * sbh / tp + full



# --- pipeline stages ------------------------------------------------------------------------------

def stage_layers(layers: int, pp: int, virtual_stages: int = 1) -> int:
    """Layers on the most loaded of `pp` pipeline stages: layers / pp when they divide; otherwise the first stages
    take one more, ceil(layers / pp). With `virtual_stages` v chunks per GPU (interleaved 1F1B) each of the
    pp x v chunks holds ceil(layers / (pp v)) and a GPU v of them."""
    chunks = pp * virtual_stages
    if chunks > layers:
        raise ValueError(f"{layers} layers do not fill {pp} pipeline stages x {virtual_stages} virtual stages = "
                         f"{chunks} chunks; choose pp x virtual_stages at most {layers}")
    return virtual_stages * -(-layers // chunks)


def stage_parameters(model: str | float | ModelShape, pp: int = 1, virtual_stages: int = 1) -> float:
    """Parameters a GPU of the first pipeline stage holds (before tensor parallelism): its `stage_layers` share of
    the layers' parameters, and the embedding, vocab x dim (the last stage holds the output head, as many). The
    layers' parameters are the model's less the embedding and the head, 2 x vocab x dim (a model that ties them,
    as GPT-3 does, counts V h once: then this over-counts what is not in the layers by V h, 0.4% of GPT-3).
    pp = 1: all of the model."""
    shape = model_shape(model)
    if pp == 1:
        return shape.parameters
    embedding = shape.vocab * shape.dim
    per_layer = (shape.parameters - 2 * embedding) / shape.layers
    return stage_layers(shape.layers, pp, virtual_stages) * per_layer + embedding


def stage_expert_parameters(model: str | float | ModelShape, pp: int = 1, virtual_stages: int = 1) -> float:
    """The experts' share of `stage_parameters`: those of the stage's layers (0 for a dense model)."""
    shape = model_shape(model)
    layers = stage_layers(shape.layers, pp, virtual_stages) if pp > 1 else shape.layers
    return shape.expert_parameters * layers / shape.layers


def in_flight_microbatches(pp: int, microbatches: int, schedule: str = "1f1b", virtual_stages: int = 1) -> float:
    """Micro-batches whose activations the first pipeline stage holds at its peak, each over all of its layers:
    GPipe runs the m forwards before any backward and holds all m (Huang et al. 2019); 1F1B starts a backward as
    soon as the last stage has a micro-batch's forward and holds at most pp (Narayanan et al. 2021, section 2.2.1);
    interleaved 1F1B with v chunks per GPU holds pp + (pp - 1) / v stage-micro-batches (Megatron-LM's warm-up of
    2 (pp - 1) + (v - 1) pp chunks and one more, each 1 / v of the stage; section 2.2.2). One stage (pp = 1) is
    gradient accumulation: one micro-batch at a time, except GPipe's all-forwards-first order."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "gpipe":
        return microbatches
    if virtual_stages > 1:
        return min(microbatches, pp + (pp - 1) / virtual_stages)
    return min(microbatches, pp)



# --- the plan -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """Bytes one GPU holds in training, by part, and whether they fit in `capacity`: the GPU's memory times
    hardware.MEMORY_MARGIN. `host` is what offload keeps in the host's memory instead."""

    model: ModelShape
    settings: dict
    parts: dict
    host: float
    gpu_bytes: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def capacity(self) -> float:
        return self.gpu_bytes * hardware.MEMORY_MARGIN

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def record(self) -> dict:
        """The plan as a run's record holds it: the settings, the model's name, the parts, host, total and verdict."""
        return {**self.settings, "model": self.model.name, "parts": self.parts, "host": self.host, "total": self.total,
                "fits": self.fits}


def plan(model: str | float | ModelShape, *, gpu: str = "h100", strategy: str = "fsdp", world_size: int = 8,
         tp: int = 1, micro_batch: int = 1, seq_len: int = 2048, checkpointing: str = "none", offload: str = "none",
         attention: str = "unfused", states: str = "fp32_adam", units: int | None = None, pp: int = 1,
         microbatches: int | None = None, schedule: str = "1f1b", virtual_stages: int = 1, cp: int = 1,
         ep: int = 1) -> Plan:
    """The memory per GPU of training `model` on `world_size` GPUs: tensor parallelism over `tp` of them,
    pipeline parallelism over `pp` stages (the model split first) and context parallelism over `cp` (each sequence
    split), `strategy` over the dp = world_size / (tp x pp x cp) data-parallel ranks (ddp, zero1, zero2, fsdp =
    ZeRO-3), the states sharded over dp x cp; a mixture-of-experts model's experts split over `ep` of those dp x cp
    ranks, their states sharded over the dp x cp / ep that hold the same experts. With pp > 1, a GPU of the first
    stage: its
    `stage_parameters` (its layers and the embedding) and the activations of the `in_flight_microbatches` of
    `schedule` ("gpipe" or "1f1b"; `virtual_stages` > 1: interleaved 1F1B) out of `microbatches` per step
    (default pp: as many as stages).

    - params, grads, optimizer: `zero.predict` with the bytes per parameter of `states` (zero.PRESETS): "fp32_adam",
      fp32 parameters and gradients and AdamW's two fp32 moments, as under autocast; "mixed_adam", the ZeRO
      paper's bf16 parameters and gradients with fp32 master weights and moments (16 bytes per parameter both);
    - unsharded (fsdp): the bf16 parameters of the unit that computes and of the one prefetched, and the fp32
      gradients of one unit before its reduce-scatter (`units` = the stage's layers + 1 unless given);
    - activations: `transformer_activation_bytes` (16-bit, sequence parallel with tp, seq_len / cp tokens) of the
      stage's layers times the micro-batches in flight (with full checkpointing one layer at a time is recomputed,
      once); the logits, the CUDA workspace and a mixture of experts' dispatch buffers and top_k expert passes per
      token are not counted (its layers count as dense ones);
    - offload "optimizer" (ZeRO-Offload) keeps the optimizer states on the host, "params" (FSDP2's
      CPUOffloadPolicy, fsdp only) the sharded parameters, gradients and optimizer states."""
    shape = model_shape(model)
    if gpu not in hardware.NODES:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(hardware.NODES)}")
    if strategy not in PLAN_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(PLAN_STRATEGIES)}")
    if offload not in OFFLOAD:
        raise ValueError(f"unknown offload {offload!r}; choose one of {', '.join(OFFLOAD)}")
    if offload == "params" and strategy != "fsdp":
        raise ValueError("offload 'params' is FSDP2's CPUOffloadPolicy: it needs strategy fsdp")
    microbatches = pp if microbatches is None else microbatches
    for name, value in (("world_size", world_size), ("tp", tp), ("micro_batch", micro_batch), ("seq_len", seq_len),
                        ("pp", pp), ("microbatches", microbatches), ("virtual_stages", virtual_stages), ("cp", cp),
                        ("ep", ep)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if virtual_stages > 1 and (schedule != "1f1b" or pp == 1):
        raise ValueError(f"virtual_stages {virtual_stages} is the interleaved 1F1B schedule: it needs schedule "
                         f"'1f1b' and pp > 1, got {schedule!r} and pp {pp}")
    if world_size % tp:
        raise ValueError(f"world_size {world_size} does not split into tensor-parallel groups of {tp}")
    if world_size % (tp * pp * cp):
        names = "tp x pp" + (" x cp" if cp > 1 else "")
        raise ValueError(f"world_size {world_size} does not split into groups of {names} = {tp} x {pp}"
                         f"{f' x {cp}' if cp > 1 else ''} = {tp * pp * cp} GPUs; choose {names} dividing {world_size}")
    _tokens_per_rank(seq_len, cp)
    dp = world_size // (tp * pp * cp)
    replicas = dp * cp  # ranks that hold the same weights and sum their gradients
    if ep > 1 and (not shape.experts or shape.experts % ep or replicas % ep):
        raise ValueError(f"ep {ep} splits the experts over data- and context-parallel ranks: it needs a mixture of "
                         f"experts whose {shape.experts} experts and dp x cp = {replicas} ranks it divides")
    layers = stage_layers(shape.layers, pp, virtual_stages) if pp > 1 else shape.layers
    experts = stage_expert_parameters(shape, pp, virtual_stages) / (tp * ep)  # this GPU's experts' parameters
    dense = (stage_parameters(shape, pp, virtual_stages) - experts * tp * ep) / tp
    n = dense + experts
    stage = {"fsdp": "zero3"}.get(strategy, strategy)
    held = zero.predict(dense, replicas, stage, preset=states)
    if experts:
        other = zero.predict(experts, replicas // ep, stage, preset=states)
        held = zero.RankMemory(**{k: getattr(held, k) + getattr(other, k) for k in ("params", "grads", "optimizer")})
    units = units or layers + 1
    in_flight = in_flight_microbatches(pp, microbatches, schedule, virtual_stages)
    parts = {"params": held.params, "grads": held.grads, "optimizer": held.optimizer,
             "unsharded": (2 * 2 + 4) * n / units if strategy == "fsdp" and replicas > 1 else 0.0,
             "activations": transformer_activation_bytes(seq_len, micro_batch, shape.dim, shape.heads,
                                                         layers * in_flight,
                                                         checkpointing, tp, attention, cp) if shape.dim else 0.0}
    moved = {"none": (), "optimizer": ("optimizer",), "params": ("params", "grads", "optimizer")}[offload]
    host = sum(parts[k] for k in moved)
    parts.update({k: 0.0 for k in moved})
    settings = dict(gpu=gpu, strategy=strategy, world_size=world_size, tp=tp, micro_batch=micro_batch, seq_len=seq_len,
                    checkpointing=checkpointing, offload=offload, attention=attention, states=states, pp=pp,
                    microbatches=microbatches, schedule=schedule, virtual_stages=virtual_stages, dp=dp,
                    stage_layers=layers, in_flight=in_flight, cp=cp, ep=ep)
    return Plan(shape, settings, parts, host, hardware.NODES[gpu].memory_GB * 1e9)


def format_plan(p: Plan) -> str:
    """The breakdown as a table in GiB, with the verdict."""
    s, gpu = p.settings, p.settings["gpu"].upper()
    lines = [f"{p.model.name}: {p.model.parameters / 1e9:.3g}B parameters, {p.model.layers} layers, width {p.model.dim}, "
             f"{p.model.heads} heads",
             f"{s['world_size']} x {gpu}, {s['strategy']}" + (f" x tensor parallel {s['tp']}" if s["tp"] > 1 else "")
             + (f" x pipeline parallel {s['pp']}" if s["pp"] > 1 else "")
             + (f" x context parallel {s['cp']}" if s["cp"] > 1 else "")
             + (f", experts over {s['ep']}" if s["ep"] > 1 else "")
             + f"; micro-batch {s['micro_batch']} x {s['seq_len']} tokens; checkpointing {s['checkpointing']}; "
             f"offload {s['offload']}; {s['attention']} attention"]
    if s["pp"] > 1:
        schedule = s["schedule"] + (f" interleaved, {s['virtual_stages']} virtual stages" if s["virtual_stages"] > 1 else "")
        lines.append(f"first of {s['pp']} stages: {s['stage_layers']} of {p.model.layers} layers and the embedding; "
                     f"{schedule}, {s['microbatches']} micro-batches per step, {s['in_flight']:g} in flight; "
                     f"{s['dp']} data-parallel ranks")
    rows = [[part, gib(nbytes, 2), ""] for part, nbytes in p.parts.items()]
    rows.append(["per GPU", gib(p.total, 2), f" usable: {gib(p.capacity)} of the {gib(p.gpu_bytes)}"])
    if p.host:
        rows.append(["host", gib(p.host, 2), " offloaded to the node's memory, copied every step"])
    lines.append(table(None, rows, indent="  "))
    verdict = "fits" if p.fits else f"does not fit ({gib(p.total - p.capacity)} too much)"
    lines.append(f"{verdict} on {gpu} ({gib(p.gpu_bytes)})")
    return "\n".join(lines)


def grid(model: str | float | ModelShape, **settings) -> dict[tuple[str, str], Plan]:
    """`plan` of `model` for every checkpointing (CHECKPOINTING) and strategy (PLAN_STRATEGIES), each from the least
    saving to the most, by (checkpointing, strategy); `settings` are `plan`'s other arguments."""
    return {(ck, strategy): plan(model, strategy=strategy, checkpointing=ck, **settings)
            for ck in CHECKPOINTING for strategy in PLAN_STRATEGIES}


def format_grid(plans: dict[tuple[str, str], Plan]) -> str:
    """`grid`'s plans as a table: GB per GPU and whether it fits, a row per checkpointing, a column per strategy."""
    first = next(iter(plans.values()))
    s = first.settings
    lines = [f"{first.model.name} on {s['world_size']} x {s['gpu'].upper()}, micro-batch {s['micro_batch']} x "
             f"{s['seq_len']} tokens, tp {s['tp']}: GB per GPU",
             f"{'checkpointing':<14}" + "".join(f"{strategy:>16}" for strategy in PLAN_STRATEGIES)]
    for ck in CHECKPOINTING:
        cells = [f"{p.total / 1e9:9.1f} {'fits' if p.fits else 'no':>5}" for p in
                 (plans[ck, strategy] for strategy in PLAN_STRATEGIES)]
        lines.append(f"{ck:<14}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def plot_plan(p: Plan):
    """The plan as one stacked bar of GB per GPU by part, the usable capacity dashed, the verdict in the title."""
    from matplotlib.figure import Figure  # no pyplot: the figure is returned, not shown twice

    s = p.settings
    fig = Figure(figsize=(7, 1.8), layout="constrained")
    ax = fig.add_subplot()
    left = 0.0
    for part, nbytes in p.parts.items():
        ax.barh([0], [nbytes / 1e9], left=left, label=part)
        left += nbytes / 1e9
    ax.axvline(p.capacity / 1e9, color="black", ls="--", lw=1)
    ax.set_yticks([])
    ax.set_xlabel("GB per GPU (dashed: usable)")
    ax.set_title(f"{p.model.name}, {s['world_size']} x {s['gpu'].upper()}, {s['strategy']}, checkpointing "
                 f"{s['checkpointing']}: {'fits' if p.fits else 'does not fit'} ({p.total / 1e9:.1f} of "
                 f"{p.capacity / 1e9:.0f} GB)", fontsize=9)
    ax.legend(ncol=5, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.5))
    return fig


def widget(model: str, gpu: str, strategy: str, world_size: int, tp: int, micro_batch: int, seq_len: int,
           checkpointing: str, offload: str):
    """The planner in JupyterLab: a drop-down or slider per argument of `plan`, starting at the values given; each
    change redraws the bar (`plot_plan`). Its `result` is the Plan of the controls' values (None where `plan`
    refuses them, which it prints)."""
    import ipywidgets as widgets
    from IPython.display import display

    def show(model, gpu, strategy, world_size, tp, micro_batch, seq_len, checkpointing, offload):
        try:
            p = plan(model, gpu=gpu, strategy=strategy, world_size=world_size, tp=tp, micro_batch=micro_batch,
                     seq_len=seq_len, checkpointing=checkpointing, offload=offload)
        except ValueError as err:
            print(f"not a configuration: {err}")
            return None
        display(plot_plan(p))
        return p

    return widgets.interactive(
        show, model=widgets.Dropdown(options=list(dict.fromkeys([*MODELS, "7B", "70B", "405B", model])), value=model),
        gpu=widgets.Dropdown(options=list(hardware.NODES), value=gpu),
        strategy=widgets.Dropdown(options=PLAN_STRATEGIES, value=strategy),
        world_size=widgets.SelectionSlider(options=sorted({2**i for i in range(13)} | {world_size}), value=world_size),
        tp=widgets.SelectionSlider(options=sorted({1, 2, 4, 8} | {tp}), value=tp),
        micro_batch=widgets.IntSlider(value=micro_batch, min=1, max=max(32, micro_batch)),
        seq_len=widgets.SelectionSlider(options=sorted({2**i for i in range(9, 18)} | {seq_len}), value=seq_len),
        checkpointing=widgets.Dropdown(options=CHECKPOINTING, value=checkpointing),
        offload=widgets.Dropdown(options=OFFLOAD, value=offload))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from workshop.base.params import positive

    parser = argparse.ArgumentParser(prog="python -m workshop.estimate.planner", description="The memory per GPU of "
                                     "training a GPT-shaped model, by part (parameters, gradients, optimizer states, "
                                     "FSDP's gathered units, activations), and whether it fits.")
    parser.add_argument("model", help=f"parameters (7B, 350M, 1.3e9) or a published model: {', '.join(MODELS)}")
    parser.add_argument("--gpu", choices=list(hardware.NODES), default="h100")
    parser.add_argument("--strategy", choices=PLAN_STRATEGIES, default="fsdp")
    parser.add_argument("--world-size", type=positive(int), default=8, help="GPUs in all (default 8)")
    parser.add_argument("--tp", type=positive(int), default=1, help="tensor-parallel size, inside the world (default 1)")
    parser.add_argument("--pp", type=positive(int), default=1, help="pipeline stages, inside the world (default 1)")
    parser.add_argument("--cp", type=positive(int), default=1, help="context-parallel size: ranks each sequence is "
                                                                     "split over, inside the world (default 1)")
    parser.add_argument("--ep", type=positive(int), default=1, help="expert-parallel size of a mixture of experts: "
                                                                     "ranks its experts are split over (default 1)")
    parser.add_argument("--microbatches", type=positive(int), help="micro-batches per step through the pipeline "
                                                                    "(default: pp)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="pipeline schedule (default 1f1b)")
    parser.add_argument("--micro-batch", type=positive(int), default=1, help="sequences per GPU per step (default 1)")
    parser.add_argument("--seq-len", type=positive(int), default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--checkpointing", choices=CHECKPOINTING, default="none")
    parser.add_argument("--offload", choices=OFFLOAD, default="none")
    parser.add_argument("--attention", choices=("unfused", "fused"), default="unfused",
                        help="fused: a FlashAttention-style kernel that stores no attention scores")
    args = parser.parse_args(argv)
    try:
        print(format_plan(plan(args.model, gpu=args.gpu, strategy=args.strategy, world_size=args.world_size, tp=args.tp,
                               micro_batch=args.micro_batch, seq_len=args.seq_len, checkpointing=args.checkpointing,
                               offload=args.offload, attention=args.attention, pp=args.pp,
                               microbatches=args.microbatches, schedule=args.schedule, cp=args.cp, ep=args.ep)))
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
