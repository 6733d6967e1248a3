"""The cost model's command line: projections, placements and the published results it is held to.

    python -m workshop.estimate.costmodel project 70B --gpu h100 --strategy fsdp     # 1 to 4096 GPUs, 4M tokens a step
    python -m workshop.estimate.costmodel project 7B --weak --micro-batch-size 4     # the batch per GPU fixed instead
    python -m workshop.estimate.costmodel placements 70B --gpus 512 --gpu h100       # every dp x tp x pp
    python -m workshop.estimate.costmodel placements llama3-405b --gpus 16384 --global-batch 128 --seq-len 131072 \
        --cp 1,2,4,8,16 --attention fused                                                # ... x cp
    python -m workshop.estimate.costmodel placements mixtral-8x7b --gpus 64 --ep 1,2,4,8 # ... x ep
    python -m workshop.estimate.costmodel validate --out docs/results                # against published scaling

The model itself, one module per part of `workshop.estimate`: `network` (alpha-beta links, a two-level cluster,
the collectives' formulas and their calibration), `steps` (DDP, FSDP and tensor-parallel step times; memory per
GPU from `planner`), `terms` (the per-GPU batch's GEMM efficiency, communication slowing overlapped compute, the
elementwise work TP leaves whole), `scaling` (one step with every term), `projection` (strong scaling at a global
batch, and weak scaling, to 4096 GPUs), `placements` (pipeline stages and dp x tp x pp), `published` (the results
it is held to) and `validation` (their scores, controls and sensitivities). `python -m workshop.measure.costcheck`
holds it against measured steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workshop.base.params import positive
from workshop.estimate import planner
from workshop.estimate.network import GPUS
from workshop.estimate.placements import GLOBAL_BATCH, SEQ_LEN, format_placements, placements, why
from workshop.estimate.projection import format_projection, project, project_strong
from workshop.estimate.steps import STRATEGIES, Workload
from workshop.estimate.validation import validation_markdown


def sizes(text: str) -> tuple[int, ...]:
    """"1,2,4" -> (1, 2, 4): sizes of a parallel dimension to search, whole numbers of at least 1."""
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers of at least 1, comma-separated, e.g. 1,2,4")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workshop.estimate.costmodel", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("project", help="throughput, efficiency and memory from 1 to 4096 GPUs of a model of a given "
                                       "size")
    p.add_argument("size", help="parameters, e.g. 7B, 350M, 1.3e9, or a published model (llama2-70b, ...)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--strategy", choices=STRATEGIES, default="fsdp")
    p.add_argument("--global-batch", type=positive(int), default=GLOBAL_BATCH,
                   help=f"sequences per step, all GPUs together (default {GLOBAL_BATCH}: Llama 2's 4M tokens)")
    p.add_argument("--weak", action="store_true", help="weak scaling instead: --micro-batch-size sequences per GPU, "
                                                        "whatever the number of GPUs")
    p.add_argument("--micro-batch-size", type=positive(int), default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--seq-len", type=positive(int), default=SEQ_LEN, help=f"tokens per sequence (default {SEQ_LEN})")
    p.add_argument("--mfu", type=positive(float), default=0.4, help="fraction of the GPU's peak that compute reaches "
                                                                      "(default 0.4)")
    p.add_argument("--tp", type=positive(int), default=8, help="tensor-parallel size of tp_fsdp (default 8)")
    pl = sub.add_parser("placements", help="every dp x tp x pp (x cp, x ep) of a model on a number of GPUs, fastest "
                                           "first, and why the first wins")
    pl.add_argument("model", help="a published model (llama2-70b, gpt3-175b, ...), its size (70B: Llama 2 70B), or "
                                  "another size, shaped as usual")
    pl.add_argument("--gpus", type=positive(int), default=512, help="GPUs in all (default 512)")
    pl.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    pl.add_argument("--global-batch", type=positive(int), default=GLOBAL_BATCH,
                    help=f"sequences per step (default {GLOBAL_BATCH}: Llama 2's 4M tokens)")
    pl.add_argument("--micro-batch-size", type=positive(int), default=1, help="sequences per micro-batch (default 1)")
    pl.add_argument("--seq-len", type=positive(int), default=SEQ_LEN, help=f"tokens per sequence (default {SEQ_LEN})")
    pl.add_argument("--mfu", type=positive(float), default=0.4, help="fraction of the GPU's peak that compute reaches "
                                                                       "(default 0.4)")
    pl.add_argument("--strategy", choices=("ddp", "fsdp", "both"), default="both",
                    help="data-parallel strategy over the replicas (default both)")
    pl.add_argument("--cp", type=sizes, default=(1,), help="context-parallel sizes to search, e.g. 1,2,4,8,16 "
                                                            "(default 1: none)")
    pl.add_argument("--ep", type=sizes, help="expert-parallel sizes to search, for a mixture of experts (default: every "
                                             "divisor of its experts)")
    pl.add_argument("--attention", choices=("unfused", "fused"), default="unfused",
                    help="attention's activations: unfused keeps the S x S scores, fused (flash) does not "
                         "(default unfused)")
    pl.add_argument("--top", type=int, default=10, help="rows to show (default 10; 0: all)")
    v = sub.add_parser("validate", help="the model against published scaling results")
    v.add_argument("--out", type=Path, help="also write costmodel_validation.md here")
    args = parser.parse_args(argv)
    if args.command == "placements" and args.top < 0:
        parser.error(f"--top {args.top}: give how many rows to show, or 0 for all")
    try:
        if args.command == "placements":
            strategies = ("ddp", "fsdp") if args.strategy == "both" else (args.strategy,)
            rows = placements(args.model, args.gpus, args.gpu, args.global_batch, args.micro_batch_size, args.seq_len,
                              strategies, args.mfu, cps=args.cp, eps=args.ep, attention=args.attention)
            shape = planner.find_model(args.model)
            print(f"{shape.name} ({shape.parameters / 1e9:.3g}B parameters, {shape.layers} layers) on {args.gpus} "
                  f"{args.gpu}: {args.global_batch} sequences of {args.seq_len} tokens per step, micro-batch "
                  f"{args.micro_batch_size}, 1F1B, full activation checkpointing, compute at {args.mfu:.0%} of peak\n")
            print(format_placements(rows, args.top or None))
            print("\n" + why(rows))
        elif args.command == "validate":
            text = validation_markdown()
            print(text)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "costmodel_validation.md").write_text(text)
        elif args.weak:
            w = Workload.from_size(args.size, tokens_per_sample=args.seq_len)
            print(format_projection(project(w, args.gpu, args.strategy, args.micro_batch_size, args.mfu, tp=args.tp)))
        else:
            print(format_projection(project_strong(args.size, args.gpu, args.strategy, args.global_batch, args.seq_len,
                                                   args.micro_batch_size, args.mfu, args.tp)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
