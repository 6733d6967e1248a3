import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
RUN_NOTEBOOK = REPO / "scripts" / "run_notebook.sh"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A runs/ folder of this test's own."""
    path = tmp_path / "runs"
    monkeypatch.setenv("WORKSHOP_RUNS", str(path))
    return path


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables from the surroundings (a test may run inside a SLURM job)."""
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                               "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
            monkeypatch.delenv(key)


def run_notebook(*args, timeout=600, env=None, **kwargs):
    """scripts/run_notebook.sh with this interpreter, in `env` (default: this process's); returns the CompletedProcess."""
    env = dict(os.environ if env is None else env, WORKSHOP_PYTHON=sys.executable)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for key in [k for k in env if k.startswith("SLURM_")]:
        del env[key]
    return subprocess.run(["bash", str(RUN_NOTEBOOK), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def on_ranks(script: str, out, nproc: int = 2):
    """tests/multirank/<script> on `nproc` gloo ranks under torchrun, given the file `out` to
    save to; returns what its rank 0 saved there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(REPO / "tests" / "multirank" / script), str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out, weights_only=True)


def slurm_answers() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%n %t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(line.split()[1].startswith(("idle", "mix", "alloc")) for line in out.stdout.splitlines()
                                       if len(line.split()) == 2)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A SLURM cluster that answers, else skip, or fail when WORKSHOP_REQUIRE_SLURM=1 (CI)."""
    if slurm_answers():
        return True
    msg = "no SLURM cluster answers (start one with `make slurm-up`)"
    if os.environ.get("WORKSHOP_REQUIRE_SLURM") == "1":
        pytest.fail(msg + ", and WORKSHOP_REQUIRE_SLURM=1")
    pytest.skip(msg)


@pytest.fixture
def slurm(slurm_cluster):
    """The local cluster to this test alone: a SLURM test of another pytest worker waits here until this one
    ends. Each expects both nodes free (block placement, 2 tasks on the first node of an uneven job)."""
    with open(Path(tempfile.gettempdir()) / "workshop-tests-slurm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield True


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
