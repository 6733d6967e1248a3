"""Notebook 06's bench: one TinyGPT trained in several sharded versions, each held against one process trained on
the same global batches, timed and measured (bytes per rank), DeepSpeed's ZeRO stages timed against DDP, and the
run's record. The sharding itself (ZeRO-1 by hand, `ZeroRedundancyOptimizer`, `fully_shard`, `deepspeed.initialize`)
is written in the notebook; this is what every version repeats.

    bench = Bench(env, "cpu", seed=0, lr=3e-3, steps=3, shard=loader)   # this rank's batches
    bench.hold_against(reference, first_batch)                          # the one-process model, its first batch
    measured = bench.train_measured(model, optimizer, loader)           # time, every rank's bytes after the steps
    bench.same_first_grads(sharded_model), bench.same_weights(model)    # check.Match, every rank agreeing

Every rank calls every method that trains, measures or compares (collectives inside).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from workshop import check, ddp, models, sharding
from workshop.dist import DistEnv
from workshop.measure import collectives, memory, metrics
from workshop.train import seeded


@dataclass
class Bench:
    """The versions' common ground: the model they start from (`fresh_model`), their plain training loop, and the
    comparisons with the one-process reference (set by `hold_against`)."""

    env: DistEnv
    size: str  # TinyGPT size
    seed: int  # seeds the weights: every version starts from the same ones
    lr: float  # AdamW's learning rate
    steps: int  # optimizer steps each version trains
    shard: Iterable  # this rank's batches (a loader over its windows)
    reference: nn.Module | None = None
    reference_grads: list[torch.Tensor] | None = None

    def fresh_model(self) -> nn.Module:
        """A TinyGPT with the seed's weights, on this rank's device (the caller's random stream left as it was)."""
        with seeded(self.seed, self.env.device):
            return models.tinygpt(self.size).to(self.env.device)

    def train(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable, n: int | None = None):
        """`n` (default `steps`) optimizer steps on `loader`'s batches; the gradients stay after the last one (so they
        can be measured). Returns this rank's losses."""
        losses = []
        for (x, y), _ in zip(loader, range(self.steps if n is None else n)):
            optimizer.zero_grad()
            loss = models.lm_loss(model(x.to(self.env.device)), y.to(self.env.device))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    def train_measured(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable) -> memory.Measured:
        """`train`, timed, then every rank's bytes of parameters, gradients and optimizer states (memory.measure)."""
        return memory.train_and_measure(lambda: self.train(model, optimizer, loader), model, optimizer, self.env.device)

    def first_grads(self, model: nn.Module, batch) -> nn.Module:
        """One backward of an untrained `model` on `batch`: the first step's gradients, kept in the model."""
        x, y = batch
        models.lm_loss(model(x.to(self.env.device)), y.to(self.env.device)).backward()
        return model

    def hold_against(self, reference: nn.Module, first_batch) -> None:
        """The one-process model every version must end with, and the gradients of a fresh one on the global batch
        `first_batch` (what every version's first backward must reduce to)."""
        self.reference = reference
        self.reference_grads = [p.grad.clone() for p in self.first_grads(self.fresh_model(), first_batch).parameters()]

    def _reference(self) -> None:
        if self.reference is None or self.reference_grads is None:
            raise RuntimeError("no reference yet: train one process on the global batches, then bench.hold_against("
                               "reference, first_batch)")

    def same_weights(self, model: nn.Module) -> check.Match:
        """Does `model` hold the reference's weights? Adam divides each gradient element by its running RMS: where
        a gradient is near zero, the rounding of a differently ordered sum moves the update by a visible fraction
        of lr, so the weights agree within lr / 10 (the first gradients are compared tightly instead)."""
        self._reference()
        return check.same_weights(model, self.reference, rtol=1e-3, atol=self.lr / 10)

    def same_first_grads(self, model: nn.Module) -> check.Match:
        """The first backward of an untrained sharded `model` on this rank's first batch against the reference's
        gradients, tightly: Adam's division hides a wrong gradient scale (a missing average over ranks)."""
        self._reference()
        return check.same_grads(self.first_grads(model, next(iter(self.shard))), self.reference_grads,
                                rtol=1e-4, atol=1e-7)

    # --- DeepSpeed: its engine runs forward, backward (reduce, keep my partition) and step ---------------------

    def deepspeed_engine(self, config: dict):
        """A fresh model and AdamW through `deepspeed.initialize` (sharding.apply_deepspeed) with `config`."""
        model = self.fresh_model()
        engine, _ = sharding.apply_deepspeed(model, torch.optim.AdamW(model.parameters(), lr=self.lr), config, self.env)
        return engine

    def train_deepspeed(self, engine, loader: Iterable) -> memory.Measured:
        """`steps` steps of DeepSpeed's loop (call the engine, `engine.backward(loss)`: reduce and keep my partition,
        `engine.step()`), timed, with every rank's bytes after the last backward (memory.measure_deepspeed): its
        step frees the gradient partition."""
        def steps():
            held = []
            for (x, y), i in zip(loader, range(self.steps)):
                engine.backward(models.lm_loss(engine(x.to(self.env.device)), y.to(self.env.device)))
                if i == self.steps - 1:
                    held = memory.gather(memory.measure_deepspeed(engine))
                engine.step()  # step my partition of the fp32 copy; gather the parameters (stages 1, 2)
            return held

        return memory.train_and_measure(steps, device=self.env.device)

    def deepspeed_first_grads(self, config: dict) -> check.Match:
        """The first backward of a fresh engine with `config` on this rank's first batch: every partition gathered
        (deepspeed.utils.safe_get_full_grad) against the reference's gradients."""
        from deepspeed.utils import safe_get_full_grad

        self._reference()
        engine = self.deepspeed_engine(config)
        x, y = next(iter(self.shard))
        engine.backward(models.lm_loss(engine(x.to(self.env.device)), y.to(self.env.device)))
        grads = ((f"{name}.grad", safe_get_full_grad(p), g)
                 for (name, p), g in zip(engine.module.named_parameters(), self.reference_grads))
        return check.compare(grads, rtol=1e-4, atol=1e-7)

    def zero_against_ddp(self, configs: dict[int, dict], passes: int = 3) -> dict[str, dict]:
        """DDP and DeepSpeed's stages (`configs`: stage -> config) on the same `steps` + 2 batches of this rank: a
        warm-up step (buckets and buffers are built in the first), `passes` passes over the next `steps` timed
        (a steadier time), then the collectives one more step calls and the bytes of the tensors they carry
        (collectives.CollectiveCounter). Returns version -> step_time_s, collectives, collective_bytes."""
        device = self.env.device
        batches = [(x.to(device), y.to(device)) for (x, y), _ in zip(self.shard, range(self.steps + 2))]
        ddp_model = ddp.apply_ddp(self.fresh_model(), self.env)
        ddp_optimizer = torch.optim.AdamW(ddp_model.parameters(), lr=self.lr)

        def ddp_step(x, y):
            ddp_optimizer.zero_grad()
            models.lm_loss(ddp_model(x), y).backward()
            ddp_optimizer.step()

        def zero_step(engine):
            def step(x, y):
                engine.backward(models.lm_loss(engine(x), y))
                engine.step()
            return step

        steps = {"ddp": ddp_step, **{f"zero{s}": zero_step(self.deepspeed_engine(c)) for s, c in configs.items()}}
        rows = {}
        for version, step in steps.items():
            step(*batches[0])
            timed = batches[1:-1] * passes
            with metrics.Timer(device) as timer:
                for x, y in timed:
                    step(x, y)
            with collectives.CollectiveCounter() as counted:
                step(*batches[-1])
            rows[version] = {"step_time_s": timer.elapsed / len(timed), "collectives": counted.calls,
                             "collective_bytes": sum(c["bytes"] for c in counted.calls.values())}
        return rows


def format_zero_against_ddp(rows: dict[str, dict]) -> str:
    """`Bench.zero_against_ddp`'s rows as text: step time and collective bytes, each also as a multiple of DDP's
    (nan with one process, which sends nothing), and every collective's calls (bytes)."""
    base = rows["ddp"]
    base_bytes = base["collective_bytes"] or float("nan")
    lines = [f"{'version':<8}{'step':>10}{'x DDP':>7}{'bytes':>11}{'x DDP':>7}  collectives per step: calls (bytes)"]
    for version, row in rows.items():
        calls = ", ".join(f"{name} {c['calls']} ({metrics.fmt_bytes(c['bytes'])})"
                          for name, c in row["collectives"].items())
        step, sent = row["step_time_s"], row["collective_bytes"]
        lines.append(f"{version:<8}{step * 1e3:>7.1f} ms{step / base['step_time_s']:>7.2f}"
                     f"{metrics.fmt_bytes(sent):>11}{sent / base_bytes:>7.2f}  {calls}")
    return "\n".join(lines)


def format_parts(rank: dict) -> str:
    """One rank's bytes (a `RankMemory.as_dict()`) by part: "params 3.3 MiB, grads 3.3 MiB, optimizer 6.6 MiB"."""
    return ", ".join(f"{part} {metrics.fmt_bytes(rank[part])}" for part in memory.PARTS)


def measurements(measured: dict[str, memory.Measured], params: dict) -> list[dict]:
    """The record's "measurements" (what the scaling report reads), one per version: rank 0's tokens per second
    (the first steps include start-up: compare versions, not absolute speed) and the memory per rank, the CUDA peak
    on a GPU, on CPU the tensor bytes of the largest rank (the process's resident set is no measure). `params`: the
    record's (size, steps, global_batch_size, micro_batch_size, seq_len)."""
    steps, tokens = params["steps"], params["global_batch_size"] * params["seq_len"]
    return [{"strategy": version, "model": f"tinygpt-{params['size']}", "samples_or_tokens": "tokens",
             "throughput": steps * tokens / m.seconds, "step_time_s": m.seconds / steps,
             "global_batch_size": params["global_batch_size"], "micro_batch_size": params["micro_batch_size"],
             "peak_memory_bytes": m.peak_bytes or max(r["total"] for r in m.per_rank),
             "memory_kind": "cuda" if m.peak_bytes else "tensors"}
            for version, m in measured.items()]


def results(params: dict, *, checks: dict, measured: dict[str, memory.Measured], rows: list[dict], memory_match,
            held: dict, checkpoint_match, reference_losses: list[float], zero_against_ddp: dict) -> dict:
    """Notebook 06's record results: every check's verdict, the memory rows against the ZeRO model, every rank's
    bytes per version, the parameters held after forward (`held`: reshard_after_forward -> bytes), DeepSpeed's
    stages against DDP, and the `measurements` of the record's `params`."""
    return {"matches_single_process": {name: bool(match) for name, match in checks.items()}, "memory": rows,
            "memory_agrees": bool(memory_match), "measured_per_rank": {v: m.per_rank for v, m in measured.items()},
            "params_held_after_forward": {"reshard": held[True], "no_reshard": held[False]},
            "checkpoint_round_trip": bool(checkpoint_match), "reference_losses": reference_losses,
            "zero_against_ddp": zero_against_ddp, "measurements": measurements(measured, params)}
