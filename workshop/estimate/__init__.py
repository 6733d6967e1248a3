"""Estimates on paper, no torch: links, clusters and collectives on them (network), step times (steps), weak scaling
(projection), pipeline stages and dp x tp x pp placements (placements), the published results the cost model is held
to (published) and its command line (costmodel); memory per GPU before a run: the ZeRO accounting (zero) and the
planner (planner)."""
