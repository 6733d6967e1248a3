"""`make student` (workshop.launch.student): the students' copies hold no solution, a copy a student edited is not
overwritten, and a copy runs until the check of its first exercise, which names it and what is wrong."""

import json
import re

import pytest

from helpers import REPO, run_notebook
from workshop.check import ExerciseFailed, Match, exercise
from workshop.launch import student

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def solutions(nb: dict) -> dict[str, list[str]]:
    """Per cell id, the lines between the solution markers of that cell."""
    found = {}
    for cell in nb["cells"]:
        blocks = re.findall(rf"{student.BEGIN}\n(.*?){student.END}", "".join(cell["source"]), flags=re.S)
        if blocks:
            found[cell["id"]] = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    return found


def test_student_copies_hold_no_solution_and_no_output(tmp_path):
    assert student.write(NOTEBOOKS, tmp_path) == 0
    names = []
    for nb in NOTEBOOKS:
        committed, copy = json.loads(nb.read_text()), json.loads((tmp_path / nb.name).read_text())
        source = "\n".join("".join(c["source"]) for c in copy["cells"])
        assert student.BEGIN not in source and student.END not in source
        cells = {c["id"]: "".join(c["source"]) for c in copy["cells"]}
        kept = [line for cid, lines in solutions(committed).items() for line in lines if line in cells[cid]]
        assert kept == [], f"{nb.name}: solution lines left in the student's copy"
        assert source.count("raise NotImplementedError()") >= len(student.exercises(copy))
        for cell in copy["cells"]:  # a stub keeps its block's indentation: every cell still compiles
            if cell["cell_type"] == "code":
                compile("\n".join(line for line in "".join(cell["source"]).splitlines() if not line.startswith("%")),
                        f"{nb.name}:{cell['id']}", "exec")
        assert all(c.get("outputs", []) == [] for c in copy["cells"] if c["cell_type"] == "code")
        assert "record" not in copy["metadata"].get("workshop", {})
        names += student.exercises(copy)
    assert {"01.1 train_step", "02.1 train_step", "03.1 make_grid", "04.1 reduce_gradients", "05.1 allreduce_gradients",
            "05.2 wrap_for_ddp", "05.3 accumulate", "06.1 shard_model", "06.2 assign_owners",
            "07.1 checkpoint_every_other", "08.1 mlp_slices", "09.1 one_f_one_b_order", "09.2 peak_in_flight",
            "10.1 online_update", "10.2 dispatch", "11.1 greedy_decode", "12.1 find_straggler"} <= set(names)


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


def test_other_mistakes_get_their_hints():
    """The checkers the notebooks call, given mistakes beside the one per notebook that tests/test_student_runs.py
    plants in a student copy (one process; 05.1 on two ranks is above)."""
    import torch
    import torch.nn.functional as F

    from workshop import models, pipeline, sharding, train

    def fresh():
        torch.manual_seed(0)
        return models.get_model("small_cnn", num_classes=10)

    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def no_step(model, optimizer, a, b):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(a), b)
        loss.backward()
        return loss

    assert "the weights did not move" in train.check_train_step(no_step, fresh, x, y, 0.05).detail
    assert train.check_train_step(lambda m, o, a, b: train.train_step(m, o, a, b)[0], fresh, x, y, 0.05)

    def one_too_many(p, m, s):  # warms up with p - s forwards
        w = min(p - s, m)
        order = [("F", i) for i in range(w)]
        for i in range(m - w):
            order += [("F", w + i), ("B", i)]
        return order + [("B", i) for i in range(m - w, m)]

    assert "runs 5 forwards before its first backward, 1F1B 4" in pipeline.check_order(one_too_many).detail
    assert pipeline.check_order(pipeline.one_f_one_b)
    every_forward = lambda order: sum(1 for kind, _ in order if kind == "F")  # noqa: E731
    assert "you counted every forward" in pipeline.check_in_flight(every_forward).detail
    assert pipeline.check_in_flight(pipeline.in_flight)

    assert "the largest share need not exceed" in sharding.check_owners(lambda sizes, n: [0] * len(sizes)).detail
    assert "goes to rank" in sharding.check_owners(lambda sizes, n: list(range(len(sizes)))).detail
