"""Task parallelism: many independent runs at once, one configuration of a grid each.

No process group, no communication: each task reads its index from the launcher, picks its
configuration from the grid, trains, and writes `<sweep>/config<i>/record.json`. One collection
reads the records back. The launchers, and what `task()` reads from each:

    sbatch --array=0-3 scripts/run_notebook.sh NB           # SLURM_ARRAY_TASK_ID (sweep id: SLURM_ARRAY_JOB_ID)
    sbatch --ntasks=4 scripts/run_notebook.sh NB            # the srun task's SLURM_PROCID (sweep id: SLURM_JOB_ID)
    scripts/run_notebook.sh --nproc 4 NB                    # torchrun's RANK (sweep id: the run folder's name)
    scripts/run_notebook.sh NB, JupyterLab, nbval           # one process: every configuration, one after another

    grid = sweep.make_grid(lr=sweep.parse_values(lrs, float))   # [{"lr": 0.01}, {"lr": 0.03}, ...]
    task = sweep.task(run)                                      # Task(index=2, count=4, launcher="array", ...)
    for i in task.indices(len(grid)):                           # [2] as a task, all of them as one process
        ...
        sweep.write_record(folder, i, grid[i], task, notebook=..., params=..., results=...)
    records, missing = sweep.collect(folder)
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import torch

from workshop import dist
from workshop.base import records
from workshop.base.runs import atomic_write_text, display_path, make_folder, runs_root, timestamp
from workshop.measure import metrics


class SweepError(ValueError):
    """A sweep that cannot run as asked: the message says what to change."""


def parse_values(text, cast: Callable = float, name: str = "values") -> list:
    """"0.01,0.03,0.1" -> [0.01, 0.03, 0.1]. Papermill turns `-p lrs 0.1` into a number: accepted."""
    values = [cast(v.strip()) for v in str(text).split(",") if v.strip()]
    if not values:
        raise SweepError(f"{name} is empty: give at least one value, e.g. {name} = \"0.1\"")
    return values


def make_grid(**axes: list) -> list[dict]:
    """Every combination of the axes, the first axis slowest: make_grid(lr=[1, 2], batch_size=[8])
    -> [{"lr": 1, "batch_size": 8}, {"lr": 2, "batch_size": 8}]. A value given twice is an error:
    two tasks would train the same configuration."""
    for name, values in axes.items():
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise SweepError(f"{name} has {', '.join(map(str, twice))} more than once: two tasks would train the same "
                             "configuration; give each value once")
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*axes.values())]


@dataclass(frozen=True)
class Task:
    """This process's part of a sweep."""

    index: int | None  # this task's grid index; None: one process runs every configuration
    count: int  # how many tasks the launcher started (an array's size, or the step's tasks)
    launcher: str  # "array", "slurm" (srun tasks of one job), "torchrun" or "single"
    sweep_id: str  # names the sweep's folder: runs/sweep-<sweep_id>/
    max_index: int | None = None  # the highest index of a job array (SLURM_ARRAY_TASK_MAX)

    def __str__(self) -> str:
        who = ("one process: it trains every configuration, one after another" if self.index is None
               else f"task {self.index} of {self.count}, started by "
               + {"array": "a SLURM job array", "slurm": "srun"}.get(self.launcher, self.launcher))
        return f"{who}; sweep {self.sweep_id}"

    @property
    def is_first(self) -> bool:
        """The task that speaks (and, outside arrays, collects): index 0, or the one process."""
        return not self.index

    def indices(self, grid_size: int) -> list[int]:
        """The grid indices this process trains, after checking the tasks fit the grid."""
        if self.index is None:
            return list(range(grid_size))
        top = self.max_index if self.max_index is not None else self.count - 1
        if self.index >= grid_size or top >= grid_size:
            what = (f"the job array goes up to index {top}" if self.launcher == "array"
                    else f"{self.count} tasks were started")
            raise SweepError(f"{what}, but the grid has {grid_size} configurations (indices 0 to {grid_size - 1}): "
                             "task indices outside the grid would train nothing or repeat a configuration; "
                             f"ask for {grid_size} tasks (--array=0-{grid_size - 1}, --ntasks={grid_size}, "
                             f"--nproc {grid_size}) or change the grid")
        if self.launcher != "array" and self.count != grid_size:
            raise SweepError(f"{self.count} tasks for a grid of {grid_size} configurations: configurations "
                             f"{self.count} to {grid_size - 1} would never run; ask for {grid_size} tasks or shrink the grid")
        return [self.index]


def task(run: Path | None = None, environ: Mapping[str, str] | None = None, sweep_id: str = "") -> Task:
    """This process's task, from its launcher's variables:

    1. a SLURM job array task: SLURM_ARRAY_TASK_ID; the sweep is the array (SLURM_ARRAY_JOB_ID);
    2. one of several srun tasks (SLURM_PROCID) or torchrun processes (RANK), as `dist.detect()`
       sees them; the sweep is the job (SLURM_JOB_ID), or the run folder `run` for torchrun;
    3. one process: it runs every configuration; the sweep is named after its run folder.

    `sweep_id` overrides the derived id: to rerun a configuration into an existing sweep.
    Only the variables are read: no process group is formed, the tasks never talk.
    """
    e = os.environ if environ is None else environ
    env = dist.detect(e, cuda_count=0, hostnames=lambda nodelist: [nodelist])  # no scontrol: no rendezvous here
    explicit = str(sweep_id).strip()
    if e.get("SLURM_ARRAY_TASK_ID", "").isdigit():
        if env.is_distributed:
            raise SweepError("a job array task with several tasks: give each array task one task (--ntasks=1), "
                             "one configuration each")
        return Task(int(e["SLURM_ARRAY_TASK_ID"]), int(e.get("SLURM_ARRAY_TASK_COUNT", 1)), "array",
                    explicit or e.get("SLURM_ARRAY_JOB_ID", e.get("SLURM_JOB_ID", "array")),
                    int(e["SLURM_ARRAY_TASK_MAX"]) if e.get("SLURM_ARRAY_TASK_MAX", "").isdigit() else None)
    name = Path(run).name if run is not None else (e.get("TORCHELASTIC_RUN_ID") or timestamp())
    if env.is_distributed:
        derived = env.job_id if env.launcher == "slurm" and env.job_id else name
        return Task(env.rank, env.world_size, env.launcher, explicit or derived)
    return Task(None, 1, "single", explicit or name)


def task_env(env: dist.DistEnv | None = None) -> dist.DistEnv:
    """The DistEnv of one configuration: a world of one (rank 0 of 1) on this task's device.
    Task parallelism forms no world; each task is a world of its own, and its record says so."""
    env = env or dist.detect(hostnames=lambda nodelist: [nodelist])
    return replace(env, rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, nodes=1,
                   master_addr=dist.DistEnv.master_addr, master_port=dist.DistEnv.master_port)


def sweep_dir(sweep_id: str) -> Path:
    """runs/sweep-<id>/: shared by the sweep's tasks, each writing only its own config<i>/."""
    return runs_root() / f"sweep-{sweep_id}"


def start(folder: Path, grid: list[dict], sweep_id: str) -> Path:
    """Make the sweep folder and its sweep.json (the grid). Every task writes the same text; a
    different grid already there is an error (a rerun into a sweep must use the sweep's grid). The folder is made
    with the run folders' mode (700 unless $WORKSHOP_RUNS_MODE), as every run folder is."""
    make_folder(folder)
    text = json.dumps({"sweep": sweep_id, "grid": grid}, indent=2) + "\n"
    path = folder / "sweep.json"
    if path.exists() and json.loads(path.read_text())["grid"] != json.loads(text)["grid"]:
        raise SweepError(f"sweep {sweep_id} was started with another grid ({display_path(path)}): "
                         "pass the same grid parameters, or another sweep id")
    atomic_write_text(path, text)
    return path


def record_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"config{index}" / "record.json"


def write_record(folder: Path, index: int, config: dict, t: Task, *, notebook: str, params: dict, results: dict,
                 env: dist.DistEnv | None = None, **extra) -> Path:
    """Write `<sweep>/config<index>/record.json` (atomically) for whichever task trained it, with the
    sweep's id, the configuration and the task. A configuration already recorded "ok" is an error:
    two tasks were given the same configuration."""
    path = record_path(folder, index)
    if records.status(path.parent) == "ok":
        raise SweepError(f"configuration {index} of sweep {t.sweep_id} has a record already "
                         f"({display_path(path)}): two tasks were given the same configuration")
    make_folder(path.parent)
    task_info = {"index": index, "count": t.count, "launcher": t.launcher,
                 "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
                 "node": os.environ.get("SLURMD_NODENAME") or os.uname().nodename,  # n1, n2 on the local cluster
                 # the machine itself (both local nodes are one), its CPUs this task may use, and its threads:
                 # `usage` tells from them whether tasks that ran at once shared cores
                 "host": os.uname().nodename, "cpus": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}
    written = metrics.write_record(path.parent, notebook=notebook, params=params, results=results, env=task_env(env),
                                   sweep=t.sweep_id, config_index=index, config=config, task=task_info, **extra)
    assert written == path
    return path


def read_grid(folder: Path) -> list[dict]:
    path = Path(folder) / "sweep.json"
    if not path.exists():
        raise SweepError(f"no sweep at {display_path(folder)} (no sweep.json): is the sweep id right? "
                         f"Sweeps under {display_path(runs_root())}: "
                         + (", ".join(sorted(p.name for p in runs_root().glob("sweep-*"))) or "none"))
    return json.loads(path.read_text())["grid"]


def collect(folder: Path) -> tuple[list[dict], list[int]]:
    """(the records of the sweep's configurations, by index; the indices with no record yet)."""
    grid = read_grid(folder)
    found, missing = [], []
    for i in range(len(grid)):
        path = record_path(folder, i)
        if path.exists():
            found.append(records.read(path).as_dict())
        else:
            missing.append(i)
    return found, missing


def wait_for(folder: Path, timeout_s: float, poll_s: float = 2.0) -> tuple[list[dict], list[int]]:
    """`collect`, once every configuration has a record or `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        found, missing = collect(folder)
        if not missing or time.monotonic() >= deadline:
            return found, missing
        time.sleep(poll_s)


def usage(found: list[dict]) -> dict:
    """What the sweep cost and how long it took, from its records: device-hours (the sum over
    configurations of wall time x devices), the sweep's wall time (first start to last end), and
    the wall time of the same configurations run one after another on one device."""
    serial = sum(r["results"]["wall_time_s"] for r in found)
    device_s = sum(r["results"]["wall_time_s"] * r["results"]["devices"] for r in found)
    wall = max(r["results"]["end"] for r in found) - min(r["results"]["start"] for r in found) if found else 0.0
    return {"configurations": len(found), "device_hours": device_s / 3600, "sweep_wall_s": wall, "serial_wall_s": serial,
            "shared_cpus": shared_cpus(found)}


def shared_cpus(found: list[dict]) -> dict | None:
    """Whether CPU tasks that ran at the same time on one machine wanted more threads than it has
    CPUs: then each ran slower than it would alone, and the sum of their times overstates a run
    one after another. {"host", "tasks" (the most at once), "threads" (theirs together), "cpus"},
    or None (GPU tasks, one task at a time, or enough cores)."""
    worst = None
    for r in found:
        t, res = r.get("task") or {}, r["results"]
        if "cpus" not in t or r.get("dist", {}).get("device", "cpu") != "cpu":
            continue
        at_once = [o for o in found if (o.get("task") or {}).get("host") == t["host"]
                   and o["results"]["start"] < res["end"] and res["start"] < o["results"]["end"]]
        threads = sum((o["task"].get("threads") or 1) for o in at_once)
        if len(at_once) > 1 and threads > t["cpus"] and (worst is None or threads > worst["threads"]):
            worst = {"host": t["host"], "tasks": len(at_once), "threads": threads, "cpus": t["cpus"]}
    return worst


def check_grid(make: Callable[..., list[dict]]):
    """Exercise 03.1: a student's `make(**axes)` must give `make_grid`'s configurations, in its order (the first
    axis slowest), on a few grids. The hint names what differs."""
    from workshop.check import Match

    for axes in ({"lr": [0.1]}, {"lr": [0.01, 0.1], "batch_size": [32, 64, 128]},
                 {"lr": [1, 2], "batch_size": [8, 16], "seed": [0, 1]}):
        got, want = make(**axes), make_grid(**axes)
        call = ", ".join(f"{k}={v}" for k, v in axes.items())
        if not isinstance(got, list) or not all(isinstance(c, dict) for c in got):
            return Match(False, f"make_grid({call}) gave a {type(got).__name__}: return a list of dicts, one per "
                                "configuration")
        if len(got) != len(want):
            return Match(False, f"make_grid({call}) gave {len(got)} configurations, the grid has {len(want)}: every "
                                "combination of one value per axis (itertools.product)")
        if got != want:
            if sorted(sorted(c.items()) for c in got) == sorted(sorted(c.items()) for c in want):
                return Match(False, f"make_grid({call}) has every configuration, in another order: the first axis "
                                    "changes slowest, as itertools.product(*axes.values()) gives them")
            return Match(False, f"make_grid({call}) gave {got[:2]}..., expected {want[:2]}... (names from the axes)")
    return Match(True)
