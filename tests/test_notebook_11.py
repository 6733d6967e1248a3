"""notebooks/11_inference.ipynb on 2 local ranks: tensor-parallel generation gives the single-device tokens, and the
checkpoint that rank 0 trained is read back by both. Compiled decoding is left to nbval (one process): compiling
on two ranks at once would double the test's time."""

import pytest

from helpers import assert_checks_as_committed, run_notebook
from workshop.base import records

NB11 = "notebooks/11_inference.ipynb"
SMALL = ["-p", "train_steps", "10", "-p", "timing_repeats", "1"]


@pytest.mark.multirank
def test_11_on_two_local_ranks(runs):
    out = run_notebook("--nproc", 2, NB11, *SMALL)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    assert (run / "tinygpt.pt").is_file()
    text = (run / "11_inference.ipynb").read_text()
    assert "tensor-parallel greedy gives the single-device tokens: True" in text
    assert "FLOPs of a cached step (2N + 4 L t d) match what a step counts:    True" in text
    assert "bytes of the cache (2 L t d bytes batch) match what a step counts: True" in text
    # the committed notebook ran on 2 nodes x 2 ranks; on CPU neither compiles (compile_on_cpu)
    assert_checks_as_committed(run / "11_inference.ipynb", NB11)
    record = records.read(run / "record.json")
    assert record.status == "ok" and record.dist["world_size"] == 2
    same = record.results["same_tokens"]
    assert same == {"no_cache": True, "static": True, "compiled": None, "tp": True}
    tp_run = record.results["tp"]  # one node of 2 ranks: TP 2, one replica; 2 all-reduces per layer (4) and the embedding's
    assert (tp_run["tp_size"], tp_run["dp_size"], tp_run["all_reduces_per_token"]) == (2, 1, 2 * 4 + 1)
    assert tp_run["all_reduce_s"] > 0 and record.results["kv_cache"]["new_tokens"] == 40


def test_11_refuses_a_missing_prompts_file(runs, tmp_path):
    out = run_notebook(NB11, "-p", "prompts_file", str(tmp_path / "none.txt"), "-p", "train_steps", "1")
    assert out.returncode != 0
    assert "no prompts file at" in out.stdout + out.stderr
