"""Launching: one notebook as N ranks (runner, and its parts: options, preflight, rundir, ranks, series), SLURM
submission from a kernel (slurm), task parallelism (sweep), the committed notebooks re-executed (regenerate), a job's
pre-flight check (doctor), faults provoked and read from the ranks' traces (faults), the students' copies (student)
and the instructor's guide's times (teaching)."""
