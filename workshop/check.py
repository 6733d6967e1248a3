"""The checks a lesson ends with: a parallel version against the one-process reference.

A comparison returns a `Match` that every rank agrees on (the worst rank decides), and says what
differs: which tensor, by how much, against which tolerance. `require` prints one line per check
on rank 0 and raises `CheckFailed` on every rank when one of them failed, so a notebook run by
`scripts/run_notebook.sh` exits non-zero and names the check cell instead of printing False.

    match = check.same_weights(model, reference, rtol=1e-4, atol=1e-5)
    check.require({"torch DDP": match, "Lightning DDP": lightning_match})
    # torch DDP matches the single-process run:     True
    # Lightning DDP matches the single-process run: True

A check of figures rather than tensors carries them, so that a failure says what was measured, the
bar it missed and what to try; a refusal is checked by calling the code that must refuse:

    check.require({"plain loop": check.that(acc > bar, f"accuracy {acc:.1%}, bar {bar:.1%}: try a lower lr")},
                  claim="above chance")
    check.require({"tp 3 of 4 heads": check.refuses(lambda: tp.check_tp_size(model, 3), ValueError, "choose")},
                  claim="is refused")

Every rank must call the comparisons (they all-reduce the verdict); a process of one agrees with itself.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as tdist


class CheckFailed(AssertionError):
    """A parallel version does not compute what the one-process reference computes."""


class ExerciseFailed(CheckFailed):
    """A student's answer to an exercise is missing or does not match the reference: the message names the
    exercise and gives one hint."""


class Diverged(RuntimeError):
    """The loss became NaN or infinite: training cannot recover from it, so it stops."""


def stop_if_diverged(loss, step: int, lr: float | None = None) -> None:
    """Raise Diverged on every rank, together, when the loss of `step` is NaN or infinite on any rank.
    Every rank must call it at every step it checks (one scalar all-reduce): a rank that stopped alone
    would leave the others waiting in their next collective until the timeout."""
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    bad = torch.tensor([0.0 if math.isfinite(value) else 1.0])
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(bad, op=tdist.ReduceOp.MAX)
    if bad.item():
        here = f"the loss is {value}" if not math.isfinite(value) else "another rank's loss is not finite"
        raise Diverged(f"training diverged at step {step}: {here}" + (f" (lr {lr:g})" if lr is not None else "")
                       + ". Nothing after this step can be trusted; try a learning rate 10 times lower, a warm-up, "
                       "or gradient clipping (torch.nn.utils.clip_grad_norm_)")


@dataclass(frozen=True)
class Match:
    ok: bool
    detail: str = ""  # what differs most, when not ok

    def __bool__(self) -> bool:
        return self.ok


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank's device: a DTensor's shards gathered (every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def agree(match: Match) -> Match:
    """The verdict of all ranks: ok only where every rank is ok. A rank that is ok itself reports
    that another rank differs."""
    if not tdist.is_available() or not tdist.is_initialized():
        return match
    verdict = torch.tensor(float(match.ok))
    tdist.all_reduce(verdict, op=tdist.ReduceOp.MIN)
    if verdict.item() == 1.0:
        return match
    return match if not match.ok else Match(False, "equal on this rank, different on another")


def compare(pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]], rtol: float, atol: float) -> Match:
    """`(name, actual, expected)` triples, compared elementwise as torch.allclose does
    (|actual - expected| <= atol + rtol |expected|); the detail names the tensor that is furthest
    beyond its tolerance. DTensors are gathered; every rank must call it."""
    worst_name, worst_excess, worst_diff = None, 0.0, 0.0
    for name, actual, expected in pairs:
        a = full(actual).detach().float().cpu()
        e = full(expected).detach().float().cpu()
        if a.shape != e.shape:
            return agree(Match(False, f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"))
        diff = (a - e).abs()
        excess = (diff - (atol + rtol * e.abs())).max().item() if diff.numel() else 0.0
        if not excess <= 0 and (worst_name is None or not excess <= worst_excess):  # NaN counts as worst
            worst_name, worst_excess, worst_diff = name, excess, diff.max().item()
    if worst_name is None:
        return agree(Match(True))
    return agree(Match(False, f"{worst_name} differs by up to {worst_diff:.3g} (rtol {rtol:g}, atol {atol:g})"))


def same_weights(model: torch.nn.Module, reference: torch.nn.Module | Mapping[str, torch.Tensor], rtol: float = 1e-4,
                 atol: float = 1e-5) -> Match:
    """Does `model` (plain, wrapped by DDP, or sharded into DTensors) hold the reference's weights?
    Parameters are matched by position; a wrapper's prefix ("module.") does not matter."""
    expected = dict(reference.named_parameters()) if isinstance(reference, torch.nn.Module) else dict(reference)
    actual = list(model.named_parameters())
    if len(actual) != len(expected):
        return agree(Match(False, f"{len(actual)} parameter tensors, the reference has {len(expected)}"))
    return compare(((name, p, e) for (name, e), (_, p) in zip(expected.items(), actual)), rtol, atol)


def same_grads(model: torch.nn.Module, expected: Mapping[str, torch.Tensor] | Iterable[torch.Tensor], rtol: float = 1e-4,
               atol: float = 1e-7) -> Match:
    """Does `model` hold these gradients (by name, or in parameter order)?"""
    params = list(model.named_parameters())
    grads = list(expected.values()) if isinstance(expected, Mapping) else list(expected)
    if len(params) != len(grads):
        return agree(Match(False, f"{len(params)} parameter tensors, {len(grads)} expected gradients"))
    missing = [name for name, p in params if p.grad is None]
    if missing:
        return agree(Match(False, f"{missing[0]} has no gradient"))
    return compare(((f"{name}.grad", p.grad, g) for (name, p), g in zip(params, grads)), rtol, atol)


def that(ok: bool, figures: str) -> Match:
    """A check of figures: `ok`, with `figures` saying what was measured against which bar (and, for a
    check a student can fail, what to try). `require` shows the figures when the check fails. Agreed by
    all ranks (every rank must call it)."""
    return agree(Match(bool(ok), figures))


def refuses(call: Callable[[], object], error: type[BaseException] = ValueError, says: str = "") -> Match:
    """Does `call()` raise `error` with `says` in its message? Rank 0 prints the message, which is
    what a user who made the mistake reads. Agreed by all ranks (every rank must call it)."""
    from workshop import dist

    try:
        call()
    except error as err:
        dist.print0(f"{type(err).__name__}: {err}")
        if says in str(err):
            return agree(Match(True))
        return agree(Match(False, f"{type(err).__name__} without {says!r} in its message: {err}"))
    return agree(Match(False, f"nothing was raised: expected a {error.__name__}"))


def require(checks: Mapping[str, Match], claim: str = "matches the single-process run") -> None:
    """Print `<name> <claim>: True|False` for each check on rank 0, aligned; then raise CheckFailed,
    on every rank, naming each failed check and what differs. Each check is a Match (from a comparison,
    `that` or `refuses`): a bare True or False would fail without saying why."""
    from workshop import dist

    bare = [name for name, match in checks.items() if not isinstance(match, Match)]
    if bare:
        raise TypeError(f"check {bare[0]!r} is a bare {type(checks[bare[0]]).__name__}: pass "
                        "check.that(ok, figures) so that a failure says what was measured against which bar")
    labels = {name: f"{name} {claim}:" if claim else f"{name}:" for name in checks}
    width = max(map(len, labels.values()))
    for name, match in checks.items():
        dist.print0(f"{labels[name]:<{width}} {bool(match)}")
    failed = [f"{name}: {match.detail or 'False'}" for name, match in checks.items() if not match]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(checks)} checks failed ({claim}):\n  " + "\n  ".join(failed))


class Exercise:
    """An exercise being checked (`exercise`): `verdict` takes the comparison of the student's answer with the
    reference, a Match whose detail is the hint."""

    def __init__(self, name: str):
        self.name = name

    def verdict(self, match: Match) -> None:
        """Print `exercise <name>: solved` on rank 0, or raise ExerciseFailed on every rank with the hint."""
        from workshop import dist

        match = agree(match)
        if not match:
            raise ExerciseFailed(f"exercise {self.name}: {match.detail or 'does not match the reference'}")
        dist.print0(f"exercise {self.name}: solved")


@contextmanager
def exercise(name: str) -> Iterator[Exercise]:
    """Check an exercise: run the student's code inside, then give `verdict` its comparison with the reference.

        with check.exercise("05.1 allreduce_gradients") as ex:
            ex.verdict(ddp.check_gradient_average(allreduce_gradients, fresh_model, batch, env))

    A stub left as it is (`raise NotImplementedError()`, what `make student` leaves of a solution) and any other
    error of the student's code become one ExerciseFailed that names the exercise: the failure line of a run says
    which exercise is not done and why, not a traceback from inside the package. Every rank must enter it."""
    try:
        yield Exercise(name)
    except CheckFailed:
        raise
    except NotImplementedError:
        raise ExerciseFailed(f"exercise {name}: not written yet; write it in place of `raise NotImplementedError()` in "
                             "its cell, then run the cells from there") from None
    except Exception as err:  # the student's code: its error, in one line, under the exercise's name
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ExerciseFailed(f"exercise {name}: your code raised {type(err).__name__}: {first}") from err
