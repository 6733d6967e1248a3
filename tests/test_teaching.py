"""docs/teaching.md's generated part (workshop.launch.teaching): the times come from a series' records, the
exercises and their minutes from the notebooks; the committed guide agrees with the notebooks as they are now."""

import json

import pytest

from helpers import REPO
from workshop.launch import teaching

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def fake_series(root, seconds: dict[str, int]):
    """A series folder holding one finished run per notebook, each taking `seconds[name]` from start to record."""
    for i, (name, s) in enumerate(seconds.items()):
        run = root / f"20261207-1200{i:02d}-{name}"
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"nranks": 4 if name.startswith("05") else 1,
                                                  "started": "2026-12-07T12:00:00+00:00",
                                                  "environment": {"SLURM_JOB_NUM_NODES": "2"}
                                                  if name.startswith("05") else {}}))
        (run / "logs").mkdir()
        for rank, t in enumerate((s - 5, s)):  # the last rank to end ends the run
            (run / "logs" / f"rank{rank}.status.json").write_text(json.dumps(
                {"returncode": 0, "ended": f"2026-12-07T12:{t // 60:02d}:{t % 60:02d}+00:00"}))
        (run / "record.json").write_text(json.dumps({"status": "ok", "git": "abc1234", "hardware": {"cpus": 2}}))
    return root


def test_the_times_come_from_the_series_and_the_plans_add_them_up(tmp_path):
    seconds = {nb.stem: 30 + 6 * i for i, nb in enumerate(NOTEBOOKS)}  # under 10 minutes: shown in seconds
    text = teaching.render(NOTEBOOKS, fake_series(tmp_path / "s", seconds))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| 0")}
    assert "| 30 s | 1 | 01.1 | 10 |" in rows[teaching.opening(NOTEBOOKS[0])["title"]]
    assert "| 4 on 2 nodes | 05.1, 05.2, 05.3 |" in rows[teaching.opening(NOTEBOOKS[4])["title"]]
    for plan, sessions in teaching.PLANS.items():
        for session, names in sessions.items():
            total = sum(seconds[n] for n in names)
            assert f"| {session} | {', '.join(n[:2] for n in names)} | {total} s |" in text, (plan, session)
    assert sorted({n for s in teaching.PLANS["Two days"].values() for n in s}) == [nb.stem for nb in NOTEBOOKS]


def test_a_series_without_a_notebook_or_with_a_failed_one_is_named_and_the_guide_kept(tmp_path):
    seconds = {nb.stem: 30 for nb in NOTEBOOKS[1:]}
    series = fake_series(tmp_path / "s", seconds)
    with pytest.raises(ValueError, match=f"no finished run of {NOTEBOOKS[0].stem}: run `make run`"):
        teaching.render(NOTEBOOKS, series)
    status = next(series.glob(f"*-{NOTEBOOKS[1].stem}")) / "logs" / "rank1.status.json"
    status.write_text(json.dumps({**json.loads(status.read_text()), "returncode": 1}))
    with pytest.raises(ValueError, match=f"a rank of {NOTEBOOKS[1].stem} failed"):
        teaching.render(NOTEBOOKS[1:], series)
    doc = tmp_path / "teaching.md"
    doc.write_text("no markers here\n")
    assert teaching.main([str(series), "--doc", str(doc)]) == 2
    assert doc.read_text() == "no markers here\n"


def test_the_committed_guide_lists_every_notebook_with_its_exercises():
    text = teaching.DOC.read_text()
    generated = text.split(teaching.BEGIN)[1].split(teaching.END)[0]
    for nb in NOTEBOOKS:
        about = teaching.opening(nb)
        (row,) = [line for line in generated.splitlines() if line.startswith(f"| {about['title']} |")]
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[3] == (", ".join(e.split()[0] for e in about["exercises"]) or "none"), row
        assert cells[4] == str(about["minutes"] or "-"), row
        if about["exercises"]:
            assert about["minutes"] > 0
