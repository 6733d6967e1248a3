"""What cannot work on this machine, refused before a run starts: GPU-sized parameters or NCCL without a GPU, a data
set asked for by name but not staged, settings a kernel would refuse only once it runs, more local ranks than the
cores can carry. Without torch: the GPU is looked for in the driver's files.

As a command, the layout of the ranks checked without torch, in a second (`workshop.base.world.layout`, which
workshop.dist says on every rank when it starts): one line per mistake, naming the #SBATCH option to change.

    srun python -m workshop.launch.preflight          # in a job script, before the training's own srun
    python -m workshop.launch.preflight               # this process (torchrun's variables, or none)

Exit status: 0 nothing wrong, or only what the run survives (warning: lines); 2 a layout that cannot work (error:).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from workshop.base import progress, world
from workshop.base.runs import REPO, RunError


def gpu_present() -> bool:
    """Whether this machine shows a GPU to this process, without importing torch (seconds to import):
    the NVIDIA driver lists one, and CUDA_VISIBLE_DEVICES does not hide them all."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def check_environment(given: dict, papermill_args: list[str]) -> None:
    """Refuse, before anything runs, what cannot work on this machine: GPU-sized parameters
    (notebooks/params/) or NCCL without a GPU, and a data set asked for by name but not staged."""
    params_dir = (REPO / "notebooks" / "params").resolve()
    for i, opt in enumerate(papermill_args[:-1]):
        if opt in ("-f", "--parameters_file") and Path(papermill_args[i + 1]).resolve().parent == params_dir:
            if os.environ.get("WORKSHOP_ALLOW_CPU") != "1" and not gpu_present():
                raise RunError(f"{papermill_args[i + 1]} holds GPU-sized parameters and this machine has no GPU: drop "
                               "-f to run the CPU defaults, or submit to a GPU partition (sbatch --gpus-per-node=1 ...); "
                               "WORKSHOP_ALLOW_CPU=1 runs them on CPU anyway")
    backend = os.environ.get("WORKSHOP_BACKEND", "")
    if backend and backend not in ("nccl", "gloo"):
        raise RunError(f"WORKSHOP_BACKEND={backend}: use nccl (GPUs) or gloo (CPU), or unset it to let the device decide")
    if backend == "nccl" and not gpu_present():
        raise RunError("WORKSHOP_BACKEND=nccl but this machine has no GPU: NCCL needs CUDA; unset WORKSHOP_BACKEND "
                       "(gloo is used on CPU) or run on a GPU node")
    try:  # what the kernels would refuse only once they run
        world.timeout_s()
        world.master_port_override()
        progress.log_every()
        progress.is_interactive()
    except ValueError as err:
        raise RunError(str(err)) from None
    dataset = given.get("dataset")
    if isinstance(dataset, str) and dataset not in ("auto", "synthetic"):  # staged data: torch only on this path
        from workshop.data import check_cifar10, check_image_folder, data_root

        try:
            if dataset == "cifar10":
                check_cifar10()
            elif dataset == "imagefolder" or (data_root() / dataset).is_dir():
                check_image_folder(data_root() if dataset == "imagefolder" else data_root() / dataset)
        except (FileNotFoundError, ValueError) as err:
            raise RunError(str(err)) from None


def check_local_ranks(nranks: int) -> None:
    """Local ranks share this machine's cores: refuse more than twice the cores this process may use (its
    CPU set, which SLURM narrows to the job's), where every rank would crawl and gloo's timeouts fire."""
    cores = len(os.sched_getaffinity(0))
    if nranks > max(2 * cores, 1):
        raise RunError(f"--nproc {nranks}: too many local ranks for this machine ({cores} core(s) for this process; at "
                       f"most {2 * cores}, twice the cores, run here): use fewer, or submit to SLURM for more "
                       f"(sbatch --ntasks={nranks} scripts/run_notebook.sh ...)")


def gpu_count() -> int:
    """The GPUs the driver lists (0 without one), for a layout read without torch."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def main() -> int:
    """The layout of this process among the ranks (see the module's docstring)."""
    try:
        fields = world.world()
        findings = world.layout(fields=fields, cuda_count=gpu_count())
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for finding in findings:
        print(f"{'error' if finding.fatal else 'warning'}: {finding.text}", file=sys.stderr)
    if not findings:
        print(f"rank {fields.get('rank', 0)} of {fields.get('world_size', 1)} ({fields['launcher']}): nothing wrong found")
    return 2 if any(f.fatal for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
