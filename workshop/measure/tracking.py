"""Where a run's metrics go: a CSV file always, and TensorBoard or Weights & Biases beside it. The same Lightning
logger objects serve the Trainer (`logger=`) and a plain loop (`log_metrics(metrics, step)`), so both loops of a
notebook log alike, into the run's folder.

    plain_log = tracking.loggers("wandb", run, env, name="plain")    # [CSVLogger, WandbLogger]
    for lg in plain_log:
        lg.log_metrics({"train_loss": 0.5}, step=epoch)
    tracking.finish(plain_log)                                        # flush; end the W&B run
    tracking.describe(plain_log, run)                                 # for record.json: the W&B run ids, how to sync

Compute nodes have no internet, so Weights & Biases runs offline: it writes `<run>/wandb/offline-run-<time>-<id>/`,
which `wandb sync` uploads later from a login node. It never asks for a key. WANDB_MODE=online is honoured where
the W&B server answers and a key is set; anywhere else it is an error that says what to do.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from workshop.dist import DistEnv

LOGGERS = ("tensorboard", "csv", "wandb")
WANDB_PROJECT = "hpc-workshop"  # the W&B project the runs are synced into (WANDB_PROJECT overrides it)


def wandb_mode() -> str:
    """The W&B mode this process may use: "offline" (the default: WANDB_MODE unset, "offline" or "dryrun") or
    "online" (WANDB_MODE=online, when the server answers and a key is set). Raises with what to do otherwise."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode in ("offline", "dryrun"):
        return "offline"
    if mode not in ("online", "run"):
        raise ValueError(f"WANDB_MODE={mode!r} is not a mode this workshop logs in: unset it (offline, into the run's "
                         "folder, synced later with `wandb sync`) or set WANDB_MODE=online on a machine with internet")
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as err:
        raise RuntimeError(
            f"WANDB_MODE=online needs {url.hostname}, which this machine cannot reach ({err}); compute nodes usually "
            "have no internet. Unset WANDB_MODE: the run logs offline into its folder, and `wandb sync "
            "runs/<run>/wandb/offline-run-*` uploads it from a login node") from err
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(url.hostname):
        raise RuntimeError("WANDB_MODE=online needs a W&B key and none is set: run `wandb login` once (it writes "
                           "~/.netrc), or set WANDB_API_KEY; or unset WANDB_MODE to log offline and sync later")
    return "online"


def _netrc_has(host: str) -> bool:
    import netrc

    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _import_wandb():
    try:
        import wandb
    except ImportError as err:
        raise ImportError(f"logger='wandb' needs the wandb package ({err}): `pip install wandb`, or `make setup` / the "
                          "conda environment, which install it with the workshop") from err
    return wandb


def loggers(kind: str, run: Path, env: DistEnv, name: str) -> list:
    """Lightning loggers writing into the run's folder under `name` ("plain", "lightning"): a CSVLogger first
    (`<run>/<name>/version_0/metrics.csv`), then a TensorBoardLogger (`<run>/tensorboard/<name>`) or a WandbLogger
    (a W&B run named `<name>`, grouped by the run's folder) as `kind` says, one of LOGGERS. Only rank 0 starts a
    W&B run; every rank gets the same list (Lightning logs from rank 0)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    if kind not in LOGGERS:
        raise ValueError(f"unknown logger {kind!r}; use one of {', '.join(LOGGERS)}")
    # Lightning's loggers write where rank_zero_only.rank is 0: a Trainer sets it from its strategy, and before any
    # Trainer it is guessed from launcher variables at import. A plain loop's loggers go by this run's DistEnv.
    rank_zero_only.rank = env.rank
    out = [CSVLogger(run, name=name)]
    if kind == "tensorboard":
        out.append(TensorBoardLogger(run / "tensorboard", name=name))
    elif kind == "wandb":
        wandb = _import_wandb()
        mode = wandb_mode()
        experiment = None
        if env.is_main:
            # W&B's own start-up lines and its copy of the console stay out of the notebook; the run is ours to
            # start (Lightning's WandbLogger passes a deprecated `anonymous` setting that wandb 0.31 warns about)
            os.environ.setdefault("WANDB_SILENT", "true")
            experiment = wandb.init(dir=str(run), project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=name,
                                    group=run.name, job_type=name, mode=mode,
                                    settings=wandb.Settings(console="off", save_code=False))
        out.append(WandbLogger(experiment=experiment, save_dir=str(run)) if experiment else
                   WandbLogger(save_dir=str(run), offline=mode == "offline"))
    return out


def finish(logged: list) -> None:
    """Write out what `loggers` hold: the CSV file and TensorBoard events flushed, the W&B run ended (its folder
    complete, ready for `wandb sync`). Lightning finalizes its own loggers at the end of fit, but not the W&B run."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in logged:
        lg.finalize("success")
        # rank 0's run (other ranks have none); the `experiment` property would start one where there is none
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg._experiment.finish()


def describe(logged: list, run: Path) -> dict:
    """What `loggers` wrote, for record.json: {"csv": [...], "tensorboard": [...], "wandb": [{"name", "id", "mode",
    "dir", "sync"}]}, paths relative to the run's folder; a W&B entry only on rank 0, which writes the record."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    from workshop.base.runs import display_path

    out: dict = {}
    for lg in logged:
        if isinstance(lg, CSVLogger):
            out.setdefault("csv", []).append(str(Path(lg.log_dir, "metrics.csv").relative_to(run)))
        elif isinstance(lg, TensorBoardLogger):
            out.setdefault("tensorboard", []).append(str(Path(lg.log_dir).relative_to(run)))
        elif isinstance(lg, WandbLogger) and lg._experiment is not None:
            experiment = lg._experiment
            folder = Path(experiment.dir).parent  # <run>/wandb/offline-run-<time>-<id>/files
            out.setdefault("wandb", []).append({
                "name": experiment.name, "id": experiment.id, "mode": "offline" if experiment.offline else "online",
                "dir": str(folder.relative_to(run)), "sync": f"wandb sync {display_path(folder)}"})
    return out
