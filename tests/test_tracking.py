"""workshop.measure.tracking: CSV and TensorBoard or W&B loggers in the run's folder; W&B offline, never asking for a key,
and a clear error where it cannot run (a server out of reach: test_bad_input). The offline W&B runs themselves, their
folders and metrics against the record: notebook 01 with `-p logger wandb` on 2 ranks, in test_run_notebook."""

import socket
import sys

import pytest

from workshop import dist
from workshop.measure import tracking


@pytest.fixture
def no_wandb_settings(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / ".config"))


def test_tensorboard_and_csv_loggers_are_described_by_their_paths(tmp_path):
    logged = tracking.loggers("tensorboard", tmp_path, dist.DistEnv(), name="lightning")
    for lg in logged:
        lg.log_metrics({"loss": 1.0}, step=0)
    tracking.finish(logged)
    assert tracking.describe(logged, tmp_path) == {"csv": ["lightning/version_0/metrics.csv"],
                                                  "tensorboard": ["tensorboard/lightning/version_0"]}
    assert list((tmp_path / "tensorboard" / "lightning" / "version_0").glob("events.out.tfevents.*"))


def test_an_unknown_logger_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use one of tensorboard, csv, wandb"):
        tracking.loggers("mlflow", tmp_path, dist.DistEnv(), name="plain")


def test_a_missing_wandb_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        tracking.loggers("wandb", tmp_path, dist.DistEnv(), name="plain")


def test_online_mode_without_a_key_is_an_error_not_a_prompt(no_wandb_settings, monkeypatch):
    with socket.socket() as server:  # a server that answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_MODE", "online")
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        with pytest.raises(RuntimeError, match="needs a W&B key.*wandb login"):
            tracking.wandb_mode()
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        assert tracking.wandb_mode() == "online"


@pytest.mark.parametrize("mode, expected", [(None, "offline"), ("offline", "offline"), ("dryrun", "offline")])
def test_offline_is_the_default(no_wandb_settings, monkeypatch, mode, expected):
    if mode:
        monkeypatch.setenv("WANDB_MODE", mode)
    assert tracking.wandb_mode() == expected


def test_a_mode_that_is_not_one_is_refused(no_wandb_settings, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with pytest.raises(ValueError, match="WANDB_MODE='disabled'"):
        tracking.wandb_mode()
