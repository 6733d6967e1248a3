"""Where runs are kept: the runs folder, a new run's own folder, paths as shown to people, and the one
way files are written there (whole or not at all). Plain files only: this module imports no torch,
so the launcher (`workshop.launch.runner`) and `workshop.launch.slurm` answer in a fraction of a second.

    runs_root()                  # $WORKSHOP_RUNS, else runs/ in the repository
    run_name("05_ddp", job_id)   # job<id>-05_ddp in a SLURM job, else <time>-05_ddp: every run folder's name
    new_run_dir("05_ddp")        # runs/<job id or time>-05_ddp, made now, never shared with another run
    find_runs("05_ddp", job_id)  # the run folders named so
    atomic_write_text(path, s)   # a temporary file beside `path`, then a rename
"""

from __future__ import annotations

import os
import re
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
TIME_FORMAT = "%Y%m%d-%H%M%S"  # a run folder's start time, where no SLURM job names it
TIME_PATTERN = r"\d{8}-\d{6}"  # the same, as a regular expression that finds it in text


class RunError(Exception):
    """Bad input to a run (a notebook, a parameter, a folder): the message says what to do."""


def runs_root() -> Path:
    return Path(os.environ.get("WORKSHOP_RUNS", REPO / "runs"))


def timestamp(when: datetime | None = None) -> str:
    """`when` (default: now) as run folders spell it: 20250131-142501."""
    return (when or datetime.now()).strftime(TIME_FORMAT)


def run_name(notebook: str, job_id: str | None = None, started: str | None = None) -> str:
    """A run folder's name: job<id>-<notebook> in a SLURM job, else <started>-<notebook>, `started` being the id a
    launcher gave the run (torchrun's) or, by default, the time it starts (`timestamp`)."""
    return f"{'job' + str(job_id) if job_id else started or timestamp()}-{notebook}"


def find_runs(notebook: str = "", job_id: str | None = None, root: Path | None = None) -> list[Path]:
    """The run folders under `root` (default: the runs folder) that the launcher named (`run_name`): those of
    `notebook` (else of any), of SLURM job `job_id` (else of any job or start time), a second run of one name
    (-2, -3, ...) included; in name order. A sweep's folder (sweep-<run folder's name>) is not a run folder."""
    root = root or runs_root()
    tag = f"job{re.escape(str(job_id))}" if job_id else rf"(job\d+|{TIME_PATTERN})"
    name = re.compile(rf"{tag}-{re.escape(notebook) if notebook else '.+'}(-\d+)?")
    return sorted(p for p in root.glob("*") if name.fullmatch(p.name) and p.is_dir()) if root.is_dir() else []


def display_path(path) -> str:
    """A path as shown to people: relative to the repository when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def folder_mode() -> int:
    """The mode of new run folders: $WORKSHOP_RUNS_MODE (octal, e.g. 750 to let the group read),
    else 700: on a shared cluster a run's notebooks, logs and checkpoints are its owner's."""
    text = os.environ.get("WORKSHOP_RUNS_MODE", "700")
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or not mode & 0o700 == 0o700:
        raise RunError(f"WORKSHOP_RUNS_MODE={text} is not an octal mode the owner can use: give three octal digits "
                       "starting with 7, e.g. 700 (only you) or 750 (your group may read)")
    if mode & 0o007:  # a run folder holds notebooks, logs, checkpoints and the job's environment
        raise RunError(f"WORKSHOP_RUNS_MODE={text} would let every user of this machine into your run folders: give "
                       "700 (only you) or 750 (your group may read)")
    return mode


def make_folder(path: Path) -> Path:
    """Make `path` (and its parents) with the run folders' mode, whatever the umask."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(folder_mode())
    return path


def new_run_dir(name: str, root: Path | None = None) -> Path:
    """runs/<job id or time>-<name>, made here and now: a name taken already gets a suffix, so a
    second run never writes into the first's folder."""
    root = root or runs_root()
    mode = folder_mode()
    try:
        root.mkdir(parents=True, exist_ok=True)
        writable = os.access(root, os.W_OK | os.X_OK)
    except OSError:
        writable = False
    if not writable:
        raise RunError(f"the runs folder {root} is not writable: set WORKSHOP_RUNS to a folder you can write "
                       "(e.g. export WORKSHOP_RUNS=$HOME/runs, or one on the project's scratch file system)")
    stem = run_name(name, os.environ.get("SLURM_JOB_ID"))
    for i in range(1, 1000):
        path = root / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir(mode=mode)
        except FileExistsError:
            continue
        path.chmod(mode)  # mkdir's mode is masked by the umask; this is the mode asked for
        return path
    raise RunError(f"too many runs named {stem} under {root}")


def atomic_write(path: Path, write: Callable, binary: bool = False) -> Path:
    """Write a file whole or not at all: `write(f)` fills a temporary file in the same folder, which is
    flushed to disk and then renamed over `path`. A reader never sees half a record or checkpoint."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))
