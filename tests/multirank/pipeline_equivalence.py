"""Pipeline parallelism against one process; rank 0 saves what tests/test_pipeline.py asserts.

    torchrun --standalone --nproc-per-node 2 tests/multirank/pipeline_equivalence.py OUT.pt   # 2 stages
    torchrun --standalone --nproc-per-node 4 tests/multirank/pipeline_equivalence.py OUT.pt   # 4 stages; 3D 2x2x1, 2x1x2
    torchrun --standalone --nproc-per-node 8 tests/multirank/pipeline_equivalence.py OUT.pt   # 3D 2x2x2

With a pipeline over all ranks: GPipe and 1F1B from scratch (loss and every gradient) against one process on the
whole batch, the library's GPipe, 1F1B (and interleaved 1F1B where every rank gets two blocks' stages) against
the from-scratch gradients, the activations each stage holds at its peak, and the bubble of stages that sleep
for known times. On 4 and 8 ranks, 3D meshes (pp x dp x tp) against one process. Every rank computes the
one-process reference itself.
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


if W in (1, 2, 4):
    group = None  # the stages are the ranks of the world, in order
    ref_loss, ref_grads = reference(M * MICRO)
    scratch = {}
    for name, schedule in pipeline.SCHEDULES.items():
        stage = pipeline.make_stage(fresh(), env.rank, W)
        with pipeline.LiveActivations(stage) as live:
            losses = pipeline.run_schedule(stage, schedule(W, M, env.rank), inputs=micro(tokens, 0),
                                           targets=micro(targets, 0), activation_shape=(MICRO, SEQ, stage.dim), live=live)
        saved[f"scratch {name} equals one process"] = bool(compare_stage(stage, ref_grads, losses, ref_loss))
        held = [None] * W
        tdist.all_gather_object(held, (live.peak / live.per_microbatch, pipeline.in_flight(schedule(W, M, env.rank))))
        saved[f"scratch {name} held"] = held  # per stage: (measured peak / one micro-batch, the schedule's count)
        scratch[name] = {n: p.grad.clone() for n, p in stage.named_parameters()}

    for name in ("gpipe", "1f1b"):
        stage = pipeline.make_stage(fresh(), env.rank, W)
        schedule = pipeline.library_schedule(name, [stage], [env.rank], W, M)
        pipeline.library_step(schedule, first=env.rank == 0, last=env.rank == W - 1, tokens=tokens[:M * MICRO],
                              targets=targets[:M * MICRO])
        saved[f"library {name} equals from scratch"] = bool(check.compare(
            [(f"{n}.grad", p.grad, scratch[name][n]) for n, p in stage.named_parameters()], rtol=1e-4, atol=1e-6))
    if fresh().depth >= 2 * W:  # two stages per rank: rank r holds stages r and r + W
        stages = [pipeline.make_stage(fresh(), s, 2 * W) for s in (env.rank, env.rank + W)]
        schedule = pipeline.library_schedule("interleaved_1f1b", stages, [env.rank, env.rank + W], 2 * W, M)
        pipeline.library_step(schedule, first=env.rank == 0, last=env.rank == W - 1, tokens=tokens[:M * MICRO],
                              targets=targets[:M * MICRO])
        pairs = [(f"{n}.grad", p.grad, ref_grads[n]) for s in stages for n, p in s.named_parameters()]
        saved["library interleaved_1f1b equals one process"] = bool(check.compare(pairs, rtol=1e-4, atol=1e-6))

    # The bubble of stages that take known times: forward 20 ms, backward 40 ms, so the schedule alone decides
    class _Sleep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            time.sleep(0.02)
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            time.sleep(0.04)
            return grad

    class SleepStage(nn.Module):
        def __init__(self, first, last):
            super().__init__()
            self.first, self.last, self.dim = first, last, 4
            self.weight = nn.Parameter(torch.ones(4, 4))

        def forward(self, x):
            x = _Sleep.apply(x.float() @ self.weight)
            return x @ torch.ones(4, 8) if self.last else x

    for m in (1, 4, 8):
        stage = SleepStage(env.rank == 0, env.rank == W - 1)
        timeline = pipeline.Timeline(stage=env.rank)
        timeline.start()
        pipeline.run_schedule(stage, pipeline.one_f_one_b(W, m, env.rank), inputs=[torch.ones(1, 2, 4)] * m,
                              targets=[torch.zeros(1, 2, dtype=torch.long)] * m, activation_shape=(1, 2, 4),
                              timeline=timeline)
        saved[f"bubble p={W} m={m}"] = pipeline.bubble(timeline.gather())

if W in (4, 8):
    shapes = [(2, 2, 1), (2, 1, 2)] if W == 4 else [(2, 2, 2)]
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
