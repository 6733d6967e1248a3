"""notebooks/03_task_parallelism.ipynb and workshop.launch.sweep: a sweep as one process (nbval runs that), as 2 local
processes, as a job array on the local SLURM cluster (then collected); tasks that do not fit the grid."""

import json
import os

import pytest
import torch

from helpers import REPO, run_notebook, sbatch
from workshop.base import records
from workshop.launch import sweep

NB03 = "notebooks/03_task_parallelism.ipynb"
TINY = ["-p", "lrs", "0.05,0.2", "-p", "steps", "3", "-p", "num_train", "256", "-p", "num_test", "128"]
GRID = [{"lr": 0.05, "batch_size": 64}, {"lr": 0.2, "batch_size": 64}]


# --- workshop.launch.sweep, no processes ---------------------------------------------------------------------

def test_grid_is_every_combination_first_axis_slowest():
    grid = sweep.make_grid(lr=sweep.parse_values("0.1, 0.3"), batch_size=sweep.parse_values(32, int))
    assert grid == [{"lr": 0.1, "batch_size": 32}, {"lr": 0.3, "batch_size": 32}]
    assert len(sweep.make_grid(a=[1, 2, 3], b=[4, 5])) == 6


@pytest.mark.parametrize("text", ["0.1,0.3,0.1", "1,1"])
def test_a_value_given_twice_is_an_error(text):
    with pytest.raises(sweep.SweepError, match="more than once: two tasks would train the same configuration"):
        sweep.make_grid(lr=sweep.parse_values(text))


def test_an_empty_axis_is_an_error():
    with pytest.raises(sweep.SweepError, match="lrs is empty"):
        sweep.parse_values(" , ", name="lrs")


def test_task_from_each_launcher(tmp_path):
    run = tmp_path / "20250101-000000-03_task_parallelism"
    array = {"SLURM_JOB_ID": "107", "SLURM_ARRAY_JOB_ID": "105", "SLURM_ARRAY_TASK_ID": "2",
             "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MAX": "3"}
    assert sweep.task(run, array) == sweep.Task(2, 4, "array", "105", 3)
    step = {"SLURM_JOB_ID": "200", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    assert sweep.task(run, step) == sweep.Task(3, 4, "slurm", "200")
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert sweep.task(run, torchrun) == sweep.Task(1, 2, "torchrun", run.name)
    batch_step = {"SLURM_JOB_ID": "300", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    assert sweep.task(run, batch_step) == sweep.Task(None, 1, "single", run.name)
    assert sweep.task(run, {}, sweep_id=105).sweep_id == "105"  # papermill passes `-p sweep_id 105` as a number


def test_tasks_must_fit_the_grid():
    assert sweep.Task(None, 1, "single", "s").indices(3) == [0, 1, 2]
    assert sweep.Task(1, 2, "torchrun", "s").indices(2) == [1]
    assert sweep.Task(2, 1, "array", "s", max_index=2).indices(4) == [2]  # one array index submitted again on its own
    with pytest.raises(sweep.SweepError, match="5 tasks were started, but the grid has 4 configurations"):
        sweep.Task(0, 5, "slurm", "s").indices(4)
    with pytest.raises(sweep.SweepError, match="array goes up to index 4, but the grid has 4"):
        sweep.Task(0, 5, "array", "s", max_index=4).indices(4)
    with pytest.raises(sweep.SweepError, match="configurations 3 to 3 would never run"):
        sweep.Task(0, 3, "torchrun", "s").indices(4)


def test_records_once_per_configuration_and_usage(runs):
    folder = sweep.sweep_dir("t1")
    grid = [{"lr": 0.1}, {"lr": 0.2}]
    sweep.start(folder, grid, "t1")
    task = sweep.Task(None, 1, "single", "t1")
    for i, (start, end) in enumerate([(100.0, 110.0), (105.0, 130.0)]):
        results = {"wall_time_s": end - start, "start": start, "end": end, "devices": 1}
        path = sweep.write_record(folder, i, grid[i], task, notebook="nb", params={}, results=results)
        assert path == folder / f"config{i}" / "record.json"
        assert [p.stat().st_mode & 0o777 for p in (folder, path.parent, path)] == [0o700, 0o700, 0o600]  # private
    with pytest.raises(sweep.SweepError, match="two tasks were given the same configuration"):
        sweep.write_record(folder, 0, grid[0], task, notebook="nb", params={}, results={})
    records, missing = sweep.collect(folder)
    assert missing == [] and [(r["config_index"], r["config"], r["sweep"]) for r in records] == [(0, grid[0], "t1"),
                                                                                                 (1, grid[1], "t1")]
    assert records[0]["dist"]["world_size"] == 1  # each configuration is a world of one
    cost = sweep.usage(records)
    assert cost["device_hours"] == pytest.approx(35 / 3600) and cost["sweep_wall_s"] == 30 and cost["serial_wall_s"] == 35
    cpus = len(os.sched_getaffinity(0))
    assert records[0]["task"]["cpus"] == cpus and records[0]["task"]["threads"] == torch.get_num_threads()

    def shared(threads, cpus=cpus):  # the two overlap in time on this machine
        return {"host": os.uname().nodename, "tasks": 2, "threads": 2 * threads, "cpus": cpus} if 2 * threads > cpus else None

    assert cost["shared_cpus"] == shared(torch.get_num_threads())
    for threads in (1, cpus, 64):
        for r in records:
            r["task"]["threads"] = threads
        assert sweep.usage(records)["shared_cpus"] == shared(threads)
    records[1]["results"].update(start=110.0, end=135.0)  # one after the other: nothing shared
    assert sweep.usage(records)["shared_cpus"] is None
    with pytest.raises(sweep.SweepError, match="another grid"):
        sweep.start(folder, [{"lr": 0.5}], "t1")


# --- the notebook through scripts/run_notebook.sh --------------------------------------------------------

def check_lines(notebook):
    """The output of the NBVAL_CHECK_OUTPUT cell that checks the collection."""
    cells = json.loads(notebook.read_text())["cells"]
    cell = next(c for c in cells if c["cell_type"] == "code" and "exactly once" in "".join(c["source"]))
    return "".join("".join(o.get("text", "")) for o in cell["outputs"]).splitlines()


def assert_collected(notebook, n):
    lines = [" ".join(line.split()) for line in check_lines(notebook)]  # check.require aligns the verdicts
    assert lines == [f"records: {n} of {n} configurations", "each configuration exactly once: True",
                     "each with its grid's configuration: True", "all of one sweep: True"]


def sweep_records(folder, n):
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [f"config{i}" for i in range(n)]
    return [records.read(folder / f"config{i}" / "record.json") for i in range(n)]


@pytest.mark.multirank
def test_sweep_on_two_local_processes_collects_on_task_0(runs):
    """A grid of 2 as 2 local processes, a few steps each: task 0 waits for the other's record, then collects. The
    committed grid's checked cells are compared by nbval (one process)."""
    out = run_notebook("--nproc", 2, NB03, *TINY)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("sweep-")]
    folder = runs / f"sweep-{run.name}"  # locally the sweep is named after the run folder
    configs = sweep_records(folder, 2)
    assert [(r.extra["config"], r.extra["task"]["index"], r.extra["task"]["launcher"]) for r in configs] == [
        (GRID[0], 0, "torchrun"), (GRID[1], 1, "torchrun")]
    assert all(r.status == "ok" and r.params["steps"] == 3 and r.dist["world_size"] == 1 for r in configs)
    assert_collected(run / "03_task_parallelism.ipynb", 2)  # task 0 waited for the other task, then collected


def test_collect_only_needs_an_existing_sweep(runs):
    out = run_notebook(NB03, "-p", "collect_only", "True", "-p", "sweep_id", "nosuch", timeout=300)
    assert out.returncode != 0 and "no sweep at" in out.stderr


# --- on the local SLURM cluster --------------------------------------------------------------------------

def remove_logs(jobs):
    for job in jobs:
        (REPO / "runs" / f"slurm-{job}.out").unlink(missing_ok=True)


@pytest.mark.slurm
def test_job_array_then_a_collection(slurm, runs):
    rc, array, log = sbatch(runs, "--array=0-1", "scripts/run_notebook.sh", NB03, *TINY)
    folder = runs / f"sweep-{array}"  # the array job id names the sweep
    configs = sweep_records(folder, 2) if folder.is_dir() else []
    jobs = [r.slurm_job_id for r in configs]
    try:
        assert rc == 0, log[-4000:]
        assert [(r.extra["config"], r.extra["task"]["index"], r.extra["task"]["launcher"]) for r in configs] == [
            (GRID[0], 0, "array"), (GRID[1], 1, "array")]
        assert len(set(jobs)) == 2  # two jobs, one configuration each, each its own run folder
        for job in jobs:
            assert (runs / f"job{job}-03_task_parallelism" / "03_task_parallelism.ipynb").is_file()
        # array tasks do not wait for each other: a separate run collects
        out = run_notebook(NB03, "-p", "collect_only", "True", "-p", "sweep_id", array, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        (collection,) = [p for p in runs.iterdir() if p.name.endswith("-03_task_parallelism") and not p.name.startswith("job")]
        assert_collected(collection / "03_task_parallelism.ipynb", 2)
    finally:
        remove_logs(jobs + [array])
