"""The committed notebooks as a reader opens them: every image decodes, nothing on stderr but what the allow-list
admits (each entry with its reason), no path of any machine, every checked cell goes through workshop.check, and
the metadata names the world the outputs came from."""

import base64
import json
import re
import struct
import zlib

import pytest

from helpers import REPO
from workshop.base.tables import WIDTH  # the columns the package wraps its printed lines to

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))

# stderr a committed notebook may show: (notebook, text in the output, why it stays). Empty: none is needed now.
STDERR_ALLOWED: list[tuple[str, str, str]] = []

# An absolute path on some machine (a home, a build machine's /__w/, a cluster's file system) or inside an
# environment; "runs/..." relative to the repository is what a reader should see.
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:home|Users|root|tmp|work|__w|opt|usr|scratch|private|var|mnt|data|gpfs|lustre"
                          r"|p|global|lus|cluster)/\S+|\S*\.venv/\S*|\S*site-packages\S*")


def png_defect(data: bytes) -> str | None:
    """What is wrong with a PNG file, else None: its signature, each chunk's CRC-32 (over type and data), an IEND."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return "no PNG signature"
    pos = 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length] or b"\0\0\0\0")
        if zlib.crc32(kind + body) != crc:
            return f"the checksum of chunk {kind!r} at byte {pos} fails"
        if kind == b"IEND":
            return None
        pos += 12 + length
    return "it ends before its IEND chunk"


def code_cells(path):
    return [(i, c) for i, c in enumerate(json.loads(path.read_text())["cells"]) if c["cell_type"] == "code"]


def texts(cell):
    """Each text an output of the cell shows, with what it is: stdout, stderr, text/plain, ..."""
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            yield out["name"], "".join(out["text"])
        for kind, value in out.get("data", {}).items():
            if kind.startswith("text/"):
                yield kind, "".join(value) if isinstance(value, list) else value
        if out["output_type"] == "error":
            yield "error", "\n".join(out.get("traceback", []))


def test_png_defect_finds_a_changed_byte():
    chunk = b"IEND"
    good = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 0) + chunk + struct.pack(">I", zlib.crc32(chunk))
    assert png_defect(good) is None
    assert "checksum" in png_defect(good[:-1] + b"\x00")
    assert png_defect(good[:8]) == "it ends before its IEND chunk"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_image_decodes(path):
    bad = [(i, png_defect(base64.b64decode(out["data"]["image/png"]))) for i, cell in code_cells(path)
           for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert [(i, why) for i, why in bad if why] == [], f"{path.name}: corrupt images (cell index, defect)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_stderr_but_the_allowed(path):
    allowed = [text for name, text, _ in STDERR_ALLOWED if name == path.name]
    shown = [(i, text[:300]) for i, cell in code_cells(path) for kind, text in texts(cell)
             if kind in ("stderr", "error") and not any(a in text for a in allowed)]
    assert shown == [], f"{path.name} shows stderr or an error (cell index, text); mend its cause, or allow it with a reason"




@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_text_line_wider_than_a_page(path):
    """Printed text (stdout, stderr, a plain-text result): Markdown and HTML outputs wrap when they are rendered."""
    wide = [(i, len(line), line[:60]) for i, cell in code_cells(path) for out in cell.get("outputs", [])
            for kind, text in texts({"outputs": [out]})
            if kind in ("stdout", "stderr", "error") or (kind == "text/plain" and len(out.get("data", {})) == 1)
            for line in text.splitlines() if len(line) > WIDTH]
    assert wide == [], f"{path.name}: lines over {WIDTH} columns (cell index, width, start): wrap them where they are made"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_machine_path(path):
    found = [(i, m) for i, cell in code_cells(path) for _, text in texts(cell) for m in MACHINE_PATH.findall(text)]
    assert found == [], f"{path.name} shows paths of a machine (cell index, path): print them relative to the repository"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_checked_cell_goes_through_workshop_check(path):
    """nbval compares a checked cell's output, but a batch run (papermill, SLURM) fails only where a check raises."""
    unchecked = [i for i, cell in code_cells(path) if "".join(cell["source"]).startswith("# NBVAL_CHECK_OUTPUT")
                 and not re.search(r"\bcheck\.(require|stop_if_diverged|exercise)\(", "".join(cell["source"]))]
    assert unchecked == [], f"{path.name}: checked cells (index) that only print: call check.require"


# The library calls a student writes in their own script, each shown once as a plain call in a lesson's code cell
IN_THE_OPEN = {
    "05_ddp": ["init_process_group(", "DistributedSampler(", ".set_epoch(", "DistributedDataParallel(", ".no_sync()",
               "L.Trainer(", "accelerator=", "devices=", "num_nodes=", "strategy=", "precision="],
    "06_sharding": ["ZeroRedundancyOptimizer(", "fully_shard(", "MixedPrecisionPolicy(", "deepspeed.initialize("],
    "07_memory": ["checkpoint("],
    "08_tensor_parallelism": ["parallelize_module(", "ColwiseParallel(", "RowwiseParallel(", "SequenceParallel("],
    "09_pipeline_parallelism": ["PipelineStage(", "ScheduleGPipe(", "Schedule1F1B(", ".step("],
    "10_long_sequences_and_experts": ["isend(", "irecv(", "all_to_all_single(", "context_parallel("],
    "11_inference": ["init_device_mesh(", "KVCache("],
}
LESSON_CODE_LINES = 300  # at most, per lesson notebook: what is not the lesson lives in the package


@pytest.mark.parametrize("name", sorted(IN_THE_OPEN))
def test_the_library_calls_stand_in_the_open(name):
    code = "\n".join("".join(c["source"]) for _, c in code_cells(REPO / "notebooks" / f"{name}.ipynb"))
    assert [call for call in IN_THE_OPEN[name] if call not in code] == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_lesson_fits_a_session(path):
    lines = sum(len("".join(c["source"]).splitlines()) for _, c in code_cells(path))
    assert lines <= LESSON_CODE_LINES, f"{path.name}: {lines} lines of code; move what is not the lesson to workshop/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_metadata_names_the_world_of_the_outputs(path):
    meta = json.loads(path.read_text())["metadata"].get("workshop", {})
    assert {"ranks", "nodes"} <= meta.keys(), f"{path.name}: run `make notebooks`, which writes workshop.ranks and .nodes"
    said = [re.match(r"(\d+) rank\(s\) on (\d+) node\(s\)", text) for _, cell in code_cells(path)[:3]
            for kind, text in texts(cell) if kind == "stdout"]
    said = [m for m in said if m]
    if said:  # the first line of a lesson that starts a world says it
        assert (meta["ranks"], meta["nodes"]) == (int(said[0][1]), int(said[0][2])), path.name
    if meta.get("make_run_ranks", 1) > 1:
        assert meta["ranks"] > 1, f"{path.name}: a multi-rank lesson committed from {meta['ranks']} rank"


def test_merge_outputs_brings_back_outputs_and_the_world_of_the_run(tmp_path):
    from workshop.launch.regenerate import merge_outputs

    def notebook(outputs, tags=()):
        cell = {"cell_type": "code", "id": "c1", "metadata": {}, "execution_count": 1, "outputs": outputs,
                "source": ["print(1)"]}
        injected = {"cell_type": "code", "id": "p", "metadata": {"tags": list(tags)}, "execution_count": 1,
                    "outputs": [], "source": ["seed = 1"]}
        return {"cells": [injected, cell] if tags else [cell], "metadata": {"workshop": {"make_run_ranks": 2}},
                "nbformat": 4, "nbformat_minor": 5}

    committed = tmp_path / "05_x.ipynb"
    committed.write_text(json.dumps(notebook([])))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"nranks": 4, "environment": {"SLURM_JOB_NUM_NODES": "2"}}))
    said = {"output_type": "stream", "name": "stdout", "text": "4 rank(s) on 2 node(s)\n"}
    (run / "05_x.ipynb").write_text(json.dumps(notebook([said], tags=["injected-parameters"])))
    merge_outputs(committed, run / "05_x.ipynb")
    merged = json.loads(committed.read_text())
    assert merged["metadata"]["workshop"] == {"make_run_ranks": 2, "ranks": 4, "nodes": 2}
    assert [c["source"] for c in merged["cells"]] == [["print(1)"]]
    assert merged["cells"][0]["outputs"] == [said]


def test_the_report_read_the_records_of_the_committed_notebooks():
    """`make notebooks` writes into each notebook's metadata the digest of the record its run wrote (record) and into
    the report's the digests of the records it read (reported): the report is stale when they differ."""
    metas = {p.stem: json.loads(p.read_text())["metadata"].get("workshop", {}) for p in NOTEBOOKS}
    report = metas.pop("13_scaling_report")
    made = {stem: [meta["record"]] for stem, meta in metas.items() if "record" in meta}
    assert made, "no committed notebook names its record: run `make notebooks`"
    reported = report.get("reported", {})
    differ = {stem: (reported.get(stem), made.get(stem)) for stem in sorted({*made, *reported})
              if reported.get(stem) != made.get(stem)}
    assert differ == {}, ("the committed report (13) read other records than the committed notebooks wrote (notebook: "
                          f"(read, written)): {differ}; run `make notebooks`, which makes the report again, last")
