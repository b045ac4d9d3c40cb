"""The shared training loop and its data paths: the loss read once per epoch (a read per step stalls a GPU),
and the device-resident loader a CUDA run trains through (tested here on the CPU, where it runs the same
code): the same samples, the same crops and flips as the per-sample path, reproducible from its seed."""

from __future__ import annotations

import contextlib
import sys

import torch

from exitbench.benchmarks import data, training
from exitbench.benchmarks.training import train_backbone
from exitbench.core.spec import BackboneTraining
from exitbench.methods.base import Budget


def _split(augment: bool = False, n: int = 96) -> data.ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return data.ImageDataset(images, torch.arange(n) % 4, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), augment=augment)


def test_the_loss_is_read_once_per_epoch(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    loader = data.make_loader(_split(), 16, True, seed=0)  # 6 steps an epoch
    reads = []
    item = torch.Tensor.item

    def counting(self):  # only the loop's own reads: DataLoader and the optimiser read scalars of their own
        if sys._getframe(1).f_code.co_filename == training.__file__:
            reads.append(1)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting)
    stats = train_backbone(model, {"train": loader}, BackboneTraining(epochs=3, batch_size=16))
    assert len(reads) == 3 and len(stats["loss_per_epoch"]) == 3  # not 18
    assert stats["data_path"].startswith("DataLoader")


def test_crop_flip_is_the_per_sample_augmentation_for_a_whole_batch():
    split = _split(augment=True, n=8)
    x = split.images.float() / 255
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [4, 4], [1, 7], [8, 0], [2, 2], [6, 1]])
    flips = torch.tensor([False, True, False, True, True, False, False, True])
    got = data.crop_flip(x, offsets, flips)
    for i in range(8):  # ImageDataset's own steps: pad 4, crop at (top, left), flip
        want = torch.nn.functional.pad(x[i], (4, 4, 4, 4))[:, offsets[i, 0]:offsets[i, 0] + 8,
                                                             offsets[i, 1]:offsets[i, 1] + 8]
        want = want.flip(-1) if flips[i] else want
        assert torch.equal(got[i], want), i
    assert torch.equal(data.crop_flip(x, torch.full((8, 2), 4), torch.zeros(8, dtype=torch.bool)), x)  # identity


def test_device_loader_covers_the_split_once_per_epoch_seeded():
    split = _split(augment=False, n=50)
    loader = data.DeviceLoader(split, 16, True, seed=3, device=torch.device("cpu"))
    assert len(loader) == 4
    xs, ys = zip(*loader)
    assert [len(y) for y in ys] == [16, 16, 16, 2]
    x, y = torch.cat(xs), torch.cat(ys)
    full_x, full_y = split.tensors()
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3))  # the order it drew
    assert torch.equal(y, full_y[order]) and torch.allclose(x, full_x[order])
    again = torch.cat([b for b, _ in data.DeviceLoader(split, 16, True, seed=3, device=torch.device("cpu"))])
    assert torch.equal(again, x)
    second_epoch = torch.cat([b for _, b in loader])
    assert not torch.equal(second_epoch, y) and sorted(second_epoch.tolist()) == sorted(y.tolist())
    plain = data.DeviceLoader(split, 16, False, seed=3, device=torch.device("cpu"))
    assert torch.equal(torch.cat([b for _, b in plain]), full_y)


def test_device_loader_augments_like_the_dataset_would():
    split = _split(augment=True, n=32)
    loader = data.DeviceLoader(split, 32, False, seed=0, device=torch.device("cpu"))
    x, _ = next(iter(loader))
    plain = split.tensors()[0]
    assert x.shape == plain.shape and not torch.equal(x, plain)  # cropped and flipped
    # every augmented image is one of its 81 crops x 2 flips
    g = torch.Generator().manual_seed(0)  # unshuffled: the generator's first draws are the crops and flips
    draws, flips = torch.randint(0, 9, (32, 2), generator=g), torch.rand(32, generator=g) < 0.5
    raw = split.images.float() / 255
    assert torch.allclose(x, (data.crop_flip(raw, draws, flips) - split.mean) / split.std)


def test_make_loader_picks_the_device_path_on_cuda_only():
    split = _split()
    assert isinstance(data.make_loader(split, 8, True, device=torch.device("cpu")), torch.utils.data.DataLoader)
    assert isinstance(data.make_loader(split, 8, True), torch.utils.data.DataLoader)


def test_training_through_the_device_loader_learns():
    torch.manual_seed(0)
    protos = torch.rand(4, 3, 8, 8)
    labels = torch.arange(200) % 4
    images = ((protos[labels] + 0.1 * torch.randn(200, 3, 8, 8)).clamp(0, 1) * 255).to(torch.uint8)
    split = data.ImageDataset(images, labels, (0.5,) * 3, (0.25,) * 3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    loader = data.DeviceLoader(split, 32, True, seed=0, device=torch.device("cpu"))
    stats = train_backbone(model, {"train": loader}, Budget(epochs=5, lr=1e-2, batch_size=32))
    assert stats["data_path"].startswith("device-resident")
    assert stats["loss_per_epoch"][-1] < stats["loss_per_epoch"][0]
    x, y = split.tensors()
    assert (model(x).argmax(-1) == y).float().mean() > 0.9


class _Interrupt(BaseException):
    """What a preemption looks like to the loop: it stops mid-epoch and never returns."""


def _resumable_run(tmp_path, monkeypatch, stop_after_steps: int | None) -> tuple[dict, dict]:
    """A cosine-scheduled training with dropout (torch's RNG) and a shuffled, augmented loader (its own
    generator), checkpointing every epoch; stopped after ``stop_after_steps`` steps, then run again."""
    monkeypatch.setattr(training, "CHECKPOINT_OVERHEAD", 1e9)  # a save after every epoch, however slow
    steps = {"n": 0}

    def loss(out, y, model):
        steps["n"] += 1
        if stop_after_steps is not None and steps["n"] > stop_after_steps:
            raise _Interrupt
        return torch.nn.functional.cross_entropy(out, y)

    def attempt() -> tuple[torch.nn.Module, dict]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(3 * 8 * 8, 4))
        loader = data.make_loader(_split(augment=True), 16, True, seed=0)  # 6 steps an epoch
        with training.resumable(tmp_path / "partial"):
            stats = training.fit(model, loss, list(model.parameters()), {"train": loader},
                                 Budget(epochs=4, lr=0.01, batch_size=16), schedule="cosine")
        return model, stats

    if stop_after_steps is not None:
        with contextlib.suppress(_Interrupt):
            attempt()
        stop_after_steps = None  # the requeued run is not interrupted
    model, stats = attempt()
    return model.state_dict(), stats


def test_an_interrupted_training_resumes_from_its_epoch_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    whole, whole_stats = _resumable_run(tmp_path / "a", monkeypatch, None)
    resumed, stats = _resumable_run(tmp_path / "b", monkeypatch, 15)  # stopped in the third epoch
    assert stats["resumed_at_epoch"] == 2 and "resumed_at_epoch" not in whole_stats
    assert stats["loss_per_epoch"] == whole_stats["loss_per_epoch"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_checkpoint_of_another_training_is_not_loaded(tmp_path, monkeypatch):
    _resumable_run(tmp_path, monkeypatch, 15)  # leaves fit-0.pt at epoch 2
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))  # another model
    loader = data.make_loader(_split(), 16, True, seed=0)
    with training.resumable(tmp_path / "partial"):
        stats = training.fit(model, lambda o, y, m: torch.nn.functional.cross_entropy(o, y), list(model.parameters()),
                             {"train": loader}, Budget(epochs=2, lr=0.01, batch_size=16))
    assert len(stats["loss_per_epoch"]) == 2 and "resumed_at_epoch" not in stats
