"""The cost model against published scaling (workshop.estimate.validation): the validation set, the targets of issue 33
held where the model meets them and its misses pinned where it does not (each with the term it lacks), the trivial
predictors it must beat on every source, the terms that each buy something, the sensitivity table, and the document
in docs/results that is the validation's output. The whole validation runs in well under a second."""

from dataclasses import replace
from pathlib import Path

import pytest

from workshop.estimate import network, published, scaling, terms, validation

ROOT = Path(__file__).resolve().parents[1]

# The rows over the 30% target today, and the series whose fall the model does not reproduce: an improvement or a
# regression changes these sets, and the document says what each lacks.
MISSES = {"1.2B strong, TP 2", "1.2B strong, TP 4", "1.2B strong, TP 8", "Llama 3.1 8B, FSDP",
          "Llama 3.1 8B, FSDP + compile", "Llama 3.1 8B, FSDP + Float8", "ZeRO-3 175B, 1536 GPUs",
          "ZeRO-3 530B, 2240 GPUs"}
TREND_MISSES = {("torchtitan", "FSDP")}
ORDERING_MISSES = {"megatron2019"}


@pytest.fixture(scope="module")
def scored():
    return validation.score()


def test_the_set_has_12_rows_from_5_sources_each_with_its_citation_and_facts(scored):
    rows = [s["row"] for s in scored]
    assert len(rows) >= 12 and len({r.source for r in rows}) >= 5
    for r in rows:
        assert r.cite and r.facts and r.kind in ("efficiency", "throughput") and r.source in published.SOURCES
        assert (r.compute_rate is None) != (r.base_rate is None), r.label  # the base's speed: given or solved
        assert r.setup.gpus > r.base.gpus or r.kind == "efficiency", r.label
    assert all(s.citation for s in published.SOURCES.values())


def test_errors_are_on_the_overhead_and_on_tflops(scored):
    goyal = next(s for s in scored if s["row"].source == "goyal2017")
    assert goyal["error"] == pytest.approx(abs((1 - goyal["predicted"]) - 0.10) / 0.10)
    zero3 = next(s for s in scored if s["row"].label == "ZeRO-3 175B, 1536 GPUs")
    assert zero3["error"] == pytest.approx(abs(zero3["predicted"] - 44) / 44)
    # a throughput row is calibrated on its base: the base predicts its own published TFLOP/s
    r = zero3["row"]
    assert validation.predict(published.Row(**{**r.__dict__, "setup": r.base})) == pytest.approx(144, rel=1e-6)


def test_targets_held_where_met_and_misses_pinned(scored):
    t = validation.targets(scored)
    assert {s["row"].label for s in t["misses"]} == MISSES
    assert all(s["row"].lacks for s in t["misses"])  # each miss names the term it lacks
    assert all(s["error"] <= validation.ROW_TARGET for s in scored if s["row"].label not in MISSES)
    # the median misses the 15% target; it must not get worse than it is
    assert not t["median_met"] and t["median"] < 0.19


def test_the_model_beats_every_trivial_predictor_on_every_source(scored):
    for x in validation.sources(scored):
        for name, err in x["controls"].items():
            assert x["model"] < err, (x["source"], name, x["model"], err)


def test_orderings_and_trends(scored):
    by_source = validation.sources(scored)
    assert {x["source"] for x in by_source if not x["ordering"]} == ORDERING_MISSES
    assert {(x["source"], k) for x in by_source for k, ok in x["trends"].items() if not ok} == TREND_MISSES
    # PTD-P's flat line against ZeRO-3's collapse: both falls reproduced within a factor 2 (DeepSpeed's gathers of
    # 2021, tensor by tensor, each over a ring of p - 1 steps), though ZeRO-3 on 1536 GPUs still falls less than
    # published
    ptdp = next(s for s in scored if s["row"].label == "PTD-P 175B, 1536 GPUs")
    zero3 = next(s for s in scored if s["row"].label == "ZeRO-3 175B, 1536 GPUs")
    assert ptdp["error"] < 0.05 and zero3["loss_predicted"] > 0.5 * zero3["loss_published"] > 0.3
    assert zero3["row"].published < zero3["predicted"] < 1.5 * zero3["row"].published


def test_each_term_buys_what_the_document_says(scored):
    off = {x["term"]: {m[0] for m in x["moved"]} for x in validation.terms_off(scored)}
    assert off["per-GPU batch GEMM efficiency (roofline)"] == set()  # every row's GEMMs stay compute-bound
    assert "ResNet-50 data parallel" in off["communication slowing overlapped compute"]
    assert {"PTD-P 175B, 1536 GPUs", "405B, 16,384 GPUs"} <= off["pipeline schedule (fill and drain)"]
    assert "8.3B, TP 8" in off["elementwise work TP leaves whole"]
    # the slowest GPU: every efficiency row, whose base has fewer GPUs than the row
    assert {s["row"].label for s in scored if s["row"].kind == "efficiency"} <= off[
        "the slowest GPU setting the step (stragglers)"]
    # DeepSpeed's gathers of 2021: the ZeRO-3 rows only, the rows whose facts say DeepSpeed
    assert off["DeepSpeed ZeRO-3's gathers of 2021 (tensor by tensor, synchronous)"] == {
        s["row"].label for s in scored if s["row"].setup.implementation == "deepspeed-2021"} != set()


def test_sensitivities_disclose_the_choices_that_move_rows():
    table = validation.sensitivities()
    found = {(x["row"].source, x["choice"]) for x in table}
    assert {("goyal2017", "DDP bucket"), ("megatron2019", "FLOP count"), ("megatron2019", "gradient precision"),
            ("llama3", "pipeline chunks per GPU V"), ("narayanan2021", "collectives across nodes")} <= found
    # each moves its row by more than 2 points, or has an alternative its base cannot be calibrated under (None)
    assert all((x["span"] > 2 or None in dict(x["alternatives"]).values()) and x["why"] and x["used"] for x in table)
    bucket = next(x for x in table if x["choice"] == "DDP bucket")
    assert dict(bucket["alternatives"])["one bucket"] < bucket["predicted"]
    # DeepSpeed's gathers: every ZeRO-3 row; fewer gathers or fewer tensors, less collapse
    deepspeed = [x for x in table if x["choice"] == "DeepSpeed ZeRO-3's gathers (2021)"]
    assert {x["row"].label for x in deepspeed} == {r.label for r in published.rows() if "ZeRO-3" in r.label}
    for x in deepspeed:
        assert dict(x["alternatives"])["2 gathers: none for the recomputed forward"] > x["predicted"]
    tensors = [x for x in table if x["choice"] == "ZeRO-3 tensors gathered per layer"]
    assert all(dict(x["alternatives"])["4: only the weight matrices"] > x["predicted"] for x in tensors)


def test_the_document_is_the_validations_output():
    assert (ROOT / "docs/results/costmodel_validation.md").read_text() == validation.validation_markdown()


def test_terms_by_hand():
    # 2048 tokens of a 12288-wide layer: far above the A100's ridge point, compute-bound
    assert terms.gemm_efficiency(2048, 12288, 8, "a100-80") == 1.0
    # 16 tokens: intensity about 16 FLOP/byte against a ridge of 153: bandwidth-bound
    assert 0.05 < terms.gemm_efficiency(16, 4096, 1, "a100-80") < 0.15
    assert terms.overlap_slowdown("h100") == pytest.approx(24 / 132) and terms.overlap_slowdown("h100", 0) == 0
    # (15 + 17) passes of 1024 tokens x 1024 wide in 2 bytes, on 2 layers, at 3.35 TB/s
    assert terms.elementwise_seconds(1024, 1024, 2, "h100") == pytest.approx(32 * 1024 * 1024 * 2 * 2 / 3350e9)
    assert terms.elementwise_seconds(1024, 1024, 2, "h100", recompute=True) == pytest.approx(
        47 / 32 * terms.elementwise_seconds(1024, 1024, 2, "h100"))
    with pytest.raises(ValueError, match="unknown GPU"):
        terms.gemm_efficiency(10, 10, 1, "abacus")
    # the slowest of 8 GPUs on a band of 8%: at 8/9 of it, against one GPU's mean at half of it
    assert terms.straggler_factor(8) == pytest.approx((1 + 0.08 * 8 / 9) / 1.04) == pytest.approx(1.0299, abs=1e-4)
    assert terms.straggler_factor(1) == 1.0 and terms.straggler_factor(512, spread=0.0) == 1.0
    # more GPUs, slower, but never past the band's far edge
    assert terms.straggler_factor(8) < terms.straggler_factor(128) < 1.08 / 1.04


def test_step_with_accumulation_and_the_compute_only_control():
    cl = published._goyal()[0].base.cluster
    s = scaling.Setup(16, "ddp", cl, "p100", work=1.0, params=1e8, microbatches=4)
    alike = replace(scaling.MODEL, straggler=0.0)  # every GPU as fast as the next
    free = scaling.step_time(s, 1.0, replace(alike, comm=False))
    assert free == pytest.approx(1.0)  # no link, no cost: the compute alone
    one = scaling.step_time(scaling.Setup(16, "ddp", cl, "p100", work=0.25, params=1e8), 1.0, alike)
    # accumulating 4 micro-batches: 3 of compute, then the one whose backward hides the buckets
    assert scaling.step_time(s, 1.0, alike) == pytest.approx(0.75 + one)
    # the model validated is the model that projects: the compute at the pace of the slowest of the 16 GPUs
    assert validation.MODEL is scaling.MODEL and scaling.step_time(s, 1.0) > scaling.step_time(s, 1.0, alike)
    assert scaling.step_time(s, 1.0, replace(validation.MODEL, comm=False)) == pytest.approx(terms.straggler_factor(16))


def test_deepspeed_2021_gathers_by_hand():
    # DeepSpeed #1069: 130 + 250 us per parameter tensor on one node of 8 A100, of which the ring's 7 steps of NVLink
    # latency are the link's
    assert terms.DEEPSPEED_2021_OP == pytest.approx(380e-6 - 7 * 4e-6)
    # the check against #1174: bing_bert's 1,040 tensors (64 layers of 16, and 16 more) and 5.1e9 fp16 parameters,
    # gathered one by one on 8 A100 of one node: the 480 - 60 ms ZeRO-3 added to the forward, within 2%
    a100 = network.gpu_cluster("a100")
    one = network.all_gather(2 * 5.1e9 / 1040, 8, a100)
    assert terms.deepspeed_gather_seconds(one, 1040) == pytest.approx(0.420, rel=0.02)
    # read per byte instead, the same 420 ms gives #1174's rate
    assert terms.DEEPSPEED_2021_RATE == pytest.approx(7 / 8 * 2 * 5e9 / 0.420)
    assert terms.synchronous_gather_seconds(2e9, 4, 1e9) == pytest.approx(1.5)  # 3/4 of 2 GB at 1 GB/s
    assert terms.synchronous_gather_seconds(2e9, 4, 1e9, link_seconds=2.0) == 2.0  # the links slower: theirs
    with pytest.raises(ValueError):
        terms.gather_rate(5e9, 8, 0.060, 0.480)
    with pytest.raises(ValueError):
        terms.deepspeed_gather_seconds(1e-3, 0)
    # 16 A100 on 2 nodes, 1e9 parameters in 2 units (a layer and the rest) of 4 tensors each, activations
    # recomputed: 3 gathers of each unit (forward, recomputed forward, backward), tensor by tensor, not overlapped,
    # the compute, the reduce-scatters after it
    s = scaling.Setup(16, "fsdp", a100, "a100-80", work=10.0, params=1e9, layers=1, gather_bytes=2, grad_bytes=2,
                      tensors=4, recompute=True, implementation="deepspeed-2021")
    o = replace(scaling.MODEL, straggler=0.0, slowdown_blocks=0, elementwise=0.0, deepspeed_reduce="exposed")
    ag = 4 * (terms.DEEPSPEED_2021_OP + network.all_gather(1e9 / 4, 16, a100))
    assert ag > network.all_gather(1e9, 16, a100)  # DeepSpeed's own cost per tensor, besides the links'
    rs = network.reduce_scatter(1e9, 16, a100)
    assert scaling.step_time(s, 1.0, o) == pytest.approx(2 * 3 * ag + 10.0 + 2 * rs)
    # the default: each unit's reduce-scatter beside the other unit's backward, the last one after it
    assert scaling.step_time(s, 1.0, replace(o, deepspeed_reduce="overlapped")) == pytest.approx(6 * ag + 10.0 + rs)
    # two gathers where nothing is recomputed; #1174 read per byte
    assert scaling.step_time(replace(s, recompute=False), 1.0, o) == pytest.approx(2 * 2 * ag + 10.0 + 2 * rs)
    per_byte = replace(o, deepspeed_rate=terms.DEEPSPEED_2021_RATE, deepspeed_gathers=2)
    assert scaling.step_time(s, 1.0, per_byte) == pytest.approx(
        2 * 2 * 15 / 16 * 1e9 / terms.DEEPSPEED_2021_RATE + 10.0 + 2 * rs)
    # the term off: the same setup as PyTorch's FSDP (prefetched, at the links' rate); the compute-only control
    fsdp = scaling.step_time(replace(s, implementation="fsdp"), 1.0, o)
    assert scaling.step_time(s, 1.0, replace(o, deepspeed=False)) == fsdp < scaling.step_time(s, 1.0, o)
    assert scaling.step_time(s, 1.0, replace(o, comm=False)) == pytest.approx(10.0)


def test_the_per_byte_reading_cannot_price_the_recomputed_forward():
    # #1174 read per byte with a third gather for the recomputed forward leaves the 175B base's 81.6 s step too little
    # compute: its GEMMs above the A100's peak. Tensor by tensor (#1069), the same three gathers calibrate the base's
    # GEMMs at 58% of the peak, against PTD-P's 61% on the same GPUs
    row = next(r for r in published.rows() if r.label == "ZeRO-3 175B, 1536 GPUs")
    assert row.setup.implementation == row.base.implementation == "deepspeed-2021" and row.base.recompute
    with pytest.raises(validation.Uncalibrated):
        validation.predict(row, replace(validation.MODEL, deepspeed_rate=terms.DEEPSPEED_2021_RATE))
    share = {b["series"]: b["share"] for b in validation.bases(validation.score())}
    assert 0.5 < share["ZeRO-3 175B"] < share["PTD-P 175B"] < 0.65
    # the rows that ran other implementations keep today's FSDP
    assert all(r.setup.implementation == "fsdp" for r in published.rows() if "ZeRO-3" not in r.label)
