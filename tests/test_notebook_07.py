"""notebooks/07_memory.ipynb on 2 local ranks (FSDP2 with checkpointing over both), and its planner cells as JupyterLab
runs them, with the widget, in this process. nbval runs the notebook as one process; the committed notebook is a 2 x 2
SLURM run; tests/test_browser.py moves the widget's controls in JupyterLab.

The widget is not built under papermill: nbclient sometimes waits forever for a cell that builds an interactive
widget (jupyter/nbclient#312, nteract/papermill#723; seen here once in 2 CI runs), and a batch run has no one to move
the sliders anyway (workshop.base.progress.is_interactive is False there)."""

import json
from unittest import mock

import matplotlib
import yaml

from helpers import REPO, assert_checks_as_committed, run_notebook
from workshop.base import records

NB07 = "notebooks/07_memory.ipynb"


def test_gpu_params_file_names_notebook_parameters():
    params = yaml.safe_load((REPO / "notebooks" / "params" / "07_memory.yaml").read_text())
    cell = next(c for c in json.loads((REPO / NB07).read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
    names = {line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines() if "=" in line}
    assert params["size"] == "gpu" and set(params) <= names


def test_07_on_two_local_ranks(runs):
    out = run_notebook("--nproc", 2, NB07)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    assert_checks_as_committed(run / "07_memory.ipynb", NB07)  # the committed notebook ran on 2 nodes x 2 ranks
    record = records.read(run / "record.json")
    results = record.results
    assert record.dist["world_size"] == 2
    assert all(r["measured"] == r["derived"] for r in results["activation_per_layer"])
    saved = {policy: r["saved_bytes"] for policy, r in results["checkpointing"].items()}
    assert saved["full"] < saved["every_other"] < saved["none"] and saved["full"] < saved["selective"] < saved["none"]
    assert results["fsdp_checkpointed_block_bytes"] == 4 * 64 * 128 * 4  # a block's input, the rank's micro-batch
    assert results["lightning_same_weights"] and results["offload_same_weights"]
    assert results["offload"]["with"]["shards_on"] == "cpu"  # on this machine the host is the device: no change
    assert results["plan"]["fits"] and results["plan"]["model"] == "Llama 2 70B"
    cells = json.loads((run / "07_memory.ipynb").read_text())["cells"]
    bar = next(c for c in cells if c["cell_type"] == "code" and "# The planner as a bar" in "".join(c["source"]))
    assert any("image/png" in o.get("data", {}) for o in bar["outputs"])  # drawn in a batch run too


def test_the_planner_cell_builds_its_widget_and_follows_the_controls():
    """The planner cell as in JupyterLab (is_interactive True): the widget is built and drawn, and its result, the
    Plan of the controls' values, follows a control that changes."""
    matplotlib.use("Agg")
    cells = json.loads((REPO / NB07).read_text())["cells"]
    source = {"".join(c["source"]).splitlines()[0]: "".join(c["source"]) for c in cells if c["cell_type"] == "code"}
    params = next("".join(c["source"]) for c in cells if "parameters" in c["metadata"].get("tags", []))
    ns = {}
    exec(params, ns)
    exec("from workshop import dist\nfrom workshop.estimate import planner", ns)
    for heading in ("# The planner for the parameters", "# The planner as a bar"):  # the table's cell makes `chosen`
        cell = next(s for first, s in source.items() if first.startswith(heading))
        with mock.patch("workshop.base.progress.is_interactive", return_value=True):
            exec(cell, ns)
    sliders = ns["sliders"]
    controls = {c.description: c for c in sliders.children if getattr(c, "description", "")}
    assert {"model", "gpu", "strategy", "world_size", "tp", "micro_batch", "seq_len", "checkpointing",
            "offload"} <= set(controls)
    assert sliders.result.fits and sliders.result.settings["checkpointing"] == "full"
    controls["checkpointing"].value = "none"  # as a person choosing it: the function runs again
    assert not sliders.result.fits and sliders.result.settings["checkpointing"] == "none"
    controls["world_size"].value = 8
    assert sliders.result.settings["world_size"] == 8
