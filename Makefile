# The two commands: `make run` (the notebook series on this machine) and `make test`.
# Each does its own set-up on a fresh machine: a virtual environment in .venv with the package
# and its dependencies. On a cluster use environment.yml (conda) instead; see README.md.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# the virtual environment's programs (papermill, torchrun, jupyter) come first
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test setup lab kernel notebooks student lint slurm-up slurm-down slurm-status

run: setup  ## execute every notebook (CPU, synthetic data, local ranks), then the scaling report (13); prints where it is
	$(BIN)/python -m workshop.launch.runner series

# Three pytest workers on two cores, each of whose processes runs one thread (conftest.py): the tests spend much
# of their time waiting on ranks, SLURM jobs and JupyterLab, and a third worker fills those waits (on 2 cores, the
# whole suite: 763 s with 2 workers, 692 s with 3, the CPUs then idle 1% of the time). `--dist loadfile` keeps a
# file's tests on one worker, so a notebook's cells run in order in one kernel (nbval); --dist loadgroup would
# not, with pytest 9.2 it silently stops grouping (pytest-dev/pytest-xdist#1386). --no-loadscope-reorder keeps the
# order of conftest.LONGEST_FIRST (else xdist starts the files with the most tests first, and a long file of one
# test last). The SLURM tests take the local cluster one at a time (conftest.py). TEST_WORKERS=0 runs everything in
# one process.
TEST_WORKERS ?= 3

test: setup  ## the whole test suite (SLURM tests need `make slurm-up`)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "Python >= 3.10 is needed (PYTHON=$(PYTHON))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile --editable '.[dev]'
	@# byte-compile what pip installed on every core (pip compiles on one: 171 s in all became 121 s on 2 cores); like
	@# pip, pass over a file this Python cannot compile (torch ships a test helper written in Python 3.12's syntax)
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

kernel: setup  ## register this environment as the Jupyter kernel "workshop"
	$(BIN)/python -m ipykernel install --user --name workshop --display-name "workshop"

lab: kernel  ## start JupyterLab on the notebooks
	$(BIN)/jupyter lab notebooks/

student: setup  ## the students' copies in student/: each exercise's solution cleared (nbgrader), outputs gone
	$(BIN)/python -m workshop.launch.student

notebooks: setup  ## re-execute the committed notebooks: multi-rank ones on 2 SLURM nodes x 2 ranks (else 4 local ranks)
	@scripts/local_slurm.sh status >/dev/null 2>&1 || scripts/local_slurm.sh start || \
	    echo "no local SLURM cluster (needs root): the multi-rank notebooks run on 4 local ranks"
	$(BIN)/python -m workshop.launch.regenerate

lint: setup
	$(BIN)/ruff check workshop tests notebooks

slurm-up:  ## a two-node SLURM cluster on this machine (root; installs slurm-wlm and munge)
	scripts/local_slurm.sh start

slurm-down:
	scripts/local_slurm.sh stop

slurm-status:
	scripts/local_slurm.sh status
