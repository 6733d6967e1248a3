"""The cost model (workshop.estimate) and its check against measurement (workshop.measure.costcheck): the
collectives' formulas against values worked out by hand, on one link and on two levels, calibration on synthetic
records, step times with their overlap, memory, the projection, pipeline stages and the placements of a model over
dp x tp x pp GPUs, the strong-scaling projection, and the predicted-against-measured check. The published results the
model is held to: tests/test_costmodel_validation.py."""

import json
import math
from pathlib import Path

import pytest

from workshop.estimate import costmodel, network, placements, planner, projection, steps, terms
from workshop.measure import costcheck

LINK = network.AlphaBeta(alpha=1e-5, beta=1e-9)  # 10 us per message, 1 GB/s
# 4 GPUs per node: 1 us and 100 GB/s inside, 10 us and 10 GB/s per GPU across
TWO = network.Cluster(network.AlphaBeta(1e-6, 1e-11), network.AlphaBeta(1e-5, 1e-10), per_node=4)
ROOT = Path(__file__).resolve().parents[1]


def test_collectives_on_one_link_by_hand():
    # 4 ranks, 1e6 bytes: all-reduce 2*3*10us + 2*3/4*1e6*1ns = 60us + 1.5ms
    assert network.all_reduce(1e6, 4, LINK) == pytest.approx(60e-6 + 1.5e-3)
    # all-gather and reduce-scatter: 3*10us + 3/4*1e6*1ns = 30us + 0.75ms, half the all-reduce
    assert network.all_gather(1e6, 4, LINK) == pytest.approx(30e-6 + 0.75e-3)
    assert network.reduce_scatter(1e6, 4, LINK) == pytest.approx(network.all_reduce(1e6, 4, LINK) / 2)
    assert network.all_reduce(1e6, 2, LINK) == pytest.approx(20e-6 + 1e-3)
    # one link is one level: the ring only, never the tree
    assert set(network.all_reduce_times(1e6, 64, LINK)) == {"ring"}
    # one rank communicates with nobody
    assert network.all_reduce(1e6, 1, LINK) == 0 and network.all_gather(1e6, 1, LINK) == 0


def test_two_levels_by_hand():
    # 8 ranks = 2 nodes x 4. Bytes go at max(3/4 * 1e-11, 1e-10 / 4) = 2.5e-11 s/B: the 4 NICs of a node together
    # ring all-reduce: 14 steps, 4 of them across nodes: 10 x 1us + 4 x 10us = 50us; 2*7/8*1e6*2.5e-11 = 43.75us
    # tree: 2 x (3 x 1us + log2(2) x 10us) = 26us; 2*1e6*2.5e-11 = 50us
    times = network.all_reduce_times(1e6, 8, TWO)
    assert times["ring"] == pytest.approx(50e-6 + 43.75e-6)
    assert times["tree"] == pytest.approx(26e-6 + 50e-6)
    assert network.all_reduce(1e6, 8, TWO) == pytest.approx(76e-6)  # small message: the tree
    big = network.all_reduce_times(1e9, 8, TWO)
    assert big["ring"] < big["tree"] and network.all_reduce(1e9, 8, TWO) == big["ring"]  # large message on 2 nodes: the ring
    # all-gather: 7 steps, 2 across: 5us + 20us; 7/8*1e6*2.5e-11
    assert network.all_gather(1e6, 8, TWO) == pytest.approx(25e-6 + 21.875e-6)
    # inside one node: the intra link alone
    assert network.all_reduce(1e6, 4, TWO) == pytest.approx(6e-6 + 1.5e6 * 1e-11)
    # a group with one rank per node (data parallel over TP ranks): every byte through one NIC
    assert network.all_gather(1e6, 8, TWO, per_node=1) == pytest.approx(7 * 10e-6 + 7 / 8 * 1e6 * 1e-10)


def test_at_scale_the_tree_takes_over_from_the_ring():
    h100 = network.gpu_cluster("h100")
    times = network.all_reduce_times(25 * 2**20, 4096, h100)
    # the ring pays about 2p hops: tens of milliseconds per operation; the tree log2(512) network hops
    assert times["ring"] > 0.02 > 0.002 > times["tree"]
    assert network.all_reduce(25 * 2**20, 4096, h100) == times["tree"]
    # on 2 nodes the ring's 2(N-1)/N halves the network bytes: the ring for a large message
    two_nodes = network.all_reduce_times(2**30, 16, h100)
    assert two_nodes["ring"] < two_nodes["tree"]


def test_known_links_and_bad_input():
    assert network.get_link("nvlink4-h100").bandwidth_GBps == pytest.approx(450)
    assert network.shared("eth-50g", 8).bandwidth_GBps == pytest.approx(6.25 / 8)
    with pytest.raises(ValueError, match="unknown link"):
        network.get_link("carrier-pigeon")
    with pytest.raises(ValueError, match="unknown GPU"):
        network.gpu_cluster("abacus")
    with pytest.raises(ValueError, match="whole number"):
        network.all_reduce(10, 0, LINK)
    with pytest.raises(ValueError, match="bytes"):
        network.all_gather(-1, 2, LINK)
    # a cluster priced on its latencies alone, or its bandwidths alone: which of the two a step waits for
    latency, bandwidth = network.only(TWO, "latency"), network.only(TWO, "bandwidth")
    assert (latency.inter.alpha, latency.inter.beta, bandwidth.intra.alpha, bandwidth.intra.beta) == (1e-5, 0, 0, 1e-11)
    with pytest.raises(ValueError, match="'latency' or 'bandwidth'"):
        network.only(TWO, "both")


def test_ddp_buckets_pipeline_with_the_backward():
    # 2 ranks, 1e7 bytes in 4 buckets of 2.5e6: one bucket's all-reduce c = 2 x 10us + 2.5e6 x 1ns = 2.52 ms
    c = 20e-6 + 2.5e-3
    # no overlap: all 4 after the backward
    assert steps.ddp_step(0.3, 1e7, 2, LINK, overlap=False, bucket_bytes=2.5e6) == pytest.approx(0.3 + 4 * c)
    # a long backward (0.2 s, 50 ms per bucket) hides all but the last bucket
    assert steps.ddp_step(0.3, 1e7, 2, LINK, bucket_bytes=2.5e6) == pytest.approx(0.3 + c)
    # a short one (2 ms, 0.5 ms per bucket): the buckets queue, c + 3 (c - 0.5 ms)
    assert steps.ddp_step(3e-3, 1e7, 2, LINK, bucket_bytes=2.5e6) == pytest.approx(3e-3 + c + 3 * (c - 0.5e-3))
    # one coalesced bucket, Megatron's: one latency
    assert steps.ddp_step(0.3, 1e7, 2, LINK, overlap=False, bucket_bytes=None) == pytest.approx(0.3 + 20e-6 + 1e-2)
    assert steps.ddp_step(0.1, 1e7, 1, LINK) == 0.1


def test_fsdp_prefetch_and_volume():
    # 2 units of 1e6 bf16 and 2e6 fp32 bytes
    ag, rs = network.all_gather(5e5, 4, LINK), network.reduce_scatter(1e6, 4, LINK)
    # no overlap: compute + per unit 2 all-gathers and a reduce-scatter
    assert steps.fsdp_step(0.3, 1e6, 4, LINK, units=2, overlap=False, grad_bytes=2e6) == pytest.approx(0.3 + 2 * (2 * ag + rs))
    # compute per unit (50 ms forward, 100 ms backward) longer than its communication: only each pass's first
    # all-gather and the last reduce-scatter are exposed
    assert steps.fsdp_step(0.3, 1e6, 4, LINK, units=2, grad_bytes=2e6) == pytest.approx(0.3 + 2 * ag + rs)
    # one unit: nothing to prefetch behind
    assert steps.fsdp_step(0.3, 1e6, 4, LINK, units=1) == pytest.approx(
        steps.fsdp_step(0.3, 1e6, 4, LINK, units=1, overlap=False))
    # a tiny compute: communication-bound, forward ag + max(f, ag) + f, backward ag + max(b, ag + rs) + b + rs
    f, b = 1e-6 / 2, 2e-6 / 2
    want = (ag + ag + f) + (ag + (ag + rs) + b + rs)
    assert steps.fsdp_step(3e-6, 1e6, 4, LINK, units=2, grad_bytes=2e6) == pytest.approx(want)
    # bytes: bf16 all-gathers twice and an fp32 reduce-scatter = (2 + 2 + 4)/4 = 2x DDP's fp32 all-reduce volume
    bw_only = network.AlphaBeta(0.0, 1e-9)
    assert steps.fsdp_comm(2e8, 8, bw_only, grad_bytes=4e8) == pytest.approx(network.all_reduce(4e8, 8, bw_only))


def test_tp_step_by_hand():
    # 2 layers on 2 TP ranks, 1e6 bytes of activations: 8 all-reduces of (2*10us + 1e6 ns) each
    assert steps.tp_step(0.1, 1e6, 2, 2, LINK) == pytest.approx(0.05 + 8 * (20e-6 + 1e-3))
    assert steps.tp_step(0.1, 1e6, 2, 2, LINK, allreduces_per_layer=6) == pytest.approx(0.05 + 12 * (20e-6 + 1e-3))
    assert steps.tp_step(0.1, 1e6, 2, 1, LINK) == 0.1


def synthetic_records(alpha, beta, sizes=(4096, 65536, 2**20, 2**24), world_sizes=(2, 4), noise=None,
                      collective="all_reduce"):
    records = []
    rounds = 2 if collective == "all_reduce" else 1
    for i, p in enumerate(world_sizes):
        rows = []
        for j, n in enumerate(sizes):
            t = rounds * (p - 1) * alpha + rounds * (p - 1) / p * n * beta
            if noise:
                t *= 1 + noise * (-1) ** (i + j)
            rows.append({"bytes": n, "time_s": t, "algbw_GBps": n / t / 1e9})
        if collective == "all_reduce":
            records.append({"notebook": "bench-allreduce", "status": "ok", "dist": {"world_size": p}, "results": {"rows": rows}})
        else:
            records.append({"notebook": "bench-collectives", "status": "ok", "dist": {"world_size": p},
                            "results": {"rows": [{**r, "collective": collective} for r in rows]}})
    return records


def test_calibration_recovers_alpha_and_beta():
    records = synthetic_records(35e-6, 2.5e-10)
    # a failed run, a one-rank run and notebook 05's rows are read too (05 as "allreduce")
    records.append({"notebook": "bench-allreduce", "status": "failed", "dist": {"world_size": 2},
                    "results": {"rows": [{"bytes": 4096, "time_s": 99.0}]}})
    rows = costcheck.allreduce_rows(records)
    assert len(rows) == 8
    ab = network.calibrate(rows)
    assert ab.alpha == pytest.approx(35e-6, rel=1e-6)
    assert ab.beta == pytest.approx(2.5e-10, rel=1e-6)
    assert network.fit_error(rows, ab) < 1e-6
    nb05 = [{"notebook": "05_ddp", "status": "ok", "dist": {"world_size": 2},
             "results": {"allreduce": r["results"]["rows"]}} for r in synthetic_records(5e-6, 1e-9, world_sizes=(2,))]
    ab05 = network.calibrate(costcheck.allreduce_rows(nb05))
    assert (ab05.alpha, ab05.beta) == (pytest.approx(5e-6, rel=1e-6), pytest.approx(1e-9, rel=1e-6))


def test_all_gather_and_reduce_scatter_are_fitted_apart():
    records = synthetic_records(35e-6, 2.5e-10) + synthetic_records(80e-6, 6e-10, collective="reduce_scatter") \
        + synthetic_records(50e-6, 3e-10, collective="all_gather")
    rs = costcheck.collective_rows(records, "reduce_scatter")
    assert len(rs) == 8 and len(costcheck.allreduce_rows(records)) == 8  # the all-reduce fit reads only its own rows
    ab = network.calibrate(rs, collective="reduce_scatter")
    assert (ab.alpha, ab.beta) == (pytest.approx(80e-6, rel=1e-6), pytest.approx(6e-10, rel=1e-6))
    assert network.fit_error(rs, ab, "reduce_scatter") < 1e-6
    fits = costcheck.calibrate_by_world_size(records, "all_gather")
    assert set(fits) == {0, 2, 4} and fits[4].beta == pytest.approx(3e-10, rel=1e-6)
    with pytest.raises(ValueError, match="unknown collective"):
        costcheck.collective_rows(records, "broadcast")


def test_calibration_with_noise_stays_close():
    ab = network.calibrate(costcheck.allreduce_rows(synthetic_records(20e-6, 1e-9, noise=0.05)))
    assert ab.alpha == pytest.approx(20e-6, rel=0.2)
    assert ab.beta == pytest.approx(1e-9, rel=0.1)


def test_calibration_never_negative_and_bad_input():
    ab = network.calibrate(costcheck.allreduce_rows(synthetic_records(0.0, 1e-9)))
    assert ab.alpha >= 0 and ab.beta == pytest.approx(1e-9, rel=1e-6)
    with pytest.raises(ValueError, match="at least two message sizes"):
        network.calibrate(costcheck.allreduce_rows(synthetic_records(1e-5, 1e-9, sizes=(4096,), world_sizes=(2,))))
    with pytest.raises(ValueError, match="at least two message sizes"):
        network.calibrate([])


def test_workload_from_size_and_parse():
    assert planner.parse_count("7B") == 7e9 and planner.parse_count("350m") == 350e6 and planner.parse_count(1.3e9) == 1.3e9
    with pytest.raises(ValueError, match="bad model size"):
        planner.parse_count("seven")
    w = steps.Workload.from_size("1B", tokens_per_sample=1024)
    assert w.parameters == 10**9 and w.flops_per_sample == 6e9 * 1024
    # 12 * layers * (128 layers)^2 is close to the size; one layer's output is (seq, dim) in bf16
    assert 0.7 < 12 * w.layers * w.dim**2 / 1e9 < 1.4 and w.dim == 128 * w.layers
    assert w.activation_bytes_per_sample == 1024 * w.dim * 2
    # a published model by name, or by a size that names one (the planner's shapes)
    llama = steps.Workload.from_size("llama2-70b", tokens_per_sample=4096)
    assert (llama.name, llama.parameters, llama.layers, llama.dim, llama.heads) == ("Llama 2 70B", 69e9, 80, 8192, 64)
    assert planner.find_model("70B") is planner.MODELS["llama2-70b"] and planner.find_model("30B").name == "30B"


def test_memory_per_gpu():
    w = steps.Workload.gpt("toy", layers=2, dim=1024, tokens_per_sample=512, parameters=1e9, heads=8)
    ddp = steps.memory_per_gpu(w, "ddp", 64, micro_batch_size=2)
    # 16 bytes per parameter on every GPU: fp32 weights and gradients, AdamW's two fp32 moments
    assert (ddp["params"], ddp["grads"], ddp["optimizer"]) == (4e9, 4e9, 8e9) and ddp["unsharded"] == 0
    # activations, full checkpointing: 2 layers x 2 s b h, plus one layer s b h (34 + 5 a s / h)
    sbh = 512 * 2 * 1024
    assert ddp["activations"] == pytest.approx(2 * 2 * sbh + sbh * (34 + 5 * 8 * 512 / 1024))
    fsdp = steps.memory_per_gpu(w, "fsdp", 64, micro_batch_size=2)
    # sharded 64 ways, plus 2 units' bf16 weights and one unit's fp32 gradients of the 3 units
    assert fsdp["params"] + fsdp["grads"] + fsdp["optimizer"] == pytest.approx(16e9 / 64)
    assert fsdp["unsharded"] == pytest.approx(8e9 / 3)
    tp = steps.memory_per_gpu(w, "tp_fsdp", 64, micro_batch_size=2, tp=8)
    assert tp["optimizer"] == pytest.approx(8e9 / 64) and tp["activations"] == pytest.approx(ddp["activations"] / 8)
    with pytest.raises(ValueError, match="strategy"):
        steps.memory_per_gpu(w, "pipeline", 8, 1)


def test_projection_marks_what_does_not_fit():
    seven = steps.Workload.from_size("7B")
    ddp = projection.project(seven, "h100", "ddp", micro_batch_size=4, devices=(8, 64))
    # 16 bytes per parameter is 112 GB: on no number of 80 GB GPUs, and not a number to plot
    for r in ddp.rows:
        assert not r["fits"] and r["memory_bytes"] > 112e9 and r["efficiency"] is None and r["step_s"] is None
        assert r["fits_with"] == ["fsdp", "tp_fsdp"]
    text = projection.format_projection(ddp)
    assert "does not fit; fits with fsdp, tp_fsdp" in text
    assert "7B DDP does not fit on up to 64 h100 GPUs: memory, 110.1 GiB per GPU there against 67.1 GiB usable" in text
    seventy = projection.project(steps.Workload.from_size("70B"), "h100", "fsdp", micro_batch_size=4, devices=(16, 32, 4096))
    assert [r["fits"] for r in seventy.rows] == [False, True, True]
    assert projection.scaling_summary(seventy).startswith("70B FSDP needs 32 GPUs to fit in memory;")
    # the plot draws the fitting points only; the others are x marks on the floor
    ax = projection.plot_projections([ddp, seventy]).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["70B FSDP"].get_xdata()) == [32, 4096] and list(lines["7B DDP"].get_xdata()) == []
    assert "does not fit" in lines


def test_projection_by_hand_and_where_it_stops():
    w = steps.Workload("toy", parameters=10**8, flops_per_sample=1e12)
    proj = projection.project(w, gpu="h100", micro_batch_size=4, mfu=0.5, devices=(1, 8, 16))
    compute = 4e12 / (989e12 * 0.5)
    assert proj.compute_s == pytest.approx(compute)
    one, eight, sixteen = proj.rows
    assert one["efficiency"] == 1 and one["throughput"] == pytest.approx(4 / compute)
    # fp32 gradients: 4e8 bytes, in 16 buckets of 25 MiB, on the two-level cluster
    h100 = network.gpu_cluster("h100")
    assert eight["step_s"] == pytest.approx(steps.ddp_step(compute, 4e8, 8, h100))
    assert sixteen["nodes"] == 2 and sixteen["efficiency"] < eight["efficiency"] < 1
    assert projection.scaling_summary(proj) == f"toy DDP keeps {sixteen['efficiency']:.0%} efficiency at 16 GPUs."
    # a hundred times less compute against the same 4e8 bytes: bandwidth-bound from the first node on
    tiny = projection.project(steps.Workload("tiny", 10**8, 1e10), gpu="h100", micro_batch_size=4, mfu=0.5, devices=(1, 8, 16))
    first = tiny.rows[1]
    assert first["bound"] == "bandwidth" and first["efficiency"] < 0.8
    assert projection.scaling_summary(tiny) == f"tiny DDP falls below 80% at 8 GPUs ({first['efficiency']:.0%}), bound by " \
                                       "bandwidth: more bytes than the links move while the GPU computes."
    with pytest.raises(ValueError, match="unknown GPU"):
        projection.project(w, gpu="abacus")
    with pytest.raises(ValueError, match="strategy"):
        projection.project(w, strategy="pipeline")
    with pytest.raises(ValueError, match="not a transformer"):
        projection.project(w, strategy="tp_fsdp")


def test_flat_fsdp_at_4096_gpus_is_latency_bound():
    # the ring all-gathers' latency grows with p: at 4096 GPUs it is what stops a 7B model's FSDP
    proj = projection.project(steps.Workload.from_size("7B"), "h100", "fsdp", micro_batch_size=4, devices=(64, 4096))
    near, far = proj.rows
    assert near["efficiency"] > 0.9 > 0.8 > far["efficiency"] and far["bound"] == "latency"


def test_strong_projection_at_llama2s_global_batch():
    proj = projection.project_strong("70B", "h100", "fsdp", devices=(16, 32, 64, 1024, 2048))
    small, base, mid, last, too_many = proj.rows
    assert small["reason"] == "memory" and not small["fits"]
    # 1024 sequences over 32 replicas: 32 each, one per micro-batch; the baseline is the first count that fits
    assert (base["per_gpu_sequences"], base["microbatches"], base["efficiency"]) == (32, 32, 1.0)
    assert mid["per_gpu_sequences"] == 16 and last["per_gpu_sequences"] == 1
    assert mid["throughput"] == pytest.approx(1024 * 4096 / 64 / mid["step_s"])
    # the compute at 40% of the peak, at the pace of the slowest of the 32 GPUs (terms.straggler_factor)
    assert 1 > mid["efficiency"] > last["efficiency"]
    assert base["mfu"] == pytest.approx(0.4 / terms.straggler_factor(32), abs=0.005)
    assert not too_many["fits"] and too_many["reason"] == "1024 sequences do not split into 2048 replicas x 1"
    assert too_many["fits_with"] == ["tp_fsdp"]  # 256 replicas of 8 GPUs do split it
    text = projection.format_projection(proj)
    assert "tokens/s per GPU against 32 GPUs, the fewest where it fits" in text and "32 (32 x 1)" in text
    tp = projection.project_strong("7B", "h100", "tp_fsdp", devices=(4, 8))
    assert tp.rows[0]["reason"] == "fewer GPUs than TP 8" and tp.rows[1]["tp"] == 8
    # the workload is the step's: at 8 GPUs, one replica of TP 8 runs all 1024 sequences
    assert tp.rows[1]["per_gpu_sequences"] == 1024
    with pytest.raises(ValueError, match="tp 16"):
        projection.project_strong("7B", strategy="tp_fsdp", tp=16)
    with pytest.raises(ValueError, match="mfu"):
        projection.project_strong("7B", mfu=0)


def test_check_strategies_against_hand_values():
    rec = {"notebook": "bench-strategies", "status": "ok", "dist": {"world_size": 2},
           "results": {"model": "tinygpt-cpu", "world_size": 2, "compute_step_s": 0.01, "param_bytes": 1e6,
                       "bucket_bytes": 25 * 2**20, "fsdp_units": 5, "alone_step_s": {"fsdp": 0.015},
                       "measurements": [{"strategy": "ddp", "step_time_s": 0.012},
                                        {"strategy": "fsdp", "step_time_s": 0.02}]}}
    one_rank = {"notebook": "bench-strategies", "status": "ok", "results": {"world_size": 1, "measurements": []}}
    rs = network.AlphaBeta(20e-6, 2e-9)
    ddp, fsdp = costcheck.check_strategies([rec, one_rank], LINK, rs_link={2: rs})
    # DDP: no step of its own on a group of one here, so the plain model's compute; one bucket, 2 ranks
    assert ddp["wrapper"] == 1 and ddp["predicted_s"] == pytest.approx(0.01 + 20e-6 + 1e-3)
    assert ddp["error"] == pytest.approx((0.01102 - 0.012) / 0.012)
    # FSDP: its step alone, 15 ms, plus 5 units x [2 all-gathers (10 us + 0.1 ms) + a reduce-scatter (20 us + 0.2 ms)]
    assert fsdp["wrapper"] == pytest.approx(1.5)
    assert fsdp["predicted_s"] == pytest.approx(0.015 + 5 * (2 * (10e-6 + 0.1e-3) + 20e-6 + 0.2e-3))
    assert math.isfinite(fsdp["error"]) and "predicted" in costcheck.format_check([ddp, fsdp])


def test_check_command_on_synthetic_records(tmp_path, capsys):
    records = synthetic_records(1e-5, 1e-9) + synthetic_records(1e-5, 1e-9, collective="all_gather") \
        + synthetic_records(1e-5, 1e-9, collective="reduce_scatter")
    for i, rec in enumerate(records):
        (tmp_path / f"c{i}").mkdir()
        (tmp_path / f"c{i}" / "record.json").write_text(json.dumps(rec))
    assert costcheck.main([str(tmp_path)]) == 2  # no strategies record yet: says which command makes one
    assert "bench strategies" in capsys.readouterr().err
    res = {"model": "tinygpt-cpu", "world_size": 2, "compute_step_s": 0.01, "param_bytes": 1e6, "bucket_bytes": 25 * 2**20,
           "fsdp_units": 5, "alone_step_s": {"ddp": 0.01, "fsdp": 0.01},
           # measured exactly what the model says: 10 ms + 2 x 10 us + 1e6 x 1 ns; FSDP 5 x 3 x (10 us + 0.1 ms)
           "measurements": [{"strategy": "ddp", "step_time_s": 0.01102}, {"strategy": "fsdp", "step_time_s": 0.01165}]}
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "record.json").write_text(json.dumps({"notebook": "bench-strategies", "status": "ok", "results": res,
                                                             "hardware": {"cpus": 2}, "versions": {"torch": "x"}}))
    text = costcheck.check(tmp_path, out=tmp_path / "out")
    assert text.count("+0.0%") == 2 and "largest error 0%" in text
    assert (tmp_path / "out" / "costmodel_check.png").stat().st_size > 0
    assert "workshop.measure.bench collectives" in (tmp_path / "out" / "costmodel_check.md").read_text()


def test_cli_project_validate_and_bad_input(tmp_path, capsys):
    assert costmodel.main(["project", "70B", "--gpu", "h100", "--strategy", "fsdp", "--weak", "--micro-batch-size",
                           "4", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "4096" in out and "70B FSDP needs 32 GPUs to fit in memory" in out
    assert costmodel.main(["project", "70B"]) == 0  # strong scaling at Llama 2's 4M tokens
    out = capsys.readouterr().out
    assert "global batch of 1024 sequences of 4096 tokens" in out and "do not split into 2048 replicas" in out
    assert costmodel.main(["validate", "--out", str(tmp_path)]) == 0
    assert "goyal2017" in (tmp_path / "costmodel_validation.md").read_text()
    capsys.readouterr()
    assert costmodel.main(["project", "lots"]) == 2 and "bad model size" in capsys.readouterr().err
    for bad in (["project", "7B", "--gpu", "abacus"], ["project", "7B", "--micro-batch-size", "0"],
                ["project", "7B", "--strategy", "pipeline"], ["project", "7B", "--mfu", "x"],
                ["project", "7B", "--mfu", "nan"], ["project", "7B", "--mfu", "inf"],
                ["project", "7B", "--global-batch", "0"]):
        with pytest.raises(SystemExit) as exit_:
            costmodel.main(bad)
        assert exit_.value.code == 2
    assert costmodel.main(["project", "7B", "--mfu", "1.5"]) == 2 and "mfu" in capsys.readouterr().err
    assert costmodel.main(["project", "7B", "--strategy", "tp_fsdp", "--tp", "16"]) == 2
    assert "tp 16" in capsys.readouterr().err


# --- pipeline parallelism and placements ---------------------------------------------------------------

def test_bubble_fraction():
    assert placements.bubble_fraction(1, 8) == 0
    assert placements.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert placements.bubble_fraction(4, 64) == pytest.approx(3 / 67)  # 4.5%
    # Narayanan et al. 2021, eq. 1: the bubble is (p - 1) / m of the ideal time; interleaved, (p - 1) / (v m)
    for p, m, v in ((4, 4, 1), (8, 32, 1), (8, 32, 4)):
        f = placements.bubble_fraction(p, m, v)
        assert f / (1 - f) == pytest.approx((p - 1) / (v * m))
    for bad in ((0, 4), (4, 0), (4, 2.5)):
        with pytest.raises(ValueError, match="whole number"):
            placements.bubble_fraction(*bad)


def test_p2p_bytes_and_the_link_between_stages():
    w = steps.Workload.gpt("Llama 2 70B", 80, 8192, 4096, 69e9, heads=64)
    # (micro_batch, seq, dim) in bf16 per direction per micro-batch; with TP each rank sends its 1/tp
    assert placements.p2p_bytes(w, 1) == 4096 * 8192 * 2 and placements.p2p_bytes(w, 2, tp=8) == 2 * 4096 * 8192 * 2 / 8
    h100 = network.gpu_cluster("h100")
    assert placements.stage_link(h100, dp=1, tp=2, pp=4) is h100.intra  # 8 GPUs: one node
    assert placements.stage_link(h100, dp=1, tp=8, pp=2) is h100.inter and placements.stage_link(h100, 2, 2, 4) is h100.inter


def test_pp_step_by_hand():
    # a 4-layer model without vocabulary on 2 nodes x 4 GPUs (TWO): tp 2, pp 2, dp 2, 3 micro-batches, DDP
    shape = planner.ModelShape("toy", 1e9, 4, 1024, 8)
    r = placements.pp_step(shape, dp=2, tp=2, pp=2, microbatches=3, micro_batch_size=1, seq_len=512, cluster=TWO, compute_s=0.4)
    c = 0.4 * 2 / 4 / 2  # the micro-batch's compute on 2 of 4 layers, split over 2 TP ranks
    tp = steps.tp_comm(512 * 1024 * 2, 2, 2, TWO.intra, 6)
    p2p = 2 * (TWO.inter.alpha + 512 * 1024 * 2 / 2 * TWO.inter.beta)  # 8 GPUs > 4 per node: across nodes
    t = c + tp + p2p
    ddp = steps.ddp_step(c, 4 * shape.parameters / 2 / 2, 2, TWO, per_node=2) - c
    assert (r.compute_s, r.tp_s, r.p2p_s) == (pytest.approx(3 * c), pytest.approx(3 * tp), pytest.approx(3 * p2p))
    assert r.bubble_s == pytest.approx(t) and r.dp_s == pytest.approx(ddp) and r.bubble == pytest.approx(1 / 4)
    assert r.step_s == pytest.approx((3 + 2 - 1) * t + ddp)
    # interleaved, 2 virtual stages: half the bubble, twice the sends
    v = placements.pp_step(shape, 2, 2, 2, 3, 1, 512, cluster=TWO, compute_s=0.4, virtual_stages=2)
    assert v.p2p_s == pytest.approx(2 * r.p2p_s) and v.bubble == pytest.approx(1 / (2 * 3 + 1))


def test_pp_step_without_stages_is_the_existing_step():
    # one stage, one micro-batch: the step of `project` (DDP, FSDP, TP x FSDP) on the same cluster
    w = steps.Workload.gpt("Llama 2 70B", 80, 8192, 4096, 69e9, heads=64)
    h100, compute = network.gpu_cluster("h100"), 2.0
    for strategy, dp, tp in (("ddp", 64, 1), ("fsdp", 64, 1), ("tp_fsdp", 8, 8)):
        want = projection._step(strategy, w, compute, dp * tp, tp, h100, 81, 1)
        got = placements.pp_step("llama2-70b", dp, tp, 1, 1, compute_s=compute, strategy="ddp" if strategy == "ddp" else "fsdp")
        assert got.step_s == pytest.approx(want) and got.bubble_s == got.p2p_s == 0


def test_pp_step_refuses_bad_input():
    for kwargs, match in ((dict(tp=16), "TP 16 would cross nodes \\(8 GPUs per node\\): keep tp at most 8"),
                          (dict(strategy="zero2"), "'ddp' or 'fsdp', not 'zero2'"),
                          (dict(microbatches=0), "microbatches must be"), (dict(pp=1, virtual_stages=2), "need pp > 1"),
                          (dict(gpu="abacus"), "unknown GPU"), (dict(mfu=1.5), "mfu"),
                          (dict(pp=96), "80 layers do not fill 96 pipeline stages")):
        args = dict(model="llama2-70b", dp=4, tp=8, pp=4, microbatches=8) | kwargs
        with pytest.raises(ValueError, match=match):
            placements.pp_step(**args)


def test_placements_of_llama2_70b_on_512_h100():
    rows = placements.placements("llama2-70b", gpus=512, gpu="h100")
    assert all(r.dp * r.tp * r.pp == 512 for r in rows)
    assert all(r.microbatches * r.dp == 1024 for r in rows)  # Llama 2's 4M tokens: 1024 sequences of 4096
    fitting = [r for r in rows if r.fits]
    assert rows[:len(fitting)] == fitting and [r.step_s for r in fitting] == sorted(r.step_s for r in fitting)
    assert all(r.memory_bytes <= 0.9 * 80e9 for r in fitting)
    # pure data parallelism of 70B: 16 bytes per parameter on every GPU, over 1 TB
    pure = next(r for r in rows if (r.dp, r.strategy) == (512, "ddp"))
    assert not pure.fits and pure.memory_bytes > 1e12 and pure.reason.startswith("does not fit: 1039.2 GiB > 67.1 GiB")
    # tensor parallelism beyond a node is not placed
    assert all(not r.fits and "TP 16 would cross nodes" in r.reason for r in rows if r.tp > 8)
    # DDP outermost (Megatron-LM's PTD-P): the fastest keeps TP inside a node and pipelines across nodes
    ddp = [r for r in fitting if r.strategy == "ddp"]
    best = ddp[0]
    assert best.tp in (4, 8) and best.pp > 1 and best.dp > 1 and "across nodes" in best.reason
    tp8pp4 = next(r for r in ddp if (r.tp, r.pp) == (8, 4))
    assert tp8pp4.step.bubble == pytest.approx(3 / 67) and "bubble 4.5%" in tp8pp4.reason
    # FSDP fits without TP or PP (2 sequences per GPU hide its all-gathers behind the compute) and, paying neither
    # bubble nor TP all-reduces, is the fastest of all in this model
    fsdp = next(r for r in fitting if (r.dp, r.strategy) == (512, "fsdp"))
    assert rows[0] is fsdp and fsdp.step.dp_s < 0.01 * fsdp.step_s and fsdp.mfu == pytest.approx(0.4, abs=0.005)
    # the same cluster with 4096 GPUs: 1024 sequences cannot feed 4096 replicas, and TP 8 x PP wins
    big = placements.placements("70B", gpus=4096)
    assert big[0].tp == 8 and big[0].pp > 1 and big[0].fits
    assert all("do not split into 4096 replicas" in r.reason for r in big if r.dp == 4096 and r.tp == 1)


def test_format_placements_and_bad_input():
    rows = placements.placements(gpus=64, strategies=("ddp",))
    text = placements.format_placements(rows, top=3)
    lines = text.splitlines()
    assert lines[0] == ("| dp | tp | pp | micro-batches | memory per GPU | fits | step s | bubble % | tokens/s per GPU "
                        "| MFU | reason |") and len(lines) == 2 + 3 + 2
    assert lines[-1] == f"{sum(r.fits for r in rows)} of {len(rows)} placements fit; 3 shown."
    assert "| DP |" in placements.format_placements(placements.placements(gpus=64), top=None)
    for kwargs, match in ((dict(strategies=("zero1",)), "'ddp' and 'fsdp', not 'zero1'"), (dict(gpus=0), "gpus"),
                          (dict(gpu="abacus"), "unknown GPU"), (dict(model="seven"), "bad model size")):
        with pytest.raises(ValueError, match=match):
            placements.placements(**kwargs)


def test_cli_placements(capsys):
    assert costmodel.main(["placements", "70B", "--gpus", "512", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Llama 2 70B (69B parameters, 80 layers) on 512 h100") and "| dp | tp | pp |" in out
    assert len([line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]) == 10
    assert costmodel.main(["placements", "70B", "--gpus", "500"]) == 0  # 500 = 4 x 125: tp up to 4, pp dividing
    capsys.readouterr()
    assert costmodel.main(["placements", "lots"]) == 2 and "bad model size" in capsys.readouterr().err
    for bad in (["placements", "70B", "--strategy", "zero3"], ["placements", "70B", "--top", "-1"],
                ["placements", "70B", "--mfu", "nan"]):
        with pytest.raises(SystemExit) as exit_:
            costmodel.main(bad)
        assert exit_.value.code == 2
