"""Checkpoints that survive a time limit: saved whole or not at all, loaded safely, resumed exactly.

A batch job on a shared cluster ends at its time limit whether the training has finished or not.
SLURM can warn it first: `sbatch --signal=B:USR1@120 --requeue ...` sends SIGUSR1 to the batch
shell 120 s before the limit. `scripts/run_notebook.sh` forwards the signal to every rank and, once
they have saved a checkpoint and stopped, requeues the job; the next start runs in the same run
folder and resumes from the checkpoint. In a training loop:

    ckpt = checkpoint.Checkpointer(run / "checkpoints", model_name="tinygpt-cpu")
    stop = checkpoint.StopOnSignal()                 # SIGUSR1 -> stop after the current step
    start = ckpt.resume(model, optimizer)            # 0, or the step the last checkpoint holds
    for step in range(start, max_steps):
        ...                                          # one optimizer step
        if stop.requested() or (step + 1) % every == 0:
            ckpt.save(model, optimizer, step + 1)    # rank 0 writes; every rank waits for it
        if stop.requested():
            raise checkpoint.Interrupted(step + 1)   # the run is recorded as interrupted

With Lightning, `lightning_on_signal(folder)` is the callback that does the same for `trainer.fit`:

    on_signal = checkpoint.lightning_on_signal(run / "checkpoints")
    trainer = dist.make_trainer(env, max_steps=max_steps, callbacks=[on_signal])
    trainer.fit(module, loader, ckpt_path=on_signal.resume_path(), weights_only=True)
    on_signal.raise_if_interrupted()                 # checkpoint.Interrupted, as above

What a checkpoint holds: the model's and the optimizer's state, the step, the RNG state, and the
model's name and parameter shapes, so a checkpoint of another model is refused with both names
rather than loaded into the wrong weights. Files are written to a temporary name, then renamed:
a job killed mid-write leaves the previous checkpoint intact. They are read with
`torch.load(weights_only=True)`, which builds tensors and plain containers only, never arbitrary
objects: a checkpoint found in a shared folder cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from workshop.base.runs import atomic_write
from workshop.dist import DistEnv, get_env

FORMAT = 1  # bumped when the layout of a checkpoint changes


class CheckpointMismatch(ValueError):
    """A checkpoint saved from another model (or another shape of it)."""


class Interrupted(RuntimeError):
    """Raised by a training loop that saved a checkpoint and stopped because it was asked to
    (SIGUSR1: the job's time limit is near). The job requeues and resumes from that step."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step} on SIGUSR1 (the time limit is near): checkpoint saved; "
                         "the next start in this run folder resumes from it")
        self.step = step


def fingerprint(model: nn.Module) -> str:
    """A short hash of the model's parameter and buffer names and shapes: equal for the same
    architecture, different for another model or another size of it."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)};".encode())
    return h.hexdigest()[:16]


def describe(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}, {n:,} parameters"


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


def atomic_save(obj, path: Path) -> Path:
    """torch.save, whole or not at all (a temporary file beside `path`, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int, *, model_name: str) -> Path:
    """Write one checkpoint file atomically (whoever calls it; see Checkpointer for rank 0 only)."""
    model = _unwrap(model)
    state = {
        "format": FORMAT, "model_name": model_name, "model_description": describe(model),
        "fingerprint": fingerprint(model), "step": int(step), "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": torch.get_rng_state(),
    }
    return atomic_save(state, path)


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, model_name: str,
         map_location="cpu") -> int:
    """Load a checkpoint into `model` (and `optimizer`); return its step. Refuses a checkpoint of
    another model, naming both."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise CheckpointMismatch(f"checkpoint {path} cannot be read as a workshop checkpoint ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}): move it away to start afresh") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointMismatch(f"checkpoint {path} is not a workshop checkpoint of format {FORMAT}: "
                                 "move it away to start afresh")
    target = _unwrap(model)
    if state["model_name"] != model_name or state["fingerprint"] != fingerprint(target):
        raise CheckpointMismatch(
            f"checkpoint {path} is of model '{state['model_name']}' ({state['model_description']}), "
            f"not of this model '{model_name}' ({describe(target)}): resume with the model that saved it, "
            "or start afresh in a new run folder"
        )
    target.load_state_dict(state["model"])
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


class Checkpointer:
    """The checkpoints of one run: `folder/step<N>.pt`, the newest `keep` kept. Rank 0 writes,
    every rank reads; a barrier after each save, so no rank runs ahead of a checkpoint."""

    def __init__(self, folder: Path, *, model_name: str, keep: int = 2, env: DistEnv | None = None):
        self.folder, self.model_name, self.keep = Path(folder), model_name, keep
        self.env = env or get_env()

    def paths(self) -> list[Path]:
        """The checkpoints, oldest first."""
        found = [p for p in self.folder.glob("step*.pt") if p.stem[4:].isdigit()]
        return sorted(found, key=lambda p: int(p.stem[4:]))

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def save(self, model: nn.Module, optimizer, step: int) -> Path:
        path = self.folder / f"step{step}.pt"
        if self.env.is_main:
            save(path, model, optimizer, step, model_name=self.model_name)
            for old in self.paths()[:-self.keep]:
                old.unlink(missing_ok=True)
        if tdist.is_initialized():
            tdist.barrier()
        return path

    def resume(self, model: nn.Module, optimizer=None) -> int:
        """Load the newest checkpoint, if any; the step to continue from (0: none)."""
        path = self.latest()
        if path is None:
            return 0
        return load(path, model, optimizer, model_name=self.model_name)


STOP_FILE = "stop.requested"  # written into the run folder by scripts/run_notebook.sh on SIGUSR1


class StopOnSignal:
    """Turns SIGUSR1 (or another signal) into a request to stop after the current step.

    The signal can come before this kernel is ready for it (SLURM's warning time is approximate),
    so `scripts/run_notebook.sh` also leaves a file `stop.requested` in the run folder: either
    one asks for the stop. `requested()` is a collective when a process group exists: every rank
    learns whether any rank was asked, so all stop at the same step (call it at the same point on
    every rank)."""

    def __init__(self, signum: int = signal.SIGUSR1, run_dir: Path | None = None):
        self.signum, self.received = signum, False
        run_dir = run_dir or os.environ.get("WORKSHOP_RUN_DIR")
        self.stop_file = Path(run_dir) / STOP_FILE if run_dir else None
        signal.signal(signum, self._handler)  # the main thread: where notebook cells run

    def _handler(self, signum, frame) -> None:
        self.received = True

    def requested(self) -> bool:
        if not self.received and self.stop_file is not None and self.stop_file.exists():
            self.received = True
        if not (tdist.is_initialized() and tdist.get_world_size() > 1):
            return self.received
        device = get_env().device if tdist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())


def lightning_on_signal(folder: Path, stop: StopOnSignal | None = None):
    """A Lightning callback: after each training step it asks `stop` (SIGUSR1 or the stop file,
    agreed by all ranks); when asked, it saves Lightning's checkpoint `folder/last.ckpt` (written
    to a temporary name, then renamed) and ends the fit. `resume_path()` gives that checkpoint for
    the next start (`trainer.fit(..., ckpt_path=..., weights_only=True)`), `raise_if_interrupted()`
    raises `Interrupted` after a fit that stopped this way. Lightning's own SLURM requeue is not
    used: the plugin of `dist.make_trainer` describes the world, and `scripts/run_notebook.sh`
    requeues the job."""
    from lightning.pytorch.callbacks import Callback

    folder = Path(folder)

    class SaveOnSignal(Callback):
        def __init__(self):
            self.stop = stop or StopOnSignal()
            self.interrupted_at: int | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not self.stop.requested():
                return
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / ".last.ckpt.partial"
            trainer.save_checkpoint(tmp)  # every rank takes part; rank 0 writes
            if trainer.is_global_zero:
                os.replace(tmp, folder / "last.ckpt")
            trainer.strategy.barrier("workshop.checkpoint.lightning_on_signal")
            self.interrupted_at = trainer.global_step
            trainer.should_stop = True

        def resume_path(self) -> Path | None:
            path = folder / "last.ckpt"
            return path if path.is_file() else None

        def raise_if_interrupted(self) -> None:
            if self.interrupted_at is not None:
                raise Interrupted(self.interrupted_at)

    return SaveOnSignal()
