"""workshop.bench: its arithmetic in one process, and each benchmark started on 2 gloo ranks.

The benchmarks print figures; these tests check that they run, print and record, never a timing.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from workshop import bench

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "workshop.bench"]


def _run(cmd, runs):
    """Run `cmd` in the repository without SLURM's or torchrun's variables, records under `runs`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "TORCHELASTIC_RUN_ID")}
    env["WORKSHOP_RUNS"] = str(runs)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def _records(runs, notebook):
    return [json.loads(p.read_text()) for p in runs.glob(f"{notebook}-*/record.json")]


def test_parse_size():
    assert bench.parse_size("4096") == 4096
    assert bench.parse_size("4KiB") == 4 * 1024
    assert bench.parse_size("64 kib") == 64 * 1024
    assert bench.parse_size("16MiB") == 16 * 2**20
    assert bench.parse_size("1GB") == 10**9
    assert bench.parse_size("1.5KiB") == 1536
    for bad in ("", "KiB", "4 parsecs", "-4KiB", "0", "1.5B"):
        with pytest.raises(ValueError, match="bad size"):
            bench.parse_size(bad)


def test_busbw_is_algbw_times_2_n_minus_1_over_n():
    assert bench.algbw(2 * 10**9, 1.0) == 2.0
    assert bench.busbw(10.0, 1) == 0.0  # nothing crosses a link
    assert bench.busbw(10.0, 2) == 10.0
    assert bench.busbw(10.0, 8) == pytest.approx(17.5)
    assert bench.busbw(10.0, 1024) == pytest.approx(20.0, rel=1e-2)  # tends to 2 x algbw


def test_formats_and_plot_of_a_sweep(clean_env):
    rows = [{"bytes": b, "time_s": b / 1e9, "algbw_GBps": 1.0, "busbw_GBps": 1.5} for b in (4096, 2**20)]
    table = bench.format_allreduce(rows, link="pcie4-x16")
    assert "busbw (GB/s)" in table and "of pcie4-x16" in table and "4.7%" in table  # 1.5 of 32 GB/s
    assert "nothing to all-reduce" in bench.format_allreduce([])
    fig = bench.plot_allreduce(rows, link="pcie4-x16")
    assert fig.axes[0].get_xscale() == "log"
    assert bench.plot_allreduce([]) is not None


def test_one_rank_runs_without_communication(clean_env):
    assert bench.allreduce_sweep([4096]) == []
    result = bench.ddp_throughput("small_cnn", 4, steps=1, warmup=0)
    assert result["ddp"] is False and result["world_size"] == 1 and result["samples_per_s"] > 0
    assert len(result["peak_memory_bytes"]) == 1 and result["peak_memory_bytes"][0] > 0
    (row,) = bench.step_split(["small_cnn"], 4, steps=1)
    assert row["comm_s"] == 0.0 and row["efficiency_no_overlap"] == row["efficiency_overlap"] == 1.0
    assert row["grad_bytes"] == 4 * 94_762
    assert "Run with N ranks" in bench.format_step_split([row])


def test_one_rank_allreduce_says_there_is_nothing_to_all_reduce(runs, clean_env, capsys):
    assert bench.main(["allreduce"]) == 0
    assert "nothing to all-reduce" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["ddp", "--model", "vgg"], "invalid choice: 'vgg'"),
    (["step-split", "--models", "small_cnn,vgg"], "unknown model 'vgg'"),
    (["allreduce", "--sizes", "4KiB,lots"], "bad size 'lots'"),
    (["allreduce", "--sizes", "6B"], "not a multiple of 4"),
    (["allreduce", "--link", "carrier-pigeon"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.multirank
def test_allreduce_on_2_ranks_prints_busbw_and_writes_a_record(tmp_path):
    out = _run(TORCHRUN + ["allreduce", "--sizes", "4KiB,64KiB", "--iters", "3", "--warmup", "1"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "busbw (GB/s)" in out.stdout and "on 2 ranks" in out.stdout
    assert out.stdout.count("all_reduce(SUM)") == 1  # rank 0 alone prints
    (record,) = _records(tmp_path, "bench-allreduce")
    rows = record["results"]["rows"]
    assert [r["bytes"] for r in rows] == [4096, 65536]
    assert all(r["time_s"] > 0 and r["busbw_GBps"] == pytest.approx(r["algbw_GBps"]) for r in rows)  # n = 2: 2(n-1)/n = 1


@pytest.mark.multirank
def test_ddp_on_2_ranks_writes_json(tmp_path):
    path = tmp_path / "ddp.json"
    out = _run(TORCHRUN + ["ddp", "--model", "small_cnn", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                           "--json", str(path)], tmp_path / "runs")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(path.read_text())
    assert result["world_size"] == 2 and result["ddp"] is True and result["samples_per_s"] > 0
    assert result["global_batch_size"] == 16 and len(result["peak_memory_bytes"]) == 2
    assert "samples/s" in out.stdout
    assert _records(tmp_path / "runs", "bench-ddp")[0]["results"]["world_size"] == 2


@pytest.mark.multirank
def test_step_split_on_2_ranks_prints_a_row(tmp_path):
    out = _run(TORCHRUN + ["step-split", "--models", "small_cnn", "--batch-size", "4", "--steps", "2"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (row,) = [line for line in out.stdout.splitlines() if line.strip().startswith("small_cnn")]
    assert "370.2 KiB" in row  # 94,762 float32 gradients
    (record,) = _records(tmp_path, "bench-step-split")
    (result,) = record["results"]["rows"]
    assert result["world_size"] == 2 and result["comm_s"] > 0
    assert 0 < result["efficiency_no_overlap"] <= result["efficiency_overlap"] <= 1
