"""Fashion-MNIST: the loader on small files written here in the real IDX format (gzip and plain), every
kind of missing or corrupt file, the training subset, and -- where Debian's dataset-fashion-mnist is
installed -- the real files."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from exitbench.benchmarks import data, fashion
from exitbench.benchmarks.config import expand
from exitbench.cli import main
from exitbench.core.errors import UserError

UBYTE = 0x08


def write_idx(path: Path, array: np.ndarray, *, gz: bool = True) -> Path:
    """``array`` (uint8) as an IDX file: 0, 0, type 0x08, ndim, big-endian uint32 dims, the bytes in C order.
    Written by hand from the format's definition, not with the reader under test."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    raw = struct.pack(">BBBB", 0, 0, UBYTE, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_fashion(folder: Path, n_train: int = 100, n_test: int = 20, *, gz: bool = True) -> dict[str, Path]:
    """Tiny Fashion-MNIST files: image i has pixel (0, 0) = i % 256 and pixel (5, 7) = 200; labels i % 10
    (train) and (i + 3) % 10 (test)."""
    def images(n: int) -> np.ndarray:
        x = np.zeros((n, 28, 28), np.uint8)
        x[:, 0, 0] = np.arange(n) % 256
        x[:, 5, 7] = 200
        return x

    suffix = ".gz" if gz else ""
    arrays = {"train_images": images(n_train), "train_labels": np.arange(n_train) % 10,
              "test_images": images(n_test), "test_labels": (np.arange(n_test) + 3) % 10}
    return {k: write_idx(folder / f"{fashion.FILES[k]}{suffix}", a, gz=gz) for k, a in arrays.items()}


@pytest.fixture(autouse=True)
def no_debian(tmp_path, monkeypatch):
    """The tests decide what is on disk: Debian's folder is replaced by an empty one (test_debian_files
    restores it)."""
    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "debian-absent")


def write_fixture(tmp_path: Path, monkeypatch=None) -> Path:  # the dataset contract's writer (test_data.FIXTURES)
    write_fashion(tmp_path / "fashion-mnist")
    return tmp_path


def test_roundtrip_padding_labels_and_normalisation(tmp_path):
    write_fashion(tmp_path / "fashion-mnist")
    s = data.load_splits("fashion_mnist", root=tmp_path, seed=2)
    assert (len(s.train), len(s.calibration), len(s.test)) == (90, 10, 20)
    assert s.info.input_size == (1, 32, 32) and s.info.class_names[9] == "Ankle boot"
    assert s.info == data.DatasetInfo("fashion_mnist", 10, (1, 32, 32), (fashion.MEAN,), (fashion.STD,),
                                      fashion.CLASS_NAMES, 100, 20)
    for split, idx in ((s.train, s.train_indices), (s.calibration, s.calibration_indices)):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 32, 32)
        assert torch.equal(split.images[:, 0, 2, 2].long(), torch.as_tensor(idx))  # 2-px padding
        assert torch.equal(split.labels, torch.as_tensor(idx) % 10)
    assert sorted(s.calibration.labels.tolist()) == list(range(10))  # stratified
    assert torch.equal(s.test.labels, (torch.arange(20) + 3) % 10)
    x, _ = s.test[11]
    assert x.shape == (1, 32, 32)
    assert x[0, 2, 2].item() == pytest.approx((11 / 255 - fashion.MEAN) / fashion.STD, abs=1e-5)
    assert x[0, 7, 9].item() == pytest.approx((200 / 255 - fashion.MEAN) / fashion.STD, abs=1e-5)
    assert x[0, 0, :].eq(x[0, 0, 0]).all() and x[0, 0, 0].item() == pytest.approx(-fashion.MEAN / fashion.STD)


def test_plain_files_in_torchvisions_folder_and_lookup_order(tmp_path, monkeypatch):
    write_fashion(tmp_path / "FashionMNIST" / "raw", n_train=110, gz=False)  # as torchvision leaves them
    assert len(data.load_splits("fashion_mnist", root=tmp_path).test) == 20
    write_fashion(tmp_path / "fashion-mnist", n_train=120, n_test=30)  # ROOT/fashion-mnist comes first
    assert len(data.load_splits("fashion_mnist", root=tmp_path).test) == 30
    debian = tmp_path / "debian"
    write_fashion(debian, n_test=40)
    monkeypatch.setattr(fashion, "DEBIAN_DIR", debian)
    assert len(data.load_splits("fashion_mnist", root=tmp_path / "empty").test) == 40  # the Debian folder last


def test_default_root_is_exitbench_data(tmp_path, monkeypatch):
    monkeypatch.setenv("EXITBENCH_DATA", str(tmp_path / "d"))
    write_fashion(tmp_path / "d" / "fashion-mnist", n_test=10)
    assert len(data.load_splits("fashion_mnist").test) == 10


def test_missing_files_name_every_place_the_package_and_download(tmp_path):
    (tmp_path / "fashion-mnist").mkdir()
    write_idx(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz", np.zeros((10, 28, 28)))  # 1 of 4
    with pytest.raises(data.DataMissing) as e:
        data.load_splits("fashion_mnist", root=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "--download" in msg and "apt-get install dataset-fashion-mnist" in msg
    for folder in fashion.candidate_dirs(tmp_path):
        assert str(folder) in msg


def _gz_bytes(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


CORRUPTIONS = {
    # what is done to which file -> the words the error must contain
    "truncated gzip": ("train_images", lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]),
                       "not a complete gzip file"),
    "not gzip at all": ("test_labels", lambda p: p.write_bytes(b"<html>404</html>"), "not a complete gzip file"),
    "flipped byte (crc)": ("train_labels", lambda p: p.write_bytes(_flip(p.read_bytes())), "gzip"),
    "empty file": ("test_images", lambda p: p.write_bytes(b""), "bad IDX header"),
    "bad magic": ("train_images", lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + _gz_bytes(p)[4:])),
                  "bad IDX header"),
    "labels as images": ("train_labels", lambda p: write_idx(p, np.zeros((100, 28, 28))), "bad IDX header"),
    "data cut short": ("test_images", lambda p: p.write_bytes(gzip.compress(_gz_bytes(p)[:-5])), "bytes for"),
    "wrong image size": ("train_images", lambda p: write_idx(p, np.zeros((100, 32, 32))), "expected 28x28"),
    "label count": ("train_labels", lambda p: write_idx(p, np.arange(99) % 10), "99 labels for the 100 images"),
    "label range": ("test_labels", lambda p: write_idx(p, np.full(20, 12)), "label 12 outside 0..9"),
}


def _flip(gz: bytes) -> bytes:
    # a byte of the compressed stream changed in the middle: gzip's CRC (or the inflater) must catch it
    b = bytearray(gz)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_files_are_one_line_naming_the_file(tmp_path, case):
    which, corrupt, words = CORRUPTIONS[case]
    files = write_fashion(tmp_path / "fashion-mnist")
    corrupt(files[which])
    with pytest.raises(UserError) as e:
        data.load_splits("fashion_mnist", root=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(files[which]) in msg and words in msg and "--download" in msg, msg
    assert not isinstance(e.value, data.DataMissing)  # corrupt is an error, not "absent" (validate warns on absent)


def test_download_offline_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.utils as tvu

    def offline(url, root, filename=None, md5=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvu, "download_url", offline)
    with pytest.raises(UserError) as e:
        data.load_splits("fashion_mnist", root=tmp_path, download=True)
    msg = str(e.value)
    assert "\n" not in msg and "downloading fashion_mnist" in msg and "name resolution" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_download_fetches_into_root_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    source = tmp_path / "mirror"
    write_fashion(source)
    got = []

    def fake(url, root, filename=None, md5=None):  # what torchvision's download_url would leave behind
        got.append((url, md5))
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes((source / filename).read_bytes())

    monkeypatch.setattr(tvu, "download_url", fake)
    s = data.load_splits("fashion_mnist", root=tmp_path / "r", download=True)
    assert len(s.test) == 20 and len(got) == 4 and all(md5 and url.endswith(".gz") for url, md5 in got)
    assert (tmp_path / "r" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").exists()


# ------------------------------------------------------------------------------------- train_subset


def test_train_subset_is_seeded_stratified_and_leaves_the_held_out_splits(tmp_path):
    write_fashion(tmp_path / "fashion-mnist", n_train=400)
    full = data.load_splits("fashion_mnist", root=tmp_path, seed=0)
    sub = data.load_splits("fashion_mnist", root=tmp_path, seed=0, train_subset=50)
    again = data.load_splits("fashion_mnist", root=tmp_path, seed=0, train_subset=50)
    other = data.load_splits("fashion_mnist", root=tmp_path, seed=1, train_subset=50)
    assert len(sub.train) == 50 and set(sub.train_indices) <= set(full.train_indices)
    assert np.array_equal(sub.calibration_indices, full.calibration_indices)
    assert torch.equal(sub.test.labels, full.test.labels)
    assert np.array_equal(sub.train_indices, again.train_indices)
    assert not np.array_equal(sub.train_indices, other.train_indices)
    assert torch.bincount(sub.train.labels, minlength=10).tolist() == [5] * 10
    assert len(data.load_splits("fashion_mnist", root=tmp_path, train_subset=len(full.train)).train) == len(full.train)


def test_train_subset_larger_than_the_files_on_disk(tmp_path):
    write_fashion(tmp_path / "fashion-mnist")  # 90 training images on disk (the official 54,000 allowed)
    with pytest.raises(UserError, match="more than the 90 training images of fashion_mnist found on disk"):
        data.load_splits("fashion_mnist", root=tmp_path, train_subset=91)


def test_train_subset_on_every_dataset():
    s = data.load_splits("digits", seed=0, train_subset=200)
    assert len(s.train) == 200 and len(s.test) == 540
    assert data.split_sizes(data.dataset_info("digits")) == (1131, 126, 540)
    with pytest.raises(UserError, match="more than digits's train split .1131 images"):
        data.load_splits("digits", train_subset=1132)


MATRIX = {"backbones": ["test_resnet"], "methods": ["sdn"]}


@pytest.mark.parametrize("value, words", [
    (0, "at least one per class"), (-5, "at least one per class"), (9, "at least one per class (10)"),
    (2.5, "whole number"), ("6000", "whole number"), (True, "whole number"),
    (54001, "54001 is more than fashion_mnist's train split (54000 images once calibration_fraction 0.1"),
])
def test_bad_train_subset_is_caught_when_the_matrix_is_read(value, words):
    m = {**MATRIX, "datasets": [{"name": "fashion_mnist", "train_subset": value}]}
    with pytest.raises(UserError) as e:
        expand(m)
    assert str(e.value).startswith("datasets[0].train_subset:") and words in str(e.value), str(e.value)


def test_bad_split_options_are_caught_when_the_matrix_is_read():
    for entry, words in (({"calibration_fraction": 1.5}, "datasets[0].calibration_fraction"),
                         ({"calibration_fraction": "0.1"}, "datasets[0].calibration_fraction"),
                         ({"download": "yes"}, "datasets[0].download: expected true or false"),
                         ({"root": 3}, "datasets[0].root")):
        with pytest.raises(UserError, match=re.escape(words)):
            expand({**MATRIX, "datasets": [{"name": "fashion_mnist", **entry}]})


def test_train_subset_is_part_of_the_cells_identity():
    cells = [expand({**MATRIX, "datasets": [d]})[0]
             for d in ({"name": "fashion_mnist"}, {"name": "fashion_mnist", "train_subset": 6000},
                       {"name": "fashion_mnist", "train_subset": 3000})]
    assert len({c.key() for c in cells}) == 3
    assert cells[1].dataset_options == {"train_subset": 6000}


def test_cli_refuses_corrupt_files_before_anything_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXITBENCH_DATA", str(tmp_path / "data"))
    files = write_fashion(tmp_path / "data" / "fashion-mnist")
    files["train_labels"].write_bytes(b"garbage")
    matrix = tmp_path / "m.yaml"
    matrix.write_text("datasets: [fashion_mnist]\nbackbones: [test_resnet]\nmethods: [sdn]\n")
    out = tmp_path / "out"
    assert main(["run", str(matrix), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(files["train_labels"]) in err
    assert not list((out / "cells").glob("*.json")) and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------- the real files

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_debian_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion, "DEBIAN_DIR", DEBIAN)
    raw = fashion.FASHION_MNIST.load(tmp_path / "nothing-here", False)
    assert (len(raw.images), len(raw.test_images)) == fashion.OFFICIAL_SIZES
    assert raw.info == data.dataset_info("fashion_mnist")
    assert torch.bincount(raw.labels).tolist() == [6000] * 10
    assert torch.bincount(raw.test_labels).tolist() == [1000] * 10
    x = raw.images.double() / 255
    assert x.mean().item() == pytest.approx(fashion.MEAN, abs=1e-4)
    assert x.std().item() == pytest.approx(fashion.STD, abs=1e-4)
    s = data.load_splits("fashion_mnist", root=tmp_path / "nothing-here", seed=0, train_subset=6000,
                         calibration_fraction=0.05)
    assert (len(s.train), len(s.calibration), len(s.test)) == (6000, 3000, 10000)


def test_cli_refuses_a_train_subset_larger_than_the_split(tmp_path, capsys):
    matrix = tmp_path / "m.yaml"
    matrix.write_text("datasets: [{name: fashion_mnist, train_subset: 60000}]\nbackbones: [test_resnet]\n"
                      "methods: [sdn]\n")
    assert main(["run", str(matrix), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "datasets[0].train_subset: 60000 is more than" in err
    assert not (tmp_path / "cache").exists()
