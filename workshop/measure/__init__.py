"""Measurement: timing, peak memory and a run's record (metrics), loggers (tracking), bytes per rank measured
(memory), single-device variants (perf), benchmarks without a notebook (bench), the cost model against measured
steps (costcheck), records to tables and plots (report)."""
