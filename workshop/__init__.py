"""Distributed deep-learning training on HPC clusters: the package the workshop's notebooks stand on.

Layers, from the bottom up; a module imports only from its own layer and the ones below it, and the folders show
them (tests/test_layers.py checks it):

    workshop/base/       what needs no torch: run folders and atomic writes, records, parameters, progress,
                         hardware data sheets, tables
    workshop/estimate/   estimates, no torch either: the cost model, the memory planner
    workshop/*.py        the lesson core, one file per concept, so notebooks say `from workshop import ddp, tp`:
                         who am I (dist), data, models, training loops, check, and one module per parallel technique
    workshop/measure/    measurement: timing, memory measured, benchmarks, loggers, the report
    workshop/launch/     launching: one notebook as N ranks, SLURM submission, sweeps, regeneration, the doctor,
                         faults provoked and read
"""

__version__ = "0.1.0"
