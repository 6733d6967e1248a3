"""Pipeline parallelism: the model cut into stages along its depth, one stage per rank, micro-batches flowing
through (GPipe, Huang et al. 2019; 1F1B, PipeDream-Flush, Narayanan et al. 2021), first from scratch with
point-to-point sends, then with `torch.distributed.pipelining`, then composed with FSDP and tensor parallelism (3D).

From scratch, on any process group whose ranks are the stages in order (notebook 09 writes the same in cells):

    stage = make_stage(model, stage=rank, num_stages=p)     # embeddings + first blocks ... last blocks + head
    actions = one_f_one_b(p, m, rank)                        # [("F", 0), ("F", 1), ("B", 0), ...]: this rank's order
    losses = run_schedule(stage, actions, group=group, inputs=tokens, targets=targets, activation_shape=(b, T, dim))

Every stage sends its output activation to the next with `isend` and receives its input with `recv`; backward runs
in the opposite direction with the gradient of that activation. A `Timeline` records when each stage computed what
(`bubble` and `unequal_stage_bubble` read it; `workshop.measure.pipeline_view` draws it), and `LiveActivations` how
many bytes of saved activations a stage holds. With the library (notebook 09 calls `PipelineStage(...)`,
`ScheduleGPipe(...)` / `Schedule1F1B(...)` and `schedule.step(...)` in the open): `library_schedule(...)` and
`library_step(...)`.

3D: `make_mesh(env, pp_size, dp_size, tp_size)` builds a ("pp", "dp", "tp") mesh, tp innermost (inside a node),
pp outermost (across nodes); `apply_pipeline(model, mesh)` keeps this rank's stage, splits it over mesh["tp"] with
the tensor-parallel notebook's plan and shards it over mesh["dp"] with FSDP2.

The stages keep the whole model's parameter names ("layers.2.attention.wq.weight" stays that on the stage that
holds block 2), so a stage's parameters are compared with the one-process model's by name.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch import nn

from workshop.dist import DistEnv
from workshop.models import TinyGPT, lm_loss
from workshop.parallel_dims import build_mesh

# ---------------------------------------------------------------------------------------------
# Stages: the model cut along its depth
# ---------------------------------------------------------------------------------------------


def stage_blocks(depth: int, num_stages: int) -> list[range]:
    """Which blocks each stage holds: `depth` blocks over `num_stages` stages, as evenly as possible (the first
    stages take one more where it does not divide: 4 blocks over 3 stages are 2, 1, 1)."""
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"the number of pipeline stages must be a whole number >= 1, got {num_stages!r}")
    if num_stages > depth:
        # two lines: one would be too wide for a notebook's output
        raise ValueError(f"{num_stages} pipeline stages for a model of {depth} blocks: a stage needs at least one block;\n"
                         f"choose at most {depth} stages (or a deeper model)")
    size, extra = divmod(depth, num_stages)
    starts = [s * size + min(s, extra) for s in range(num_stages + 1)]
    return [range(starts[s], starts[s + 1]) for s in range(num_stages)]


class Stage(nn.Module):
    """One stage of a TinyGPT: the token and position embeddings on the first stage, its blocks, the final norm and
    the output head on the last. `layers` is a ModuleDict keyed by the block's index in the whole model, so the
    parameter names are the whole model's. forward maps tokens (first stage) or activations (B, T, dim) to
    activations (B, T, dim) or logits (B, T, vocab) (last stage)."""

    def __init__(self, model: TinyGPT, blocks: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last, self.dim = first, last, model.dim
        if first:
            self.tok_embeddings, self.pos_embeddings = model.tok_embeddings, model.pos_embeddings
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in blocks})
        if last:
            self.norm, self.output = model.norm, model.output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.tok_embeddings(x) + self.pos_embeddings(torch.arange(x.shape[1], device=x.device))
        for block in self.layers.values():
            x = block(x)
        return self.output(self.norm(x)) if self.last else x


def make_stage(model: TinyGPT, stage: int, num_stages: int) -> Stage:
    """Stage `stage` of `num_stages` of a copy of `model` (the model itself is left whole)."""
    blocks = stage_blocks(model.depth, num_stages)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} of {num_stages}: choose 0 ... {num_stages - 1}")
    return Stage(copy.deepcopy(model), blocks[stage], first=stage == 0, last=stage == num_stages - 1)


def split(model: TinyGPT, num_stages: int) -> list[Stage]:
    """All stages of a copy of `model`, in order: running them one after another is the model."""
    return [make_stage(model, s, num_stages) for s in range(num_stages)]


# ---------------------------------------------------------------------------------------------
# Schedules: the order in which one stage runs its micro-batches' forwards (F) and backwards (B)
# ---------------------------------------------------------------------------------------------


def gpipe(p: int, m: int, stage: int) -> list[tuple[str, int]]:
    """GPipe (all forward, then all backward): every stage runs the m forwards, then the m backwards; it holds the
    activations of all m micro-batches at once."""
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


def one_f_one_b(p: int, m: int, stage: int) -> list[tuple[str, int]]:
    """1F1B (PipeDream-Flush): stage s first runs p - s - 1 forwards (warm-up), then alternates one forward and one
    backward, then runs the backwards left (cool-down). The same bubble as GPipe, but at most p - s micro-batches'
    activations are held at once instead of m."""
    warmup = min(p - stage - 1, m)
    actions = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        actions += [("F", warmup + i), ("B", i)]
    return actions + [("B", i) for i in range(m - warmup, m)]


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def microbatch_counts(text) -> list[int]:
    """The numbers of micro-batches in a comma-separated parameter ("1,2,4,8"; papermill passes `-p NAME 4` as the
    number 4), sorted, each once; a ValueError says how to write them."""
    try:
        counts = sorted({int(n) for n in str(text).split(",")})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise ValueError(f"bubble_microbatches = {text!r}: write whole numbers of at least 1, comma-separated, "
                         "e.g. 1,2,4,8")
    return counts


def in_flight(actions: list[tuple[str, int]]) -> int:
    """The most micro-batches whose forward has run and whose backward has not, at any point of `actions`: how
    many micro-batches' activations the stage holds at its peak."""
    held = peak = 0
    for kind, _ in actions:
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    return peak


def check_schedule(actions: list[tuple[str, int]], m: int) -> None:
    """Refuse an order that cannot run: each micro-batch forward once and backward once, backward after forward."""
    done_f, done_b = set(), set()
    for kind, i in actions:
        if kind == "F" and i not in done_f:
            done_f.add(i)
        elif kind == "B" and i in done_f and i not in done_b:
            done_b.add(i)
        else:
            raise ValueError(f"schedule step {(kind, i)} cannot run here: each micro-batch needs one forward, then "
                             f"one backward ({actions})")
    if done_f != set(range(m)) or done_b != set(range(m)):
        raise ValueError(f"schedule {actions} does not run each of the {m} micro-batches forward and backward")


# ---------------------------------------------------------------------------------------------
# Measuring a schedule: when each stage computed, and how many activation bytes it held
# ---------------------------------------------------------------------------------------------


@dataclass
class Timeline:
    """What one stage computed and when: events (kind "F" or "B", micro-batch, start s, end s), seconds from the
    moment the stages left a common barrier (`start`)."""

    stage: int = 0
    events: list[tuple[str, int, float, float]] = field(default_factory=list)
    t0: float = 0.0

    def start(self, group=None) -> None:
        tdist.barrier(group=group)
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def event(self, kind: str, microbatch: int):
        begin = time.perf_counter() - self.t0
        yield
        self.events.append((kind, microbatch, begin, time.perf_counter() - self.t0))

    def gather(self, group=None) -> list[Timeline]:
        """Every stage's timeline, in stage order, on every rank of the pipeline group."""
        out = [None] * tdist.get_world_size(group)
        tdist.all_gather_object(out, self, group=group)
        return out


def step_seconds(timelines: list[Timeline]) -> float:
    """The step's span: from the stages' common start to the end of the last event on any stage."""
    return max(end for t in timelines for *_, end in t.events)


def bubble(timelines: list[Timeline]) -> float:
    """The measured idle share of the step: for each stage 1 - (time computing) / (the step's span, from the common
    start to the last stage's last event), averaged over stages. Theory, for equal stages and no transfer time:
    (p - 1) / (m + p - 1)."""
    span = step_seconds(timelines)
    return sum(1 - sum(end - begin for _, _, begin, end in t.events) / span for t in timelines) / len(timelines)


def unequal_stage_bubble(timelines: list[Timeline]) -> float:
    """The bubble that the stages' own measured speeds predict, transfers left out: stage s takes t_s per micro-batch
    (its mean forward plus backward), a micro-batch crosses all stages in sum(t_s), and the others follow at the
    pace of the slowest, so a step of m micro-batches spans sum(t_s) + (m - 1) max(t_s) and stage s idles
    1 - m t_s / span of it. Equal stages give (p - 1) / (m + p - 1); the rest of a measured bubble is transfers."""
    m = len({i for t in timelines for _, i, _, _ in t.events})
    per_stage = [sum(end - begin for _, _, begin, end in t.events) / m for t in timelines]
    span = sum(per_stage) + (m - 1) * max(per_stage)
    return sum(1 - m * t / span for t in per_stage) / len(per_stage)


class LiveActivations:
    """The bytes of activations a stage holds for backward, as they come and go: every tensor autograd saves is
    counted (each storage once, parameters not) until the graph that saved it is freed by its backward. `peak` is
    the most held at once; `per_microbatch` what the first forward alone saved.

        with pipeline.LiveActivations(stage) as live:
            run_schedule(...)
        live.peak, live.per_microbatch"""

    def __init__(self, module: nn.Module):
        self.module = module
        self.live = self.peak = 0
        self.per_microbatch = 0
        self._count: dict[int, list] = {}  # storage pointer -> [bytes, holders]

    class _Held:
        def __init__(self, meter, t):
            self.meter, self.t, self.key = meter, t, t.untyped_storage().data_ptr()

        def __del__(self):
            self.meter._release(self.key)

    def _pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if not key or key in self._params:
            return t
        entry = self._count.setdefault(key, [t.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        return LiveActivations._Held(self, t)

    def _release(self, key: int) -> None:
        entry = self._count[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._count[key]

    @staticmethod
    def _unpack(held):
        return held.t if isinstance(held, LiveActivations._Held) else held

    def first_forward_done(self) -> None:
        if not self.per_microbatch:
            self.per_microbatch = self.live

    def __enter__(self) -> LiveActivations:
        from torch.distributed.tensor import DTensor

        self._params = {(p.to_local() if isinstance(p, DTensor) else p).untyped_storage().data_ptr()
                        for p in self.module.parameters()}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# Running a schedule from scratch: isend / recv between neighbouring stages
# ---------------------------------------------------------------------------------------------


def run_schedule(stage: Stage, actions: list[tuple[str, int]], *, group=None, inputs=None, targets=None,
                 activation_shape: tuple[int, ...], timeline: Timeline | None = None,
                 live: LiveActivations | None = None, dtype=torch.float32) -> list[torch.Tensor]:
    """One training step's forwards and backwards of this rank's stage, in the order `actions` gives, its
    gradients accumulated in the stage's parameters (each micro-batch's loss divided by the number of micro-batches,
    so they equal one process's on the whole batch). The group's ranks are the stages in order. The first stage
    takes `inputs` (a token tensor per micro-batch), the last `targets`; activations (`activation_shape`, the
    same for every micro-batch) travel forward, their gradients backward. Returns the last stage's micro-batch
    losses (empty on the others)."""
    group = group or tdist.group.WORLD
    rank, p = tdist.get_rank(group), tdist.get_world_size(group)
    m = len({i for _, i in actions})
    check_schedule(actions, m)
    previous = tdist.get_global_rank(group, rank - 1) if rank > 0 else None
    following = tdist.get_global_rank(group, rank + 1) if rank < p - 1 else None
    device = next(stage.parameters()).device
    timeline = timeline or Timeline(stage=rank)
    stage_in, stage_out, losses, sending = {}, {}, [], []

    def receive(source):
        buffer = torch.empty(activation_shape, dtype=dtype, device=device)
        tdist.recv(buffer, src=source)
        return buffer

    def send(tensor, destination):  # isend: the neighbour may be busy sending to us; keep the tensor until done
        tensor = tensor.detach().contiguous()
        sending.append((tdist.isend(tensor, dst=destination), tensor))

    for kind, i in actions:
        if kind == "F":
            x = inputs[i].to(device) if stage.first else receive(previous).requires_grad_()
            with timeline.event("F", i):
                out = stage(x)
                if stage.last:
                    loss = lm_loss(out, targets[i].to(device))
                    losses.append(loss.detach())
                    out = loss / m
            if live is not None:
                live.first_forward_done()
            if not stage.last:
                send(out, following)
            stage_in[i], stage_out[i] = x, out
        else:
            grad = None if stage.last else receive(following)
            with timeline.event("B", i):
                torch.autograd.backward(stage_out.pop(i), grad)
            x = stage_in.pop(i)
            if not stage.first:
                send(x.grad, previous)
    for work, _ in sending:
        work.wait()
    return losses


# ---------------------------------------------------------------------------------------------
# The library's version: torch.distributed.pipelining
# ---------------------------------------------------------------------------------------------


def library_schedule(name: str, stages: list[nn.Module], stage_indices: list[int], num_stages: int, m: int,
                     group=None, device="cpu"):
    """A `torch.distributed.pipelining` schedule over this rank's stage modules: "gpipe" (ScheduleGPipe), "1f1b"
    (Schedule1F1B), each with one stage per rank, or "interleaved_1f1b" (ScheduleInterleaved1F1B: several stages
    per rank, `stage_indices` e.g. [rank, rank + p], the bubble divided by their number). The loss is TinyGPT's;
    gradients are averaged over the m micro-batches, as `run_schedule` does."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    classes = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}
    if name not in classes:
        raise ValueError(f"unknown pipelining schedule {name!r}; choose one of {sorted(classes)}")
    wrapped = [PipelineStage(module, index, num_stages, torch.device(device), group=group)
               for module, index in zip(stages, stage_indices)]
    if name == "interleaved_1f1b":
        return classes[name](wrapped, n_microbatches=m, loss_fn=lm_loss)
    if len(wrapped) != 1:
        raise ValueError(f"{name} runs one stage per rank, got {len(wrapped)}; use interleaved_1f1b for more")
    return classes[name](wrapped[0], n_microbatches=m, loss_fn=lm_loss)


def library_step(schedule, *, first: bool, last: bool, tokens=None, targets=None) -> list[torch.Tensor]:
    """One step of a `library_schedule`: the rank holding the first stage gives the whole batch's tokens (the
    schedule cuts them into micro-batches), the rank holding the last its targets (one rank may hold both);
    returns the last stage's micro-batch losses (empty elsewhere)."""
    losses: list[torch.Tensor] = []
    args = (tokens,) if first else ()
    kwargs = dict(target=targets, losses=losses) if last else {}
    schedule.step(*args, **kwargs)
    return losses


# ---------------------------------------------------------------------------------------------
# 3D: pipeline x data x tensor parallelism
# ---------------------------------------------------------------------------------------------


def make_mesh(env: DistEnv, pp_size: int, dp_size: int, tp_size: int):
    """A 3D device mesh named ("pp", "dp", "tp"): tp innermost (consecutive ranks, one node: it talks in every
    layer), dp in the middle, pp outermost (one stage's neighbours are whole nodes away: it sends one activation
    per micro-batch and boundary, the least traffic of the three)."""
    return build_mesh(env, pp=pp_size, dp=dp_size, tp=tp_size)


def apply_pipeline(model: TinyGPT, mesh, *, pp_dim: str = "pp", dp_dim: str = "dp", tp_dim: str = "tp") -> Stage:
    """This rank's stage of `model` on a ("pp", "dp", "tp") mesh: the stage of its pp coordinate, its attention and
    MLP split over mesh[tp_dim] with the tensor-parallel plan (`tp.tinygpt_tp_plan`, the entries this stage has),
    then sharded over mesh[dp_dim] with FSDP2 (`sharding.apply_fsdp`). Run it with `run_schedule` over
    mesh[pp_dim]'s group, each dp group on its own share of the batch."""
    from torch.distributed.tensor.parallel import parallelize_module

    from workshop.sharding import apply_fsdp
    from workshop.tp import check_tp_size, tinygpt_tp_plan

    stage = make_stage(model, mesh[pp_dim].get_local_rank(), mesh[pp_dim].size())
    if mesh[tp_dim].size() > 1:
        check_tp_size(model, mesh[tp_dim].size())
        names = {name for name, _ in stage.named_modules()}
        prefixes = {key.split(".")[0] for key in names if key}
        plan = {key: style for key, style in tinygpt_tp_plan().items() if key.split(".")[0] in prefixes}
        parallelize_module(stage, mesh[tp_dim], plan)
    if mesh[dp_dim].size() > 1:
        apply_fsdp(stage, mesh[dp_dim])
    return stage


def check_order(order, p_max: int = 4, m_max: int = 8):
    """Exercise 09.1: a student's `order(p, m, s)` must give `one_f_one_b`'s order for every stage s of p <= `p_max`
    stages and m <= `m_max` micro-batches. The hint names the first difference and the usual mistake behind it."""
    from workshop.check import Match

    for p in range(p_max, 0, -1):  # the largest first: there the usual mistakes differ from each other
        for m in range(m_max, 0, -1):
            for s in range(p):
                got, want = [tuple(a) for a in order(p, m, s)], one_f_one_b(p, m, s)
                if got == want:
                    continue
                where = f"stage {s} of p={p} with m={m}"
                shown = " ".join(f"{k}{i}" for k, i in got[:12]) + (" ..." if len(got) > 12 else "")
                if sorted(got) != sorted(want):
                    return Match(False, f"{where} runs {shown}: each micro-batch 0..m-1 needs one F and one B")
                early = next((i for k, i in got if k == "B" and got.index(("B", i)) < got.index(("F", i))), None)
                if early is not None:
                    return Match(False, f"{where} runs B{early} before F{early}: a backward needs its forward")
                warmup = next(j for j, (k, _) in enumerate(got) if k == "B")
                expected = next(j for j, (k, _) in enumerate(want) if k == "B")
                if warmup != expected:
                    if got == gpipe(p, m, s):
                        return Match(False, f"{where}: that is GPipe's order (all forwards, then all backwards); 1F1B "
                                            "starts the backwards after p - s - 1 forwards")
                    return Match(False, f"{where} runs {warmup} forwards before its first backward, 1F1B {expected}: "
                                        f"p - s - 1 = {p - s - 1} to fill the pipe (at most m), then it alternates F, B")
                return Match(False, f"{where} runs {shown}; 1F1B runs " + " ".join(f"{k}{i}" for k, i in want))
    return Match(True)


def check_in_flight(peak):
    """Exercise 09.2: a student's `peak(order)` must give `in_flight(order)`, the most micro-batches a stage holds at
    once, for GPipe's and 1F1B's orders of up to 4 stages and 8 micro-batches. The hint names the usual mistakes."""
    from workshop.check import Match

    for name, schedule in SCHEDULES.items():
        for p in range(4, 0, -1):
            for m in range(8, 0, -1):
                for s in range(p):
                    order = schedule(p, m, s)
                    got, want = peak(order), in_flight(order)
                    if got == want:
                        continue
                    where = f"{name}, stage {s} of p={p}, m={m}"
                    forwards = sum(1 for k, _ in order if k == "F")
                    if got == forwards and want != forwards:
                        return Match(False, f"{where}: you counted every forward ({got}); a backward frees its "
                                            f"micro-batch, so count down at each B and keep the largest count ({want})")
                    return Match(False, f"{where}: you say {got}, the stage holds at most {want} at once "
                                        "(+1 at each F, -1 at each B, the largest count)")
    return Match(True)
