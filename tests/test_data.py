"""Datasets and splits. The torchvision loaders run on tiny files written here in the official on-disk
formats; md5 checks are patched out only in these tests (tiny files cannot match the official sums)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
import torchvision

from exitbench.benchmarks import data
from exitbench.methods.base import UserError
from tests import test_fashion

# ----------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits() -> data.Splits:
    return data.load_splits("digits", seed=0)


def test_digits_shapes_and_info(digits):
    assert data.list_datasets() == ["cifar10", "cifar100", "digits", "fashion_mnist", "svhn", "synthetic"]
    assert digits.info.num_classes == 10 and digits.info.input_size == (3, 32, 32)
    assert data.dataset_info("digits") == digits.info
    x, y = digits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(x[0], x[2])  # grey replicated to 3 channels
    xs, ys = data.to_tensors(digits.test)
    assert xs.shape == (len(digits.test), 3, 32, 32) and ys.dtype == torch.long
    assert torch.allclose(xs[5], digits.test[5][0]) and int(ys[5]) == digits.test[5][1]


def test_digits_splits_disjoint_cover_and_stratified(digits):
    tr, ca, te = digits.train_indices, digits.calibration_indices, digits.test_indices
    assert (len(tr), len(ca), len(te)) == (1131, 126, 540)
    assert len(set(tr) | set(ca) | set(te)) == len(tr) + len(ca) + len(te) == 1797
    labels = [data.to_tensors(s)[1] for s in (digits.train, digits.calibration, digits.test)]
    props = [torch.bincount(y, minlength=10).float() / len(y) for y in labels]
    for p in props[1:]:
        assert (p - props[0]).abs().max() < 0.02


def test_digits_seeded(digits):
    again = data.load_splits("digits", seed=0)
    other = data.load_splits("digits", seed=1)
    assert np.array_equal(again.train_indices, digits.train_indices)
    assert np.array_equal(again.calibration_indices, digits.calibration_indices)
    assert not np.array_equal(other.test_indices, digits.test_indices)
    assert not np.array_equal(other.calibration_indices, digits.calibration_indices)


def test_digits_normalisation_constants():
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    assert abs(x.mean().item() - data.DIGITS_MEAN) < 1e-3 and abs(x.std().item() - data.DIGITS_STD) < 1e-3


# ----------------------------------------------------------------------------------------------
# user errors


def test_unknown_name_option_and_fraction():
    with pytest.raises(UserError, match="did you mean 'digits'"):
        data.load_splits("digit")
    with pytest.raises(UserError, match="num_classes"):
        data.load_splits("synthetic", num_clases=3)
    with pytest.raises(UserError, match="takes no options"):
        data.load_splits("digits", n=3)
    with pytest.raises(UserError, match="calibration_fraction"):
        data.load_splits("digits", calibration_fraction=0)


@pytest.mark.parametrize("name, expected", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "svhn/train_32x32.mat")])
def test_missing_files_offline(tmp_path, name, expected):
    with pytest.raises(UserError) as e:
        data.load_splits(name, root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / expected) in msg and "download" in msg and "not found" in msg and "\n" not in msg


# ----------------------------------------------------------------------------------------------
# torchvision datasets on tiny files in the official formats


def _pickle(path, obj):
    # The official files are Python 2 pickles; torchvision loads them with encoding="latin1", which gives
    # str keys ("data", "labels"), the same as these Python 3 pickles with str keys.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _batch(start: int, n: int, label_key: str, label_fn):
    x = np.zeros((n, 3072), np.uint8)
    idx = np.arange(start, start + n)
    x[:, 0] = idx  # red channel, pixel (0, 0): the sample's index
    x[:, 1024 + 2 * 32 + 3] = 200  # green channel, pixel (2, 3)
    return {"data": x, label_key: [label_fn(i) for i in idx]}


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    return _write_cifar(tmp_path, monkeypatch)


def _write_cifar(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    d10 = tmp_path / "cifar-10-batches-py"
    d10.mkdir()
    for b in range(5):
        _pickle(d10 / f"data_batch_{b + 1}", _batch(20 * b, 20, "labels", lambda i: i % 10))
    _pickle(d10 / "test_batch", _batch(0, 20, "labels", lambda i: (i + 1) % 10))
    _pickle(d10 / "batches.meta", {"label_names": [f"c{k}" for k in range(10)], "num_vis": 3072})
    d100 = tmp_path / "cifar-100-python"
    d100.mkdir()
    fine = lambda i: 20 * (i % 5)  # five of the 100 classes, so 10 % calibration can be stratified
    _pickle(d100 / "train", _batch(0, 100, "fine_labels", fine) | {"coarse_labels": [0] * 100})
    _pickle(d100 / "test", _batch(0, 10, "fine_labels", fine) | {"coarse_labels": [0] * 10})
    _pickle(d100 / "meta", {"fine_label_names": [f"f{k}" for k in range(100)], "coarse_label_names": ["x"] * 20})
    return tmp_path


def test_cifar10_roundtrip(cifar_root):
    s = data.load_splits("cifar10", root=cifar_root, seed=3)
    assert (len(s.train), len(s.calibration), len(s.test)) == (90, 10, 20)
    assert s.info.num_classes == 10 and s.info.class_names[3] == "c3"
    assert not set(s.train_indices) & set(s.calibration_indices)
    for split, idx in ((s.train, s.train_indices), (s.calibration, s.calibration_indices)):
        assert torch.equal(split.images[:, 0, 0, 0].long(), torch.as_tensor(idx))
        assert torch.equal(split.labels, torch.as_tensor(idx) % 10)
    assert torch.equal(s.test.labels, (torch.arange(20) + 1) % 10)
    assert sorted(s.calibration.labels.tolist()) == list(range(10))  # stratified: one per class
    x, y = s.test[7]
    m, sd = s.info.mean, s.info.std
    assert y == 8
    assert x[0, 0, 0].item() == pytest.approx((7 / 255 - m[0]) / sd[0], abs=1e-5)
    assert x[1, 2, 3].item() == pytest.approx((200 / 255 - m[1]) / sd[1], abs=1e-5)
    assert x[2, 2, 3].item() == pytest.approx((0 - m[2]) / sd[2], abs=1e-5)


def test_cifar100_roundtrip(cifar_root):
    s = data.load_splits("cifar100", root=cifar_root)
    assert s.info.num_classes == 100 and len(s.test) == 10 and len(s.calibration) == 10
    assert torch.equal(s.train.labels, 20 * (torch.as_tensor(s.train_indices) % 5))
    assert torch.equal(s.train.images[:, 0, 0, 0].long(), torch.as_tensor(s.train_indices))


def test_cifar_augment_train_only(cifar_root):
    s = data.load_splits("cifar10", root=cifar_root, augment=True)
    assert s.augment and s.train.augment and not s.calibration.augment and not s.test.augment
    torch.manual_seed(0)
    views = torch.stack([s.train[0][0] for _ in range(20)])
    assert views.shape == (20, 3, 32, 32)
    assert (views - views[0]).abs().amax() > 0  # crops / flips differ
    assert torch.equal(data.to_tensors(s.train)[0][0], s.train._scale(s.train.images[0]))  # never augmented


def test_md5_checked_without_patch(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for f in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        _pickle(d / f, _batch(0, 2, "labels", lambda i: 0))
    with pytest.raises(UserError, match="md5"):
        data.load_splits("cifar10", root=tmp_path)


def _write_svhn(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)
    root = tmp_path / "svhn"
    root.mkdir()
    for split, n in (("train", 100), ("test", 12)):
        x = np.zeros((32, 32, 3, n), np.uint8)
        x[0, 0, 0] = np.arange(n)  # red, pixel (0, 0)
        x[2, 3, 1] = 200  # green, row 2, column 3
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # 1..10; 10 is the digit 0
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return tmp_path


def test_svhn_roundtrip(tmp_path, monkeypatch):
    _write_svhn(tmp_path, monkeypatch)
    s = data.load_splits("svhn", root=tmp_path, augment=True)
    assert not s.augment and not s.train.augment  # never flip house numbers
    assert (len(s.train), len(s.calibration), len(s.test)) == (90, 10, 12)
    idx = torch.as_tensor(s.train_indices)
    assert torch.equal(s.train.images[:, 0, 0, 0].long(), idx)
    assert torch.equal(s.train.labels, (idx % 10 + 1) % 10)
    assert s.test.labels[9].item() == 0 and s.test.labels[0].item() == 1
    x, _ = s.test[0]
    assert x[1, 2, 3].item() == pytest.approx((200 / 255 - s.info.mean[1]) / s.info.std[1], abs=1e-5)


# ----------------------------------------------------------------------------------------------
# the dataset contract, generated from the registry

# Every registered dataset needs a tiny copy in its real on-disk format here (None: needs no files).
FIXTURES = {"digits": None, "synthetic": None, "cifar10": _write_cifar, "cifar100": _write_cifar,
            "svhn": _write_svhn, "fashion_mnist": test_fashion.write_fixture}


@pytest.mark.parametrize("name", data.DATASETS.names())
def test_every_registered_dataset_keeps_the_contract(name, tmp_path, monkeypatch):
    assert name in FIXTURES, f"dataset {name!r} has no on-disk fixture: add a writer to FIXTURES in tests/test_data.py"
    write = FIXTURES[name]
    root = write(tmp_path, monkeypatch) if write else tmp_path
    assert data.DATASETS.help(name), f"dataset {name!r} has no one-line help (its docstring)"
    info = data.dataset_info(name)  # known without loading anything
    s = data.load_splits(name, root=root, seed=0)
    assert (s.info.name, s.info.num_classes, s.info.input_size, s.info.mean, s.info.std) == \
        (name, info.num_classes, info.input_size, info.mean, info.std)
    assert not set(s.train_indices) & set(s.calibration_indices)
    for split in (s.train, s.calibration, s.test):
        x, y = data.to_tensors(split)
        assert len(x) > 0 and x.dtype == torch.float32 and tuple(x.shape[1:]) == info.input_size
        assert int(y.min()) >= 0 and int(y.max()) < info.num_classes
    augmented = data.load_splits(name, root=root, augment=True)
    assert s.augment is False and augmented.augment == data.DATASETS.get(name).augment


# ----------------------------------------------------------------------------------------------
# synthetic and loaders


def test_synthetic_learnable():
    s = data.load_splits("synthetic", seed=0, num_classes=4, n=240, image_size=16)
    assert s.info == data.dataset_info("synthetic", num_classes=4, n=240, image_size=16)
    x, y = data.to_tensors(s.train)
    assert x.shape[1:] == (3, 16, 16)
    means = torch.stack([x[y == k].mean(0) for k in range(4)]).flatten(1)
    xt, yt = data.to_tensors(s.test)
    pred = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (pred == yt).float().mean() > 0.8  # chance is 0.25
    again = data.load_splits("synthetic", seed=0)
    assert torch.equal(again.test.images, s.test.images)


def test_make_loader_seeded(digits):
    order = lambda seed: torch.cat([y for _, y in data.make_loader(digits.train, 64, True, seed)])
    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    xb, yb = next(iter(data.make_loader(digits.test, 32, False)))
    assert xb.shape == (32, 3, 32, 32) and torch.equal(yb, digits.test.labels[:32])
