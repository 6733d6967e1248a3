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
# Papermill options pass through: -p NAME VALUE, -r NAME VALUE, -f FILE.yaml, -y YAML, -k KERNEL.
# Each run gets a folder of its own, runs/<job id or time>-<notebook>/: rank 0's executed notebook,
# the other ranks' under ranks/, logs/ (one log and status per rank), record.json. The exit
# status is non-zero if any rank failed, and the message names the rank, the cell and the
# notebook to open. Set WORKSHOP_PYTHON to choose the interpreter (default: python3 on PATH).
#
#SBATCH --job-name=workshop
#SBATCH --time=00:30:00
#SBATCH --output=runs/slurm-%j.out

set -uo pipefail

usage() {
    sed -n '2,/^#SBATCH/p' "${BASH_SOURCE[0]}" | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'
}

PYTHON=${WORKSHOP_PYTHON:-python3}
nproc=""
while [[ $# -gt 0 ]]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --nproc) [[ $# -ge 2 ]] || { echo "error: --nproc needs a number" >&2; exit 2; }; nproc=$2; shift 2 ;;
        --nproc=*) nproc=${1#--nproc=}; shift ;;
        *) break ;;
    esac
done
if [[ $# -lt 1 ]]; then
    echo "error: no notebook given" >&2
    echo "usage: scripts/run_notebook.sh [--nproc N] NOTEBOOK [papermill options]   (or: sbatch [options] scripts/run_notebook.sh NOTEBOOK ...)" >&2
    exit 2
fi
notebook=$1
shift

if ! "$PYTHON" -c 'import workshop, papermill' 2>/dev/null; then
    echo "error: $PYTHON cannot import the workshop package and papermill: activate the workshop environment (conda activate workshop, or source .venv/bin/activate), or set WORKSHOP_PYTHON" >&2
    exit 2
fi

# Under SLURM (sbatch, or salloc) the ranks are the job's tasks; --nproc runs locally instead.
if [[ -n ${SLURM_JOB_ID:-} && -z $nproc ]]; then
    launcher=srun
    nranks=${SLURM_NTASKS:-${SLURM_JOB_NUM_NODES:-1}}  # sbatch sets no SLURM_NTASKS for --nodes=N alone: one per node
else
    launcher=torchrun
    nranks=${nproc:-1}
fi

# Refuse bad input (missing notebook, unknown parameter, bad rank count) before anything runs.
run_dir=$("$PYTHON" -m workshop.runner prepare --nranks "$nranks" "$notebook" "$@") || exit $?
echo "run folder: $run_dir ($nranks rank(s) via $launcher)"

if [[ $launcher == srun ]]; then
    # --kill-on-bad-exit: when one rank fails the others are stopped instead of waiting forever.
    srun --kill-on-bad-exit=1 --ntasks="$nranks" "$PYTHON" -m workshop.runner rank "$run_dir" "$notebook" "$@"
    rc=$?
elif [[ $nranks -eq 1 ]]; then
    "$PYTHON" -m workshop.runner rank "$run_dir" "$notebook" "$@"
    rc=$?
else
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nranks" --no-python \
        "$PYTHON" -m workshop.runner rank "$run_dir" "$notebook" "$@"
    rc=$?
fi

"$PYTHON" -m workshop.runner collect "$run_dir" "$rc"
