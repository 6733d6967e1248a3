"""On a CUDA machine: the device a rank gets, a timed training step, and CUDA peak memory."""

import pytest
import torch

from workshop import dist, models
from workshop.measure import metrics

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


def test_axonn_tensor_parallelism_trains_as_one_process(clean_env):
    pytest.importorskip("axonn", reason="AxoNN is the gpu extra: pip install -e '.[gpu]'")
    from workshop import data, tp

    env = dist.init()
    try:
        train_set, _, _ = data.get_text_dataset(seq_len=16, num_train_tokens=3 * 4 * 16 + 1)

        def fresh():
            torch.manual_seed(0)
            return models.tinygpt("cpu").to(env.device)

        model = tp.axonn_parallelize(fresh, fresh().state_dict(), tp.parse_tp_dimensions("0,1,1", env.world_size))
        model = model.to(env.device)
        axonn = tp.axonn_train(model, torch.optim.SGD(model.parameters(), lr=0.1), data.make_loader(train_set, 4), env)
        one, plain = fresh(), []
        optimizer = torch.optim.SGD(one.parameters(), lr=0.1)
        for x, y in data.make_loader(train_set, 4):
            optimizer.zero_grad()
            loss = models.lm_loss(one(x.to(env.device)), y.to(env.device))
            loss.backward()
            optimizer.step()
            plain.append(loss.item())
        assert len(axonn) == 3 and axonn == pytest.approx(plain, rel=1e-4)
    finally:
        dist.cleanup()
