"""Bad input: each case, its exact error message and exit status, as in the README's Troubleshooting.

One table, CASES: append a case to add one. A case runs `scripts/run_notebook.sh` with its
arguments (or, for what a user calls from Python, `python -c` with its `python` code) and
environment (after its `setup` made what it needs in a temporary folder) and expects
the exit status and, in stderr, the message with {tmp} (the temporary folder) and {repo} filled in.
Exit status 2: refused before anything runs, and nothing is written under the runs folder.
Exit status 1: the notebook started and failed in a cell, which the message names.
Exit status 0: diagnosed, and the run goes on (a layout's `warning:`, as workshop.dist says it on every rank).
A layout is checked as a step's task sees it: `python -m workshop.launch.preflight` in the environment srun (or
torchrun) gives that task, SLURM's variables written out by `step`.
`test_the_readme_lists_every_case` keeps the README's table and this one the same.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from helpers import REPO, RUN_NOTEBOOK
from workshop.base.world import tasks_per_node

FAIL = "tests/notebooks/fail_on_rank.ipynb"
RESUME = "tests/notebooks/resume_training.ipynb"
NB01 = "notebooks/01_baseline.ipynb"
NB03 = "notebooks/03_task_parallelism.ipynb"
NB08 = "notebooks/08_tensor_parallelism.ipynb"
TINY03 = ["-p", "lrs", "0.1,0.3", "-p", "steps", "2", "-p", "num_train", "64", "-p", "num_test", "32",
          "-p", "dataset", "synthetic"]


@dataclass
class Case:
    name: str  # what is wrong, as the README's table says it
    args: list[str]  # run_notebook.sh's arguments; {tmp} is the case's temporary folder
    code: int  # the exit status
    message: str  # a line of stderr (or the start of one; \n where the message goes on), {tmp} and {repo} filled in
    env: dict = field(default_factory=dict)  # added to the environment; {tmp} filled in
    setup: Callable[[Path], None] | None = None  # makes what the case needs under tmp
    unprivileged: bool = False  # needs permission checks that root skips (run without root's override)
    skip: Callable[[], str] | None = None  # a reason to skip here, or ""
    python: str = ""  # run `python -c` with this code instead of run_notebook.sh (args then empty)
    module: str = ""  # run `python -m` with this module instead (a step's layout: workshop.launch.preflight)


def _unreadable_notebook(tmp: Path) -> None:
    shutil.copy(REPO / FAIL, tmp / "unreadable.ipynb")
    (tmp / "unreadable.ipynb").chmod(0)


def _corrupt_notebook(tmp: Path) -> None:
    (tmp / "corrupt.ipynb").write_text('{"cells": [')  # cut off mid-write


def _plain_notebook(tmp: Path) -> None:
    nb = json.loads((REPO / FAIL).read_text())
    for cell in nb["cells"]:
        cell["metadata"].pop("tags", None)
    (tmp / "plain.ipynb").write_text(json.dumps(nb))


def _read_only_runs(tmp: Path) -> None:
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)


def _empty_data(tmp: Path) -> None:
    (tmp / "data").mkdir()


def _corrupt_cifar(tmp: Path) -> None:
    folder = tmp / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(b"\0" * 1000)  # a download cut short


def _fake_python(tmp: Path) -> None:
    (tmp / "python").write_text("#!/bin/sh\nexit 1\n")
    (tmp / "python").chmod(0o755)


def _run_folder(status: str, args: list[str]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        run = tmp / "runs" / "earlier-fail_on_rank"
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"notebook": str(REPO / FAIL), "nranks": 1, "papermill_args": args}))
        (run / "record.json").write_text(json.dumps({"notebook": "fail_on_rank", "status": status}))
    return setup


def _other_models_checkpoint(tmp: Path) -> None:
    from workshop import checkpoint

    checkpoint.save(tmp / "ckpt" / "step5.pt", torch.nn.Linear(3, 3), None, 5, model_name="linear")


def _image_folder(*classes: str, empty: tuple[str, ...] = ()) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for name in classes:
            folder = tmp / "data" / "birds" / "train" / name
            folder.mkdir(parents=True)
            if name not in empty:
                (folder / "0001.png").write_bytes(b"\x89PNG")
    return setup


def _latin1_text(tmp: Path) -> None:
    (tmp / "notes.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)


def _truncated_checkpoint(tmp: Path) -> None:
    from workshop import checkpoint

    path = checkpoint.save(tmp / "ckpt" / "step5.pt", torch.nn.Linear(3, 3), None, 5, model_name="linear")
    path.write_bytes(path.read_bytes()[:200])  # the job's time ran out while it was written, say


def _parameters_file(text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / "params.yaml").write_text(text)
    return setup


def _running_run(tmp: Path) -> None:
    """A run that another launcher, alive on this host (this test's own process), writes now."""
    _run_folder("running", [])(tmp)
    record = tmp / "runs" / "earlier-fail_on_rank" / "record.json"
    record.write_text(json.dumps({"notebook": "fail_on_rank", "status": "running",  # as rundir.write_record writes it
                                  "launcher": {"host": socket.gethostname(), "pid": os.getpid()}}))


def _path_without_srun(tmp: Path) -> None:
    (tmp / "bin").mkdir()
    (tmp / "bin" / "bash").symlink_to(shutil.which("bash"))


def step(procid: int, tasks: int, per_node: str, nodes: str, **extra) -> dict:
    """The variables srun gives task `procid` of a step of `tasks` tasks on `nodes` (a plain list, no scontrol)."""
    names = nodes.split(",")
    counts = tasks_per_node(per_node)
    node = next(i for i in range(len(counts)) if procid < sum(counts[:i + 1]))
    return {"SLURM_JOB_ID": "4711", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid - sum(counts[:node])), "SLURM_NODEID": str(node),
            "SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_STEP_TASKS_PER_NODE": per_node, "SLURM_STEP_NODELIST": nodes,
            "SLURM_JOB_NODELIST": nodes, "SLURM_STEP_NUM_NODES": str(len(names)), "SLURM_JOB_NUM_NODES": str(len(names)),
            "SLURMD_NODENAME": names[node], **extra}


PREFLIGHT = "workshop.launch.preflight"
TWO_NODES = "gpu017,gpu018"


def _no_gpu_here() -> str:
    return "this machine has a GPU" if torch.cuda.is_available() else ""


CASES = [
    Case("no notebook given", [], 2, "error: no notebook given"),
    Case("a notebook that does not exist", ["notebooks/99_missing.ipynb"], 2,
         "error: notebook {repo}/notebooks/99_missing.ipynb does not exist (notebooks are under notebooks/, "
         "e.g. notebooks/01_baseline.ipynb)"),
    Case("a file that is not a notebook", ["README.md"], 2, "error: {repo}/README.md is not a notebook (.ipynb)"),
    Case("a notebook that cannot be read", ["{tmp}/unreadable.ipynb"], 2,
         "error: notebook {tmp}/unreadable.ipynb cannot be read (permission denied): check its permissions (ls -l) "
         "or copy it somewhere you can read", setup=_unreadable_notebook, unprivileged=True),
    Case("a corrupt notebook (not JSON)", ["{tmp}/corrupt.ipynb"], 2,
         "error: {tmp}/corrupt.ipynb is not a valid notebook (JSONDecodeError:", setup=_corrupt_notebook),
    Case("an unknown parameter", [FAIL, "-p", "learning_rate", "0.1"], 2,
         "error: fail_on_rank.ipynb has no parameter 'learning_rate'. Its parameters:"),
    Case("an unknown parameter in YAML", [FAIL, "-y", "{stepz: 2}"], 2,
         "error: fail_on_rank.ipynb has no parameter 'stepz'. Its parameters:"),
    Case("a parameter of the wrong type", [FAIL, "-p", "steps", "three"], 2,
         "error: parameter steps of fail_on_rank.ipynb is an int (default 3), got 'three' (str): pass a value of that "
         "type, e.g. -p steps 3"),
    Case("a parameters file that does not exist", [FAIL, "-f", "nope.yaml"], 2,
         "error: parameters file nope.yaml does not exist"),
    Case("a notebook that is not parameterised", ["{tmp}/plain.ipynb", "-p", "steps", "2"], 2,
         "error: plain.ipynb is not parameterised (no cell tagged 'parameters'), so steps cannot be set: tag the cell "
         "of defaults 'parameters' (JupyterLab: property inspector, cell tags), or run it without -p/-f/-y",
         setup=_plain_notebook),
    Case("--nproc zero", ["--nproc", "0", FAIL], 2,
         "error: the number of ranks must be a positive integer, got '0' (e.g. --nproc 2)"),
    Case("--nproc not a number", ["--nproc", "two", FAIL], 2,
         "error: the number of ranks must be a positive integer, got 'two' (e.g. --nproc 2)"),
    Case("an interpreter without the workshop package", [FAIL], 2,
         "error: {tmp}/python cannot import the workshop package and papermill: activate the workshop environment "
         "(conda activate workshop, or source .venv/bin/activate), or set WORKSHOP_PYTHON",
         env={"WORKSHOP_PYTHON": "{tmp}/python"}, setup=_fake_python),
    Case("GPU parameters on a machine with no GPU", [NB01, "-f", "notebooks/params/gpu.yaml"], 2,
         "error: notebooks/params/gpu.yaml holds GPU-sized parameters and this machine has no GPU: drop -f to run the "
         "CPU defaults, or submit to a GPU partition (sbatch --gpus-per-node=1 ...); WORKSHOP_ALLOW_CPU=1 runs them "
         "on CPU anyway", skip=_no_gpu_here),
    Case("NCCL asked for on CPU", [FAIL], 2,
         "error: WORKSHOP_BACKEND=nccl but this machine has no GPU: NCCL needs CUDA; unset WORKSHOP_BACKEND (gloo is "
         "used on CPU) or run on a GPU node", env={"WORKSHOP_BACKEND": "nccl"}, skip=_no_gpu_here),
    Case("an unknown backend", [FAIL], 2,
         "error: WORKSHOP_BACKEND=mpi: use nccl (GPUs) or gloo (CPU), or unset it to let the device decide",
         env={"WORKSHOP_BACKEND": "mpi"}),
    Case("a data set asked for but not staged", [NB01, "-p", "dataset", "cifar10"], 2,
         "error: CIFAR-10 is not staged: {tmp}/data/cifar-10-batches-py does not exist; stage it on a machine with "
         "internet (a login node): `scripts/stage_data.sh cifar10 DIR`, then `export WORKSHOP_DATA=DIR` (or pass "
         "dataset='synthetic' to run without it)", env={"WORKSHOP_DATA": "{tmp}/data"}, setup=_empty_data),
    Case("a corrupt staged data set", [NB01, "-p", "dataset", "cifar10"], 2,
         "error: CIFAR-10 in {tmp}/data/cifar-10-batches-py is incomplete or corrupt (data_batch_1, data_batch_2, "
         "data_batch_3, data_batch_4, data_batch_5, test_batch missing or with a wrong checksum): delete the folder "
         "and stage it again; stage it on a machine with internet", env={"WORKSHOP_DATA": "{tmp}/data"},
         setup=_corrupt_cifar),
    Case("a runs folder that is not writable", [FAIL], 2,
         "error: the runs folder {tmp}/ro is not writable: set WORKSHOP_RUNS to a folder you can write (e.g. export "
         "WORKSHOP_RUNS=$HOME/runs, or one on the project's scratch file system)",
         env={"WORKSHOP_RUNS": "{tmp}/ro"}, setup=_read_only_runs, unprivileged=True),
    Case("a run-folder mode that is not octal", [FAIL], 2,
         "error: WORKSHOP_RUNS_MODE=rw: is not an octal mode the owner can use: give three octal digits starting "
         "with 7, e.g. 700 (only you) or 750 (your group may read)", env={"WORKSHOP_RUNS_MODE": "rw:"}),
    Case("--resume of a folder that does not exist", ["--resume", "{tmp}/nope", FAIL], 2,
         "error: --resume {tmp}/nope: no such run folder"),
    Case("--resume with other parameters", ["--resume", "{tmp}/runs/earlier-fail_on_rank", FAIL, "-p", "steps", "5"], 2,
         "error: {tmp}/runs/earlier-fail_on_rank was started with the parameters -p steps 2, not -p steps 5: resume "
         "with the same ones, or start a new run", setup=_run_folder("interrupted", ["-p", "steps", "2"])),
    Case("--resume of a run that finished", ["--resume", "{tmp}/runs/earlier-fail_on_rank", FAIL], 2,
         "error: {tmp}/runs/earlier-fail_on_rank finished already (record.json says ok): nothing to resume",
         setup=_run_folder("ok", [])),
    Case("a checkpoint from another model", [RESUME, "-p", "steps", "8", "-p", "checkpoint_dir", "{tmp}/ckpt"], 1,
         "(CheckpointMismatch: checkpoint {tmp}/ckpt/step5.pt is of model 'linear' (Linear, 12 parameters), not of "
         "this model 'tinygpt-resume-test' (TinyGPT,", setup=_other_models_checkpoint),
    Case("a job array index outside the sweep grid", ["--nproc", "1", NB03, *TINY03], 1,
         "(SweepError: the job array goes up to index 2, but the grid has 2 configurations (indices 0 to 1): task "
         "indices outside the grid would train nothing or repeat a configuration; ask for 2 tasks (--array=0-1, "
         "--ntasks=2, --nproc 2) or change the grid)",
         env={"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MAX": "2",
              "SLURM_ARRAY_JOB_ID": "777"}),
    Case("a tensor-parallel size that does not divide the heads", [], 1,
         "ValueError: tensor-parallel size 3 does not divide the 4 attention heads\n(heads 4, dim 128, hidden 512, "
         "vocab_size 256); choose tp_size from [1, 2, 4]",
         python='from workshop import models, tp; tp.check_tp_size(models.tinygpt("cpu"), 3)'),
    Case("a mesh whose product is not the world size", ["--nproc", "1", NB08, "-p", "tp_size", "1", "-p", "dp_size", "2"],
         1, "(ValueError: mesh dp_size 2 x tp_size 1 = 2 ranks, but the world has 1;\nchoose (dp_size, tp_size) from "
         "[(1, 1)])"),
    Case("the FSDP strategy on CPU", [], 1,
         "ValueError: Lightning's FSDP strategy needs CUDA GPUs and this rank runs on CPU: use "
         "strategy=ModelParallelStrategy(data_parallel_size=env.world_size, tensor_parallel_size=1) with "
         "`workshop.sharding.apply_fsdp` in the module's configure_model (FSDP2, runs on CPU), or strategy=\"ddp\"",
         python='from workshop import dist; dist.make_trainer(strategy="fsdp")',
         skip=lambda: "a GPU is here: FSDP is allowed" if torch.cuda.is_available() else ""),
    Case("epochs below 1", [NB01, "-p", "epochs", "-1"], 2,
         "error: parameter epochs = -1 must be at least 1 (the rules are in 01_baseline.ipynb's parameters cell)"),
    Case("a learning rate that is not a number", [NB01, "-p", "lr", "nan"], 2,
         "error: parameter lr = nan is not a number; it must be above 0, at most 10 (the rules are in 01_baseline.ipynb's "
         "parameters cell)"),
    Case("a batch size of 0", [NB01, "-p", "batch_size", "0"], 2,
         "error: parameter batch_size = 0 must be at least 1 (the rules are in 01_baseline.ipynb's parameters cell)"),
    Case("no training images", [NB01, "-p", "num_train", "0"], 2,
         "error: parameter num_train = 0 must be at least 1 (the rules are in 01_baseline.ipynb's parameters cell)"),
    Case("a model name that does not exist", [NB01, "-p", "model_name", "resnet50"], 2,
         "error: parameter model_name = 'resnet50' must be one of small_cnn, resnet18, vit_tiny (the rules are in "
         "01_baseline.ipynb's parameters cell)"),
    Case("-p without a value", [FAIL, "-p", "steps"], 2,
         "error: argument -p/--parameters: expected 2 arguments (e.g. -p epochs 1 -f params.yaml; "
         "scripts/run_notebook.sh --help)"),
    Case("an option papermill does not have", [FAIL, "--steps", "3"], 2,
         "error: unknown option or stray value '--steps 3': a run takes -p NAME VALUE, -r NAME VALUE, -f FILE.yaml, "
         "-y YAML, -b BASE64, -k KERNEL and --cwd DIR after the notebook"),
    Case("a misspelt launcher option", ["--nprocs", "2", FAIL], 2,
         "error: unknown option --nprocs: before the notebook come --nproc N and --resume RUN_DIR"),
    Case("YAML that does not parse", [FAIL, "-y", "{steps: [1"], 2,
         "error: -y {steps: [1: not valid YAML (while parsing a flow sequence)"),
    Case("YAML that is not a mapping", [FAIL, "-y", "[1, 2]"], 2,
         "error: -y [1, 2] must give a mapping of parameter names to values"),
    Case("a parameters file with an unknown key", [FAIL, "-f", "{tmp}/params.yaml"], 2,
         "error: fail_on_rank.ipynb has no parameter 'stepz'. Its parameters:", setup=_parameters_file("stepz: 2\n")),
    Case("a parameters file that does not parse", [FAIL, "-f", "{tmp}/params.yaml"], 2,
         "error: -f {tmp}/params.yaml: not valid YAML (while parsing a flow sequence)", setup=_parameters_file("steps: [1\n")),
    Case("a number where a switch is expected", ["notebooks/02_single_device_performance.ipynb", "-p", "compile_on_cpu", "1"],
         2, "error: parameter compile_on_cpu of 02_single_device_performance.ipynb is a bool (default False), got 1 (int): "
         "pass a value of that type, e.g. -p compile_on_cpu False"),
    Case("a learning rate far too large", [NB01, "-p", "lr", "100"], 2,
         "error: parameter lr = 100 must be above 0, at most 10 (the rules are in 01_baseline.ipynb's parameters cell)"),
    Case("a model size that does not exist", ["notebooks/06_sharding.ipynb", "-p", "size", "huge"], 2,
         "error: parameter size = 'huge' must be one of cpu, small, gpu (the rules are in 06_sharding.ipynb's "
         "parameters cell)"),
    Case("a compile mode that does not exist", ["notebooks/11_inference.ipynb", "-p", "compile_mode", "max"], 2,
         "error: parameter compile_mode = 'max' must be one of default, reduce-overhead, max-autotune (the rules are in "
         "11_inference.ipynb's parameters cell)"),
    Case("a sampling temperature of 0", ["notebooks/11_inference.ipynb", "-p", "temperature", "0"], 2,
         "error: parameter temperature = 0 must be above 0 (the rules are in 11_inference.ipynb's parameters cell)"),
    Case("a provoked hang that would never time out", ["notebooks/12_when_things_go_wrong.ipynb", "-p", "fault_timeout",
                                                        "0"], 2,
         "error: parameter fault_timeout = 0 must be above 0, at most 30 (the rules are in 12_when_things_go_wrong.ipynb's "
         "parameters cell)"),
    Case("more local ranks than the machine can run", ["--nproc", "999", FAIL], 2,
         "error: --nproc 999: too many local ranks for this machine"),
    Case("a rank timeout that is not a number", [FAIL], 2,
         "error: WORKSHOP_DIST_TIMEOUT=10m: give the seconds a rank waits for the others, a number above 0 (e.g. 600), "
         "or unset it", env={"WORKSHOP_DIST_TIMEOUT": "10m"}),
    Case("a log interval that is not a number", [FAIL], 2,
         "error: WORKSHOP_LOG_EVERY='often': give a whole number of steps (0 for no lines)",
         env={"WORKSHOP_LOG_EVERY": "often"}),
    Case("--resume with another number of ranks", ["--nproc", "2", "--resume", "{tmp}/runs/earlier-fail_on_rank", FAIL], 2,
         "error: {tmp}/runs/earlier-fail_on_rank ran as 1 rank(s), not 2: resume with the same number of ranks "
         "(fail_on_rank.ipynb does not declare that its checkpoints and data order survive another: its metadata has "
         "no workshop.reshards)", setup=_run_folder("interrupted", [])),
    Case("--resume with another notebook", ["--resume", "{tmp}/runs/earlier-fail_on_rank", RESUME], 2,
         "error: {tmp}/runs/earlier-fail_on_rank is a run of fail_on_rank.ipynb, not of resume_training.ipynb: resume it "
         "with its own notebook", setup=_run_folder("interrupted", [])),
    Case("--resume of a folder that is not a run", ["--resume", "{tmp}", FAIL], 2,
         "error: {tmp} is not a run folder (no readable run.json): give the folder of the run to resume"),
    Case("an image folder with one class", [NB01, "-p", "dataset", "birds"], 2,
         "error: the image folder {tmp}/data/birds/train has one class (sparrow): a classifier needs at least two; lay it "
         "out as {tmp}/data/birds/train/<class>/*.jpg and {tmp}/data/birds/test/<class>/*.jpg",
         env={"WORKSHOP_DATA": "{tmp}/data"}, setup=_image_folder("sparrow")),
    Case("an image folder with an empty class", [NB01, "-p", "dataset", "birds"], 2,
         "error: the image folder {tmp}/data/birds/train has class folders without images: robin (images are .jpg, .jpeg, "
         ".png, .ppm, .bmp, .pgm, .tif, .tiff, .webp); add images or remove the folders",
         env={"WORKSHOP_DATA": "{tmp}/data"}, setup=_image_folder("robin", "sparrow", empty=("robin",))),
    Case("a text file that is not UTF-8", [], 1,
         "ValueError: {tmp}/notes.txt is not UTF-8 text (byte 3 is 0xe9): convert it, e.g. iconv -f latin1 -t utf-8 "
         "in.txt > out.txt", setup=_latin1_text, python='from workshop import data; data.get_text_dataset("{tmp}/notes.txt")'),
    Case("a checkpoint cut short", [RESUME, "-p", "steps", "8", "-p", "checkpoint_dir", "{tmp}/ckpt"], 1,
         "(CheckpointMismatch: checkpoint {tmp}/ckpt/step5.pt cannot be read as a workshop checkpoint (",
         setup=_truncated_checkpoint),
    Case("sbatch missing when asked to submit", [], 1,
         "workshop.launch.slurm.SlurmError: `sbatch` is not on PATH: this machine is not part of a SLURM cluster (or its "
         "SLURM module is not loaded), so there is nothing to submit to. Run the notebook here instead, as N local "
         "ranks: scripts/run_notebook.sh --nproc N notebooks/<notebook>.ipynb",
         env={"PATH": "{tmp}"}, python='from workshop.launch import slurm; slurm.submit("05_ddp.ipynb", nodes=2)'),
    Case("a logger that does not exist", [NB01, "-p", "logger", "mlflow"], 2,
         "error: parameter logger = 'mlflow' must be one of tensorboard, csv, wandb (the rules are in 01_baseline.ipynb's "
         "parameters cell)"),
    Case("W&B online where its server cannot be reached", [], 1,
         "RuntimeError: WANDB_MODE=online needs 127.0.0.1, which this machine cannot reach ([Errno 111] Connection "
         "refused); compute nodes usually have no internet. Unset WANDB_MODE: the run logs offline into its folder, and "
         "`wandb sync runs/<run>/wandb/offline-run-*` uploads it from a login node",
         env={"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9"},
         python="from workshop.measure import tracking; tracking.wandb_mode()"),
    # the layouts students get wrong on a cluster: one line each, naming the #SBATCH option (or variable) to change
    Case("one GPU per task on a node of several tasks", [], 0,
         "warning: gpu017: each of its 2 tasks sees one GPU (CUDA_VISIBLE_DEVICES=1 here): SLURM binds a GPU to each "
         "task (--gpus-per-task=1, --ntasks-per-gpu or --gpu-bind), so torch.cuda.set_device(LOCAL_RANK) fails above "
         "local rank 0 (workshop.dist takes cuda:0); for ranks that train one model ask for #SBATCH --gpus-per-node=2 "
         "with --ntasks-per-node=2 instead",
         env=step(1, 2, "2", "gpu017", CUDA_VISIBLE_DEVICES="1", SLURM_GPUS_ON_NODE="2"), module=PREFLIGHT),
    Case("GPUs split between tasks (--gpu-bind=closest)", [], 2,
         "error: gpu017: each of its 4 tasks sees 2 of the node's 4 GPUs (CUDA_VISIBLE_DEVICES=2,3 here): SLURM split "
         "them between the tasks (--gpu-bind=closest, or --gpus-per-task), so cuda:<local rank> points past a task's "
         "share; drop --gpu-bind and ask for #SBATCH --gpus-per-node=4 with --ntasks-per-node=4",
         env=step(2, 4, "4", "gpu017", CUDA_VISIBLE_DEVICES="2,3", SLURM_GPUS_ON_NODE="4"), module=PREFLIGHT),
    Case("more tasks per node than GPUs", [], 2,
         "error: gpu017 runs 4 tasks but has 2 GPU(s) (CUDA_VISIBLE_DEVICES=0,1): local ranks 2 to 3 would have none "
         "of its own; ask for one task per GPU, #SBATCH --ntasks-per-node=2 (or --gpus-per-node=4)",
         env=step(3, 4, "4", "gpu017", CUDA_VISIBLE_DEVICES="0,1", SLURM_GPUS_ON_NODE="2"), module=PREFLIGHT),
    Case("torchrun with more ranks than GPUs", [], 2,
         "error: {host} runs 2 tasks but has 1 GPU(s) (CUDA_VISIBLE_DEVICES=0): local rank 1 would have none of its "
         "own; ask for one task per GPU, torchrun --nproc-per-node 1 (or a node with 2 GPUs)",
         env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0"},
         module=PREFLIGHT),
    Case("GPUs left idle", [], 0,
         "warning: gpu017 runs 2 task(s) but has 4 GPUs (CUDA_VISIBLE_DEVICES=0,1,2,3): 2 sit idle; ask for one task "
         "per GPU, #SBATCH --ntasks-per-node=4 (or --gpus-per-node=2)",
         env=step(0, 2, "2", "gpu017", CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_GPUS_ON_NODE="4"), module=PREFLIGHT),
    Case("a job of more nodes than tasks", [], 0,
         "warning: the job holds 2 nodes but its 1 task(s) run on 1: 1 node sits idle; start tasks on every node with "
         "srun (#SBATCH --ntasks-per-node=<GPUs per node>, or 1 without GPUs), or ask for #SBATCH --nodes=1",
         env={"SLURM_JOB_ID": "4711", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": TWO_NODES,
              "SLURMD_NODENAME": "gpu017"}, module=PREFLIGHT),
    Case("a rendezvous host that does not resolve from a node", [], 2,
         "error: gpu018: the rendezvous host gpu017.invalid (the first node of gpu017.invalid,gpu018) does not "
         "resolve here, so no rank here can reach it; export WORKSHOP_MASTER_ADDR=<an address of gpu017.invalid that "
         "every node resolves> in the job script, or leave the node out (#SBATCH --exclude=gpu017.invalid)",
         env=step(2, 4, "2(x2)", "gpu017.invalid,gpu018"), module=PREFLIGHT),
    Case("gloo on the loopback with ranks on two nodes", [], 2,
         "error: gpu018: gloo would listen on the loopback (GLOO_SOCKET_IFNAME=lo) while the ranks sit on several "
         "nodes, which cannot reach it: the first collective would hang; export GLOO_SOCKET_IFNAME=<the interface "
         "between the nodes> in the job script",
         env=step(2, 4, "2(x2)", TWO_NODES, GLOO_SOCKET_IFNAME="lo", WORKSHOP_MASTER_ADDR="10.0.0.17"), module=PREFLIGHT),
    Case("NCCL on the loopback with ranks on two nodes", [], 2,
         "error: gpu018: NCCL_SOCKET_IFNAME=lo names the loopback while the ranks sit on several nodes, which cannot "
         "reach it: NCCL would hang; set it to the interface between the nodes in the job script, or unset it to let "
         "NCCL choose",
         env=step(2, 4, "2(x2)", TWO_NODES, NCCL_SOCKET_IFNAME="lo", WORKSHOP_MASTER_ADDR="10.0.0.17",
                  CUDA_VISIBLE_DEVICES="0,1", SLURM_GPUS_ON_NODE="2"), module=PREFLIGHT),
    Case("RANK set without WORLD_SIZE", [], 0,
         "warning: RANK=1 is set but WORLD_SIZE is not: this process runs alone, as rank 0 of 1; unset RANK (does the "
         "job script or a .bashrc export it?), or start the ranks with srun or torchrun, which set both",
         env={"RANK": "1"}, module=PREFLIGHT),
    Case("a RANK past the WORLD_SIZE", [], 2,
         "error: RANK=4 but WORLD_SIZE=4: ranks count from 0 to 3; let torchrun set RANK and WORLD_SIZE (the job "
         "script or a .bashrc should not)", env={"RANK": "4", "WORLD_SIZE": "4"}, module=PREFLIGHT),
    Case("a LOCAL_RANK past the LOCAL_WORLD_SIZE", [], 2,
         "error: LOCAL_RANK=2 but LOCAL_WORLD_SIZE=2: ranks count from 0 to 1; let torchrun set LOCAL_RANK and "
         "LOCAL_WORLD_SIZE (the job script or a .bashrc should not)",
         env={"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, module=PREFLIGHT),
    Case("more threads than the task's CPUs", [], 0,
         "warning: gpu017: OMP_NUM_THREADS=4096 is more threads than this task has CPUs: they would take turns, "
         "slower, not faster; export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK in the job script, or ask for #SBATCH "
         "--cpus-per-task=4096", env=step(0, 2, "2", "gpu017", OMP_NUM_THREADS="4096"), module=PREFLIGHT),
    Case("a rendezvous port that is not a number", [FAIL], 2,
         "error: WORKSHOP_MASTER_PORT=abc: give the rendezvous port, a whole number from 1024 to 65535 (e.g. 29500), "
         "or unset it to derive one from the job id", env={"WORKSHOP_MASTER_PORT": "abc"}),
    Case("a run-folder mode that lets every user in", [FAIL], 2,
         "error: WORKSHOP_RUNS_MODE=755 would let every user of this machine into your run folders: give 700 (only "
         "you) or 750 (your group may read)", env={"WORKSHOP_RUNS_MODE": "755"}),
    Case("a SLURM job id left over where srun is missing", [FAIL], 2,
         "error: SLURM_JOB_ID=4711 says this runs in a SLURM job, but srun is not on PATH: load SLURM (module load "
         "slurm), or, where the variable is left over (an ssh into a job's node, an exported environment), unset "
         "SLURM_JOB_ID, or pass --nproc N to run the ranks here",
         env={"SLURM_JOB_ID": "4711", "PATH": "{tmp}/bin"}, setup=_path_without_srun),
    Case("--resume of a run that another launcher is writing", ["--resume", "{tmp}/runs/earlier-fail_on_rank", FAIL], 2,
         "error: {tmp}/runs/earlier-fail_on_rank is being written by another run now: two runs must not write one run "
         "folder; wait until it ends, or start a new run without --resume (its launcher, pid",
         setup=_running_run),
]


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{repo}", str(REPO)).replace("{host}", socket.gethostname())


def _without_root_override() -> list[str]:
    """root reads and writes whatever the permissions say; drop that power for permission cases."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permission checks cannot be shown")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path):
    if case.skip and case.skip():
        pytest.skip(case.skip())
    tmp = tmp_path
    if case.setup:
        case.setup(tmp)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WORKSHOP_"))}
    env.update(WORKSHOP_PYTHON=sys.executable, WORKSHOP_RUNS=str(tmp / "runs"), WORKSHOP_DATA=str(tmp / "no-data"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.update({k: _fill(v, tmp) for k, v in case.env.items()})
    before = sorted(p.name for p in (tmp / "runs").iterdir()) if (tmp / "runs").is_dir() else []
    prefix = _without_root_override() if case.unprivileged else []
    command = ([sys.executable, "-c", _fill(case.python, tmp)] if case.python else [sys.executable, "-m", case.module]
               if case.module else ["bash", str(RUN_NOTEBOOK)])
    out = subprocess.run([*prefix, *command, *(_fill(a, tmp) for a in case.args)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == case.code, out.stderr[-3000:]
    assert _fill(case.message, tmp) in out.stderr, out.stderr[-3000:]
    if case.code == 2:  # refused before anything ran: no run folder was made
        after = sorted(p.name for p in (tmp / "runs").iterdir()) if (tmp / "runs").is_dir() else []
        assert after == before


def readme_row(case: Case) -> str:
    """The case's message as the README shows it: placeholders as <tmp>, <repo>, and a message of two lines on one
    (a table's cell holds one line)."""
    return case.message.replace("{tmp}", "<tmp>").replace("{repo}", "<repo>").replace("{host}", "<host>").replace("\n", " ")


def test_the_readme_lists_every_case():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Troubleshooting"):]
    section = section[:section.find("\n## ", 3) if "\n## " in section[3:] else len(section)]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    for case in CASES:
        matching = [r for r in rows if f"| {case.name} |" in r]
        assert matching, f"README's Troubleshooting table has no row for {case.name!r}"
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", matching[0])[1:-1]]
        assert cells[-2] == str(case.code), (case.name, cells)
        assert cells[-1].strip("`").strip().replace("\\|", "|") == readme_row(case), (case.name, cells[-1])
    assert len(CASES) >= 75
