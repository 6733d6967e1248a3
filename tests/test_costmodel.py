"""workshop.costmodel: the collectives' formulas against values worked out by hand, calibration
on synthetic all-reduce records, step times and the projection."""

import math

import pytest

from workshop import costmodel as cm

LINK = cm.AlphaBeta(alpha=1e-5, beta=1e-9)  # 10 us per message, 1 GB/s


def test_collectives_by_hand():
    # 4 ranks, 1e6 bytes: all-reduce 2*3*10us + 2*3/4*1e6*1ns = 60us + 1.5ms
    assert cm.all_reduce(1e6, 4, LINK) == pytest.approx(60e-6 + 1.5e-3)
    # all-gather and reduce-scatter: 3*10us + 3/4*1e6*1ns = 30us + 0.75ms, half the all-reduce
    assert cm.all_gather(1e6, 4, LINK) == pytest.approx(30e-6 + 0.75e-3)
    assert cm.reduce_scatter(1e6, 4, LINK) == pytest.approx(cm.all_reduce(1e6, 4, LINK) / 2)
    # 2 ranks: all-reduce 2*10us + 1*1e6*1ns
    assert cm.all_reduce(1e6, 2, LINK) == pytest.approx(20e-6 + 1e-3)
    # one rank communicates with nobody
    assert cm.all_reduce(1e6, 1, LINK) == 0 and cm.all_gather(1e6, 1, LINK) == 0


def test_known_links_and_bad_input():
    h100 = cm.get_link("nvlink4-h100")
    assert h100.bandwidth_GBps == pytest.approx(450)
    with pytest.raises(ValueError, match="unknown link"):
        cm.get_link("carrier-pigeon")
    with pytest.raises(ValueError, match="whole number"):
        cm.all_reduce(10, 0, LINK)
    with pytest.raises(ValueError, match="bytes"):
        cm.all_gather(-1, 2, LINK)


def test_ddp_step_by_hand():
    # 4 ranks, 10 MB of gradients in one bucket: comm = 60us + 2*3/4*1e7*1ns = 15.06 ms
    comm = 60e-6 + 15e-3
    assert cm.ddp_step(0.1, 1e7, 4, LINK) == pytest.approx(0.1 + comm)
    # half of it overlapped with the backward
    assert cm.ddp_step(0.1, 1e7, 4, LINK, overlap=0.5) == pytest.approx(0.1 + comm / 2)
    # overlap cannot hide more than the backward (2/3 of the compute): 3 ms of compute hides 2 ms
    assert cm.ddp_step(3e-3, 1e7, 4, LINK, overlap=1.0) == pytest.approx(3e-3 + comm - 2e-3)
    # two buckets pay the latency twice, the bandwidth term once
    assert cm.ddp_step(0.1, 1e7, 4, LINK, bucket_bytes=5e6) == pytest.approx(0.1 + 2 * 60e-6 + 15e-3)
    assert cm.ddp_step(0.1, 1e7, 1, LINK) == 0.1
    with pytest.raises(ValueError, match="overlap"):
        cm.ddp_step(0.1, 1e7, 4, LINK, overlap=1.5)


def test_fsdp_is_one_and_a_half_ddp_volume():
    # the bandwidth terms: FSDP 2 AG + 1 RS = 3 (p-1)/p n beta against DDP's 2 (p-1)/p n beta
    bw_only = cm.AlphaBeta(0.0, 1e-9)
    assert cm.fsdp_comm(1e8, 8, bw_only) == pytest.approx(1.5 * cm.all_reduce(1e8, 8, bw_only))
    # per unit latency: 3 units x 3 collectives x (p-1) alpha, 4 ranks: 27 * 10us + 3*3/4*1e6 ns
    assert cm.fsdp_comm(1e6, 4, LINK, units=3) == pytest.approx(27e-5 + 2.25e-3)
    assert cm.fsdp_step(0.1, 1e6, 4, LINK, units=3) == pytest.approx(0.1 + 27e-5 + 2.25e-3)


def test_tp_step_by_hand():
    # 2 layers on 2 TP ranks, 1e6 bytes of activations: 8 all-reduces of (2*10us + 1e6 ns) each
    assert cm.tp_step(0.1, 1e6, 2, 2, LINK) == pytest.approx(0.05 + 8 * (20e-6 + 1e-3))
    assert cm.tp_step(0.1, 1e6, 2, 1, LINK) == 0.1


def synthetic_records(alpha, beta, sizes=(4096, 65536, 2**20, 2**24), world_sizes=(2, 4), noise=None):
    records = []
    for i, p in enumerate(world_sizes):
        rows = []
        for j, n in enumerate(sizes):
            t = 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta
            if noise:
                t *= 1 + noise * (-1) ** (i + j)
            rows.append({"bytes": n, "time_s": t, "algbw_GBps": n / t / 1e9})
        records.append({"notebook": "bench-allreduce", "status": "ok", "dist": {"world_size": p}, "results": {"rows": rows}})
    return records


def test_calibration_recovers_alpha_and_beta():
    records = synthetic_records(35e-6, 2.5e-10)
    # a failed run, a one-rank run and notebook 05's rows are read too (05 as "allreduce")
    records.append({"notebook": "bench-allreduce", "status": "failed", "dist": {"world_size": 2},
                    "results": {"rows": [{"bytes": 4096, "time_s": 99.0}]}})
    rows = cm.allreduce_rows(records)
    assert len(rows) == 8
    ab = cm.calibrate(rows)
    assert ab.alpha == pytest.approx(35e-6, rel=1e-6)
    assert ab.beta == pytest.approx(2.5e-10, rel=1e-6)
    assert cm.fit_error(rows, ab) < 1e-6
    nb05 = [{"notebook": "05_ddp", "status": "ok", "dist": {"world_size": 2},
             "results": {"allreduce": r["results"]["rows"]}} for r in synthetic_records(5e-6, 1e-9, world_sizes=(2,))]
    ab05 = cm.calibrate(cm.allreduce_rows(nb05))
    assert (ab05.alpha, ab05.beta) == (pytest.approx(5e-6, rel=1e-6), pytest.approx(1e-9, rel=1e-6))


def test_calibration_with_noise_stays_close():
    ab = cm.calibrate(cm.allreduce_rows(synthetic_records(20e-6, 1e-9, noise=0.05)))
    assert ab.alpha == pytest.approx(20e-6, rel=0.2)
    assert ab.beta == pytest.approx(1e-9, rel=0.1)


def test_calibration_never_negative_and_bad_input():
    # pure bandwidth: no latency at all
    ab = cm.calibrate(cm.allreduce_rows(synthetic_records(0.0, 1e-9)))
    assert ab.alpha >= 0 and ab.beta == pytest.approx(1e-9, rel=1e-6)
    with pytest.raises(ValueError, match="at least two message sizes"):
        cm.calibrate(cm.allreduce_rows(synthetic_records(1e-5, 1e-9, sizes=(4096,), world_sizes=(2,))))
    with pytest.raises(ValueError, match="at least two message sizes"):
        cm.calibrate([])


def test_workload_from_size_and_parse():
    assert cm.parse_count("7B") == 7e9 and cm.parse_count("350m") == 350e6 and cm.parse_count(1.3e9) == 1.3e9
    with pytest.raises(ValueError, match="bad model size"):
        cm.parse_count("seven")
    w = cm.Workload.from_size("1B", tokens_per_sample=1024)
    assert w.parameters == 10**9 and w.flops_per_sample == 6e9 * 1024
    # 12 * layers * (128 layers)^2 is close to the size
    assert 0.7 < 12 * w.layers * (128 * w.layers) ** 2 / 1e9 < 1.4


def test_projection_by_hand_and_shape():
    w = cm.Workload("toy", parameters=10**8, flops_per_sample=1e12, bytes_per_param=2)
    proj = cm.project(w, gpu="h100", micro_batch_size=4, mfu=0.5, devices=(1, 8, 16), overlap=0.0)
    compute = 4e12 / (989e12 * 0.5)
    assert proj.compute_s == pytest.approx(compute)
    one, eight, sixteen = proj.rows
    assert one["efficiency"] == 1 and one["throughput"] == pytest.approx(4 / compute)
    # 8 devices: one node, NVLink; 16: two nodes, the ring at InfiniBand speed; 2e8 bytes in 8 buckets of 25 MiB
    assert eight["step_s"] == pytest.approx(compute + 8 * cm.all_reduce(2.5e7, 8, "nvlink4-h100"))
    assert sixteen["step_s"] == pytest.approx(compute + 8 * cm.all_reduce(2.5e7, 16, "ib-ndr-400"))
    assert sixteen["nodes"] == 2 and sixteen["efficiency"] < eight["efficiency"] < 1
    fsdp = cm.project(w, strategy="fsdp", micro_batch_size=4, mfu=0.5, devices=(16,), overlap=0.0, units=1)
    assert fsdp.rows[0]["step_s"] == pytest.approx(compute + cm.fsdp_comm(2e8, 16, "ib-ndr-400"))
    assert "efficiency" in cm.format_projection(proj)
    with pytest.raises(ValueError, match="unknown GPU"):
        cm.project(w, gpu="abacus")
    with pytest.raises(ValueError, match="strategy"):
        cm.project(w, strategy="pipeline")


def test_check_strategies_against_hand_values():
    rec = {"notebook": "bench-strategies", "status": "ok", "dist": {"world_size": 2},
           "results": {"model": "tinygpt-cpu", "world_size": 2, "compute_step_s": 0.01, "param_bytes": 1e6,
                       "bucket_bytes": 25 * 2**20, "fsdp_units": 5, "alone_step_s": {"fsdp": 0.015},
                       "measurements": [{"strategy": "ddp", "step_time_s": 0.012},
                                        {"strategy": "fsdp", "step_time_s": 0.02}]}}
    one_rank = {"notebook": "bench-strategies", "status": "ok", "results": {"world_size": 1, "measurements": []}}
    ddp, fsdp = cm.check_strategies([rec, one_rank], LINK)
    # DDP: no step of its own on a group of one here, so the plain model's compute; one bucket, 2 ranks
    assert ddp["wrapper"] == 1 and ddp["predicted_s"] == pytest.approx(0.01 + 20e-6 + 1e-3)
    assert ddp["error"] == pytest.approx((0.01102 - 0.012) / 0.012)
    # FSDP: its step alone, 15 ms, plus 5 units x 3 collectives x (10 us + 0.5 ms)
    assert fsdp["wrapper"] == pytest.approx(1.5)
    assert fsdp["predicted_s"] == pytest.approx(0.015 + 15 * 10e-6 + 3 * 0.5e-3)
    assert math.isfinite(fsdp["error"]) and "predicted" in cm.format_check([ddp, fsdp], LINK)


def test_check_command_on_synthetic_records(tmp_path, capsys):
    import json

    for i, rec in enumerate(synthetic_records(1e-5, 1e-9)):
        (tmp_path / f"ar{i}").mkdir()
        (tmp_path / f"ar{i}" / "record.json").write_text(json.dumps(rec))
    assert cm.main(["check", str(tmp_path)]) == 2  # no strategies record yet: says which command makes one
    assert "bench strategies" in capsys.readouterr().err
    res = {"model": "tinygpt-cpu", "world_size": 2, "compute_step_s": 0.01, "param_bytes": 1e6, "bucket_bytes": 25 * 2**20,
           "fsdp_units": 5, "alone_step_s": {"ddp": 0.01},
           # measured exactly what the model says: 10 ms + 2 x 10 us + 1e6 x 1 ns
           "measurements": [{"strategy": "ddp", "step_time_s": 0.01102}]}
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "record.json").write_text(json.dumps({"notebook": "bench-strategies", "status": "ok", "results": res,
                                                             "hardware": {"cpus": 2}, "versions": {"torch": "x"}}))
    text = cm.check(tmp_path, out=tmp_path / "out")
    assert "+0.0%" in text and "largest error 0%" in text
    assert (tmp_path / "out" / "costmodel_check.png").stat().st_size > 0
    assert "workshop.bench strategies" in (tmp_path / "out" / "costmodel_check.md").read_text()
    assert cm.main(["project", "350M", "--gpu", "a100"]) == 0 and "4096" in capsys.readouterr().out
    assert cm.main(["project", "lots"]) == 2 and "bad model size" in capsys.readouterr().err
