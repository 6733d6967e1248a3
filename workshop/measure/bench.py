"""The benchmarks' command line: the all-reduce, the collectives, a DDP training step, a step split into its
compute and its communication, DDP against FSDP, and one device's variants. They print measurements and write
records; none passes or fails.

    allreduce    time torch.distributed.all_reduce of float32 tensors from KiB to MiB: algbw, busbw
    ddp          global samples/s of a model trained with DistributedDataParallel on synthetic data
    step-split   per model: compute time of a step, all-reduce time of its gradients, and the
                 scaling efficiency with no overlap and with perfect overlap of the two
    strategies   one TinyGPT step as compute alone, under DDP and under FSDP2 (fully_shard per block,
                 then the root): step times and tokens/s, for checking workshop.estimate.costmodel
    collectives  all-reduce, all-gather and reduce-scatter of float32 tensors, timed in turns: the three
                 collectives that DDP and FSDP use, for calibrating workshop.estimate.costmodel
    single       one device, before any parallelism: samples/s, speedup, step time, peak memory and
                 MFU of the same training steps under cumulative variants (workers and pinned memory,
                 bf16 autocast, channels_last, torch.compile, data resident on the device); see
                 workshop.measure.perf and notebook 02

Run it as N ranks, like any SPMD program here (workshop.dist.init reads the launcher):

    # locally, one process (the one-device baseline; all-reduce has no partner)
    python -m workshop.measure.bench ddp --model small_cnn --batch-size 64 --steps 20
    # on one node, 2 ranks (gloo on CPU, NCCL on GPUs)
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.measure.bench allreduce
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m workshop.measure.bench step-split --batch-size 32
    python -m torch.distributed.run --standalone --nproc-per-node 4 -m workshop.measure.bench strategies --size small
    # under SLURM, 2 nodes x 4 GPUs, inside an sbatch script or an salloc
    srun --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 python -m workshop.measure.bench allreduce --link ib-ndr-400
    # one GPU (one process: `single` refuses more ranks)
    srun --ntasks 1 --gpus 1 --cpus-per-task 8 python -m workshop.measure.bench single --model resnet18 \\
        --batch-size 512 --steps 50

The measurements themselves, for a notebook, are in workshop.measure.collectives (allreduce, collectives; algbw
and busbw as NCCL-tests define them), workshop.measure.throughput (ddp, step-split, strategies) and
workshop.measure.perf (single).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workshop import dist
from workshop.dist import DistEnv
from workshop.measure import collectives, metrics, perf, throughput
from workshop.models import MODELS

DEFAULT_SIZES = "4KiB,64KiB,1MiB,16MiB,64MiB"


# --- command line ---------------------------------------------------------------------------------

def _arg_sizes(text: str) -> list[int]:
    try:
        sizes = [collectives.parse_size(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    for s in sizes:
        if s % collectives.FLOAT32:
            raise argparse.ArgumentTypeError(f"size {s} bytes is not a multiple of 4 (the all-reduce is of float32)")
    return sizes


def _arg_models(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(unknown) or text!r}; choose from {', '.join(sorted(MODELS))}")
    return names


def _arg_int(minimum: int):
    """An argparse type: a whole number of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value
    return parse


_arg_positive, _arg_count = _arg_int(1), _arg_int(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workshop.measure.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("allreduce", help="all-reduce time, algbw and busbw against message size")
    p.add_argument("--sizes", type=_arg_sizes, default=_arg_sizes(DEFAULT_SIZES),
                   help=f"comma-separated message sizes (default {DEFAULT_SIZES})")
    p.add_argument("--iters", type=_arg_positive, default=20, help="timed iterations per size (default 20)")
    p.add_argument("--warmup", type=_arg_count, default=5, help="untimed iterations first (default 5)")
    p.add_argument("--link", choices=sorted(collectives.NOMINAL_LINKS),
                   help="show busbw as a fraction of this link's nominal peak")

    p = sub.add_parser("ddp", help="global samples/s of DDP training on synthetic data")
    p.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    p.add_argument("--batch-size", type=_arg_positive, default=64, help="micro_batch_size, per rank (default 64)")
    p.add_argument("--steps", type=_arg_positive, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=_arg_count, default=3, help="untimed steps first (default 3)")
    p.add_argument("--json", type=Path, help="also write the result here (rank 0)")

    p = sub.add_parser("step-split", help="compute against gradient all-reduce per model; efficiency bounds")
    p.add_argument("--models", type=_arg_models, default=_arg_models(",".join(MODELS)),
                   help=f"comma-separated model names (default {','.join(MODELS)})")
    p.add_argument("--batch-size", type=_arg_positive, default=32, help="micro_batch_size, per rank (default 32)")
    p.add_argument("--steps", type=_arg_positive, default=5, help="timed steps per model (default 5)")
    p.add_argument("--warmup", type=_arg_count, default=1, help="untimed steps first (default 1)")

    p = sub.add_parser("strategies", help="TinyGPT step time as compute alone, DDP and FSDP2 (checks the cost model)")
    p.add_argument("--size", choices=["cpu", "small", "gpu"], default="cpu", help="TinyGPT size (default cpu)")
    p.add_argument("--batch-size", type=_arg_positive, default=8, help="micro_batch_size in sequences, per rank (default 8)")
    p.add_argument("--seq-len", type=_arg_positive, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--steps", type=_arg_positive, default=10, help="timed steps per strategy (default 10)")
    p.add_argument("--warmup", type=_arg_count, default=3, help="untimed steps first (default 3)")

    p = sub.add_parser("collectives", help="all-reduce, all-gather and reduce-scatter time against size, in turns")
    p.add_argument("--sizes", type=_arg_sizes, default=_arg_sizes(DEFAULT_SIZES),
                   help=f"whole-tensor sizes, comma-separated, multiples of 4 x ranks bytes (default {DEFAULT_SIZES})")
    p.add_argument("--iters", type=_arg_positive, default=20, help="timed iterations per size (default 20)")
    p.add_argument("--warmup", type=_arg_count, default=5, help="untimed iterations first (default 5)")

    p = sub.add_parser("single", help="one device: samples/s, speedup and MFU of cumulative performance variants")
    p.add_argument("--model", type=_arg_model, default="small_cnn", help="small_cnn (default) or resnet18 (or vit_tiny)")
    p.add_argument("--batch-size", type=_arg_positive, default=32, help="samples per step (default 32; GPU: 512)")
    p.add_argument("--steps", type=_arg_positive, default=10, help="timed steps per variant (default 10; GPU: 50)")
    p.add_argument("--warmup", type=_arg_positive, default=2,
                   help="untimed steps first, at least 1: the first compiles, picks kernels, starts workers (default 2)")
    p.add_argument("--variants", type=_arg_variants, default=list(perf.VARIANTS),
                   help=f"comma-separated, each adding to those before it (default {','.join(perf.VARIANTS)})")
    p.add_argument("--num-workers", type=_arg_count, default=None,
                   help="DataLoader workers of the 'workers' variant (default: $SLURM_CPUS_PER_TASK - 1, else 2)")
    p.add_argument("--dataset", choices=["synthetic", "auto", "cifar10"], default="synthetic",
                   help="images to train on (default synthetic; auto: CIFAR-10 where staged)")
    p.add_argument("--compile-on-cpu", action="store_true",
                   help="measure torch.compile on CPU too (it builds C++ kernels: minutes)")
    return parser


def _arg_model(text: str) -> str:
    if text not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose from {', '.join(sorted(MODELS))}")
    return text


def _arg_variants(text: str) -> list[str]:
    try:
        return perf.check_variants(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _write(notebook: str, params: dict, results: dict, env: DistEnv) -> None:
    if env.is_main:
        path = metrics.write_record(metrics.run_dir(notebook, env), notebook=notebook, params=params, results=results, env=env)
        print(f"record: {metrics.display_path(path)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad arguments: a message and exit 2, before any rank waits
    env = dist.init()
    try:
        if args.command == "allreduce":
            if not env.is_distributed:
                print(collectives.format_allreduce([], env=env))
                return 0
            rows = collectives.allreduce_sweep(args.sizes, iters=args.iters, warmup=args.warmup, env=env)
            dist.print0(collectives.format_allreduce(rows, link=args.link, env=env))
            _write("bench-allreduce", {"sizes": args.sizes, "iters": args.iters, "warmup": args.warmup, "link": args.link},
                   {"rows": rows}, env)
        elif args.command == "ddp":
            result = throughput.ddp_throughput(args.model, args.batch_size, args.steps, args.warmup, env)
            dist.print0(throughput.format_ddp(result))
            if env.is_main and args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                metrics.atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
            _write("bench-ddp", {"model": args.model, "micro_batch_size": args.batch_size, "steps": args.steps,
                                 "warmup": args.warmup}, result, env)
        elif args.command == "strategies":
            result = throughput.strategy_steps(args.size, args.batch_size, args.seq_len, args.steps, args.warmup, env=env)
            dist.print0(throughput.format_strategies(result))
            _write("bench-strategies", {"size": args.size, "micro_batch_size": args.batch_size, "seq_len": args.seq_len,
                                        "steps": args.steps, "warmup": args.warmup}, result, env)
        elif args.command == "collectives":
            rows = collectives.collectives_sweep(args.sizes, iters=args.iters, warmup=args.warmup, env=env)
            dist.print0(collectives.format_collectives(rows, env=env))
            if env.is_distributed:
                _write("bench-collectives", {"sizes": args.sizes, "iters": args.iters, "warmup": args.warmup},
                       {"rows": rows}, env)
        elif args.command == "single":
            if env.is_distributed:
                raise SystemExit("workshop.measure.bench single measures one device: run it as one process, "
                                 "not under torchrun/srun -n N")
            num_workers = perf.default_num_workers(2) if args.num_workers is None else args.num_workers
            rows = perf.run_variants(args.model, args.batch_size, args.steps, args.warmup, args.variants, env,
                                     num_workers=num_workers, dataset=args.dataset, compile_on_cpu=args.compile_on_cpu)
            print(perf.format_variants(rows))
            _write("bench-single", {"model": args.model, "batch_size": args.batch_size, "steps": args.steps,
                                    "warmup": args.warmup, "variants": args.variants, "num_workers": num_workers,
                                    "dataset": args.dataset, "compile_on_cpu": args.compile_on_cpu},
                   perf.results(rows), env)
        elif args.command == "step-split":
            rows = throughput.step_split(args.models, args.batch_size, args.steps, env, warmup=args.warmup)
            dist.print0(throughput.format_step_split(rows, env=env))
            _write("bench-step-split", {"models": args.models, "micro_batch_size": args.batch_size, "steps": args.steps,
                                        "warmup": args.warmup},
                   {"rows": rows}, env)  # bounds from the split, not a measured DDP step: no measurement
        return 0
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
