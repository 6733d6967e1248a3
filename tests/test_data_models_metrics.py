"""workshop.data (its augmentation too), workshop.models, workshop.measure.metrics and workshop.train, in one process."""

import json

import pytest
import torch
from PIL import Image

from workshop import check, data, dist, models, train
from workshop.base import records
from workshop.measure import metrics


def test_synthetic_is_deterministic_from_its_seed():
    a, la = data.make_synthetic(64, seed=3)
    b, lb = data.make_synthetic(64, seed=3)
    c, _ = data.make_synthetic(64, seed=4)
    assert a.shape == (64, 3, 32, 32) and a.dtype == torch.uint8 and la.shape == (64,)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_synthetic_is_learnable_by_the_small_cnn_but_not_in_one_epoch():
    torch.manual_seed(0)
    train_set, test_set, info = data.get_dataset("synthetic", num_train=2048, num_test=512)
    model = models.get_model("small_cnn")
    history = train.fit(model, data.make_loader(train_set, 64, shuffle=True), data.make_loader(test_set, 256),
                        epochs=2, lr=0.05, device="cpu")
    assert history[-1]["val_acc"] > 0.4  # chance is 0.1
    assert history[0]["val_acc"] < 0.9  # a learning problem: one epoch does not solve it
    assert history[-1]["loss"] < history[0]["loss"]


def test_synthetic_classes_are_named_balanced_and_not_given_away_by_colour():
    images, labels = data.make_synthetic(2000, seed=0)
    _, _, info = data.get_dataset("synthetic", num_train=8, num_test=8)
    assert info.classes == data.SYNTHETIC_CLASSES and len(info.classes) == info.num_classes == 10
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() > 150  # about 200 each
    # The mean colour of an image, classified by the nearest class mean: colour tells a pair of classes (they share
    # a colour family), not the class, so this stays far from what a CNN reaches.
    colour = images.float().mean(dim=(2, 3))  # (n, 3)
    train, test = slice(0, 1000), slice(1000, 2000)
    centres = torch.stack([colour[train][labels[train] == c].mean(0) for c in range(10)])  # (10, 3)
    guess = torch.cdist(colour[test], centres).argmin(1)
    assert (guess == labels[test]).float().mean() < 0.5


def test_plot_examples_shows_every_class_under_its_name():
    train_set, _, info = data.get_dataset("synthetic", num_train=200, num_test=8)
    fig = data.plot_examples(train_set, info.classes, per_class=3)
    axes = fig.get_axes()
    assert len(axes) == 3 * len(info.classes)
    titles = [ax.get_title().replace("\n", " ") for ax in axes if ax.get_title()]
    assert titles == list(info.classes)
    assert all(ax.get_images() for ax in axes)  # 200 images hold 3 of every class


def test_explicit_cifar10_that_is_not_staged_says_how_to_stage_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage_data.sh"):
        data.get_dataset("cifar10", root=tmp_path)


def test_auto_takes_synthetic_when_nothing_is_staged_and_says_so(tmp_path, capsys, clean_env):
    _, _, info = data.get_dataset("auto", root=tmp_path, num_train=16, num_test=16)
    assert info.name == "synthetic"
    assert "using the synthetic set" in capsys.readouterr().out


def test_unknown_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'birds'"):
        data.get_dataset("birds", root=tmp_path)


def test_imagefolder_reads_one_folder_per_class(tmp_path):
    for split in ("train", "test"):
        for i, cls in enumerate(["crow", "wren"]):
            (tmp_path / "birds" / split / cls).mkdir(parents=True)
            for j in range(3):
                Image.new("RGB", (40, 30), (80 * i, 30 * j, 100)).save(tmp_path / "birds" / split / cls / f"{j}.png")
    train_set, test_set, info = data.get_dataset("birds", root=tmp_path, image_size=32)
    assert (info.name, info.num_classes, info.num_train, info.num_test) == ("imagefolder", 2, 6, 6)
    assert info.classes == ("crow", "wren")
    x, y = train_set[0]
    assert x.shape == (3, 32, 32) and y == 0


def test_augmentation_crops_the_padded_image_and_flips():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = data.augment_batch(images, pad=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 8, 8) and out.dtype == torch.float32
    mean, std = torch.tensor(data.CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(data.CIFAR_STD).view(1, 3, 1, 1)
    padded = torch.nn.functional.pad((images.float() / 255 - mean) / std, (2, 2, 2, 2), mode="reflect")
    for b in range(16):
        crops = [padded[b, :, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], c) or torch.equal(out[b], c.flip(-1)) for c in crops)
    same = data.augment_batch(images, pad=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, same)  # a pure function of the generator
    ds = data.AugmentedImages(images, torch.zeros(16, dtype=torch.long), pad=2)
    x, _ = ds[3]
    crops = [padded[3, :, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
    assert any(torch.allclose(x, c) or torch.allclose(x, c.flip(-1)) for c in crops)  # the same, one image at a time


def test_loaders_shard_disjointly_across_ranks():
    train_set, _, _ = data.get_dataset("synthetic", num_train=100, num_test=10)
    seen = []
    for rank in range(2):
        env = dist.DistEnv(rank=rank, world_size=2, local_world_size=2, local_rank=rank)
        loader = data.make_loader(train_set, 10, env=env, shuffle=True, seed=1)
        loader.sampler.set_epoch(0)
        seen.append({int(i) for i in loader.sampler})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 100


@pytest.mark.parametrize("name, params", [("small_cnn", 94_762), ("resnet18", 11_173_962), ("vit_tiny", 2_693_578)])
def test_models_map_images_to_logits(name, params):
    model = models.get_model(name, num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert models.count_parameters(model) == params


def test_small_cnn_with_group_norm_normalises_each_sample_on_its_own():
    torch.manual_seed(0)
    model = models.get_model("small_cnn", norm="group").train()
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.GroupNorm in kinds and torch.nn.BatchNorm2d not in kinds
    assert models.count_parameters(model) == 94_762  # same as with BatchNorm: a weight and a bias per channel
    # in training mode a sample's logits do not depend on the rest of the batch: the property that
    # makes N ranks of micro batches compute what one process computes on their union
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(model(x)[:4], model(x[:4]))
    with pytest.raises(ValueError, match="unknown norm"):
        models.get_model("small_cnn", norm="layer")


def test_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="unknown model"):
        models.get_model("vgg")


def test_record_is_written_by_rank_0_only(tmp_path, clean_env):
    path = metrics.write_record(tmp_path, notebook="nb", params={"lr": 0.1}, results={"samples_per_s": 12.5})
    record = json.loads(path.read_text())
    assert record["status"] == "ok" and record["params"] == {"lr": 0.1} and record["results"]["samples_per_s"] == 12.5
    for key in ("dist", "hardware", "versions", "git", "slurm_job_id", "time"):
        assert key in record
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left behind
    rank1 = dist.DistEnv(rank=1, world_size=2)
    assert metrics.write_record(tmp_path / "x", notebook="nb", params={}, results={}, env=rank1) is None


def test_each_interactive_run_gets_a_folder_of_its_own(runs, clean_env):
    a = metrics.run_dir("01_baseline")
    b = metrics.run_dir("01_baseline")
    assert a != b and a.parent == b.parent == runs


def test_train_step_is_one_sgd_step_and_stops_before_a_nan_update():
    with train.seeded(0):
        model = models.get_model("small_cnn", norm="group")
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    twin = models.get_model("small_cnn", norm="group")
    twin.load_state_dict(model.state_dict())
    opt, opt_twin = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin))
    loss, logits = train.train_step(model, opt, x, y)
    expected = torch.nn.functional.cross_entropy(twin(x), y)  # the same step, written out
    expected.backward()
    opt_twin.step()
    assert logits.shape == (4, 10) and torch.equal(loss, expected.detach())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(check.Diverged, match="step 3"):
        train.train_step(model, opt, torch.full_like(x, float("nan")), y, check_at=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # stopped before the update


def test_seeded_gives_the_same_draws_and_keeps_the_callers_stream():
    torch.manual_seed(7)
    plain = torch.rand(2)
    torch.manual_seed(7)
    before = torch.rand(1)
    with train.seeded(0):
        first = torch.rand(3)
    with train.seeded(0):
        assert torch.equal(torch.rand(3), first)
    assert torch.equal(torch.cat([before, torch.rand(1)]), plain)


def test_timer_and_throughput():
    with metrics.Timer("cpu") as t:
        sum(range(10000))
    assert t.elapsed > 0
    assert metrics.throughput(100, 2.0) == 50.0
    assert metrics.fmt_bytes(3 * 1024**2) == "3.0 MiB"


def test_baseline_record_computes_throughput_and_report_measurements(tmp_path, clean_env):
    params = dict(model_name="small_cnn", epochs=2, batch_size=64, num_train=500)
    path = metrics.write_baseline_record(tmp_path, params, data_source="synthetic(seed=0)",
                                         plain={"wall_time_s": 4.0, "peak_memory_bytes": 123, "val_acc": 0.7},
                                         lightning={"wall_time_s": 5.0, "val_acc": 0.6})
    record = records.read(path)
    results = record.results
    assert results["plain"]["samples_per_s"] == 250.0 and results["lightning"]["samples_per_s"] == 200.0
    assert [(m["variant"], m["baseline"], m["throughput"]) for m in results["measurements"]] == [
        ("plain loop", True, 250.0), ("lightning", False, 200.0)]
    assert record.extra["wall_time_s"] == 9.0 and record.extra["samples_per_s"] == 250.0
    assert record.extra["peak_memory_bytes"] == 123
