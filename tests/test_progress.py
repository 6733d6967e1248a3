"""workshop.base.progress: a bar where a person watches (JupyterLab), a line every N steps in a batch
job's log, nothing under nbval or nbconvert; the plain loop and Lightning's Trainer follow it."""

import sys
import types

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from workshop import dist, lit, models, train
from workshop.base import progress


@pytest.fixture
def batch(monkeypatch):
    """No launcher, no override, no Jupyter session: what nbval and papermill give a kernel."""
    for key in ("WORKSHOP_PROGRESS", "WORKSHOP_LOG_EVERY", "JPY_SESSION_NAME", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)


def fake_ipython(monkeypatch, kind):
    shell = type(kind, (), {})()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))


def test_plain_python_is_batch(batch):
    assert not progress.is_interactive()


def test_a_kernel_is_interactive_only_with_a_jupyter_session(batch, monkeypatch):
    fake_ipython(monkeypatch, "ZMQInteractiveShell")
    assert not progress.is_interactive()  # papermill, nbval, nbconvert: a kernel, no frontend
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/student/workshop/notebooks/01_baseline.ipynb")
    assert progress.is_interactive()  # a kernel that JupyterLab's server started for a notebook
    fake_ipython(monkeypatch, "TerminalInteractiveShell")
    monkeypatch.delenv("JPY_SESSION_NAME")
    assert progress.is_interactive()


def test_the_override_wins_and_a_bad_one_is_an_error(batch, monkeypatch):
    monkeypatch.setenv("WORKSHOP_PROGRESS", "bar")
    assert progress.is_interactive()
    fake_ipython(monkeypatch, "ZMQInteractiveShell")
    monkeypatch.setenv("JPY_SESSION_NAME", "x.ipynb")
    monkeypatch.setenv("WORKSHOP_PROGRESS", "log")
    assert not progress.is_interactive()
    monkeypatch.setenv("WORKSHOP_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="use 'bar'"):
        progress.is_interactive()
    monkeypatch.setenv("WORKSHOP_PROGRESS", "log")
    monkeypatch.setenv("WORKSHOP_LOG_EVERY", "ten")
    with pytest.raises(ValueError, match="whole number"):
        progress.log_every()


def test_batch_mode_prints_a_line_every_n_steps_and_at_the_last(batch, capsys):
    steps = progress.progress(range(5), desc="epoch 0", every=2)
    seen = []
    for i in steps:
        seen.append(i)
        steps.set_postfix(loss=1.0 / (i + 1))
    assert seen == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["epoch 0: step 2/5", "epoch 0: step 4/5", "epoch 0: step 5/5"]
    assert lines[0].endswith("loss 0.5)") and lines[-1].endswith("loss 0.2)")


def test_batch_mode_is_silent_by_default_and_on_other_ranks(batch, capsys, monkeypatch):
    assert list(progress.progress(range(3))) == [0, 1, 2]  # nbval, nbconvert: committed outputs stay as they are
    monkeypatch.setenv("WORKSHOP_LOG_EVERY", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # rank 1 of a torchrun world
    assert list(progress.progress(range(3))) == [0, 1, 2]
    assert capsys.readouterr().out == ""


def test_interactive_mode_draws_a_bar(batch, capsys, monkeypatch):
    monkeypatch.setenv("WORKSHOP_PROGRESS", "bar")
    bar = progress.progress(range(7), desc="epoch 1")
    assert type(bar).__module__.startswith("tqdm")
    assert list(bar) == list(range(7))
    err = capsys.readouterr().err
    assert "epoch 1" in err and "7/7" in err


def tiny_loader(n=24, batch_size=4):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=batch_size)


def test_train_epoch_logs_in_batch_jobs_only(batch, capsys, monkeypatch):
    model = models.get_model("small_cnn")
    opt = train.make_optimizer(model, 0.01)
    stats = train.train_epoch(model, tiny_loader(), opt, "cpu", epoch=3)
    assert capsys.readouterr().out == "" and stats["samples"] == 24
    monkeypatch.setenv("WORKSHOP_LOG_EVERY", "4")  # what scripts/run_notebook.sh sets (to 50)
    stats = train.train_epoch(model, tiny_loader(), opt, "cpu", epoch=4)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["epoch 4: step 4/6", "epoch 4: step 6/6"]
    assert lines[-1].endswith(f"loss {stats['loss']:.4g})")  # the epoch's mean loss so far


def test_trainer_bar_in_jupyterlab_lines_in_batch(batch, clean_env, capsys, monkeypatch, tmp_path):
    env = dist.DistEnv()
    kw = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
    monkeypatch.setenv("WORKSHOP_PROGRESS", "bar")
    assert dist.make_trainer(env, **kw).progress_bar_callback is not None
    assert dist.make_trainer(env, enable_progress_bar=False, **kw).progress_bar_callback is None  # asked for: kept
    monkeypatch.setenv("WORKSHOP_PROGRESS", "log")
    monkeypatch.setenv("WORKSHOP_LOG_EVERY", "2")
    trainer = dist.make_trainer(env, **kw)
    assert trainer.progress_bar_callback is None
    capsys.readouterr()
    trainer.fit(lit.LitClassifier(models.get_model("small_cnn"), lr=0.01), tiny_loader(n=20))
    lines = [line.split(" (")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert lines == ["epoch 0: step 2/5", "epoch 0: step 4/5", "epoch 0: step 5/5"]


def test_live_plot_redraws_one_display_in_jupyterlab_only(batch, monkeypatch):
    import IPython.display

    shown = []

    class Handle:
        def update(self, fig):
            shown.append(("update", [len(line.get_xdata()) for line in fig.axes[0].lines]))

    def display(fig, display_id=False):
        shown.append(("display", [len(line.get_xdata()) for line in fig.axes[0].lines]))
        return Handle()

    monkeypatch.setattr(IPython.display, "display", display)
    quiet = progress.LivePlot("train_loss", "val_loss", xlabel="epoch")  # batch: values kept, nothing drawn
    quiet.update(train_loss=2.0, val_loss=2.5)
    assert quiet.history == {"train_loss": [2.0], "val_loss": [2.5]} and shown == []
    monkeypatch.setenv("WORKSHOP_PROGRESS", "bar")
    live = progress.LivePlot("train_loss", "val_loss")
    live.update(train_loss=2.0, val_loss=2.5)
    live.update(train_loss=1.5, val_loss=2.0)
    assert shown == [("display", [1, 1]), ("update", [2, 2])]
    with pytest.raises(ValueError, match=r"LivePlot has no curve \['acc'\]; its curves: \['train_loss', 'val_loss'\]"):
        live.update(acc=0.5)
