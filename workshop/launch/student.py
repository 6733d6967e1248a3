"""`make student`: the students' copies of the notebooks, each exercise's solution cleared by nbgrader.

A lesson keeps its exercises' solutions between `### BEGIN SOLUTION` and `### END SOLUTION`, so the committed
notebook runs whole and is checked as any other. Its student copy, student/NN_*.ipynb (ignored by git), holds in
their place nbgrader's stub (`ClearSolutions`: `# YOUR CODE HERE` and `raise NotImplementedError()`), keeps the
instructions, and has no outputs. Run as the committed one is (JupyterLab, `scripts/run_notebook.sh --nproc 2
student/05_ddp.ipynb`), it stops at the check of the first exercise not yet written, which names it
(`workshop.check.exercise`).

    python -m workshop.launch.student                              # every notebook into student/
    python -m workshop.launch.student notebooks/05_ddp.ipynb --out /tmp/mine
    python -m workshop.launch.student --force                      # replace copies that were edited

A copy already there that differs from what would be written (a student's work, perhaps) stops it before anything
is written, unless --force.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from workshop.base.runs import REPO

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = "# YOUR CODE HERE\nraise NotImplementedError()"
EXERCISE = re.compile(r"""check\.exercise\(["']([^"']+)["']\)""")


def student_copy(notebook: Path) -> dict:
    """The student's copy of `notebook` as a notebook dict: solutions cleared by nbgrader, outputs and execution
    counts gone, and no metadata of the committed run (its world and record)."""
    import nbformat
    from nbgrader.preprocessors import ClearSolutions

    nb = nbformat.read(notebook, as_version=4)
    # enforce_metadata=False: the markers alone say where a solution is (no nbgrader cell metadata to keep in step)
    nb, _ = ClearSolutions(enforce_metadata=False, code_stub={"python": STUB}).preprocess(nb, {})
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    for key in ("ranks", "nodes", "record", "reported"):
        nb.metadata.get("workshop", {}).pop(key, None)
    return json.loads(nbformat.writes(nb))


def exercises(nb: dict) -> list[str]:
    """The names of a notebook's exercises, in order, from its check cells (`check.exercise("05.1 name")`)."""
    return [name for cell in nb["cells"] if cell["cell_type"] == "code"
            for name in EXERCISE.findall("".join(cell["source"]))]


def _text(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def write(notebooks: list[Path], out: Path, force: bool = False) -> int:
    copies = {out / nb.name: student_copy(nb) for nb in notebooks}
    edited = [p for p, nb in copies.items() if p.is_file() and p.read_text() != _text(nb)]
    if edited and not force:
        print(f"error: {len(edited)} student cop{'y differs' if len(edited) == 1 else 'ies differ'} from what would be "
              f"written (a student's work?): {', '.join(str(p) for p in edited)}; move them away, or pass --force to "
              "replace them", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for path, nb in copies.items():
        path.write_text(_text(nb))
        names = exercises(nb)
        total += len(names)
        print(f"{path}: {len(names)} exercise(s){': ' + ', '.join(names) if names else ''}")
    print(f"{len(copies)} student notebook(s), {total} exercise(s), in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workshop.launch.student", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every lesson notebook, notebooks/NN_*.ipynb")
    parser.add_argument("--out", type=Path, default=REPO / "student", help="where the copies go (default: student/)")
    parser.add_argument("--force", action="store_true", help="replace copies that differ from what would be written")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    missing = [str(nb) for nb in notebooks if not nb.is_file()]
    if missing:
        print(f"error: no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    return write(notebooks, args.out, args.force)


if __name__ == "__main__":
    sys.exit(main())
