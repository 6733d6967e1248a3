"""`make student` (workshop.launch.student): the students' copies hold no solution, a copy a student edited is not
overwritten, and a copy runs until the check of its first exercise, which names it and what is wrong."""

import json
import re

import pytest

from helpers import REPO, run_notebook
from workshop.check import ExerciseFailed, Match, exercise
from workshop.launch import student

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def solutions(nb: dict) -> list[str]:
    """The lines between the solution markers of a notebook's code cells."""
    found = []
    for cell in nb["cells"]:
        found += re.findall(rf"{student.BEGIN}\n(.*?){student.END}", "".join(cell["source"]), flags=re.S)
    return [line.strip() for block in found for line in block.splitlines() if line.strip()]


def test_student_copies_hold_no_solution_and_no_output(tmp_path):
    assert student.write(NOTEBOOKS, tmp_path) == 0
    names = []
    for nb in NOTEBOOKS:
        committed, copy = json.loads(nb.read_text()), json.loads((tmp_path / nb.name).read_text())
        source = "\n".join("".join(c["source"]) for c in copy["cells"])
        assert student.BEGIN not in source and student.END not in source
        assert [line for line in solutions(committed) if line in source] == [], nb.name
        assert source.count("raise NotImplementedError()") >= len(student.exercises(copy))
        assert all(c.get("outputs", []) == [] for c in copy["cells"] if c["cell_type"] == "code")
        assert "record" not in copy["metadata"].get("workshop", {})
        names += student.exercises(copy)
    assert {"05.1 allreduce_gradients", "05.2 wrap_for_ddp"} <= set(names)


def test_a_copy_a_student_edited_is_kept_unless_forced(tmp_path, capsys):
    nb05 = REPO / "notebooks" / "05_ddp.ipynb"
    assert student.main([str(nb05), "--out", str(tmp_path)]) == 0
    mine = tmp_path / "05_ddp.ipynb"
    mine.write_text(mine.read_text().replace("raise NotImplementedError()", "pass  # my answer", 1))
    edited = mine.read_text()
    assert student.main([str(nb05), "--out", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err and mine.read_text() == edited
    assert student.main([str(nb05), "--out", str(tmp_path), "--force"]) == 0
    assert "my answer" not in mine.read_text()


def test_an_exercise_names_itself_and_what_is_wrong():
    with pytest.raises(ExerciseFailed, match=r"^exercise 9\.1 f: not written yet"):
        with exercise("9.1 f"):
            raise NotImplementedError()
    with pytest.raises(ExerciseFailed, match=r"^exercise 9\.1 f: your code raised KeyError: 'x'$"):
        with exercise("9.1 f"):
            {}["x"]
    with pytest.raises(ExerciseFailed, match=r"^exercise 9\.1 f: divide by 2$"):
        with exercise("9.1 f") as ex:
            ex.verdict(Match(False, "divide by 2"))
    with exercise("9.1 f") as ex:
        ex.verdict(Match(True))


@pytest.mark.multirank
def test_a_wrong_answer_on_two_ranks_fails_the_run_with_its_hint(runs, tmp_path):
    """Exercise 05.1 answered without the division by the world size: the run's last line names the exercise and
    the hint; the stub of 05.2 is not reached."""
    assert student.main([str(REPO / "notebooks" / "05_ddp.ipynb"), "--out", str(tmp_path)]) == 0
    copy = tmp_path / "05_ddp.ipynb"
    nb = json.loads(copy.read_text())
    (cell,) = [c for c in nb["cells"] if "def allreduce_gradients" in "".join(c["source"])]
    cell["source"] = "".join(cell["source"]).replace(
        "raise NotImplementedError()", "for p in model.parameters():\n        tdist.all_reduce(p.grad)")
    copy.write_text(json.dumps(nb))
    out = run_notebook("--nproc", 2, copy, "-p", "split_models", "small_cnn")
    assert out.returncode != 0
    last = (out.stdout + out.stderr).strip().splitlines()[-1]
    assert "exercise 05.1 allreduce_gradients: your gradients are 2.0x the reference's: did you divide the sum by " \
           "the world size (2)?" in last, last
