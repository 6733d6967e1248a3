"""On a CUDA machine: the device a rank gets, a timed training step, and CUDA peak memory."""

import pytest
import torch

from workshop import dist, metrics, models

pytestmark = pytest.mark.gpu


def test_one_process_uses_the_first_gpu_with_nccl(clean_env):
    env = dist.detect()
    assert (env.device, env.backend) == ("cuda:0", "nccl")


def test_a_timed_training_step_on_the_gpu():
    device = "cuda:0"
    model = models.get_model("resnet18").to(device)
    x, y = torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 10, (64,), device=device)
    metrics.reset_peak_memory(device)
    with metrics.Timer(device) as t:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert t.elapsed > 0
    assert metrics.peak_memory(device) > 4 * models.count_parameters(model)  # at least the fp32 weights
