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
#   SLURM sends SIGUSR1 to this script 120 s before the limit (B: to the batch shell only). The
#   script forwards it to every rank; a notebook that trains with workshop.checkpoint saves a
#   checkpoint and stops; the script records the run as interrupted and requeues the job
#   (scontrol requeue). The requeued job keeps its id and continues in the same run folder,
#   job<id>-<notebook>, from the checkpoint; each earlier attempt's notebooks and logs move to
#   attempt<k>/. Locally, `kill -USR1 <this script's pid>` does the same, without the requeue;
#   resume by hand with --resume RUN_DIR and the same notebook, ranks and parameters.
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
#SBATCH --open-mode=append

set -uo pipefail
# SIGUSR1 may come at any moment, even before the ranks start: remember it until they run.
usr1_early=""
trap 'usr1_early=1' USR1

usage() {
    sed -n '2,/^#SBATCH/p' "${BASH_SOURCE[0]}" | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'
}

PYTHON=${WORKSHOP_PYTHON:-python3}
nproc=""
resume=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --nproc) [[ $# -ge 2 ]] || { echo "error: --nproc needs a number" >&2; exit 2; }; nproc=$2; shift 2 ;;
        --nproc=*) nproc=${1#--nproc=}; shift ;;
        --resume) [[ $# -ge 2 ]] || { echo "error: --resume needs a run folder" >&2; exit 2; }; resume=(--resume "$2"); shift 2 ;;
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
# A requeued job (same id, SLURM_RESTART_COUNT > 0) continues in its interrupted run folder.
run_dir=$("$PYTHON" -m workshop.runner prepare --nranks "$nranks" "${resume[@]}" "$notebook" "$@") || exit $?
echo "run folder: $run_dir ($nranks rank(s) via $launcher${SLURM_RESTART_COUNT:+, restart $SLURM_RESTART_COUNT})"

# SIGUSR1 (sbatch --signal=B:USR1@N, or kill -USR1): forward it to every rank, whose kernel saves
# a checkpoint and stops. The launcher starts with USR1 ignored, so only a kernel that installed
# a handler (workshop.checkpoint.StopOnSignal) reacts; it runs in the background so that the
# trap runs at once instead of after the launcher ends.
interrupted=""
on_usr1() {
    interrupted="SIGUSR1 at $(date +%H:%M:%S) (the time limit is near)"
    echo "$interrupted: asking the ranks to save a checkpoint and stop" >&2
    touch "$run_dir/stop.requested"  # seen by a kernel that starts later, or missed the signal
    if [[ $launcher == srun ]]; then
        scancel --signal=USR1 "$SLURM_JOB_ID"  # every process of the job's steps, on every node; not this shell
    else
        "$PYTHON" -m workshop.runner forward-signal "$launcher_pid" USR1
    fi
}
trap '' USR1
if [[ $launcher == srun ]]; then
    # --kill-on-bad-exit: when one rank fails the others are stopped instead of waiting forever.
    # each task ignores USR1 from its first instruction (scancel signals every process of a step)
    srun --kill-on-bad-exit=1 --ntasks="$nranks" bash -c 'trap "" USR1; exec "$@"' rank \
        "$PYTHON" -m workshop.runner rank "$run_dir" "$notebook" "$@" &
elif [[ $nranks -eq 1 ]]; then
    "$PYTHON" -m workshop.runner rank "$run_dir" "$notebook" "$@" &
else
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nranks" --no-python \
        "$PYTHON" -m workshop.runner rank "$run_dir" "$notebook" "$@" &
fi
launcher_pid=$!
trap on_usr1 USR1
[[ -n $usr1_early ]] && on_usr1
# SIGTERM (scancel, or the time limit itself): stop the ranks and still write the record.
trap 'interrupted=${interrupted:-SIGTERM (cancelled, or the time limit was reached)}; kill -TERM "$launcher_pid" 2>/dev/null' TERM
# SIGINT (Ctrl-C): the user stopped it; recorded as interrupted, as for SIGTERM, not as a failure.
trap 'interrupted=${interrupted:-SIGINT (stopped by the user, Ctrl-C)}; kill -TERM "$launcher_pid" 2>/dev/null' INT
while kill -0 "$launcher_pid" 2>/dev/null; do
    wait "$launcher_pid"  # returns early when a trapped signal arrives; then wait again
done
wait "$launcher_pid"
rc=$?
trap '' USR1

"$PYTHON" -m workshop.runner collect "$run_dir" "$rc" ${interrupted:+--interrupted "$interrupted"}
status=$?
if [[ $status -eq 3 && $interrupted == SIGUSR1* && -n ${SLURM_JOB_ID:-} && $launcher == srun ]]; then
    echo "requeueing job $SLURM_JOB_ID: its next start resumes in $run_dir" >&2
    scontrol requeue "$SLURM_JOB_ID" && exit 0  # this script is ended by the requeue
    echo "scontrol requeue failed (submit with --requeue?): resume with sbatch ... scripts/run_notebook.sh --resume $run_dir $notebook $*" >&2
fi
exit $status
