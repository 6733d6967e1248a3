"""Progress in JupyterLab, log lines in batch jobs: the notebook tells which it is in.

In JupyterLab a training loop shows a progress bar that updates in place. A batch run (papermill
under `scripts/run_notebook.sh`, its output going to the job's log) must not: each bar update is a
line there, thousands per epoch. So there a loop prints one line every N steps, and nothing under
nbval or `jupyter nbconvert --execute`, whose outputs are committed and compared.

    for x, y in progress.progress(loader, desc=f"epoch {epoch}"):   # a bar, or a line every N steps
        ...
    trainer = dist.make_trainer(env, max_epochs=2)                   # Lightning's bar, or the same lines

Which one is decided by `is_interactive()`; $WORKSHOP_PROGRESS=bar or =log overrides it, and
$WORKSHOP_LOG_EVERY sets N (`scripts/run_notebook.sh` sets 50; unset, batch runs print no lines).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping

from workshop.base import world

DEFAULT_LOG_EVERY = 50  # what the runner sets for batch jobs


@contextlib.contextmanager
def quiet(logger: str, level: int = logging.ERROR):
    """Within the block, `logger` says only what is at `level` or above; its own level comes back after it."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)


def is_interactive() -> bool:
    """True in a kernel that a person watches: a Jupyter server's kernel (JupyterLab, Notebook)
    or terminal IPython. False under papermill, nbval and nbconvert (their kernels have no
    frontend), and in plain Python. Jupyter's server gives the kernels it starts for a notebook
    $JPY_SESSION_NAME; kernels that papermill, nbval or nbconvert start have none."""
    mode = os.environ.get("WORKSHOP_PROGRESS", "").strip().lower()
    if mode in ("bar", "bars"):
        return True
    if mode in ("log", "lines", "none"):
        return False
    if mode:
        raise ValueError(f"WORKSHOP_PROGRESS={mode!r}: use 'bar' (progress bars) or 'log' (a line every N steps)")
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    if shell is None:
        return False
    kind = type(shell).__name__
    if kind == "TerminalInteractiveShell":
        return True
    return kind == "ZMQInteractiveShell" and bool(os.environ.get("JPY_SESSION_NAME"))


def log_every() -> int:
    """Steps between two log lines in batch mode: $WORKSHOP_LOG_EVERY, else 0 (no lines)."""
    text = os.environ.get("WORKSHOP_LOG_EVERY", "0").strip() or "0"
    if not text.isdigit():
        raise ValueError(f"WORKSHOP_LOG_EVERY={text!r}: give a whole number of steps (0 for no lines)")
    return int(text)


def _is_main() -> bool:
    """Rank 0 speaks. Read cheaply, from the launcher's variables: this runs once per loop, maybe before dist.init()."""
    return world.rank() == 0


def _tqdm():
    # tqdm.auto draws a widget in a notebook, which needs ipywidgets; without it the text bar
    # (on stderr, redrawn in place with carriage returns, which JupyterLab honours) still works.
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm


class Lines:
    """An iterable that prints `desc: step i/total (s, postfix)` every `every` steps and at the
    last one; `every=0` prints nothing. Has tqdm's `set_postfix`, so a loop works with either."""

    def __init__(self, iterable: Iterable, total: int | None = None, desc: str = "", every: int = 0, file=None):
        self.iterable, self.total, self.desc, self.every = iterable, total, desc, every
        self.file = file
        self.postfix: dict = {}

    def set_postfix(self, ordered_dict: Mapping | None = None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def line(self, step: int, seconds: float) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in self.postfix.items())
        return f"{self.desc + ': ' if self.desc else ''}step {step}{of} ({seconds:.1f} s{extra})"

    def __iter__(self) -> Iterator:
        t0 = time.perf_counter()
        step = 0
        for step, item in enumerate(self.iterable, 1):
            yield item  # the loop body runs here; its set_postfix shows in this step's line
            if self.every and (step % self.every == 0 or step == self.total):
                print(self.line(step, time.perf_counter() - t0), file=self.file or sys.stdout, flush=True)

    def close(self) -> None:
        pass


def progress(iterable: Iterable, total: int | None = None, desc: str = "", every: int | None = None, leave: bool = True):
    """`iterable`, with a progress bar when a person watches (`is_interactive()`), else with a
    line every `every` steps (default $WORKSHOP_LOG_EVERY; 0: none). Only rank 0 shows either."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not _is_main():
        return Lines(iterable, total, desc, every=0)
    if is_interactive():
        return _tqdm()(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True)
    return Lines(iterable, total, desc, every=log_every() if every is None else every)


def lightning_lines(every: int | None = None):
    """A Lightning callback printing one line every `every` training batches (default
    $WORKSHOP_LOG_EVERY) on rank 0: the batch job's stand-in for Lightning's progress bar."""
    from lightning.pytorch.callbacks import Callback

    n = log_every() if every is None else every

    class LogLines(Callback):
        def on_train_start(self, trainer, pl_module):  # a fit resumed mid-epoch starts no epoch
            self.t0 = time.perf_counter()

        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step, total = batch_idx + 1, trainer.num_training_batches
            if not (n and trainer.is_global_zero and (step % n == 0 or step == total)):
                return
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            lines = Lines((), total if total != float("inf") else None, f"epoch {trainer.current_epoch}")
            if loss is not None:
                lines.set_postfix(loss=float(loss))
            print(lines.line(step, time.perf_counter() - self.t0), flush=True)

    return LogLines()


class LivePlot:
    """Curves that redraw in place while a loop runs, where a person watches (`is_interactive()`,
    rank 0); elsewhere (batch jobs, nbval) `update` only keeps the values, so a batch log holds no
    figures and committed notebooks stay the same. The values are in `history` either way.

        live = progress.LivePlot("train_loss", "val_loss", xlabel="epoch")
        for epoch in range(epochs):
            ...
            live.update(train_loss=train_loss, val_loss=val_loss)
    """

    def __init__(self, *names: str, xlabel: str = "step"):
        self.names, self.xlabel = names, xlabel
        self.history: dict[str, list[float]] = {name: [] for name in names}
        self.live = is_interactive() and _is_main()
        self._handle = None

    def update(self, **values: float) -> None:
        unknown = set(values) - set(self.names)
        if unknown:
            raise ValueError(f"LivePlot has no curve {sorted(unknown)}; its curves: {list(self.names)}")
        for name, value in values.items():
            self.history[name].append(float(value))
        if self.live:
            self._draw()

    def _draw(self) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        fig, ax = plt.subplots(figsize=(5, 3))
        for name, values in self.history.items():
            ax.plot(range(1, len(values) + 1), values, "o-", label=name)
        ax.set_xlabel(self.xlabel)
        ax.legend()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
        plt.close(fig)  # the displayed image stays; the figure is not drawn a second time at the cell's end
