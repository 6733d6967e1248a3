"""What several test modules share: the repository's paths, starting notebooks, local ranks and SLURM jobs, and
reading what they left. Functions and constants only; the fixtures are in the repository's conftest.py."""

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from workshop.base.world import local_ranks, without_launcher
from workshop.launch.slurm import wait as wait_for_job

REPO = Path(__file__).resolve().parent.parent
RUN_NOTEBOOK = REPO / "scripts" / "run_notebook.sh"
STARTUP_S = 25  # a launch's own start (torch imported by the launcher and by each rank on 2 busy cores), at most


def run_notebook(*args, timeout=600, env=None, **kwargs):
    """scripts/run_notebook.sh with this interpreter, in `env` (default: this process's) without any launcher's
    variables; returns the CompletedProcess."""
    env = dict(without_launcher(os.environ if env is None else env), WORKSHOP_PYTHON=sys.executable)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(RUN_NOTEBOOK), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def on_ranks(script: str, out, nproc: int = 2):
    """tests/multirank/<script> on `nproc` gloo ranks under torchrun, given the file `out` to
    save to; returns what its rank 0 saved there."""
    cmd, env = local_ranks(nproc, REPO / "tests" / "multirank" / script, out)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out, weights_only=True)


# --- a launch that must end within a bound and leave nothing behind ------------------------------------------------

@dataclass
class Launch:
    rc: int
    out: str
    left: list[str]  # processes of this launch still alive after it ended


def launch(cmd: list[str], env: dict, bound_s: float, **env_extra) -> Launch:
    """Run `cmd` in `env` (local_ranks' for local ranks, without_launcher()'s for srun) from the repository's root;
    fail the test if it does not end within `bound_s` seconds. Each launch carries a marker in its environment (srun
    passes it on to its tasks): a process that still has it once the launch has ended was left behind."""
    marker = uuid.uuid4().hex
    env = dict(env, WORKSHOP_TEST_LAUNCH=marker, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               **env_extra)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not end within {bound_s:g} s:\n{out[-4000:]}")
    return Launch(proc.returncode, out, left_behind(marker))


def left_behind(marker: str) -> list[str]:
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.environ().get("WORKSHOP_TEST_LAUNCH") == marker:
                left.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return left


# --- the local SLURM cluster --------------------------------------------------------------------------------------

def slurm_env(runs) -> dict:
    """A job of its own (no variables of the job this runs in, if any), with this interpreter, its runs under `runs`."""
    env = without_launcher()
    env.update(WORKSHOP_PYTHON=sys.executable, WORKSHOP_RUNS=str(runs), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    return env


def sbatch(runs, *args, timeout=600):
    """Submit from the repository's root with this interpreter and wait for the job, every task of an array, to
    end: (the highest exit status of its tasks, the job id, its output). It polls twice a second: `sbatch --wait`
    sleeps 2, then 8, then 32 s between its looks (Slurm 22.05, sbatch.c `_job_wait`), so a job of 15 s is seen
    ended after 42 s."""
    out = subprocess.run(["sbatch", "--parsable", "--time=00:10:00", *args], cwd=REPO, env=slurm_env(runs),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    wait_for_job(job, timeout=timeout, poll_s=0.5)
    log = REPO / "runs" / f"slurm-{job}.out"
    return exit_status(job), job, log.read_text() if log.exists() else ""


def exit_status(job: str) -> int:
    """The highest exit status of the job's tasks, as `sbatch --wait` gives it (SLURM keeps an ended job
    MinJobAge = 60 s on the local cluster; a task killed by a signal counts as 128 + the signal)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, check=True)
    codes = [tuple(map(int, m.split(":"))) for m in re.findall(r"\bExitCode=(\d+:\d+)", out.stdout)]
    assert codes, out.stdout
    return max(code or (128 + signal if signal else 0) for code, signal in codes)


# --- what a run left -------------------------------------------------------------------------------------------

def checked_outputs(notebook: Path) -> dict:
    """The text each `# NBVAL_CHECK_OUTPUT` cell of a notebook printed, by cell id, with machine paths,
    job ids and times scrubbed as `make notebooks` scrubs them."""
    from workshop.launch.regenerate import scrub

    cells = json.loads(Path(notebook).read_text())["cells"]
    return {c.get("id"): scrub("".join("".join(o.get("text", "")) for o in c.get("outputs", [])
                                      if o.get("output_type") == "stream"))
            for c in cells if c["cell_type"] == "code" and "".join(c["source"]).startswith("# NBVAL_CHECK_OUTPUT")}


def assert_checks_as_committed(executed: Path, committed: str | Path, skip: tuple[str, ...] = ()):
    """A fresh multi-rank run's checked cells print what the committed notebook shows (which `make notebooks`
    made on 4 ranks, and nbval compares with one process). `skip`: ids of checked cells whose output depends
    on a parameter the test changed."""
    ran, want = checked_outputs(executed), checked_outputs(REPO / committed)
    assert want, f"{committed} has no NBVAL_CHECK_OUTPUT cell"
    for cell_id, text in want.items():
        if cell_id not in skip:
            assert ran.get(cell_id) == text, f"checked cell {cell_id} of {committed}: ran {ran.get(cell_id)!r}, not {text!r}"


def wandb_history(folder: Path) -> list[dict]:
    """The metrics an offline W&B run logged, one dict per step, read from its `run-<id>.wandb` file: a LevelDB-style
    log (a 7-byte ":W&B" header, then 32 KiB blocks of chunks, each with a 4-byte checksum, a 2-byte little-endian
    length and a type: 1 whole, 2 first, 3 middle, 4 last) of wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("run-*.wandb")
    data, block, pos, pieces, steps = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                steps.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                              for item in record.history.item})
    return steps
