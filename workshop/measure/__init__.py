"""Measurement: timing, peak memory and a run's record (metrics), loggers (tracking), bytes per rank measured
(memory), single-device variants (perf), benchmarks without a notebook (bench), records to tables and plots
(report)."""
