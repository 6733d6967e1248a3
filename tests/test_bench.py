"""The benchmarks (workshop.measure.collectives, throughput, flops and perf, and their command line
workshop.measure.bench): their arithmetic in one process, and the benchmark no notebook runs (`strategies`) on 2
gloo ranks. Notebook 05 runs the all-reduce sweep and the step split on 2 ranks (test_notebook_05 checks their rows);
notebook 04 runs `bench ddp` on 2 ranks through torchrun (test_notebook_04 checks its result).

The benchmarks print figures; these tests check that they run, print and record, never a timing.
"""

import subprocess
import sys
from unittest import mock

import pytest
import torch

from helpers import REPO
from workshop import models
from workshop.base import records
from workshop.base.world import local_ranks, without_launcher
from workshop.measure import bench, collectives, flops, perf, throughput

TORCHRUN, _ = local_ranks(2, "workshop.measure.bench", run="module")  # each test's arguments follow


def _run(cmd, runs):
    """Run `cmd` in the repository without SLURM's or torchrun's variables, records under `runs`."""
    env = dict(without_launcher(), WORKSHOP_RUNS=str(runs))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def _records(runs, notebook):
    found = [records.read(p) for p in runs.glob("*/record.json")]
    return [r for r in found if r.notebook == notebook]


def test_parse_size():
    assert collectives.parse_size("4096") == 4096
    assert collectives.parse_size("4KiB") == 4 * 1024
    assert collectives.parse_size("64 kib") == 64 * 1024
    assert collectives.parse_size("16MiB") == 16 * 2**20
    assert collectives.parse_size("1GB") == 10**9
    assert collectives.parse_size("1.5KiB") == 1536
    for bad in ("", "KiB", "4 parsecs", "-4KiB", "0", "1.5B"):
        with pytest.raises(ValueError, match="bad size"):
            collectives.parse_size(bad)


def test_busbw_is_algbw_times_2_n_minus_1_over_n():
    assert collectives.algbw(2 * 10**9, 1.0) == 2.0
    assert collectives.busbw(10.0, 1) == 0.0  # nothing crosses a link
    assert collectives.busbw(10.0, 2) == 10.0
    assert collectives.busbw(10.0, 8) == pytest.approx(17.5)
    assert collectives.busbw(10.0, 1024) == pytest.approx(20.0, rel=1e-2)  # tends to 2 x algbw


def test_formats_and_plot_of_a_sweep(clean_env):
    rows = [{"bytes": b, "time_s": b / 1e9, "fastest_s": b / 2e9, "algbw_GBps": 1.0, "busbw_GBps": 1.5}
            for b in (4096, 2**20)]
    table = collectives.format_allreduce(rows, link="pcie4-x16")
    assert "busbw (GB/s)" in table and "of pcie4-x16" in table and "4.7%" in table  # 1.5 of 32 GB/s
    assert "took longer" not in table
    latency_bound = [{**rows[0], "time_s": 2e-3}, {**rows[1], "time_s": 1e-3}]  # 4 KiB slower than 1 MiB: said why
    assert "4.0 KiB took longer than 1.0 MiB: at these sizes an all-reduce costs its latency" in \
        collectives.format_allreduce(latency_bound)
    assert "nothing to all-reduce" in collectives.format_allreduce([])
    fig = collectives.plot_allreduce(rows, link="pcie4-x16")
    assert fig.axes[0].get_xscale() == "log"
    assert collectives.plot_allreduce([]) is not None


def test_one_rank_runs_without_communication(clean_env):
    assert collectives.allreduce_sweep([4096]) == []
    result = throughput.ddp_throughput("small_cnn", 4, steps=1, warmup=0)
    assert result["ddp"] is False and result["world_size"] == 1 and result["samples_per_s"] > 0
    assert len(result["peak_memory_bytes"]) == 1 and result["peak_memory_bytes"][0] > 0
    (row,) = throughput.step_split(["small_cnn"], 4, steps=1)
    assert row["comm_s"] == 0.0 and row["efficiency_no_overlap"] == row["efficiency_overlap"] == 1.0
    assert row["grad_bytes"] == 4 * 94_762
    assert "Run with N ranks" in throughput.format_step_split([row])


@pytest.mark.parametrize("call", [
    lambda: throughput.ddp_throughput("small_cnn", 2, steps=1, warmup=0),
    lambda: throughput.step_split(["small_cnn"], 2, steps=1, warmup=0),
    lambda: perf.run_variants("small_cnn", 2, steps=1, warmup=1, variants="naive,resident", num_workers=0),
    lambda: flops.measured_matmul_flops("cpu", torch.float32, n=16, iters=1),
], ids=["ddp_throughput", "step_split", "run_variants", "measured_matmul_flops"])
def test_a_benchmark_leaves_the_callers_random_stream_untouched(call, clean_env):
    torch.manual_seed(7)
    plain = torch.rand(2)  # the caller's stream, with nothing in between
    torch.manual_seed(7)
    before = torch.rand(1)
    call()  # seeds its weights and draws its data in a stream of its own
    assert torch.equal(torch.cat([before, torch.rand(1)]), plain)


def test_one_rank_allreduce_says_there_is_nothing_to_all_reduce(runs, clean_env, capsys):
    assert bench.main(["allreduce"]) == 0
    assert "nothing to all-reduce" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["ddp", "--model", "vgg"], "invalid choice: 'vgg'"),
    (["step-split", "--models", "small_cnn,vgg"], "unknown model 'vgg'"),
    (["allreduce", "--sizes", "4KiB,lots"], "bad size 'lots'"),
    (["allreduce", "--sizes", "6B"], "not a multiple of 4"),
    (["allreduce", "--link", "carrier-pigeon"], "invalid choice"),
    (["single", "--variants", "naive,turbo"], "unknown variant 'turbo'"),
    (["single", "--variants", ","], "unknown variant"),
    (["single", "--model", "vgg"], "unknown model 'vgg'"),
    (["single", "--warmup", "0"], "must be at least 1"),
    (["strategies", "--size", "huge"], "invalid choice: 'huge'"),
    (["strategies", "--batch-size", "0"], "must be at least 1"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.multirank
def test_strategies_on_2_ranks_records_ddp_and_fsdp(tmp_path):
    out = _run(TORCHRUN + ["strategies", "--batch-size", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "fsdp" in out.stdout and "on a group of one rank" in out.stdout
    (record,) = _records(tmp_path, "bench-strategies")
    res = record.results
    assert res["world_size"] == 2 and res["samples_or_tokens"] == "tokens" and res["fsdp_units"] == 5  # 4 blocks + root
    assert [m["strategy"] for m in res["measurements"]] == ["ddp", "fsdp"]
    assert set(res["alone_step_s"]) == {"ddp", "fsdp"} and res["compute_step_s"] > 0
    ddp, fsdp = res["measurements"]
    assert ddp["throughput"] == pytest.approx(2 * 2 * 16 / ddp["step_time_s"])
    # FSDP on 2 ranks holds half of the parameters, gradients and AdamW moments that DDP holds
    assert fsdp["state_bytes_per_rank"][0] == pytest.approx(ddp["state_bytes_per_rank"][0] / 2, rel=0.01)
    tensors = len(list(models.tinygpt("cpu", max_seq_len=16).parameters()))
    # weights, gradients, two moments, and AdamW's step count (a 4-byte scalar per tensor)
    assert ddp["state_bytes_per_rank"][0] == 4 * res["param_bytes"] + 4 * tensors


# --- single: one device, cumulative performance variants (workshop.measure.perf) ----------------------------

def test_single_on_cpu_writes_a_record_with_a_row_per_variant(runs):
    variants = "naive,workers,bf16,channels_last,compile,resident"
    out = _run([sys.executable, "-m", "workshop.measure.bench", "single", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                "--num-workers", "1", "--variants", variants], runs)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "samples/s" in out.stdout and "speedup" in out.stdout and "record: " in out.stdout
    (record,) = _records(runs, "bench-single")
    rows = record.results["rows"]
    assert [r["variant"] for r in rows] == variants.split(",")
    assert record.params["variants"] == variants.split(",")
    for r in rows:
        assert r["status"] in ("ok", "skipped")
        if r["status"] == "ok":
            assert r["samples_per_s"] > 0 and r["step_time_s"] > 0 and r["peak_memory_bytes"] > 0
            assert r["flops_per_step"] > 0 and r["speedup"] > 0
        else:
            assert r["reason"] and r["speedup"] is None
    assert rows[0]["status"] == "ok" and rows[0]["speedup"] == 1.0
    if not torch.cuda.is_available():
        compiled = rows[4]
        assert compiled["status"] == "skipped" and "compile_on_cpu" in compiled["reason"]
        assert rows[5]["compile"] is False and rows[5]["without"] == ["compile"]  # a skipped change is not carried on
        assert all(r["mfu"] is None for r in rows if r["status"] == "ok")  # no peak to divide by on CPU
        assert "MFU: not meaningful on CPU" in out.stdout


def test_flops_of_a_linear_model_are_the_analytic_count():
    B, n_in, hidden, n_out = 8, 16, 32, 4
    x, y = torch.randn(B, n_in), torch.randint(0, n_out, (B,))
    linear = torch.nn.Linear(n_in, n_out)
    assert flops.count_step_flops(linear, x, y, backward=False) == 2 * B * n_in * n_out  # one multiply-add = 2 FLOPs
    # backward: the weight's gradient (another 2*B*in*out); the input is data and needs no gradient
    assert flops.count_step_flops(linear, x, y) == 2 * (2 * B * n_in * n_out)
    mlp = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_out))
    forward = 2 * B * (n_in * hidden + hidden * n_out)
    assert flops.count_step_flops(mlp, x, y, backward=False) == forward
    # the second layer computes both gradients (of its input and of its weight), the first only its weight's
    assert flops.count_step_flops(mlp, x, y) == forward + 2 * B * n_in * hidden + 2 * (2 * B * hidden * n_out)
    before = [p.clone() for p in mlp.parameters()]
    assert all(p.grad is None for p in mlp.parameters())  # counted on a copy: the model is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, mlp.parameters()))


def test_flops_of_a_cnn_step_are_about_three_forwards():
    model = models.get_model("small_cnn")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    ratio = flops.count_step_flops(model, x, y) / flops.count_step_flops(model, x, y, backward=False)
    assert 2.5 < ratio <= 3.0  # the first convolution needs no input gradient


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989),
    ("NVIDIA H200", torch.bfloat16, 989),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312),
    ("NVIDIA A100-SXM4-80GB", torch.float32, 156),  # float32 convolutions run in TF32 (cuDNN's default)
    ("NVIDIA L40S", torch.float16, 362),
    ("Tesla V100-SXM2-32GB", torch.float16, 125),
    ("Tesla V100-SXM2-32GB", torch.float32, 15.7),  # no TF32 before Ampere
])
def test_peak_flops_from_the_data_sheet_table(name, dtype, tflops):
    with mock.patch("torch.cuda.get_device_name", return_value=name):
        assert flops.peak_flops("cuda:0", dtype) == pytest.approx(tflops * 1e12)
        assert name in flops.gpu_peak("cuda:0", dtype)[1]


def test_peak_flops_on_cpu_is_none():
    assert flops.peak_flops("cpu", torch.bfloat16) is None
    assert "not meaningful" in flops.gpu_peak("cpu", torch.float32)[1]


def test_variants_are_cumulative():
    setups = perf.variant_setups(perf.VARIANTS, "cpu", num_workers=3)
    assert [s.name for s in setups] == list(perf.VARIANTS)
    last = setups[-1]
    assert last.num_workers == 3 and last.amp_dtype == "bfloat16" and last.channels_last and last.compile and last.resident
    assert setups[0] == perf.Setup("naive")
    assert not setups[1].pin_memory  # pinning helps copies to a GPU only
    (only,) = perf.variant_setups("channels_last", "cpu", num_workers=3)
    assert only.channels_last and only.num_workers == 0 and only.amp_dtype is None
    with pytest.raises(ValueError, match="unknown variant 'x'"):
        perf.variant_setups("naive,x", "cpu", 1)


def test_default_num_workers_from_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert perf.default_num_workers(5) == 5
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    assert perf.default_num_workers(5) == 7  # one core stays with the training process
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert perf.default_num_workers(5) == 1


def test_run_variants_format_and_plot(clean_env):
    rows = perf.run_variants("small_cnn", 4, steps=1, warmup=1, variants="naive,channels_last,compile,resident",
                             num_workers=0, dataset="synthetic")
    assert [r["variant"] for r in rows] == ["naive", "channels_last", "compile", "resident"]
    assert rows[0]["baseline"] == "naive" and rows[0]["speedup"] == 1.0
    table = perf.format_variants(rows)
    assert "samples/s" in table and "channels_last" in table
    if not torch.cuda.is_available():
        assert "compile skipped:" in table and "without compile (skipped)" in table
    fig = perf.plot_speedups(rows)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["naive", "channels_last", "compile", "resident"]
    assert perf.setup_of(rows[1]) == perf.Setup("channels_last", channels_last=True)


@pytest.mark.gpu
def test_single_on_a_gpu_measures_every_variant_with_mfu(runs):
    out = _run([sys.executable, "-m", "workshop.measure.bench", "single", "--model", "small_cnn", "--batch-size", "128",
                "--steps", "5", "--warmup", "2", "--num-workers", "2"], runs)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (record,) = _records(runs, "bench-single")
    rows = record.results["rows"]
    assert [r["variant"] for r in rows] == list(perf.VARIANTS)
    assert all(r["status"] == "ok" and r["samples_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)
    assert rows[4]["compile_time_s"] is not None and rows[1]["pin_memory"] is True


def test_the_collective_counter_counts_each_collective_and_its_whole_tensor(clean_env):
    import torch.distributed as tdist

    from workshop import dist

    dist.init(dist.DistEnv())  # a process group of one: the collectives run, alone
    try:
        whole, part = torch.zeros(8), torch.ones(8)
        with collectives.CollectiveCounter() as counted:
            tdist.all_reduce(torch.ones(10))
            tdist.all_reduce(torch.ones(6, dtype=torch.float64))
            tdist.all_gather_single(whole, part)
            tdist.broadcast(torch.ones(3), src=0)
            torch.ones(4) * 2  # not a collective
        assert counted.calls == {"all_reduce": {"calls": 2, "bytes": 40 + 48}, "all_gather": {"calls": 1, "bytes": 32},
                                 "broadcast": {"calls": 1, "bytes": 12}}
        assert torch.equal(whole, part)  # the collective itself ran
    finally:
        dist.cleanup()
