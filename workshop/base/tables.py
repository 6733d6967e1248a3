"""Text tables and quantities as the notebooks print them: one place for column padding and for units.

    print(table(["strategy", "step (ms)", "memory"], [["ddp", "41.2", gib(3 * 2**30)], ["fsdp", "47.9", gib(2**30)]]))

Columns are as wide as their widest cell and two spaces apart; a column whose cells all read as numbers (a unit or a
percent sign after them allowed) is right-aligned, text is left-aligned. Memory per GPU is always in GiB (2**30
bytes); bandwidths in GB/s (1e9 bytes), as data sheets and NCCL's tests give them.
"""

from __future__ import annotations

import re
import textwrap

WIDTH = 120  # columns of a printed line: a notebook's output and a log read in a terminal, without scrolling


def wrap(text: str, first: str = "", rest: str = "  ") -> str:
    """`text` in lines of at most WIDTH columns: the first starts with `first` (a bullet, "  1. "), the others with
    `rest`, a hanging indent. Lines break at spaces only: a path, a flag, a host:port or a list stays whole."""
    return textwrap.fill(text, WIDTH, initial_indent=first, subsequent_indent=rest, break_long_words=False,
                         break_on_hyphens=False)


_NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?x?\s*(%|[KMGT]i?B|B|ms|us|s|GB/s|/s)?$", re.IGNORECASE)


def _is_number(cell: str) -> bool:
    return bool(_NUMBER.match(cell.strip())) or cell.strip() in ("-", "")


def table(header: list[str] | tuple[str, ...] | None, rows, align: str | None = None, indent: str = "") -> str:
    """`rows` (each a sequence of cells, printed with str()) under `header` as aligned text. `align` overrides the
    guess with one letter per column: "l" (left) or "r" (right)."""
    body = [[str(c) for c in row] for row in rows]
    lines = ([list(map(str, header))] if header else []) + body
    if not lines:
        return ""
    columns = max(len(line) for line in lines)
    lines = [line + [""] * (columns - len(line)) for line in lines]
    widths = [max(len(line[i]) for line in lines) for i in range(columns)]
    if align is None:
        align = "".join("r" if body and all(_is_number(row[i]) for row in body) and any(row[i].strip() for row in body)
                        else "l" for i in range(columns))
    if len(align) != columns:
        raise ValueError(f"align has {len(align)} letters for {columns} columns")
    out = []
    for line in lines:
        cells = [cell.rjust(w) if a == "r" else cell.ljust(w) for cell, w, a in zip(line, widths, align)]
        out.append(indent + "  ".join(cells).rstrip())
    return "\n".join(out)


def fmt_bytes(n: float) -> str:
    """Bytes in the largest binary unit below 1024 of it: "512 B", "1.5 KiB", "3.0 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def gib(nbytes: float, digits: int = 1) -> str:
    """Memory per GPU, always in GiB: "79.6 GiB"."""
    return f"{nbytes / 2**30:.{digits}f} GiB"


def mib(nbytes: float, digits: int = 1) -> str:
    """Bytes a rank holds in a small model, in MiB: "0.830 MiB" with digits=3."""
    return f"{nbytes / 2**20:.{digits}f} MiB"
