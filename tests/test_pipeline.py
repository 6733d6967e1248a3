"""Pipeline parallelism (workshop.pipeline): stages, schedules, sizes refused, what notebook 09 prints and draws of its
measurements (workshop.measure.pipeline_view), and every pipelined version against one process on 8 gloo ranks in one
launch (tests/multirank/pipeline_equivalence.py): pipelines of 2 and 4 stages from scratch and with
torch.distributed.pipelining, the bubble of stages of known duration, the activations held, and 3D meshes."""

import pytest
import torch

from helpers import on_ranks
from workshop import models, pipeline
from workshop.estimate import placements, planner
from workshop.measure import pipeline_view


def test_blocks_are_split_as_evenly_as_possible():
    assert pipeline.stage_blocks(4, 2) == [range(0, 2), range(2, 4)]
    assert pipeline.stage_blocks(4, 3) == [range(0, 2), range(2, 3), range(3, 4)]
    assert pipeline.stage_blocks(4, 1) == [range(0, 4)]
    with pytest.raises(ValueError, match=r"5 pipeline stages for a model of 4 blocks: .*;\nchoose at most 4 stages"):
        pipeline.stage_blocks(4, 5)
    with pytest.raises(ValueError, match="whole number >= 1, got 0"):
        pipeline.stage_blocks(4, 0)


def test_stages_in_a_row_are_the_model_and_keep_its_names():
    torch.manual_seed(0)
    model = models.tinygpt("cpu", max_seq_len=16)
    tokens = torch.randint(256, (2, 16))
    stages = pipeline.split(model, 3)
    x = tokens
    for stage in stages:
        x = stage(x)
    torch.testing.assert_close(x, model(tokens))
    names = [n for stage in stages for n, _ in stage.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert "layers.3.feed_forward.w2.weight" in dict(stages[2].named_parameters())
    assert model.layers[0].attention.wq.weight is not stages[0].layers["0"].attention.wq.weight  # a copy


def test_schedules_hold_what_the_papers_say():
    p, m = 4, 6
    for s in range(p):
        for name, schedule in pipeline.SCHEDULES.items():
            pipeline.check_schedule(schedule(p, m, s), m)
        assert pipeline.in_flight(pipeline.gpipe(p, m, s)) == m
        assert pipeline.in_flight(pipeline.one_f_one_b(p, m, s)) == p - s  # 1F1B: at most p - s in flight
    assert pipeline.one_f_one_b(2, 3, 0) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]
    assert pipeline.one_f_one_b(2, 3, 1) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert pipeline.in_flight(pipeline.one_f_one_b(4, 2, 0)) == 2  # fewer micro-batches than stages
    with pytest.raises(ValueError, match="cannot run here"):
        pipeline.check_schedule([("B", 0), ("F", 0)], 1)
    with pytest.raises(ValueError, match="does not run each of the 2 micro-batches"):
        pipeline.check_schedule([("F", 0), ("B", 0)], 2)


def test_the_planner_counts_the_micro_batches_the_schedules_hold():
    """workshop.estimate.planner's count for the first stage is what the schedule run here holds there."""
    for p in (1, 2, 4, 8):
        for m in (1, 3, 8, 32):
            for name, schedule in pipeline.SCHEDULES.items():
                assert planner.in_flight_microbatches(p, m, name) == pipeline.in_flight(schedule(p, m, 0)), (name, p, m)


def test_the_bubble_parameter_is_a_list_of_micro_batch_counts():
    assert pipeline.microbatch_counts("8,1,4,4") == [1, 4, 8]
    assert pipeline.microbatch_counts(4) == [4]  # papermill's `-p bubble_microbatches 4`
    for bad in ("", "1,x", "0,2", "1.5"):
        with pytest.raises(ValueError, match="write whole numbers of at least 1, comma-separated"):
            pipeline.microbatch_counts(bad)


def test_what_notebook_09_shows_of_its_measurements():
    """Two stages, one micro-batch: each computes 2 s of a 4 s step, the bubble (p-1)/(m+p-1) = 1/2."""
    import matplotlib.pyplot as plt

    timelines = [pipeline.Timeline(stage=0, events=[("F", 0, 0.0, 1.0), ("B", 0, 3.0, 4.0)]),
                 pipeline.Timeline(stage=1, events=[("F", 0, 1.0, 2.0), ("B", 0, 2.0, 3.0)])]
    assert pipeline.step_seconds(timelines) == 4.0
    assert pipeline.bubble(timelines) == 0.5 == placements.bubble_fraction(2, 1)
    row = dict(schedule="1f1b", p=2, m=1, step_s=4.0, measured=0.5, theory=0.5, unequal=0.5)
    assert pipeline_view.bubble_table([row]).splitlines()[1].split() == ["1f1b", "2", "1", "4000.0", "50.0%", "50.0%",
                                                                         "50.0%"]
    held = pipeline_view.held_table([dict(schedule="gpipe", stage=0, one=2**20, peak=4 * 2**20, formula=4)])
    assert held.splitlines()[1].split() == ["gpipe", "0", "1.0", "MiB", "4.0", "MiB", "4.00", "4"]
    fig = pipeline_view.plot_schedules({("1f1b", 1): timelines}, [row], m=1)
    assert [ax.get_title() for ax in fig.axes] == ["1f1b: p=2, m=1, bubble measured 50%, theory 50%"]
    plt.close(fig)
    assert pipeline_view.mesh_name({"pp": 2, "dp": 1, "tp": 2}) == "pp 2 x dp 1 x tp 2"
    assert pipeline_view.mesh_3d({"pp": 2, "dp": 1, "tp": 1}, 0, torch.zeros(1)).startswith("mesh pp 2 x dp 1 x tp 1: "
                                                                                           "a 1D subset (pp);")


def test_the_placements_as_notebook_09_prints_and_records_them():
    rows = placements.placements("llama2-70b", gpus=512, gpu="h100")
    text = pipeline_view.placements_table(rows, top=3)
    assert f"{sum(r.fits for r in rows)} of {len(rows)} placements fit; 3 shown. Why:" in text
    assert [line[:3] for line in text.splitlines() if line[:1].isdigit() and "placements fit" not in line][-3:] == \
        ["1. ", "2. ", "3. "]  # the reasons, numbered as the table's rows
    assert all(len(line) <= 120 for line in text.splitlines())
    records = pipeline_view.placement_records(rows, 8)
    assert len(records) == 8 and set(records[0]) == {"dp", "tp", "pp", "microbatches", "strategy", "memory_bytes", "fits",
                                                     "step_s", "reason"}


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown pipelining schedule 'zb'"):
        pipeline.library_schedule("zb", [], [], 1, 1)


@pytest.mark.multirank
def test_pipelines_and_3d_on_8_ranks_equal_one_process(tmp_path, clean_env):
    saved = on_ranks("pipeline_equivalence.py", tmp_path / "pp.pt", 8)
    assert saved["world_size"] == 8
    saved = saved["saved"]
    for p in (2, 4):
        for name in ("gpipe", "1f1b"):
            assert saved[f"p={p} scratch {name} equals one process"] is True
            assert saved[f"p={p} library {name} equals from scratch"] is True
            # the bytes a stage holds at its peak: exactly the schedule's micro-batches in flight
            for peak, one, count in saved[f"p={p} scratch {name} held"]:
                assert one > 0 and peak == count * one
        assert [c for *_, c in saved[f"p={p} scratch 1f1b held"]] == list(range(p, 0, -1))
        assert [c for *_, c in saved[f"p={p} scratch gpipe held"]] == [4] * p
        # stages of known duration: the bubble shrinks as micro-batches grow, and each is the theory's within a
        # factor that other processes' waits for the CPU stay inside (measured within 6% of it with two busy cores);
        # a schedule that ran the micro-batches one after another would idle (p - 1) / p of the step at any m
        bubbles = {m: saved[f"p={p} bubble m={m}"] for m in (1, 4, 8)}
        assert bubbles[1] > bubbles[4] > bubbles[8], bubbles
        for m, measured in bubbles.items():
            assert 0.8 <= measured / placements.bubble_fraction(p, m) <= 2, (p, m, measured)
    assert all(saved[f"p=4 bubble m={m}"] > saved[f"p=2 bubble m={m}"] for m in (1, 4, 8))  # more stages, more idle
    assert saved["p=2 library interleaved_1f1b equals one process"] is True
    assert saved["3D pp2 dp2 tp2 equals one process"] is True
    assert saved["3D pp4 dp1 tp2 equals one process"] is True
