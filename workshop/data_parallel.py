"""nn.DataParallel's steps written out, so that they run, and can be timed, on CPU.

`torch.nn.parallel.replicate`, `scatter`, `parallel_apply` and `gather`, which nn.DataParallel is
made of, refuse CPU devices (they copy between GPUs). These do the same on one machine's CPU, one
Python thread standing for one GPU (notebook 04 writes the step with them):

    replicas = replicate(model, n)                 # n copies of the weights, on every step
    outs = parallel_apply(forward, zip(replicas, scatter(x, n)))   # chunk i on replica i, one thread each
    logits = gather(outs)                          # (B, classes) on the first device, the loss there
    ... backward of each replica in its thread, then reduce_gradients(replicas, model): the sum
    lands in the master copy, where the one optimizer steps.

Threads share one interpreter: the GIL lets one of them run Python at a time, and only the
kernels that release it (convolutions, matrix products) run side by side. That, the copy on every
step and the gather onto one device are what DDP's one process per device avoids (Li et al.,
"PyTorch Distributed", VLDB 2020, section 2; PyTorch's DDP notes).
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Callable, Iterable

import torch
from torch import nn

from workshop.base.tables import wrap


def replicate(module: nn.Module, n: int) -> list[nn.Module]:
    """`n` copies of `module`, parameters and buffers included, without gradients (DataParallel's
    `Broadcast` of the weights). Built anew on every step: the optimizer has changed the weights."""
    replicas = [copy.deepcopy(module) for _ in range(n)]
    for replica in replicas:
        for p in replica.parameters():
            p.grad = None
    return replicas


def scatter(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    """`t` split along dim 0 into `n` chunks, sizes differing by at most one: (B, ...) -> n x (~B/n, ...)."""
    if t.shape[0] < n:
        raise ValueError(f"a batch of {t.shape[0]} cannot feed {n} replicas: give each at least one sample")
    return list(t.tensor_split(n))


def parallel_apply(fn: Callable, args: Iterable[tuple]) -> list:
    """fn(*a) for each tuple `a`, each in its own thread, as DataParallel runs its replicas; the
    results in order. An exception in a thread is raised here. Grad mode and the number of
    intra-op threads are the caller's (a new thread would otherwise start with the defaults)."""
    args = list(args)
    results, errors = [None] * len(args), [None] * len(args)
    grad_enabled, num_threads = torch.is_grad_enabled(), torch.get_num_threads()

    def work(i: int, a: tuple) -> None:
        try:
            torch.set_num_threads(num_threads)
            with torch.set_grad_enabled(grad_enabled):
                results[i] = fn(*a)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread below
            errors[i] = err

    threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(args)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for err in errors:
        if err is not None:
            raise err
    return results


def gather(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The replicas' outputs concatenated on the first device: n x (B/n, C) -> (B, C)."""
    return torch.cat(outputs)


def reduce_gradients(replicas: list[nn.Module], master: nn.Module) -> None:
    """The replicas' gradients summed into the master copy (DataParallel's `ReduceAddCoalesced`).
    A sum, not a mean: the loss is the mean over the whole batch, so each chunk's gradient already
    carries its 1/B."""
    for p, *copies in zip(master.parameters(), *(r.parameters() for r in replicas)):
        grads = [c.grad for c in copies if c.grad is not None]
        if grads:
            p.grad = torch.stack(grads).sum(0)


class Laps:
    """Seconds per named phase, summed over steps: `lap(name)` charges the time since the last lap.

        laps = Laps(); ...; laps.lap("replicate"); ...; laps.lap("forward")
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start()

    def start(self) -> None:
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now

    def total(self) -> float:
        return sum(self.seconds.values())


def cpu_comparison(one_process_s: float, laps: Laps, steps: int, ddp: dict) -> dict:
    """Notebook 04's CPU measurement as one dict (the record's): seconds per step of one process,
    of DataParallel by hand (and of each of its phases), and of DDP (`workshop.measure.throughput.run_ddp`'s result)."""
    return {"one_process_step_s": one_process_s, "dp_by_hand_step_s": laps.total() / steps,
            "dp_by_hand_phases_s": {name: s / steps for name, s in laps.seconds.items()},
            "ddp_step_s": ddp["step_time_s"], "ddp_world_size": ddp["world_size"],
            "global_batch_size": ddp["global_batch_size"]}


def format_cpu_comparison(result: dict, replicas: int) -> str:
    """The table of `cpu_comparison`, and one sentence that reads it."""
    one, dp, ddp = result["one_process_step_s"], result["dp_by_hand_step_s"], result["ddp_step_s"]
    phases = result["dp_by_hand_phases_s"]
    rows = [("one process, 1 core", one), (f"DataParallel by hand, {replicas} threads", dp),
            (f"DDP, {result['ddp_world_size']} ranks", ddp)]
    lines = [f"global batch {result['global_batch_size']}, one intra-op thread per replica or rank",
             f"{'':32s} {'ms/step':>8} {'speed-up':>9}"]
    lines += [f"{name:32s} {s * 1e3:8.1f} {one / s:8.2f}x" for name, s in rows]
    lines += ["", "DataParallel by hand, per step:"]
    lines += [f"  {name:30s} {s * 1e3:8.1f} ms {s / dp:6.1%}" for name, s in phases.items()]
    overhead = sum(s for name, s in phases.items() if "threads" not in name and name != "optimizer step")
    threads = sum(s for name, s in phases.items() if "threads" in name)
    lines += ["", wrap(
        f"Split perfectly over {replicas} cores, one process's step would take {one / replicas * 1e3:.0f} ms. "
        f"DataParallel by hand took {dp * 1e3:.0f} ms ({one / dp:.2f}x one process): the threads' forward and "
        f"backward alone took {threads * 1e3:.0f} ms (threads of one interpreter take turns at its GIL), and "
        f"copying the model, scattering, gathering and reducing on the first device {overhead * 1e3:.0f} ms "
        f"({overhead / dp:.0%}). "
        f"DDP's {result['ddp_world_size']} processes took {ddp * 1e3:.0f} ms ({one / ddp:.2f}x one process).")]
    return "\n".join(lines)


def check_reduce(reduce, make_model: Callable[[], nn.Module]):
    """Exercise 04.1: a student's `reduce(replicas, model)` must set each of `model`'s gradients to the sum of the
    replicas' (made-up gradients, on 2 and 3 replicas). The hint names a mean, one replica taken alone, a gradient
    left unset."""
    from workshop.check import Match

    for n in (2, 3):
        model = make_model()
        replicas = replicate(model, n)
        g = torch.Generator().manual_seed(n)
        for replica in replicas:
            for p in replica.parameters():
                p.grad = torch.randn(p.shape, generator=g)
        reduce(replicas, model)
        for (name, p), *copies in zip(model.named_parameters(), *(r.parameters() for r in replicas)):
            want = torch.stack([c.grad for c in copies]).sum(0)
            if p.grad is None:
                return Match(False, f"{name}.grad is unset on the model after your reduce: the optimizer steps the model, "
                                    "so its .grad must hold the sum")
            if torch.allclose(p.grad, want, rtol=1e-5, atol=1e-6):
                continue
            if torch.allclose(p.grad * n, want, rtol=1e-5, atol=1e-6):
                return Match(False, f"with {n} replicas {name}.grad is the mean of theirs: sum them, the loss's gradient "
                                    "already divides by the whole batch")
            if any(torch.allclose(p.grad, c.grad) for c in copies):
                return Match(False, f"with {n} replicas {name}.grad is one replica's: sum over all of them")
            return Match(False, f"with {n} replicas {name}.grad is not the sum of theirs")
    return Match(True)
