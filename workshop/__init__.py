"""Distributed deep-learning training on HPC clusters: the package the workshop's notebooks stand on.

Four layers; a module imports only from its own layer and the ones below it (tests/test_layers.py checks it):

    launching     runner (one notebook as N ranks), slurm (submit from a kernel), sweep (task parallelism),
                  regenerate (the committed notebooks)
    measurement   metrics (timing, peak memory, run folders' records), tracking (CSV, TensorBoard, W&B loggers),
                  memory, perf, bench, costmodel, report,
                  doctor (a job's pre-flight check: each rank's host, device, interface; what is wrong),
                  faults (a hang, a mismatched collective, a slow rank, provoked; who is behind, from the traces)
    lesson core   dist (who am I in this run), data, models, train (the plain loop), lit (the same with
                  Lightning), check, ddp, data_parallel, sharding, tp, pipeline, checkpoint, inference
    plain         runs (run folders, atomic writes), records (what a record.json holds, written and read),
                  params (a notebook's parameters and their rules),
                  progress (bars and log lines), hardware (links and GPUs from data sheets): no torch
"""

__version__ = "0.1.0"

LAYERS = {
    "plain": ("runs", "records", "params", "progress", "hardware"),
    "core": ("dist", "data", "models", "train", "lit", "check", "ddp", "data_parallel", "sharding", "tp", "pipeline",
             "checkpoint", "reshard", "inference"),
    "measurement": ("metrics", "tracking", "memory", "perf", "bench", "costmodel", "report", "doctor", "faults"),
    "launching": ("runner", "slurm", "sweep", "regenerate"),
}
