"""One notebook as N ranks: the Python half of `scripts/run_notebook.sh`.

The shell script launches; this module does the rest, in three steps:

    python -m workshop.runner prepare --nranks N NOTEBOOK [papermill options]   # -> run folder
    python -m workshop.runner rank RUN_DIR NOTEBOOK [papermill options]         # once per rank
    python -m workshop.runner collect RUN_DIR LAUNCHER_EXIT_CODE                # summary, exit code
    python -m workshop.runner series [NOTEBOOK ...]                             # `make run`

`prepare` refuses bad input before anything runs (a missing notebook, a parameter the notebook
does not have, a bad rank count) and makes a run folder that no other run writes to. `rank` runs
papermill for the rank that the launcher (torchrun or srun) started, with Jupyter's runtime files
and IPython's history in node-local temporary folders, and progress as log lines, not bars.
`collect` says which rank failed, in which cell, and which notebook to open.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import yaml

from workshop.metrics import REPO, atomic_write_text, display_path, runs_root
from workshop.progress import DEFAULT_LOG_EVERY

# papermill options that carry parameters, and how many values follow each
PARAM_OPTIONS = {"-p": 2, "--parameters": 2, "-r": 2, "--parameters_raw": 2, "-f": 1,
                 "--parameters_file": 1, "-y": 1, "--parameters_yaml": 1, "-b": 1, "--parameters_base64": 1}
KERNEL = "workshop-current"  # a kernel spec written per rank: always this interpreter


class RunError(Exception):
    """Bad input: the message says what to do."""


def parameter_names(papermill_args: list[str]) -> list[str]:
    """The names of the parameters that papermill options set."""
    names, i = [], 0
    while i < len(papermill_args):
        opt = papermill_args[i]
        key, _, inline = opt.partition("=")
        if key in PARAM_OPTIONS:
            n = PARAM_OPTIONS[key]
            values = ([inline] if inline else []) + papermill_args[i + 1: i + 1 + n - bool(inline)]
            if len(values) < n:
                raise RunError(f"papermill option {key} needs {n} value(s)")
            if key in ("-p", "--parameters", "-r", "--parameters_raw"):
                names.append(values[0])
            else:
                if key in ("-f", "--parameters_file"):
                    path = Path(values[0])
                    if not path.is_file():
                        raise RunError(f"parameters file {path} does not exist")
                    text = path.read_text()
                elif key in ("-b", "--parameters_base64"):
                    text = base64.b64decode(values[0]).decode()
                else:
                    text = values[0]
                loaded = yaml.safe_load(text) or {}
                if not isinstance(loaded, dict):
                    raise RunError(f"{key} must give a mapping of parameter names to values")
                names.extend(loaded)
            i += 1 + n - bool(inline)
        else:
            i += 1
    return names


def check_notebook(notebook: Path, papermill_args: list[str]) -> None:
    """Raise RunError unless the notebook exists and has every parameter the options set."""
    import papermill

    if not notebook.is_file():
        raise RunError(f"notebook {notebook} does not exist (notebooks are under notebooks/, e.g. notebooks/01_baseline.ipynb)")
    if notebook.suffix != ".ipynb":
        raise RunError(f"{notebook} is not a notebook (.ipynb)")
    known = papermill.inspect_notebook(str(notebook))
    unknown = [n for n in parameter_names(papermill_args) if n not in known]
    if unknown:
        listing = "\n".join(f"  {name} = {p['default']}  {p.get('help') or ''}".rstrip() for name, p in known.items())
        raise RunError(
            f"{notebook.name} has no parameter {', '.join(map(repr, unknown))}. Its parameters:\n"
            + (listing or "  (none)")
        )


def new_run_dir(notebook: Path, root: Path | None = None) -> Path:
    """runs/<job id or time>-<notebook>, made here and now: a name taken already gets a suffix,
    so a second run never writes into the first's folder."""
    root = root or runs_root()
    root.mkdir(parents=True, exist_ok=True)
    job = os.environ.get("SLURM_JOB_ID")
    stem = f"{'job' + job if job else datetime.now().strftime('%Y%m%d-%H%M%S')}-{notebook.stem}"
    for i in range(1, 1000):
        path = root / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RunError(f"too many runs named {stem} under {root}")


def prepare(notebook: str, nranks: str, papermill_args: list[str]) -> Path:
    if not nranks.isdigit() or int(nranks) < 1:
        raise RunError(f"the number of ranks must be a positive integer, got {nranks!r} (e.g. --nproc 2)")
    nb = Path(notebook).resolve()
    check_notebook(nb, papermill_args)
    run = new_run_dir(nb)
    (run / "ranks").mkdir()
    (run / "logs").mkdir()
    meta = {"notebook": str(nb), "nranks": int(nranks), "papermill_args": papermill_args,
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    atomic_write_text(run / "run.json", json.dumps(meta, indent=2) + "\n")
    if os.environ.get("SLURM_JOB_ID"):  # the job's own output file, where sbatch put it
        out = Path(os.environ.get("SLURM_SUBMIT_DIR", ".")) / "runs" / f"slurm-{os.environ['SLURM_JOB_ID']}.out"
        if out.exists():
            (run / "slurm.out").symlink_to(os.path.relpath(out, run))
    return run


def this_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def output_notebook(run: Path, notebook: Path, rank: int) -> Path:
    return run / f"{notebook.stem}.ipynb" if rank == 0 else run / "ranks" / f"{notebook.stem}.rank{rank}.ipynb"


def failed_cell(executed: Path) -> dict:
    """Where an executed notebook stopped: the first cell with an error output."""
    try:
        nb = json.loads(executed.read_text())
    except (OSError, ValueError):
        return {}
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":  # "In [N]" is how Jupyter labels the cell
                return {"cell": f"In [{cell.get('execution_count')}]", "error": f"{out.get('ename')}: {out.get('evalue')}"}
    return {}


def _rank_environment(run: Path, rank: int) -> tuple[dict, Path]:
    """Node-local folders for Jupyter's runtime files and IPython's history (a shared home
    folder breaks their sqlite and socket files), and a kernel spec for this interpreter."""
    base = Path(os.environ.get("SLURM_TMPDIR") or tempfile.gettempdir())
    tmp = Path(tempfile.mkdtemp(prefix=f"workshop-{run.name}-rank{rank}-", dir=base))
    spec = tmp / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "workshop (current environment)", "language": "python"}))
    env = dict(os.environ)
    env.update(WORKSHOP_RUN_DIR=str(run), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), IPYTHONDIR=str(tmp / "ipython"),
               JUPYTER_PATH=os.pathsep.join(filter(None, [str(tmp / "jupyter"), os.environ.get("JUPYTER_PATH")])),
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    # A batch run: a line every N training steps in the log, no progress bars (workshop.progress),
    # even when submitted from a JupyterLab kernel whose session variable sbatch passed on.
    env.pop("JPY_SESSION_NAME", None)
    env.setdefault("WORKSHOP_PROGRESS", "log")
    env.setdefault("WORKSHOP_LOG_EVERY", str(DEFAULT_LOG_EVERY))
    return env, tmp


def run_rank(run: Path, notebook: str, papermill_args: list[str]) -> int:
    """Execute the notebook for this rank with papermill; write logs/rank<R>.status.json."""
    rank = this_rank()
    nb = Path(notebook).resolve()
    out = output_notebook(run, nb, rank)
    env, tmp = _rank_environment(run, rank)
    defaults = []
    if not {"-k", "--kernel"} & {a.split("=")[0] for a in papermill_args}:
        defaults += ["-k", KERNEL]
    if "--cwd" not in papermill_args:
        defaults += ["--cwd", str(nb.parent)]
    cmd = [sys.executable, "-m", "papermill", str(nb), str(out), *defaults, "--log-output", "--no-progress-bar", *papermill_args]
    log = run / "logs" / f"rank{rank}.log"
    node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:  # rank 0 also shows its progress in the job's output
            f.write(line)
            if rank == 0:
                sys.stdout.write(line)
                sys.stdout.flush()
        rc = proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)
    status = {"rank": rank, "node": node, "returncode": rc, "notebook": str(out), "log": str(log),
              "started": started, "ended": datetime.now().astimezone().isoformat(timespec="seconds")}
    if rc != 0:
        status.update(failed_cell(out))
        where = f"cell {status['cell']} ({status['error']})" if "cell" in status else "before any cell ran"
        print(f"rank {rank} on {node} failed in {where}: open {out} (log: {log})", file=sys.stderr, flush=True)
    atomic_write_text(run / "logs" / f"rank{rank}.status.json", json.dumps(status, indent=2) + "\n")
    return rc


def collect(run: Path, launcher_rc: int) -> int:
    """Summarise the ranks of a run; non-zero when any failed or did not report."""
    meta = json.loads((run / "run.json").read_text())
    problems = []
    for rank in range(meta["nranks"]):
        path = run / "logs" / f"rank{rank}.status.json"
        if not path.exists():
            log = run / "logs" / f"rank{rank}.log"
            problems.append(f"rank {rank} did not finish (killed, or stopped when another rank failed): see {log}")
            continue
        st = json.loads(path.read_text())
        if st["returncode"] != 0:
            where = f"cell {st['cell']} ({st['error']})" if "cell" in st else "before any cell ran"
            problems.append(f"rank {rank} on {st['node']} failed in {where}: open {st['notebook']}")
    if launcher_rc != 0 and not problems:
        problems.append(f"the launcher exited with {launcher_rc}: see {run / 'logs'}")
    record = run / "record.json"
    if problems and not record.exists():  # a failed run is recorded as failed, never dropped
        atomic_write_text(record, json.dumps({"notebook": Path(meta["notebook"]).stem, "status": "failed",
                                              "reason": problems, "params": {}, "slurm_job_id": meta["slurm_job_id"],
                                              "run": meta}, indent=2) + "\n")
    if problems:
        print(f"\nRUN FAILED: {run}", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    nb = Path(meta["notebook"])
    print(f"\nrun folder:         {run}")
    print(f"executed notebook:  {output_notebook(run, nb, 0)}")
    if meta["nranks"] > 1:
        print(f"other ranks:        {run / 'ranks'}")
    print(f"record:             {record if record.exists() else '(this notebook writes none)'}")
    return 0


def declared_ranks(notebook: Path) -> int:
    """How many local ranks `make run` gives a notebook: its metadata's workshop.ranks, else 1."""
    meta = json.loads(notebook.read_text()).get("metadata", {})
    return int(meta.get("workshop", {}).get("ranks", 1))


def series(notebooks: list[Path]) -> int:
    """Run the notebooks in order, each as its declared number of local ranks, through
    scripts/run_notebook.sh; then list each one's run folder. Non-zero if any failed."""
    script = REPO / "scripts" / "run_notebook.sh"
    env = dict(os.environ, WORKSHOP_PYTHON=sys.executable)
    env.pop("SLURM_JOB_ID", None)  # local ranks even inside an allocation
    rows = []
    for nb in notebooks:
        before = set(runs_root().glob(f"*-{nb.stem}*"))
        nranks = declared_ranks(nb)
        print(f"\n=== {nb.name}: {nranks} rank(s) ===", flush=True)
        rc = subprocess.run(["bash", str(script), "--nproc", str(nranks), str(nb)], env=env).returncode
        made = sorted(set(runs_root().glob(f"*-{nb.stem}*")) - before)
        rows.append((nb.name, nranks, "ok" if rc == 0 else f"FAILED ({rc})", made[-1] if made else None))
    width = max(len(name) for name, *_ in rows) if rows else 8
    print(f"\n{'notebook':{width}s}  ranks  status      run folder (executed notebook, record.json)")
    for name, nranks, status, run in rows:
        print(f"{name:{width}s}  {nranks:5d}  {status:10s}  {display_path(run) if run else '-'}")
    return 0 if all(status == "ok" for _, _, status, _ in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workshop.runner", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", allow_abbrev=False)
    p.add_argument("--nranks", default="1")
    p.add_argument("notebook")
    r = sub.add_parser("rank", allow_abbrev=False)
    r.add_argument("run_dir", type=Path)
    r.add_argument("notebook")
    c = sub.add_parser("collect", allow_abbrev=False)
    c.add_argument("run_dir", type=Path)
    c.add_argument("launcher_rc", type=int)
    s = sub.add_parser("series", allow_abbrev=False)
    s.add_argument("notebooks", nargs="*", type=Path)
    args, rest = parser.parse_known_args(argv)
    try:
        if args.step == "prepare":
            print(prepare(args.notebook, args.nranks, rest))
            return 0
        if args.step == "rank":
            return run_rank(args.run_dir, args.notebook, rest)
        if args.step == "series":
            return series(args.notebooks or sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")))
        return collect(args.run_dir, args.launcher_rc)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
