"""Training steps timed across ranks: DDP's global samples/s, a step split into its compute and its gradients'
all-reduce, and one TinyGPT step as compute alone, under DDP and under FSDP2. Every function here is a collective:
every rank calls it, and the slowest rank's time counts.

    result = throughput.ddp_throughput("small_cnn", micro_batch_size=64, steps=20, warmup=3)
    rows = throughput.step_split(["small_cnn", "resnet18"], micro_batch_size=32, steps=5)
    result = throughput.strategy_steps("cpu", micro_batch_size=8, seq_len=64)
    result = throughput.run_ddp(2, "small_cnn", 32, steps=20, warmup=3, run=run)   # from a one-process notebook (04)
    rows = throughput.end_to_end_scaling("small_cnn", micro_batch_size=16, steps=10)  # 1 rank, then N, timed whole

From the command line: `python -m workshop.measure.bench ddp|step-split|strategies` (see there).
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import torch
import torch.distributed as tdist

from workshop import dist
from workshop.base.hardware import device_type
from workshop.base.tables import fmt_bytes, gib, table
from workshop.base.world import local_ranks
from workshop.ddp import apply_ddp
from workshop.dist import DistEnv
from workshop.estimate.steps import DDP_BUCKET_BYTES
from workshop.measure import memory, metrics
from workshop.measure.collectives import max_over_ranks, per_rank, timed_allreduce
from workshop.models import count_parameters, get_model, lm_loss
from workshop.train import seeded, train_step

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)  # CIFAR-shaped synthetic samples
STRATEGIES = ("ddp", "fsdp")


def _synthetic_batch(micro_batch_size: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of random CIFAR-shaped tensors already on the device, drawn from a generator of its own: the
    benchmarks measure the step, not the input pipeline."""
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(micro_batch_size, *IMAGE_SHAPE, device=device, generator=g)  # (B, 3, 32, 32)
    y = torch.randint(0, NUM_CLASSES, (micro_batch_size,), device=device, generator=g)  # (B,)
    return x, y


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


# --- DDP throughput ------------------------------------------------------------------------------

def ddp_throughput(model_name: str, micro_batch_size: int, steps: int, warmup: int, env: DistEnv | None = None) -> dict:
    """Global samples/s of `steps` SGD steps (after `warmup` untimed ones) of `model_name` wrapped
    in DistributedDataParallel, each rank on its own random batch already on its device. With one
    rank the same model runs without DDP: the one-device baseline. A collective: every rank calls it.

    samples_per_s = world_size * micro_batch_size * steps / time, the time of the slowest rank.
    Peak memory is per rank: CUDA bytes allocated on a GPU; on CPU the process's peak resident set
    (Python and the libraries included).
    """
    env = env or dist.get_env()
    with seeded(0, env.device):  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
        model = get_model(model_name, num_classes=NUM_CLASSES).to(env.device)
    parameters = count_parameters(model)
    if env.is_distributed:
        model = apply_ddp(model, env)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = _synthetic_batch(micro_batch_size, env.device, seed=1 + env.rank)  # each rank its own data, as with a sampler

    time_s = max_over_ranks([_timed_steps(model, optimizer, x, y, steps, warmup, env.device)], env)[0]
    peak = [int(b) for b in per_rank(float(metrics.peak_memory(env.device)), env)]
    return {
        "model": model_name,
        "parameters": parameters,
        "ddp": env.is_distributed,
        "world_size": env.world_size,
        "device": env.device,
        "backend": env.backend,
        "micro_batch_size": micro_batch_size,
        "global_batch_size": micro_batch_size * env.world_size,
        "steps": steps,
        "warmup": warmup,
        "time_s": time_s,
        "step_time_s": time_s / steps,
        "samples_per_s": metrics.throughput(env.world_size * micro_batch_size * steps, time_s),
        "peak_memory_bytes": peak,  # one entry per rank, in rank order
        # the keys of workshop.measure.report
        "throughput": metrics.throughput(env.world_size * micro_batch_size * steps, time_s),
        "samples_or_tokens": "samples",
        "strategy": "ddp" if env.is_distributed else "single",
    }


def _timed_steps(model, optimizer, x, y, steps: int, warmup: int, device, line_up=dist.barrier) -> float:
    """Seconds of `steps` of workshop.train's step after `warmup` untimed ones, timed as a block over one batch
    kept on the device: no loader, no divergence check. The first steps allocate buffers, pick kernels and build
    DDP's buckets; `line_up` then starts the timed steps of every rank together."""
    for _ in range(warmup):
        train_step(model, optimizer, x, y)
    metrics.reset_peak_memory(device)
    line_up()
    with metrics.Timer(device) as t:
        for _ in range(steps):
            train_step(model, optimizer, x, y)
    return t.elapsed


def end_to_end_scaling(model_name: str, micro_batch_size: int, steps: int, warmup: int = 1,
                       env: DistEnv | None = None) -> list[dict]:
    """Speedup as it is measured: the same work, `steps` SGD steps of `micro_batch_size` samples per rank, timed
    whole on one rank (rank 0 alone, no DDP, while the others wait) and then on every rank with DDP (as in
    `ddp_throughput`). Two measurements in the keys of workshop.measure.report, strategies "single" and "ddp":
    their throughputs' ratio is the speedup this machine delivers, communication, waiting and shared cores
    included (weak scaling: the batch per rank stays). One rank: the single measurement only. A collective."""
    env = env or dist.get_env()
    x, y = _synthetic_batch(micro_batch_size, env.device, seed=1)
    alone = 0.0
    if env.rank == 0:
        with seeded(0, env.device):
            model = get_model(model_name, num_classes=NUM_CLASSES).to(env.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        alone = _timed_steps(model, optimizer, x, y, steps, warmup, env.device, line_up=lambda: None)
        del model, optimizer
    alone = per_rank(alone, env)[0]  # rank 0's time, on every rank (the others waited here)
    common = {"model": model_name, "samples_or_tokens": "samples", "micro_batch_size": micro_batch_size,
              "steps": steps, "timed": "whole"}
    rows = [{**common, "strategy": "single", "world_size": 1, "global_batch_size": micro_batch_size,
             "wall_time_s": alone, "step_time_s": alone / steps,
             "throughput": metrics.throughput(micro_batch_size * steps, alone)}]
    if env.is_distributed:
        ddp = ddp_throughput(model_name, micro_batch_size, steps, warmup, env)
        rows.append({**common, "strategy": "ddp", "world_size": env.world_size,
                     "global_batch_size": ddp["global_batch_size"], "wall_time_s": ddp["time_s"],
                     "step_time_s": ddp["step_time_s"], "throughput": ddp["throughput"]})
    return rows


def format_scaling(rows: list[dict]) -> str:
    """The measured speedup and efficiency of `end_to_end_scaling`'s rows against the one-rank row."""
    one = rows[0]["throughput"]
    body = [[r["strategy"], r["world_size"], f"{r['wall_time_s']:.2f}", _ms(r["step_time_s"]),
             f"{r['throughput']:,.1f}", f"{r['throughput'] / one:.2f}x", f"{r['throughput'] / one / r['world_size']:.0%}"]
            for r in rows]
    return (f"{rows[0]['model']}: {rows[0]['steps']} steps of {rows[0]['micro_batch_size']} samples per rank, timed whole\n"
            + table(["strategy", "ranks", "time (s)", "step (ms)", "samples/s", "speedup", "efficiency"], body))


def format_ddp(result: dict) -> str:
    how = (f"DistributedDataParallel on {result['world_size']} ranks ({result['backend']}, {result['device']})"
           if result["ddp"] else f"one rank, no DDP: the one-device baseline ({result['device']})")
    peaks = ", ".join(gib(b, 2) for b in result["peak_memory_bytes"])
    return "\n".join([
        f"{result['model']} ({result['parameters']:,} parameters), {how}",
        f"micro_batch_size {result['micro_batch_size']}, global_batch_size {result['global_batch_size']}, "
        f"{result['steps']} steps after {result['warmup']} warm-up",
        f"throughput  {result['samples_per_s']:.1f} samples/s (global)",
        f"step time   {_ms(result['step_time_s'])} ms",
        f"peak memory {peaks} (per rank)",
    ])


def run_ddp(nproc: int, model_name: str, micro_batch_size: int, steps: int, warmup: int, run: Path,
            cpu: bool = False) -> dict:
    """`ddp_throughput` as a separate program on `nproc` ranks started by torchrun on this machine,
    from a one-process notebook (04): its result, its output in run/ddp.log, its record in run/ddp/.
    Each rank gets one intra-op thread, so on CPU a rank stands for one core, as a GPU for one device.
    `cpu`: on the CPU even where there are GPUs."""
    Path(run).mkdir(parents=True, exist_ok=True)
    out, log = Path(run) / "ddp.json", Path(run) / "ddp.log"
    cmd, environ = local_ranks(nproc, "workshop.measure.bench", "ddp", "--model", model_name, "--batch-size",
                               micro_batch_size, "--steps", steps, "--warmup", warmup, "--json", out, run="module")
    environ.update(OMP_NUM_THREADS="1", WORKSHOP_RUN_DIR=str(Path(run) / "ddp"))
    if cpu:
        environ["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"the DDP run failed with exit code {proc.returncode}; its output, also in "
                           f"{metrics.display_path(log)}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(out.read_text())


# --- compute against communication ----------------------------------------------------------------

def step_split(model_names: list[str], micro_batch_size: int, steps: int, env: DistEnv | None = None,
               warmup: int = 1) -> list[dict]:
    """Per model: the compute of one training step (forward, backward, SGD step; no communication)
    and the all-reduce of one buffer as large as its gradients, each timed every step on every rank,
    the slowest rank counting, the median over `steps` reported. A collective: every rank calls it.

    The bounds on scaling efficiency (time of one rank's step alone / time of a DDP step):
    - no overlap: compute / (compute + comm), communication after backward (allreduce_gradients);
    - perfect overlap: compute / max(compute, comm), all of it hidden behind backward (DDP at best).
    With one rank comm_s is 0 and both are 1.
    """
    env = env or dist.get_env()
    rows = []
    for name in model_names:
        with seeded(0, env.device):
            model = get_model(name, num_classes=NUM_CLASSES).to(env.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = _synthetic_batch(micro_batch_size, env.device, seed=1 + env.rank)
        grads = [p for p in model.parameters() if p.requires_grad]
        grad_bytes = sum(p.numel() * p.element_size() for p in grads)
        # one flat buffer, like a single DDP bucket holding every gradient
        buf = torch.zeros(sum(p.numel() for p in grads), dtype=grads[0].dtype, device=env.device)

        compute, comm = [], []
        for i in range(warmup + steps):
            dist.barrier()
            with metrics.Timer(env.device) as t:
                train_step(model, optimizer, x, y)
            comm_s = timed_allreduce(buf, env) if env.is_distributed else 0.0
            if i >= warmup:
                compute.append(t.elapsed)
                comm.append(comm_s)
        compute_s = statistics.median(max_over_ranks(compute, env))
        comm_s = statistics.median(max_over_ranks(comm, env))
        rows.append({
            "model": name,
            "parameters": count_parameters(model),
            "grad_bytes": grad_bytes,
            "world_size": env.world_size,
            "micro_batch_size": micro_batch_size,
            "compute_s": compute_s,
            "comm_s": comm_s,
            "efficiency_no_overlap": compute_s / (compute_s + comm_s),
            "efficiency_overlap": compute_s / max(compute_s, comm_s),
        })
        del model, optimizer, buf
    return rows


def format_step_split(rows: list[dict], env: DistEnv | None = None) -> str:
    env = env or dist.get_env()
    world_size = rows[0]["world_size"] if rows else env.world_size
    header = ["model", "parameters", "grad size", "compute (ms)", "all-reduce (ms)", "comm/compute", "eff. no overlap",
              "eff. overlap"]
    body = [[r["model"], f"{r['parameters']:,}", fmt_bytes(r["grad_bytes"]), _ms(r["compute_s"]), _ms(r["comm_s"]),
             f"{r['comm_s'] / r['compute_s']:.2f}", f"{r['efficiency_no_overlap']:.1%}", f"{r['efficiency_overlap']:.1%}"]
            for r in rows]
    lines = [f"one training step split into compute and gradient all-reduce, {world_size} rank(s) ({env.backend}, "
             f"{env.device});\nmedian over steps of the slowest rank; eff.: the bounds these parts give, not a step timed "
             "whole", table(header, body)]
    if world_size == 1:
        lines.append("one rank: no all-reduce, so communication is 0. Run with N ranks to measure it: "
                     "python -m torch.distributed.run --standalone --nproc-per-node N -m workshop.measure.bench step-split")
    return "\n".join(lines)


# --- DDP against FSDP ------------------------------------------------------------------------------

def _lm_step(model, optimizer, tokens) -> None:
    """TinyGPT's next-token step (workshop.train steps image classifiers): (B, T) inputs, the next tokens as targets."""
    optimizer.zero_grad(set_to_none=True)
    lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    optimizer.step()


def strategy_steps(size: str = "cpu", micro_batch_size: int = 8, seq_len: int = 64, steps: int = 10, warmup: int = 3,
                   strategies=STRATEGIES, env: DistEnv | None = None) -> dict:
    """Step times of TinyGPT(`size`) trained with AdamW on random tokens, every rank at once (a collective):

    - single: the plain model on every rank, no communication: the compute of a step (on one rank,
      the one-device baseline; on N ranks, `compute_step_s`, not a measurement of its own);
    - ddp: DistributedDataParallel, gradients all-reduced in 25 MiB buckets during backward;
    - fsdp: FSDP2, `fully_shard` on each block, then on the root: parameters all-gathered per block
      in forward and backward, gradients reduce-scattered.

    On N ranks each wrapper also runs on a process group of its rank alone ("<strategy>-alone"):
    its own work (hooks, bucket and all-gather copies) with nobody to communicate with. The
    strategies take turns, one step each, so that a machine busy with other work slows them alike;
    each step starts after a barrier and the slowest rank's time counts; the median over `steps`
    (after `warmup` rounds) is reported. State bytes per rank: parameters, gradients and
    AdamW's states that the rank holds (`workshop.measure.memory.measure`). Returns the record's results, in the
    keys of workshop.measure.report (one measurement per strategy), with what workshop.estimate.costmodel needs."""
    from torch.distributed.device_mesh import DeviceMesh

    from workshop.models import tinygpt
    from workshop.sharding import apply_fsdp

    env = env or dist.get_env()
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown}; choose from {', '.join(STRATEGIES)}")

    def fresh():
        with seeded(0, env.device):
            return tinygpt(size, max_seq_len=seq_len).to(env.device)

    def wrap(strategy, group):
        model = fresh()
        if strategy == "ddp":
            return apply_ddp(model, env, bucket_cap_mb=DDP_BUCKET_BYTES / 2**20, process_group=group)
        mesh = DeviceMesh.from_group(group, device_type(env.device)) if group is not None else None
        return apply_fsdp(model, mesh)

    models = {"single": fresh()}
    parameters = count_parameters(models["single"])
    param_bytes = memory.param_bytes(models["single"])
    units = len(models["single"].layers) + 1
    alone = tdist.new_subgroups(group_size=1)[0] if env.is_distributed else None  # each rank a group of its own
    for strategy in strategies:
        if env.is_distributed:  # the wrapper's own work (hooks, copies), with nobody to communicate with
            models[f"{strategy}-alone"] = wrap(strategy, alone)
        models[strategy] = wrap(strategy, None)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    g = torch.Generator(env.device).manual_seed(1 + env.rank)  # each rank its own tokens, as with a DistributedSampler
    tokens = torch.randint(0, 256, (micro_batch_size, seq_len + 1), device=env.device, generator=g)  # (B, T + 1)

    times = {name: [] for name in models}
    for i in range(warmup + steps):
        for name, model in models.items():
            dist.barrier()
            with metrics.Timer(env.device) as t:
                _lm_step(model, optimizers[name], tokens)
            if i >= warmup:
                times[name].append(t.elapsed)
    tokens_per_step = micro_batch_size * seq_len * env.world_size
    step_s = {name: statistics.median(max_over_ranks(times[name], env)) for name in models}
    rows = [{"strategy": name, "step_time_s": step_s[name], "throughput": tokens_per_step / step_s[name],
             "state_bytes_per_rank": [int(b) for b in per_rank(memory.measure(models[name], optimizers[name]).total, env)]}
            for name in ["single", *strategies]]
    return {"model": f"tinygpt-{size}", "samples_or_tokens": "tokens", "world_size": env.world_size,
            "micro_batch_size": micro_batch_size, "global_batch_size": micro_batch_size * env.world_size, "seq_len": seq_len,
            "parameters": parameters, "param_bytes": param_bytes, "bucket_bytes": DDP_BUCKET_BYTES, "fsdp_units": units,
            "steps": steps, "warmup": warmup, "device": env.device, "backend": env.backend,
            "compute_step_s": step_s["single"],
            "alone_step_s": {s: step_s[f"{s}-alone"] for s in strategies if f"{s}-alone" in step_s},
            # the report compares training runs: on N ranks the plain model's step is the compute alone, not a run
            "measurements": rows if not env.is_distributed else rows[1:]}


def format_strategies(result: dict) -> str:
    body = [[m["strategy"], _ms(m["step_time_s"]), f"{m['throughput']:.0f}", gib(max(m["state_bytes_per_rank"]), 3)]
            for m in result["measurements"]]
    return "\n".join([
        f"{result['model']} ({result['parameters']:,} parameters, {fmt_bytes(result['param_bytes'])}), "
        f"{result['world_size']} rank(s) ({result['backend']}, {result['device']}), "
        f"micro batch {result['micro_batch_size']} x {result['seq_len']} tokens; "
        f"median of the slowest rank over {result['steps']} steps",
        f"compute alone (the plain model on every rank, no communication): {_ms(result['compute_step_s'])} ms per step"
        + "".join(f"; {k} on a group of one rank: {_ms(v)} ms" for k, v in result["alone_step_s"].items()),
        table(["strategy", "step (ms)", "tokens/s", "state per rank"], body)])
