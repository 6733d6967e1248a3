"""notebooks/07_memory.ipynb on 2 local ranks (FSDP2 with checkpointing over both), with the planner's widget built
as JupyterLab would (WORKSHOP_PROGRESS=bar: a kernel with no frontend still builds and draws it). nbval runs it as
one process; the committed notebook is a 2 x 2 SLURM run."""

import json
import os

import yaml

from conftest import REPO, assert_checks_as_committed, run_notebook

NB07 = "notebooks/07_memory.ipynb"
WIDGET = "application/vnd.jupyter.widget-view+json"


def test_gpu_params_file_names_notebook_parameters():
    params = yaml.safe_load((REPO / "notebooks" / "params" / "07_memory.yaml").read_text())
    cell = next(c for c in json.loads((REPO / NB07).read_text())["cells"] if "parameters" in c["metadata"].get("tags", []))
    names = {line.split("=")[0].strip() for line in "".join(cell["source"]).splitlines() if "=" in line}
    assert params["size"] == "gpu" and set(params) <= names


def test_07_on_two_local_ranks_with_the_planner_widget(runs):
    out = run_notebook("--nproc", 2, NB07, env={**os.environ, "WORKSHOP_PROGRESS": "bar"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    assert_checks_as_committed(run / "07_memory.ipynb", NB07)  # the committed notebook ran on 2 nodes x 2 ranks
    record = json.loads((run / "record.json").read_text())
    results = record["results"]
    assert record["dist"]["world_size"] == 2
    assert all(r["measured"] == r["derived"] for r in results["activation_per_layer"])
    saved = {policy: r["saved_bytes"] for policy, r in results["checkpointing"].items()}
    assert saved["full"] < saved["every_other"] < saved["none"] and saved["full"] < saved["selective"] < saved["none"]
    assert results["fsdp_checkpointed_block_bytes"] == 4 * 64 * 128 * 4  # a block's input, the rank's micro-batch
    assert results["lightning_same_weights"] and results["offload_same_weights"]
    assert results["offload"]["with"]["shards_on"] == "cpu"  # on this machine the host is the device: no change
    assert results["plan"]["fits"] and results["plan"]["model"] == "Llama 2 70B"
    cells = json.loads((run / "07_memory.ipynb").read_text())["cells"]
    widget = next(c for c in cells if c["cell_type"] == "code" and "the planner with sliders" in "".join(c["source"]))
    assert any(WIDGET in o.get("data", {}) for o in widget["outputs"]), widget["outputs"]
    assert any("image/png" in o.get("data", {}) for o in widget["outputs"])  # the bar chart, drawn once
