#!/usr/bin/env bash
# The GPU check: everything the workshop does only on CUDA, in one command, sized for at most 8
# minutes on one H100 or H200 (not yet timed on one). Run it the day a GPU is lent, from the repository's root:
#   scripts/gpu_check.sh                                   # on a GPU node
#   sbatch --partition=gpu --gpus-per-node=1 --cpus-per-task=8 --time=00:15:00 scripts/gpu_check.sh
#   WORKSHOP_ALLOW_CPU=1 scripts/gpu_check.sh              # the same steps on CPU, with CPU sizes (3 minutes)
#   WORKSHOP_ALLOW_CPU=1 scripts/gpu_check.sh --check-only # CI: steps 1 and 2 run, the notebooks' parameters (GPU
#                                                          # and CPU sizes) are checked against their rules, not run
#                                                          # (the tests run every notebook on CPU): the script cannot rot
# Steps, each timed, each with its log:
#   1. the gpu-marked tests (pytest -m gpu): the device a rank gets, a timed step, CUDA peak memory, and
#      AxoNN's tensor parallelism against one process (with the gpu extra: pip install -e '.[gpu]');
#   2. python -m workshop.measure.bench single --model resnet18 --batch-size 512 (notebook 02's variants);
#   3. notebooks 01, 02, 05, 06, 07, 08, 09 and 10 as one process, with their GPU parameters
#      (notebooks/params/) at fewer steps: CUDA timing and peak memory, bf16 autocast, channels-last,
#      pinned memory, the CUDA allocator's peak and snapshot, torch.compile of a training step and
#      of decoding with CUDA graphs (reduce-overhead), FSDP2 with bf16 compute, DDP and tensor
#      parallelism on a CUDA device (AxoNN's too, with the gpu extra), DeepSpeed ZeRO 1-3 and Lightning's
#      DeepSpeed strategies, a pipeline stage's step and torch.distributed.pipelining on one.
# Writes its records under runs/gpu-check-<time>/ and its report (device, versions, each step's
# status and time) to docs/results/gpu_check.md; on CPU or with --check-only the report stays in the run folder,
# so such a check never overwrites a GPU report. Exit status: the number of steps that failed.
#
# Unreachable on one GPU (they need two or more): NCCL between ranks (dist picking cuda:<local
# rank> with several GPUs on a node, checkpoint's broadcast over NCCL, the collectives of 05, 06
# and 08 across GPUs, 09's sends between pipeline stages, `python -m workshop.measure.bench collectives`
# and `bench strategies` on NCCL), and the split of 08's and 09's meshes over nodes. Run those with the sbatch lines in each notebook's header.
#SBATCH --job-name=gpu-check
#SBATCH --time=00:15:00
#SBATCH --output=runs/slurm-%j.out
set -u
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
check_only=""
case "${1:-}" in
    "") ;;
    --check-only) check_only=1 ;;
    *) echo "usage: scripts/gpu_check.sh [--check-only]" >&2; exit 2 ;;
esac
PYTHON=${WORKSHOP_PYTHON:-python3}
export WORKSHOP_PYTHON=$PYTHON WORKSHOP_LOG_EVERY=0
if ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    if [[ ${WORKSHOP_ALLOW_CPU:-} != 1 ]]; then
        echo "error: no CUDA GPU here ($PYTHON sees none): run it on a GPU node, or with WORKSHOP_ALLOW_CPU=1 to run the same steps on CPU" >&2
        exit 2
    fi
    gpu=""
else
    gpu=1
fi
runs=runs/gpu-check-$(date +%Y%m%d-%H%M%S)
mkdir -p "$runs/logs"
export WORKSHOP_RUNS=$PWD/$runs
steps=()

step() {  # step NAME COMMAND...: run it, its output in logs/NAME.log; one line of status
    local name=$1 start=$SECONDS rc
    shift
    printf '%-24s ' "$name"
    "$@" >"$runs/logs/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - start))
    if [[ $rc -eq 0 ]]; then echo "ok      ${took} s"; else echo "FAILED  ${took} s (exit $rc; $runs/logs/$name.log)"; fi
    steps+=("$name|$rc|$took")
}

nb() {  # nb NOTEBOOK PARAMS_FILE [GPU options] -- [CPU options]: one process, the GPU parameters at fewer steps
    local notebook=$1 file=$2
    shift 2
    local gpu_opts=() cpu_opts=() into=gpu_opts
    for a in "$@"; do
        if [[ $a == -- ]]; then into=cpu_opts; continue; fi
        if [[ $into == gpu_opts ]]; then gpu_opts+=("$a"); else cpu_opts+=("$a"); fi
    done
    if [[ -n $check_only ]]; then  # both sets of sizes, on any machine: the GPU run's, and the CPU run's
        notebook "notebooks/$notebook.ipynb" -f "notebooks/params/$file" "${gpu_opts[@]}" &&
            notebook "notebooks/$notebook.ipynb" -f "notebooks/params/$file" "${gpu_opts[@]}" "${cpu_opts[@]}"
        return
    fi
    local opts=("${gpu_opts[@]}")
    [[ -z $gpu ]] && opts+=("${cpu_opts[@]}")  # on CPU the sizes shrink to CPU ones as well
    notebook "notebooks/$notebook.ipynb" -f "notebooks/params/$file" "${opts[@]}"
}

notebook() {  # notebook NOTEBOOK [papermill options]: one process; with --check-only its parameters checked only
    "$PYTHON" -m workshop.launch.runner ${check_only:+check} "$@"
}

echo "GPU check: ${gpu:+CUDA}${gpu:-CPU (WORKSHOP_ALLOW_CPU=1)}${check_only:+, notebooks checked only}; records and logs in $runs"
step gpu-tests "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
if [[ -n $gpu ]]; then
    step bench-single "$PYTHON" -m workshop.measure.bench single --model resnet18 --batch-size 512 --steps 20
else
    step bench-single "$PYTHON" -m workshop.measure.bench single --model small_cnn --batch-size 16 --steps 2 --warmup 1 \
        --variants naive,bf16,channels_last
fi
step 01_baseline nb 01_baseline gpu.yaml -p epochs 1 -p num_train 16384 -p num_test 4096 -p profile_steps 3 \
    -- -p model_name small_cnn -p dataset synthetic -p num_train 256 -p num_test 128 -p batch_size 64
step 02_performance nb 02_single_device_performance 02_single_device_performance.yaml -p steps 15 -p warmup 3 \
    -p profile_steps 3 -- -p model_name small_cnn -p dataset synthetic -p batch_size 16 -p steps 2 -p warmup 1 \
    -p num_workers 1 -p profile_steps 1
step 05_ddp notebook notebooks/05_ddp.ipynb -p steps 2 -p split_steps 2 \
    ${gpu:+-p micro_batch_size 64 -p split_batch_size 128}
step 06_sharding nb 06_sharding 06_sharding.yaml -p steps 3 -- -p size cpu -p seq_len 32 -p micro_batch_size 4
step 07_memory nb 07_memory 07_memory.yaml -p timing_repeats 2 \
    -- -p size cpu -p seq_len 32 -p micro_batch_size 2 -p sizes 32x2 -p image_batch_size 2 -p timing_repeats 1
step 08_tensor_parallel nb 08_tensor_parallelism 08_tensor_parallelism.yaml -p steps 2 \
    -- -p model_size cpu -p seq_len 32 -p micro_batch_size 4
step 09_pipeline nb 09_pipeline_parallelism 09_pipeline_parallelism.yaml -p timing_repeats 1 -p bubble_microbatches 1,4 \
    -- -p model_size cpu -p seq_len 32 -p micro_batch_size 2 -p bubble_microbatches 2 -p timing_repeats 1
# context parallelism through torch's context_parallel (CUDA attention kernels only) against one process; the ring
# and the experts as well, on one GPU
step 10_long_sequences notebook notebooks/10_long_sequences_and_experts.ipynb ${gpu:+-p seq_len 8192 -p seq_lens 2048,8192}
step 11_inference nb 11_inference 11_inference.yaml -p train_steps 60 -p max_new_tokens 48 -p timing_repeats 2 \
    -- -p model_size cpu -p seq_len 64 -p batch_size 16 -p train_steps 20 -p max_new_tokens 16 -p compile_decoding False
# the debugging notebook's CPU run is the tests' (nbval and 2 ranks); on a GPU its own ranks use NCCL and CUDA
if [[ -n $gpu ]]; then
    step 12_when_things_go_wrong notebook notebooks/12_when_things_go_wrong.ipynb
fi

"$PYTHON" - "$runs" "${gpu:-}" "${check_only:-}" "${steps[@]}" <<'EOF'
"""The report: device, versions, each step's status and time."""
import platform
import sys
from datetime import datetime
from pathlib import Path

import torch

runs, gpu, check_only, rows = Path(sys.argv[1]), sys.argv[2], sys.argv[3], [s.split("|") for s in sys.argv[4:]]
device = torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()}), WORKSHOP_ALLOW_CPU=1"
lines = ["# GPU check", "", f"Made by `scripts/gpu_check.sh` on {datetime.now():%Y-%m-%d %H:%M}; records and logs in "
         f"`{runs}`.", "", f"- device: {device}", f"- python {platform.python_version()}, torch {torch.__version__}, "
         f"CUDA {torch.version.cuda}", *(["- notebooks: parameters checked against their rules, not run (--check-only)"]
                                         if check_only else []), "", "| step | status | seconds | log |", "|---|---|---|---|"]
lines += [f"| {name} | {'ok' if rc == '0' else f'FAILED (exit {rc})'} | {took} | `{runs}/logs/{name}.log` |"
          for name, rc, took in rows]
out = Path("docs/results/gpu_check.md") if gpu and not check_only else runs / "gpu_check.md"
out.write_text("\n".join(lines) + "\n")
print(f"report: {out}")
EOF
failed=0
for s in "${steps[@]}"; do [[ ${s#*|} == 0\|* ]] || failed=$((failed + 1)); done
echo "$failed of ${#steps[@]} steps failed"
exit $failed
