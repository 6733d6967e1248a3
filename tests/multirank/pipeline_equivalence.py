"""Pipeline parallelism against one process; rank 0 saves what tests/test_pipeline.py asserts.

    python tests/multirank/pipeline_equivalence.py OUT.pt                                     # 1 stage
    torchrun --standalone --nproc-per-node 4 tests/multirank/pipeline_equivalence.py OUT.pt   # 2 and 4 stages; 3D
    torchrun --standalone --nproc-per-node 8 tests/multirank/pipeline_equivalence.py OUT.pt   # 3D 2x2x2

With pipelines of 1, 2 (two side by side on 4 ranks) and 4 stages: GPipe and 1F1B from scratch (loss and every
gradient) against one process on the whole batch, the library's GPipe, 1F1B (and interleaved 1F1B where every rank
gets two blocks' stages) against the from-scratch gradients, the activations each stage holds at its peak, and the
bubble of stages that sleep for known times. On 4 and 8 ranks, 3D meshes (pp x dp x tp) against one process. Every
rank computes the one-process reference itself.
"""

import sys
import time

import torch
import torch.distributed as tdist
from torch import nn

from workshop import check, dist, models, pipeline

SEQ, MICRO, M = 16, 2, 4  # tokens per sample, samples per micro-batch, micro-batches

env = dist.init()
W = env.world_size
saved = {}  # name -> a bool, a number, or (value, reference) tensors


def fresh():
    torch.manual_seed(0)
    return models.tinygpt("cpu", max_seq_len=SEQ)


g = torch.Generator().manual_seed(1)
tokens = torch.randint(256, (4 * M * MICRO, SEQ), generator=g)  # enough for 4 data-parallel groups
targets = torch.randint(256, (4 * M * MICRO, SEQ), generator=g)


def reference(n):
    """Loss and gradients of one process on the first n samples."""
    model = fresh()
    loss = models.lm_loss(model(tokens[:n]), targets[:n])
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def compare_stage(stage, ref_grads, losses=None, ref_loss=None):
    pairs = [(f"{n}.grad", p.grad, ref_grads[n]) for n, p in stage.named_parameters()]
    if losses:
        pairs.append(("loss", torch.stack(losses).mean(), ref_loss))
    return check.compare(pairs, rtol=1e-4, atol=1e-6)


def micro(x, first, n=M):
    return [t.clone() for t in x[first:first + n * MICRO].split(MICRO)]  # storages of their own, as loaded batches


# The sleeping stages of the bubble check: forward 50 ms, backward 100 ms, so that the schedule alone decides (8 ranks
# share 2 cores with other tests: at 20 and 40 ms, their waits for the CPU moved a measured bubble of 0.2 to 0.3)
class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        time.sleep(0.05)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.10)
        return grad


class SleepStage(nn.Module):
    def __init__(self, first, last):
        super().__init__()
        self.first, self.last, self.dim = first, last, 4
        self.weight = nn.Parameter(torch.ones(4, 4))

    def forward(self, x):
        x = _Sleep.apply(x.float() @ self.weight)
        return x @ torch.ones(4, 8) if self.last else x


ref_loss, ref_grads = reference(M * MICRO)
for P in {1: [1], 2: [2], 4: [2, 4], 8: [2, 4]}[W]:  # pipelines of P stages, W / P of them side by side on the same data
    mesh = pipeline.make_mesh(env, P, W // P, 1)
    group, s = mesh["pp"].get_group(), mesh["pp"].get_local_rank()
    first, last = s == 0, s == P - 1
    scratch = {}
    for name, schedule in pipeline.SCHEDULES.items():
        stage = pipeline.make_stage(fresh(), s, P)
        with pipeline.LiveActivations(stage) as live:
            losses = pipeline.run_schedule(stage, schedule(P, M, s), group=group, inputs=micro(tokens, 0),
                                           targets=micro(targets, 0), activation_shape=(MICRO, SEQ, stage.dim), live=live)
        saved[f"p={P} scratch {name} equals one process"] = bool(compare_stage(stage, ref_grads, losses, ref_loss))
        held = [None] * P
        tdist.all_gather_object(held, (live.peak, live.per_microbatch, pipeline.in_flight(schedule(P, M, s))), group=group)
        saved[f"p={P} scratch {name} held"] = held  # per stage: peak bytes, one micro-batch's, the schedule's count
        scratch[name] = {n: p.grad.clone() for n, p in stage.named_parameters()}

    for name in pipeline.SCHEDULES:
        stage = pipeline.make_stage(fresh(), s, P)
        schedule = pipeline.library_schedule(name, [stage], [s], P, M, group=group)
        pipeline.library_step(schedule, first=first, last=last, tokens=tokens[:M * MICRO], targets=targets[:M * MICRO])
        saved[f"p={P} library {name} equals from scratch"] = bool(check.compare(
            [(f"{n}.grad", p.grad, scratch[name][n]) for n, p in stage.named_parameters()], rtol=1e-4, atol=1e-6))
    if fresh().depth >= 2 * P:  # two stages per rank: rank s holds stages s and s + P
        stages = [pipeline.make_stage(fresh(), v, 2 * P) for v in (s, s + P)]
        schedule = pipeline.library_schedule("interleaved_1f1b", stages, [s, s + P], 2 * P, M, group=group)
        pipeline.library_step(schedule, first=first, last=last, tokens=tokens[:M * MICRO], targets=targets[:M * MICRO])
        pairs = [(f"{n}.grad", p.grad, ref_grads[n]) for v in stages for n, p in v.named_parameters()]
        saved[f"p={P} library interleaved_1f1b equals one process"] = bool(check.compare(pairs, rtol=1e-4, atol=1e-6))

    for m in (1, 4, 8):
        stage = SleepStage(first, last)
        timeline = pipeline.Timeline(stage=s)
        timeline.start(group)
        pipeline.run_schedule(stage, pipeline.one_f_one_b(P, m, s), group=group, inputs=[torch.ones(1, 2, 4)] * m,
                              targets=[torch.zeros(1, 2, dtype=torch.long)] * m, activation_shape=(1, 2, 4),
                              timeline=timeline)
        saved[f"p={P} bubble m={m}"] = pipeline.bubble(timeline.gather(group))

if W in (4, 8):
    shapes = [(2, 2, 1), (2, 1, 2)] if W == 4 else [(2, 2, 2), (4, 1, 2)]
    for pp, dp, tp in shapes:
        mesh = pipeline.make_mesh(env, pp, dp, tp)
        ref_loss, ref_grads = reference(dp * M * MICRO)
        stage = pipeline.apply_pipeline(fresh(), mesh)
        dp_rank = mesh["dp"].get_local_rank()
        losses = pipeline.run_schedule(stage, pipeline.one_f_one_b(pp, M, mesh["pp"].get_local_rank()),
                                       group=mesh["pp"].get_group(), inputs=micro(tokens, dp_rank * M * MICRO),
                                       targets=micro(targets, dp_rank * M * MICRO),
                                       activation_shape=(MICRO, SEQ, stage.dim))
        if losses:  # the mean over the dp groups' losses is the global batch's
            mean = torch.stack(losses).mean()
            tdist.all_reduce(mean, group=mesh["dp"].get_group())
            losses = [mean / dp]
        saved[f"3D pp{pp} dp{dp} tp{tp} equals one process"] = bool(compare_stage(stage, ref_grads, losses, ref_loss))

if env.is_main:
    torch.save({"world_size": W, "saved": saved}, sys.argv[1])
dist.cleanup()
