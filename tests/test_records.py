"""workshop.base.records: the record schema. A key that breaks it is refused when written, naming it; a record on disk
that breaks it is a failed run in the report, with why; records round-trip as strict JSON."""

import json

import pytest

from workshop.base import records
from workshop.base.records import Measurement, Record, RecordError
from workshop.measure import metrics, report


@pytest.mark.parametrize("values,why", [
    ({"throughput": "fast"}, "results.throughput must be a number, got 'fast'"),
    ({"throughput": True}, "results.throughput must be a number, got True"),
    ({"samples_or_tokens": "images"}, "results.samples_or_tokens must be one of samples, tokens, got 'images'"),
    ({"memory_kind": "rss"}, "results.memory_kind must be one of cuda, tensors, resident set, got 'rss'"),
    ({"world_size": 0}, "results.world_size must be a whole number of at least 1, got 0"),
    ({"world_size": 1.5}, "results.world_size must be a whole number of at least 1, got 1.5"),
    ({"model": 18}, "results.model must be text, got 18"),
    ({"baseline": "yes"}, "results.baseline must be true or false, got 'yes'"),
    ({"peak_memory_bytes": [1, "2"]}, r"results.peak_memory_bytes\[1\] must be a number, got '2'"),
])
def test_a_measurement_that_breaks_the_schema_names_its_key(values, why):
    with pytest.raises(RecordError, match=why):
        Measurement.from_dict(values)


def test_a_measurement_keeps_its_own_throughput_and_takes_the_rest_from_results():
    rec = Record("bench-ddp", "ok", results={"model": "small_cnn", "world_size": 2, "throughput": float("nan"),
                                             "variant": "the run's", "measurements": [
                                                 {"strategy": "ddp", "throughput": 100}, {"strategy": "fsdp"}]})
    own, missing = rec.measurements()  # results' NaN throughput is none: results are no measurement of their own
    assert (own.model, own.world_size, own.strategy, own.throughput, own.variant) == ("small_cnn", 2, "ddp", 100, None)
    assert missing.throughput is None and missing.strategy == "fsdp"
    with pytest.raises(RecordError, match="results.measurements must be a list"):
        Record("x", "ok", results={"measurements": {"strategy": "ddp"}})
    with pytest.raises(RecordError, match=r"results.measurements\[1\] must be a JSON object, got str"):
        Record("x", "ok", results={"measurements": [{}, "ddp"]})


def test_a_record_names_a_status_of_the_list_and_keeps_its_own_keys_apart():
    with pytest.raises(RecordError, match="status must be one of running, ok, failed, interrupted, incomplete, got 'done'"):
        Record("05_ddp", "done")
    with pytest.raises(RecordError, match="extra repeats the record's own keys: status"):
        Record("05_ddp", "ok", extra={"status": "failed"})
    with pytest.raises(RecordError, match="a record names its notebook and its status"):
        Record.from_dict({"notebook": "05_ddp"})


def test_written_strict_and_read_back(tmp_path):
    rec = Record("05_ddp", "ok", params={"lr": float("nan")}, results={"throughput": 12.5, "val_loss": float("inf")},
                 slurm_job_id="42", extra={"sweep": "s1"})
    path = records.write(tmp_path, rec)
    values = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in a record"))
    assert values["params"]["lr"] is None and values["sweep"] == "s1"
    assert set(values["non_finite"]) == {"params.lr", "results.val_loss"}
    back = records.read(tmp_path)
    assert (back.notebook, back.status, back.slurm_job_id, back.measurements()[0].throughput) == ("05_ddp", "ok", "42", 12.5)
    assert records.status(tmp_path) == "ok" and records.status(tmp_path / "nothing here") is None


def test_a_notebook_that_writes_a_bad_measurement_fails_where_it_writes(tmp_path):
    with pytest.raises(RecordError, match=r"results.measurements\[0\].throughput must be a number, got '12 tokens/s'"):
        metrics.write_record(tmp_path, notebook="05_ddp", params={}, results={"measurements": [{"throughput": "12 tokens/s"}]})
    assert not (tmp_path / "record.json").exists()


def test_the_report_lists_a_record_that_breaks_the_schema_as_failed(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "record.json").write_text(json.dumps({"notebook": "05_ddp", "status": "ok",
                                                              "results": {"throughput": "fast"}}))
    (run,) = report.build(tmp_path, sacct=None).failed
    assert run.status == "failed" and run.reason == "results.throughput must be a number, got 'fast'"


def test_tables_pad_columns_and_align_numbers_right():
    from workshop.base.tables import fmt_bytes, gib, table

    text = table(["name", "ms", "memory"], [["ddp", "41.2", gib(3 * 2**30)], ["fsdp", "147.9", "-"]])
    assert text.splitlines() == ["name     ms   memory", "ddp    41.2  3.0 GiB", "fsdp  147.9        -"]
    assert table(["a", "b"], [["x", "y"]], align="rl") == "a  b\nx  y"
    assert (fmt_bytes(512), fmt_bytes(1536), gib(2**31, 2)) == ("512 B", "1.5 KiB", "2.00 GiB")
