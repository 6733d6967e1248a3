#!/usr/bin/env bash
# Run one notebook as N ranks: one papermill process per rank, each executing the same notebook
# (a notebook is an SPMD program; workshop.dist tells each process its rank).
#
# On a SLURM cluster, from the repository's root (one rank per task, across nodes with srun):
#   sbatch scripts/run_notebook.sh notebooks/01_baseline.ipynb                      # 1 task
#   sbatch --nodes=2 --ntasks-per-node=1 scripts/run_notebook.sh notebooks/05_ddp.ipynb
#   sbatch --partition=gpu --account=ACCOUNT --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 \
#          --cpus-per-task=8 --time=01:00:00 \
#          scripts/run_notebook.sh notebooks/05_ddp.ipynb -f notebooks/params/gpu.yaml
#   Ask for as many GPUs per node as tasks per node: rank <local_rank> uses cuda:<local_rank>.
#   Task parallelism (notebook 03): independent tasks anywhere, or a job array, one GPU each:
#   sbatch --ntasks=4 --gpus-per-task=1 scripts/run_notebook.sh notebooks/03_task_parallelism.ipynb
#   sbatch --array=0-3 --gpus-per-node=1 scripts/run_notebook.sh notebooks/03_task_parallelism.ipynb
#   Every #SBATCH default below is overridden by the same option on the sbatch command line. No
#   task or node count is set there: sbatch's own default is one task on one node (one per node
#   with --nodes=N), and --ntasks=N alone lets SLURM place the N tasks on any nodes.
#   The job's own output goes to runs/slurm-<jobid>.out (so submit from the repository's root).
#
# Without SLURM (or to run on the node you are on), torchrun starts the ranks:
#   scripts/run_notebook.sh notebooks/01_baseline.ipynb                  # one process
#   scripts/run_notebook.sh --nproc 2 notebooks/05_ddp.ipynb -p epochs 1 # 2 local ranks
#
# Time limits: ask SLURM to warn the job before its limit and to let it requeue itself,
#   sbatch --signal=B:USR1@120 --requeue ... scripts/run_notebook.sh NOTEBOOK ...
#   SLURM sends SIGUSR1 to the launcher 120 s before the limit (B: to the batch process only). It
#   forwards it to every rank; a notebook that trains with workshop.checkpoint saves a checkpoint
#   and stops; the run is recorded as interrupted (exit status 3) and the job requeues itself
#   (scontrol requeue). The requeued job keeps its id and continues in the same run folder,
#   job<id>-<notebook>, from the checkpoint; each earlier attempt's notebooks and logs move to
#   attempt<k>/. Locally, `kill -USR1 <the launcher's pid>` does the same, without the requeue;
#   resume by hand with --resume RUN_DIR and the same notebook, ranks and parameters.
#
# Papermill's options: -p NAME VALUE, -r NAME VALUE, -f FILE.yaml, -y YAML, -b BASE64, -k KERNEL, --cwd DIR.
# Each run gets a folder of its own, runs/<job id or time>-<notebook>/: rank 0's executed notebook,
# the other ranks' under ranks/, logs/ (one log and status per rank), record.json. The exit
# status is non-zero if any rank failed, and the message names the rank, the cell and the
# notebook to open. Set WORKSHOP_PYTHON to choose the interpreter (default: python3 on PATH).
#
#SBATCH --job-name=workshop
#SBATCH --time=00:30:00
#SBATCH --output=runs/slurm-%j.out
#SBATCH --open-mode=append

set -u
# SIGUSR1 (the time-limit warning) may come at once: ignored until the launcher has its handler
trap '' USR1
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^#SBATCH/p' "${BASH_SOURCE[0]}" | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'
    exit 0
fi
PYTHON=${WORKSHOP_PYTHON:-python3}
if ! "$PYTHON" -c 'import workshop.launch.runner' 2>/dev/null; then
    echo "error: $PYTHON cannot import the workshop package and papermill: activate the workshop environment (conda activate workshop, or source .venv/bin/activate), or set WORKSHOP_PYTHON" >&2
    exit 2
fi
exec "$PYTHON" -m workshop.launch.runner "$@"  # the launcher: workshop/launch/runner.py
