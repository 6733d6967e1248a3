"""Every student notebook, run as a student first runs it: one exercise per notebook answered with a typical mistake,
the others left as `make student` wrote them. Each exercise's check must fail with the exercise's name and one
line: the mistake's hint, or "not written yet" for a stub. The run stops after the notebook's last check cell and
goes on past errors, as a student's kernel does.

(On 2 ranks: tests/test_student.py runs 05's copy through the launcher.)"""

import json
import re
import textwrap

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO
from workshop.launch import student

STUB = "raise NotImplementedError()"

# Per notebook: the exercise answered wrong, its wrong body (in place of the stub, at the stub's indentation), and
# what its hint must say (a regular expression).
WRONG = {
    "01_baseline": ("01.1 train_step", """
        loss = torch.nn.functional.cross_entropy(model(x), y)  # no optimizer.zero_grad(): gradients pile up
        loss.backward()
        optimizer.step()
        return loss""", r"clear the gradients \(optimizer\.zero_grad\(\)\)"),
    "02_single_device_performance": ("02.1 train_step", """
        loss = torch.nn.functional.cross_entropy(model(x), y)  # outside torch.autocast: float32
        loss.backward()
        optimizer.step()""", "run the forward and the loss inside torch.autocast"),
    "03_task_parallelism": ("03.1 make_grid", """
        import itertools
        names = list(axes)[::-1]  # the last axis slowest
        return [dict(zip(names, c)) for c in itertools.product(*(axes[n] for n in names))]""",
                            "in another order: the first axis changes slowest"),
    "04_data_parallel": ("04.1 reduce_gradients", """
        for p, *copies in zip(model.parameters(), *(r.parameters() for r in replicas)):
            p.grad = sum(c.grad for c in copies) / len(copies)  # the mean, not the sum""",
                         "is the mean of theirs: sum them"),
    "05_ddp": ("05.3 accumulate", """
        for x, y in micro_batches:  # no model.no_sync(): every backward all-reduces
            (torch.nn.functional.cross_entropy(model(x), y) / len(micro_batches)).backward()""",
               r"all-reduced \d+ times, the accumulation needs 1"),
    "06_sharding": ("06.1 shard_model", """
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)  # the root alone
        return model""", "only the root is a unit"),
    "07_memory": ("07.1 checkpoint_every_other", """
        for block in blocks:  # every block, not every other
            block.forward = lambda *args, forward=block.forward: checkpoint(forward, *args, use_reentrant=False)""",
                   "block 1 keeps"),
    "08_tensor_parallelism": ("08.1 mlp_slices", """
        n, d = w1.shape[0] // ranks, w2.shape[0] // ranks
        return w1[rank * n:(rank + 1) * n], w2[rank * d:(rank + 1) * d]  # w2 by rows: B split the wrong way""",
                              "you split w2 along its rows"),
    "09_pipeline_parallelism": ("09.1 one_f_one_b_order", """
        return gpipe_order(p, m, s)""", "GPipe's order"),
    "10_long_sequences_and_experts": ("10.1 online_update", """
        m_new = torch.maximum(m, scores.amax(dim=-1))
        p = torch.exp(scores - m_new.unsqueeze(-1))
        return m_new, total + p.sum(dim=-1), acc + p @ v  # the old sum and output not rescaled to the new maximum""",
                                      r"rescale the old sum by exp\(m - m_new\)"),
    "11_inference": ("11.1 greedy_decode", """
        for _ in range(new_tokens):  # the whole sequence fed at every step, the cache unused
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)""",
                     "feed only the newest token"),
    "12_when_things_go_wrong": ("12.1 find_straggler", """
        return max(times, key=lambda t: statistics.median(t["wait_s"]))["rank"]  # the one that waits longest""",
                                "which waits longest"),
}
# Smaller runs of the cells before the checks (as papermill's -p would give them): the checks test the exercises on
# inputs of their own, so the lesson's sizes only cost time here (the sizes of each notebook's own tests)
SMALL = {"01_baseline": {"epochs": 1, "num_train": 512, "num_test": 256, "profile_steps": 1},
         "02_single_device_performance": {"dataset": "synthetic", "batch_size": 8, "steps": 2, "warmup": 1,
                                          "profile_steps": 1},
         "03_task_parallelism": {"lrs": "0.05,0.2", "steps": 3, "num_train": 256, "num_test": 128},
         "04_data_parallel": {"batch_size": 8, "steps": 2, "warmup": 1, "profile_steps": 1},
         "05_ddp": {"split_models": "small_cnn,vit_tiny", "split_steps": 1, "allreduce_sizes": "4KiB,1MiB",
                    "scaling_steps": 3},
         "07_memory": {"timing_repeats": 2, "sizes": "64x4"},
         "08_tensor_parallelism": {"steps": 2, "seq_len": 16},
         "09_pipeline_parallelism": {"bubble_microbatches": "1,4", "timing_repeats": 1},
         "10_long_sequences_and_experts": {"seq_len": 512, "seq_lens": "128,256", "timing_repeats": 1},
         "11_inference": {"train_steps": 10, "max_new_tokens": 8},
         "12_when_things_go_wrong": {"provoke": False, "straggle_steps": 3}}
LESSONS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb") if student.exercises(
    json.loads(p.read_text())))


def test_every_lesson_has_a_wrong_answer_here():
    assert sorted(WRONG) == LESSONS


def answer_wrong(nb, name: str, body: str) -> None:
    """Put `body` in place of the stub of exercise `name` (the first stub after its heading)."""
    heading = f"# Exercise {name.split()[0]}:"
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(heading)]
    indent = re.search(rf"^( *)# YOUR CODE HERE\n *{re.escape(STUB)}$", cell.source, flags=re.M).group(1)
    cell.source = re.sub(rf"^ *# YOUR CODE HERE\n *{re.escape(STUB)}$",
                         lambda _: textwrap.indent(textwrap.dedent(body).strip("\n"), indent), cell.source,
                         count=1, flags=re.M)


@pytest.mark.parametrize("lesson", sorted(WRONG))
def test_a_student_copy_names_each_exercise_and_its_mistake(lesson, tmp_path, runs, clean_env, monkeypatch):
    assert student.main([str(REPO / "notebooks" / f"{lesson}.ipynb"), "--out", str(tmp_path)]) == 0
    nb = nbformat.read(tmp_path / f"{lesson}.ipynb", as_version=4)
    wrong_name, body, hint = WRONG[lesson]
    answer_wrong(nb, wrong_name, body)
    checks = {i: re.search(r'check\.exercise\("([^"]+)"\)', c.source) for i, c in enumerate(nb.cells)
              if c.cell_type == "code"}
    checks = {i: m.group(1) for i, m in checks.items() if m}
    nb.cells = nb.cells[:max(checks) + 1]
    parameters = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(parameters + 1, nbformat.v4.new_code_cell(
        "\n".join(f"{key} = {value!r}" for key, value in SMALL.get(lesson, {}).items())))
    checks = {i + (i > parameters): name for i, name in checks.items()}
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    NotebookClient(nb, kernel_name="python3", allow_errors=True, timeout=300,
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    for i, name in checks.items():
        errors = [o for o in nb.cells[i].outputs if o.output_type == "error"]
        assert [e.ename for e in errors] == ["ExerciseFailed"], (name, [(e.ename, e.evalue) for e in errors])
        message = errors[0].evalue
        assert "\n" not in message and message.startswith(f"exercise {name}: "), message
        if name == wrong_name:
            assert re.search(hint, message), message
        else:
            assert "not written yet" in message, message
