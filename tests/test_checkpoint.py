"""workshop.checkpoint without processes: atomic files, safe loading, the model check, the stop request."""

import os
import signal

import pytest
import torch

from workshop import checkpoint


def small_model(width=4):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


def test_a_checkpoint_restores_model_optimizer_and_step(tmp_path):
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    checkpoint.save(tmp_path / "c.pt", model, opt, 7, model_name="mlp")
    other = small_model()
    torch.nn.init.zeros_(other[0].weight)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.01)
    assert checkpoint.load(tmp_path / "c.pt", other, other_opt, model_name="mlp") == 7
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = small_model()
    checkpoint.save(tmp_path / "c.pt", model, None, 1, model_name="mlp")
    before = (tmp_path / "c.pt").read_bytes()

    def broken(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path / "c.pt", model, None, 2, model_name="mlp")
    assert (tmp_path / "c.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_a_checkpoint_of_another_model_is_refused_naming_both(tmp_path):
    checkpoint.save(tmp_path / "c.pt", small_model(4), None, 3, model_name="mlp")
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"of model 'mlp' \(Sequential, 26 parameters\), not of this "
                                                           r"model 'mlp' \(Sequential, 50 parameters\)"):
        checkpoint.load(tmp_path / "c.pt", small_model(8), model_name="mlp")
    with pytest.raises(checkpoint.CheckpointMismatch, match="of model 'mlp' .* not of this model 'other'"):
        checkpoint.load(tmp_path / "c.pt", small_model(4), model_name="other")


class Payload:
    def __reduce__(self):  # what a crafted checkpoint would do when unpickled: run a command
        return (os.system, ("echo owned > /dev/null",))


def test_checkpoints_are_loaded_without_running_code(tmp_path):
    torch.save({"format": checkpoint.FORMAT, "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointMismatch, match="cannot be read as a workshop checkpoint"):
        checkpoint.load(tmp_path / "evil.pt", small_model(), model_name="mlp")


def test_the_checkpointer_keeps_the_newest_and_resumes_from_it(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, model_name="mlp", keep=2)
    model = small_model()
    assert ckpt.resume(model) == 0
    for step in (5, 10, 15):
        ckpt.save(model, None, step)
    assert [p.name for p in ckpt.paths()] == ["step10.pt", "step15.pt"]
    assert ckpt.resume(small_model()) == 15


def test_sigusr1_or_the_stop_file_ask_for_a_stop(tmp_path):
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        stop = checkpoint.StopOnSignal(run_dir=tmp_path)
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested()
        late = checkpoint.StopOnSignal(run_dir=tmp_path)  # a kernel that started after the signal
        assert not late.requested()
        (tmp_path / checkpoint.STOP_FILE).touch()
        assert late.requested()
    finally:
        signal.signal(signal.SIGUSR1, previous)
