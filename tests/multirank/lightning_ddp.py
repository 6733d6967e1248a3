"""Train a few steps with Lightning through workshop.dist.make_trainer and save rank 0's weights.

    python tests/multirank/lightning_ddp.py OUT.pt                                   # reference
    torchrun --standalone --nproc-per-node 2 tests/multirank/lightning_ddp.py OUT.pt   # 2 ranks

The global batch is the same in both (64 = micro batch x world size), and the model has no
BatchNorm (whose statistics are per rank), so DDP must end with the reference's weights.
"""

import sys

import torch
from torch import nn

from workshop import data, dist, lit

GLOBAL_BATCH = 64

env = dist.init()
train_set, _, _ = data.get_dataset("synthetic", num_train=256, num_test=16)
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10))
module = lit.LitClassifier(model, lr=0.1, momentum=0.9, weight_decay=0.0)
trainer = dist.make_trainer(env, max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=sys.argv[1] + ".lightning",
                            use_distributed_sampler=False)
# Our sampler, not Lightning's (which would shuffle): rank r reads samples r, r + 2, ..., so the two
# ranks' micro batches of step k together are the reference's batch k.
trainer.fit(module, data.make_loader(train_set, GLOBAL_BATCH // env.world_size, env=env))
assert trainer.world_size == env.world_size
if env.is_main:
    torch.save({"state": model.state_dict(), "world_size": trainer.world_size, "steps": trainer.global_step}, sys.argv[1])
dist.cleanup()
