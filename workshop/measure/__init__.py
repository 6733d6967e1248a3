"""Measurement: timing, peak memory and a run's record (metrics), loggers (tracking), bytes per rank measured
(memory), FLOPs and MFU (flops), the profiler (profiler), single-device variants (perf), collectives timed
(collectives), training steps timed across ranks (throughput), the benchmarks' command line (bench), the cost model
against measured steps (costcheck), records to tables (report) and plots (report_plots); and what one lesson measures
over and over: the sharded versions against one process (sharded, notebook 06), a step's memory and time by
checkpointing policy (step_memory, 07), the pipeline's timelines and tables (pipeline_view, 09)."""
