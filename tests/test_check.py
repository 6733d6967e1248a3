"""workshop.check: what a comparison reports and that a failed check raises with it (one process;
the agreement of ranks is checked on 3 ranks in tests/multirank/ring_allreduce.py)."""

import pytest
import torch

from workshop import check, dist


@pytest.fixture(autouse=True, scope="module")
def group_of_one():
    dist.init()
    yield
    dist.cleanup()  # the next module's tests start with no group (test_progress reads the rank from it)


def twins():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    b = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    b.load_state_dict(a.state_dict())
    return a, b


def test_equal_weights_match_and_a_difference_is_named():
    a, b = twins()
    assert check.same_weights(a, b).ok and check.same_weights(a, b).detail == ""
    with torch.no_grad():
        b[1].bias[0] += 0.5
    match = check.same_weights(a, b)
    assert not match and "1.bias" in match.detail and "0.5" in match.detail


def test_tolerance_is_allclose_s():
    a, b = twins()
    with torch.no_grad():
        b[0].weight.add_(1e-6)
    assert check.same_weights(a, b, rtol=0, atol=1e-5)
    assert not check.same_weights(a, b, rtol=0, atol=1e-7)


def test_nan_never_matches():
    a, b = twins()
    with torch.no_grad():
        a[0].weight[0, 0] = float("nan")
    match = check.same_weights(a, b)
    assert not match and "0.weight" in match.detail


def test_wrapper_prefix_and_counts():
    a, b = twins()
    wrapped = torch.nn.Module()
    wrapped.module = a  # as DDP names them: module.0.weight
    assert check.same_weights(wrapped, b)
    assert "parameter tensors" in check.same_weights(a[0], b).detail


def test_same_grads():
    a, b = twins()
    x = torch.randn(5, 3)
    for m in (a, b):
        m(x).sum().backward()
    assert check.same_grads(a, [p.grad for p in b.parameters()])
    assert "has no gradient" in check.same_grads(twins()[0], [p.grad for p in b.parameters()]).detail
    b[0].weight.grad.mul_(2)  # a missing average over ranks
    match = check.same_grads(a, {n: p.grad for n, p in b.named_parameters()})
    assert not match and "0.weight.grad" in match.detail


def test_require_prints_every_line_and_raises_with_the_difference(capsys):
    a, b = twins()
    check.require({"plain": check.same_weights(a, b), "bucketed": check.that(True, "1 bucket")})
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["plain matches the single-process run:    True", "bucketed matches the single-process run: True"]
    with torch.no_grad():
        b[0].bias[1] -= 1.0
    with pytest.raises(check.CheckFailed, match=r"1 of 2 checks failed[\s\S]*plain: 0\.bias differs by up to 1"):
        check.require({"plain": check.same_weights(a, b), "bucketed": check.that(True, "1 bucket")})
    assert capsys.readouterr().out.splitlines()[0].endswith("False")
    with pytest.raises(check.CheckFailed, match=r"accuracy: 9\.0%, bar 15\.0%: try a lower learning rate"):
        check.require({"accuracy": check.that(0.09 > 0.15, "9.0%, bar 15.0%: try a lower learning rate")}, claim="")


def test_a_bare_boolean_is_refused_before_anything_prints(capsys):
    with pytest.raises(TypeError, match=r"'bare' is a bare bool: pass check.that\(ok, figures\)"):
        check.require({"fine": check.that(True, ""), "bare": False}, claim="")
    assert capsys.readouterr().out == ""


def test_refuses_needs_the_error_and_its_words(capsys):
    def bad():
        raise ValueError("size 3 does not divide 4; choose from [1, 2, 4]")

    assert check.refuses(bad, ValueError, "choose")
    assert capsys.readouterr().out == "ValueError: size 3 does not divide 4; choose from [1, 2, 4]\n"
    assert "without 'pick'" in check.refuses(bad, ValueError, "pick").detail
    assert check.refuses(lambda: None, ValueError).detail == "nothing was raised: expected a ValueError"
    with pytest.raises(ValueError):  # another error is not a refusal of this kind: it propagates
        check.refuses(bad, KeyError)


def test_a_non_finite_loss_stops_training_with_its_step():
    check.stop_if_diverged(torch.tensor(2.5), step=3, lr=0.1)
    with pytest.raises(check.Diverged, match=r"diverged at step 7: the loss is nan \(lr 100\)[\s\S]*10 times lower"):
        check.stop_if_diverged(torch.tensor(float("nan")), step=7, lr=100.0)
    with pytest.raises(check.Diverged, match="the loss is inf"):
        check.stop_if_diverged(float("inf"), step=0)


def nan_model():
    from workshop import models

    model = models.get_model("small_cnn", norm="group")
    with torch.no_grad():
        model.head[-1].bias[3] = float("nan")  # every logit row then holds a NaN: the first loss is NaN
    return model


def test_every_training_loop_stops_at_the_first_non_finite_loss():
    from workshop import data, ddp, lit, train

    train_set, _, _ = data.get_dataset("synthetic", num_train=32, num_test=8)
    loader = data.make_loader(train_set, 8)
    model = nan_model()
    with pytest.raises(check.Diverged, match=r"step 0: the loss is nan \(lr 0.05\)"):
        train.train_epoch(model, loader, train.make_optimizer(model, 0.05), "cpu")
    model = nan_model()
    with pytest.raises(check.Diverged, match="step 0"):
        ddp.train_steps(model, train.make_optimizer(model, 0.05), loader, "cpu", grad_accum_steps=2)
    trainer = dist.make_trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_model_summary=False)
    with pytest.raises(check.Diverged, match="step 0"):
        trainer.fit(lit.LitClassifier(nan_model(), lr=0.05), loader)
