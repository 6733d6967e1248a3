"""Distributed deep-learning training on HPC clusters: the package the workshop's notebooks
stand on. One module a concern: `dist` (who am I in this run), `data`, `models`, `train` (the
plain loop), `lit` (the same with Lightning), `metrics` (timing, memory, records), `runner`
(one notebook as N ranks)."""

__version__ = "0.1.0"
