"""Estimates on paper, no torch: collectives, steps and projections on a two-level cluster (costmodel), and memory
per GPU before a run."""
