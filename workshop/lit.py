"""The classifier and the language model as LightningModules: Lightning owns the loop, the
devices and the processes' cooperation; build its Trainer with `workshop.dist.make_trainer` (notebook 05 writes the
same `L.Trainer(...)` call in the open, with `dist.lightning_environment(env)` as its plugin).

    module = lit.LitClassifier(models.get_model("small_cnn"), lr=0.05)
    trainer = dist.make_trainer(env, max_epochs=2)
    trainer.fit(module, train_loader, test_loader)
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from workshop import check
from workshop.models import lm_loss
from workshop.train import make_optimizer


class LitClassifier(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4):
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])

    def forward(self, x):
        return self.model(x)

    def _step(self, batch, stage: str):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        if stage == "train":  # per step, this rank's batch: no communication in the training loop
            self.log_dict({"train_loss": loss, "train_acc": acc}, on_step=True, on_epoch=False)
        else:  # per epoch, averaged over all ranks' shards (sync_dist), not only rank 0's
            self.log_dict({"val_loss": loss, "val_acc": acc}, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        check.stop_if_diverged(loss, self.global_step, self.hparams.lr)  # Lightning re-raises it on every rank
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        h = self.hparams
        return make_optimizer(self.model, h.lr, h.momentum, h.weight_decay)


class LitLanguageModel(L.LightningModule):
    """A language model (TinyGPT) as a LightningModule, trained on next-token loss with AdamW, or
    with SGD and momentum 0.9 (`optimizer="sgd"`: the exact comparisons of notebook 08, where Adam
    would magnify rounding in near-zero gradients).

    With `ModelParallelStrategy` Lightning builds a device mesh and calls `configure_model`, where
    `parallelize(model, device_mesh)` shards the model (for instance FSDP2 with
    `workshop.sharding.apply_fsdp(model, device_mesh["data_parallel"])`); the optimizer is made
    afterwards, from the sharded parameters.

        module = lit.LitLanguageModel(models.tinygpt("cpu"), lr=3e-3, parallelize=my_plan)
        strategy = ModelParallelStrategy(data_parallel_size=env.world_size, tensor_parallel_size=1)
        dist.make_trainer(env, strategy=strategy, max_steps=100).fit(module, loader)
    """

    def __init__(self, model: nn.Module, lr: float = 3e-3, weight_decay: float = 0.01, parallelize=None,
                 optimizer: str = "adamw"):
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adamw' or 'sgd'")
        self.model = model
        self.parallelize = parallelize
        self.save_hyperparameters(ignore=["model", "parallelize"])
        self._parallelized = False

    def configure_model(self):
        if self.parallelize is not None and not self._parallelized:  # Lightning may call it again
            self.parallelize(self.model, self.device_mesh)
            self._parallelized = True

    def forward(self, tokens):
        return self.model(tokens)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = lm_loss(self.model(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        check.stop_if_diverged(loss, self.global_step, self.hparams.lr)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        if h.optimizer == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=h.lr, momentum=0.9)
        return torch.optim.AdamW(self.model.parameters(), lr=h.lr, weight_decay=h.weight_decay)
