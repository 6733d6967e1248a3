"""What every layer stands on and needs no torch: run folders and atomic writes (runs), what a record.json holds
(records), a notebook's parameters and their rules (params), progress bars and log lines (progress), links and GPUs
from data sheets (hardware)."""
