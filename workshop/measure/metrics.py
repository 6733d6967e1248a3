"""Timing, throughput, peak memory, and the run's folder and `record.json`.

Every run writes into a folder of its own (`run_dir`): `scripts/run_notebook.sh` makes it and
passes it as $WORKSHOP_RUN_DIR; run by hand (JupyterLab, nbval) a notebook gets one named the
same way, runs/<time>-<notebook>. What a record holds is `workshop.base.records`; `write_record` fills in
the world, the hardware, the versions and the revision. Reports are computed from the records only.

    run = metrics.run_dir("01_baseline")
    with metrics.Timer(device) as t:
        ...
    metrics.write_record(run, params=params, results={"wall_time_s": t.elapsed})
"""

from __future__ import annotations

import os
import platform
import resource
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch

from workshop.base import records
from workshop.base.hardware import device_type
from workshop.base.runs import REPO, atomic_write_text, display_path, make_folder, new_run_dir, run_name, runs_root  # noqa: F401
from workshop.base.tables import fmt_bytes  # noqa: F401  (the notebooks' metrics.fmt_bytes)
from workshop.dist import DistEnv, get_env


def _sync(device) -> None:
    if device_type(device) == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time of a block. On CUDA it synchronises before and after: kernels run
    asynchronously, and without the sync the timer measures only the launch."""

    def __init__(self, device="cpu"):
        self.device = device
        self.elapsed = 0.0

    def __enter__(self):
        _sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.elapsed = time.perf_counter() - self._t0
        return False


@dataclass
class Timing:
    """One timed generation: `new_tokens` per sequence for `batch_size` sequences in `seconds`."""

    new_tokens: int
    batch_size: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens * self.batch_size / self.seconds if self.seconds > 0 else float("nan")

    @property
    def ms_per_token(self) -> float:
        """Latency per decoding step (one new token for every sequence of the batch)."""
        return 1000 * self.seconds / self.new_tokens

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "ms_per_token": self.ms_per_token}


def timed(fn, *, new_tokens: int, batch_size: int, device="cpu", repeats: int = 1):
    """Run `fn()` `repeats` times (synchronised on CUDA); returns (its last result, the fastest Timing)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        with Timer(device) as t:
            out = fn()
        best = min(best, t.elapsed)
    return out, Timing(new_tokens, batch_size, best)


def fastest(fn, repeats: int = 1, device="cpu") -> float:
    """Seconds of the fastest of `repeats` calls of `fn()` (each synchronised on CUDA, as `Timer` does)."""
    best = float("inf")
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        best = min(best, t.elapsed)
    return best


def throughput(samples: int, seconds: float) -> float:
    """samples/s (or tokens/s when `samples` counts tokens)."""
    return samples / seconds if seconds > 0 else float("nan")


def reset_peak_memory(device) -> None:
    if device_type(device) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> int:
    """Peak bytes: CUDA memory allocated by tensors on a GPU (since the last reset); on CPU the
    process's peak resident set size, which includes Python and the libraries (never reset)."""
    if device_type(device) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def peak_memory_kind(device) -> str:
    """What `peak_memory` counts on `device`, in the words a printed figure needs beside it."""
    return "tensors' bytes" if device_type(device) == "cuda" else "the process's resident set: Python and libraries too"


def run_dir(notebook: str, env: DistEnv | None = None) -> Path:
    """This run's folder: $WORKSHOP_RUN_DIR (set by scripts/run_notebook.sh), else one named as the
    launcher names them, runs/<job id or time>-<notebook>: a new one for one process (JupyterLab,
    nbval), and for ranks started by hand (torchrun) the one of their job or torchrun run id."""
    if os.environ.get("WORKSHOP_RUN_DIR"):
        path = Path(os.environ["WORKSHOP_RUN_DIR"])
    else:
        env = env or get_env()
        if not env.is_distributed:
            return new_run_dir(notebook)
        path = runs_root() / run_name(notebook, env.job_id, os.environ.get("TORCHELASTIC_RUN_ID"))
    if not path.exists():  # readable by its owner only, unless $WORKSHOP_RUNS_MODE says otherwise
        make_folder(path)
    return path


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def hardware() -> dict:
    info = {"host": socket.gethostname(), "cpus": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def versions() -> dict:
    import lightning

    return {
        "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
        "cuda": torch.version.cuda, "workshop": _workshop_version(),
    }


def _workshop_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("workshop")
    except PackageNotFoundError:
        return "source"


def write_record(run: Path, *, notebook: str, params: dict, results: dict, status: str = "ok",
                 env: DistEnv | None = None, **extra) -> Path | None:
    """Write `run/record.json` (rank 0 only; other ranks return None): what ran, where, with
    which versions, and what it measured (`workshop.base.records.Record`; a key that breaks its schema
    raises here, naming it). Numbers only from measurements."""
    env = env or get_env()
    if not env.is_main:
        return None
    record = records.Record.from_dict({
        "notebook": notebook,
        "status": status,
        "time": datetime.now().astimezone().isoformat(timespec="seconds"),
        "params": params,
        "dist": env.as_dict(),
        "hardware": hardware(),
        "versions": versions(),
        "git": git_revision(),
        "slurm_job_id": env.job_id,
        "results": results,
        **extra,
    })
    return records.write(run, record)


def write_baseline_record(run, params: dict, *, plain: dict, lightning: dict, data_source: str, env=None, **extra):
    """Notebook 01's record.json (rank 0 writes it; other ranks get None). `plain` and `lightning` are what each
    loop measured: wall_time_s, and where known peak_memory_bytes, val_acc, val_loss. Their samples/s are computed
    from params' epochs and num_train; both also go into "measurements" in the keys workshop.measure.report reads
    (notebook 13), the plain loop as the baseline. `extra` keys go into the record beside them (`tracking`)."""
    samples = params["epochs"] * params["num_train"]
    loops = {name: {**measured, "samples_per_s": throughput(samples, measured["wall_time_s"])}
             for name, measured in (("plain", plain), ("lightning", lightning))}
    common = dict(model=params["model_name"], strategy="single", samples_or_tokens="samples", world_size=1,
                  global_batch_size=params["batch_size"], epoch_size=params["num_train"])
    measurements = [{**common, "variant": variant, "baseline": name == "plain", "throughput": loops[name]["samples_per_s"],
                     "wall_time_s": loops[name]["wall_time_s"],
                     **({"peak_memory_bytes": loops[name]["peak_memory_bytes"]} if "peak_memory_bytes" in loops[name] else {})}
                    for name, variant in (("plain", "plain loop"), ("lightning", "lightning"))]
    return write_record(
        run, notebook="01_baseline", params=params, results={**loops, "measurements": measurements}, env=env,
        data_source=data_source, wall_time_s=plain["wall_time_s"] + lightning["wall_time_s"],
        samples_per_s=loops["plain"]["samples_per_s"], peak_memory_bytes=plain.get("peak_memory_bytes"), **extra,
    )
