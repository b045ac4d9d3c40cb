"""Datasets and the three disjoint splits every cell uses: train, calibration, test.

Registry: ``digits`` (default; scikit-learn's 1,797 real 8x8 digits, shipped with the package, no
download), ``fashion_mnist`` (the original IDX files, ``exitbench.benchmarks.fashion``), ``cifar10``,
``cifar100``, ``svhn`` (torchvision, from ``root``) and ``synthetic`` (for tests).

Every split is held in memory as an :class:`ImageDataset` (uint8 or [0, 1] float images, normalised on
access), so a split materialises with one vectorised op (:func:`to_tensors`) and no PIL round trip.

Splits (docs/measurement.md, "Accuracy"): seeded, stratified (sklearn ``train_test_split``) and disjoint.
Calibration is held out of the training data; datasets with an official test set use it as ``test``,
the others (digits, synthetic) split a stratified test set off first with ``test_fraction``. Every dataset
takes ``train_subset``: a seeded, stratified subset of that many training images (calibration and test
are not touched), so that a CPU-sized matrix can run on a large dataset.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from exitbench.core.errors import UserError, did_you_mean
from exitbench.core.registry import Registry

DEFAULT_DATASET = "digits"
CALIBRATION_FRACTION, TEST_FRACTION = 0.1, 0.3  # the split options' defaults


@dataclass(frozen=True)
class DatasetInfo:
    """What a backbone needs to know about a dataset; ``mean``/``std`` are per channel, on [0, 1] pixels."""

    name: str
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None
    # images in the official train and test files (test 0: the harness cuts a test split from train); known
    # without the files, for `exitbench plan`'s estimates
    train_samples: int | None = None
    test_samples: int | None = None


class ImageDataset(Dataset):
    """In-memory images [N, C, H, W] (uint8 0..255 or float 0..1) and labels [N].

    ``__getitem__`` returns ``(normalised float image [C, H, W], int label)``. With ``augment`` it first
    applies a random crop (zero padding 4, i.e. black, as torchvision's ``RandomCrop``) and a horizontal
    flip; the randomness comes from torch's global RNG, which DataLoader workers seed from the loader's
    generator and the training loop seeds with ``torch.manual_seed`` in the main process.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                 *, augment: bool = False):
        self.images, self.labels, self.augment = images, labels.long(), augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def _scale(self, x: Tensor) -> Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.images[i]
        if self.augment:
            h, w = x.shape[-2:]
            x = F.pad(x, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            x = x[:, top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return self._scale(x), int(self.labels[i])

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All images normalised (never augmented) and labels, in one vectorised op."""
        return self._scale(self.images), self.labels


@dataclass
class Splits:
    """The three disjoint splits and the indices that made them.

    ``train_indices`` and ``calibration_indices`` index the dataset's training pool (the official train
    set, or for digits/synthetic the whole dataset); ``test_indices`` index the official test set, or
    the whole dataset for digits/synthetic. ``augment`` says whether train really is augmented.
    """

    train: ImageDataset
    calibration: ImageDataset
    test: ImageDataset
    info: DatasetInfo
    train_indices: np.ndarray
    calibration_indices: np.ndarray
    test_indices: np.ndarray
    augment: bool = False


@dataclass
class RawData:
    """What a loader returns: images [N, C, H, W] (uint8 or float in [0, 1]) and labels, plus the official
    test set when the dataset has one."""

    info: DatasetInfo
    images: Tensor
    labels: Tensor
    test_images: Tensor | None = None  # official test set, when the dataset has one
    test_labels: Tensor | None = None


# ----------------------------------------------------------------------------------------------
# Datasets: each a DatasetSpec registered in DATASETS

DIGITS_NAMES = tuple(str(d) for d in range(10))
# Fixed constants rather than train-split statistics, so DatasetInfo does not depend on the seed:
# the mean/std of all 1,797 images after the 32 px bilinear upscale (0.3053 / 0.3236; a test recomputes
# them). Two scalars carry no label information worth speaking of.
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3236


class DatasetSpec:
    """A registered dataset: its :class:`DatasetInfo` without loading, its loader, the options it takes,
    and whether its train split may be augmented with crop + flip.

    Subclass it, set ``name`` and ``options`` (option -> (type, default)), implement ``info`` and
    ``load``, and register an instance in ``DATASETS`` (or declare it in the ``exitbench.datasets``
    entry-point group). ``load`` returns a :class:`RawData`; missing files raise :class:`UserError`.
    """

    name: str = ""
    options: dict[str, tuple[type, Any]] = {}
    augment: bool = False  # random crop + horizontal flip make sense (never for digits or house numbers)

    def info(self, **options: Any) -> DatasetInfo:
        raise NotImplementedError

    def load(self, root: Path, download: bool, **options: Any) -> RawData:
        raise NotImplementedError

    def check(self, options: dict[str, Any]) -> None:
        """Raise :class:`UserError` for option values out of range (types are checked already)."""


class Digits(DatasetSpec):
    """scikit-learn's 8x8 digits (1,797 images), upscaled to 32 px, embedded: needs no files."""

    name = "digits"

    def info(self) -> DatasetInfo:
        return DatasetInfo("digits", 10, (3, 32, 32), (DIGITS_MEAN,) * 3, (DIGITS_STD,) * 3, DIGITS_NAMES, 1797, 0)

    def load(self, root: Path, download: bool) -> RawData:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16  # pixels are 0..16
        x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp_(0, 1)
        return RawData(self.info(), x.expand(-1, 3, -1, -1).contiguous(), torch.tensor(d.target))


class Synthetic(DatasetSpec):
    """Generated class prototypes plus per-sample noise (options num_classes, n, image_size, channels, noise): tests."""

    name = "synthetic"
    options = {"num_classes": (int, 4), "n": (int, 240), "image_size": (int, 16), "noise": (float, 0.5),
               "channels": (int, 3)}

    def info(self, num_classes: int = 4, n: int = 240, image_size: int = 16, noise: float = 0.5,
             channels: int = 3) -> DatasetInfo:
        return DatasetInfo("synthetic", num_classes, (channels, image_size, image_size), (0.5,) * channels,
                           (0.25,) * channels, tuple(f"class{k}" for k in range(num_classes)), train_samples=n,
                           test_samples=0)

    def check(self, options: dict[str, Any]) -> None:
        o = {k: d for k, (_, d) in self.options.items()} | options
        if (o["num_classes"] < 2 or o["image_size"] < 4 or o["noise"] < 0 or o["n"] < 4 * o["num_classes"]
                or o["channels"] < 1):
            raise UserError(f"dataset: synthetic needs num_classes >= 2, image_size >= 4, channels >= 1, noise >= 0 "
                            f"and n >= 4 * num_classes; got {o}")

    def load(self, root: Path, download: bool, num_classes: int = 4, n: int = 240, image_size: int = 16,
             noise: float = 0.5, channels: int = 3) -> RawData:
        # A smooth random prototype per class plus Gaussian noise whose scale varies per sample (0.2..1.2 x
        # ``noise``), so some samples are easy and some hard, as an early-exit benchmark needs. The data is
        # fixed (generator seed 0); the split seed only decides which sample goes to which split.
        g = torch.Generator().manual_seed(0)
        protos = F.interpolate(torch.rand(num_classes, channels, 4, 4, generator=g), size=image_size,
                               mode="bilinear", align_corners=False)
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]
        scale = noise * (0.2 + torch.rand(n, 1, 1, 1, generator=g))
        x = (protos[labels] + scale * torch.randn(n, channels, image_size, image_size, generator=g)).clamp_(0, 1)
        return RawData(self.info(num_classes, n, image_size, noise, channels), x, labels)


class DataMissing(UserError):
    """A dataset's files are not on this machine (``exitbench validate`` warns instead of failing)."""


def _missing(name: str, expected: list[Path]) -> UserError:
    absent = [str(p) for p in expected if not p.exists()]
    what = f"not found at {', '.join(absent)}" if absent else \
        f"failed their md5 check (corrupted or incomplete) at {', '.join(map(str, expected))}"
    return DataMissing(f"dataset: {name} files {what}; pass `download: true` in the matrix (or --download) to "
                     f"fetch them, or put the official archive's contents there")


class Torchvision(DatasetSpec):
    """A torchvision dataset in its official on-disk format (CIFAR-10/100 python pickles, SVHN .mat files)."""

    def __init__(self, name: str, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...],
                 augment: bool, help: str, sizes: tuple[int, int]):
        self.name, self.num_classes, self.mean, self.std, self.augment = name, num_classes, mean, std, augment
        self.sizes = sizes  # images in the official (train, test) files
        self.__doc__ = help

    def info(self) -> DatasetInfo:
        # class names come with the files
        return DatasetInfo(self.name, self.num_classes, (3, 32, 32), self.mean, self.std, None, *self.sizes)

    def load(self, root: Path, download: bool) -> RawData:
        import torchvision.datasets as tvd

        name = self.name
        if name == "svhn":
            root = root / "svhn"
            expected = [root / "train_32x32.mat", root / "test_32x32.mat"]
            make = lambda train: tvd.SVHN(str(root), split="train" if train else "test", download=download)
        else:
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            expected = [root / cls.base_folder]
            make = lambda train: cls(str(root), train=train, download=download)
        try:
            train, test = make(True), make(False)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            raise _missing(name, expected) from None
        except OSError as e:  # no network, disk full, ...
            raise UserError(f"dataset: downloading {name} into {root} failed ({e}); check the network, or put the "
                            f"official files at {', '.join(map(str, expected))} and run without download") from None

        def arrays(ds: Any) -> tuple[Tensor, Tensor]:
            if name == "svhn":  # already [N, C, H, W]; torchvision maps label 10 to digit 0
                return torch.from_numpy(np.ascontiguousarray(ds.data)), torch.as_tensor(ds.labels)
            return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(ds.targets)

        (x, y), (xt, yt) = arrays(train), arrays(test)
        classes = DIGITS_NAMES if name == "svhn" else tuple(train.classes)
        return RawData(DatasetInfo(name, len(classes), (3, 32, 32), self.mean, self.std, classes, len(x), len(xt)),
                       x, y, xt, yt)


DATASETS: Registry[DatasetSpec] = Registry("dataset", base=DatasetSpec, group="exitbench.datasets", field="dataset")
DATASETS.register("digits", Digits())
# Per-channel training-set statistics on [0, 1] pixels (pixel-level std, as commonly published).
DATASETS.register("cifar10", Torchvision("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True,
                                         "CIFAR-10 (torchvision files; crop + flip augmentation allowed)",
                                         (50000, 10000)))
DATASETS.register("cifar100", Torchvision("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True,
                                          "CIFAR-100 (torchvision files; crop + flip augmentation allowed)",
                                          (50000, 10000)))
DATASETS.register("svhn", Torchvision("svhn", 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False,
                                      "SVHN cropped digits (torchvision .mat files; never flipped)", (73257, 26032)))
DATASETS.register("synthetic", Synthetic())
DATASETS.register("fashion_mnist", "exitbench.benchmarks.fashion:FASHION_MNIST")  # lazy: its module imports this one


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return sorted(DATASETS.names())


def default_root() -> Path:
    """Where torchvision datasets live: ``$EXITBENCH_DATA`` or ``~/.cache/exitbench/data``."""
    return Path(os.environ.get("EXITBENCH_DATA") or "~/.cache/exitbench/data").expanduser()


def _check(name: str, options: dict[str, Any]) -> DatasetSpec:
    spec = DATASETS.get(name)
    allowed = spec.options
    for key, value in options.items():
        if key not in allowed:
            hint = did_you_mean(key, list(allowed)) if allowed else f"{name} takes no options"
            raise UserError(f"dataset.{key}: unknown option for {name}; {hint}")
        kind = allowed[key][0]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise UserError(f"dataset.{key}: expected {kind.__name__}, got {value!r}")
    spec.check(options)
    return spec


def dataset_info(name: str = DEFAULT_DATASET, **options: Any) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` without loading any data (for building backbones)."""
    return _check(name, options).info(**options)


def _split(labels: np.ndarray, indices: np.ndarray, held_out: float | int, seed: int, field: str, value: Any):
    """(kept, held out) of ``indices``, stratified and seeded; ``held_out`` is a fraction or a count."""
    from sklearn.model_selection import train_test_split  # lazy: sklearn adds ~1.5 s to every CLI start

    try:
        return train_test_split(indices, test_size=held_out, random_state=seed, stratify=labels[indices])
    except ValueError as e:  # a class too rare, or fewer held-out samples than classes
        raise UserError(f"{field}: cannot make a stratified split of {len(indices)} samples "
                        f"({len(np.unique(labels))} classes) with {field}={value} ({e}); use more data or "
                        f"a larger {field}") from None


def split_sizes(info: DatasetInfo, calibration_fraction: float = CALIBRATION_FRACTION,
                test_fraction: float = TEST_FRACTION) -> tuple[int, int, int]:
    """(train, calibration, test) images of the splits :func:`load_splits` makes from the dataset's official
    files, before any ``train_subset`` (sklearn's rounding: the held-out side gets ``ceil(fraction * n)``)."""
    pool, test = info.train_samples or 0, info.test_samples or 0
    if not test:  # no official test set: it is split off the whole dataset first
        test = math.ceil(test_fraction * pool)
        pool -= test
    calibration = math.ceil(calibration_fraction * pool)
    return pool - calibration, calibration, test


def check_split(name: str, info: DatasetInfo, calibration_fraction: float = CALIBRATION_FRACTION,
                test_fraction: float = TEST_FRACTION, train_subset: int | None = None, where: str = "dataset") -> None:
    """Raise :class:`UserError` (naming ``where``.field) for split options of the wrong type or range: fractions
    strictly between 0 and 1, ``train_subset`` a whole number from the number of classes up to the train split."""
    for field, f in (("calibration_fraction", calibration_fraction), ("test_fraction", test_fraction)):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise UserError(f"{where}.{field}: must be a number between 0 and 1 (exclusive), got {f!r}")
    if train_subset is None:
        return
    if isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < info.num_classes:
        raise UserError(f"{where}.train_subset: must be a whole number of training images, at least one per class "
                        f"({info.num_classes}), got {train_subset!r}; drop it to train on the whole split")
    available = split_sizes(info, calibration_fraction, test_fraction)[0]
    if info.train_samples and train_subset > available:
        raise UserError(f"{where}.train_subset: {train_subset} is more than {name}'s train split ({available} images "
                        f"once calibration_fraction {calibration_fraction:g} is held out); use at most {available}, "
                        "or drop it to train on the whole split")


def load_splits(name: str = DEFAULT_DATASET, *, root: str | Path | None = None, seed: int = 0,
                calibration_fraction: float = CALIBRATION_FRACTION, test_fraction: float = TEST_FRACTION,
                download: bool = False, augment: bool = False, train_subset: int | None = None, **options: Any
                ) -> Splits:
    """Load dataset ``name`` and cut it into seeded, stratified, disjoint train / calibration / test.

    ``calibration_fraction`` of the training pool is held out as calibration. ``test_fraction`` is used
    only by datasets without an official test set (digits, synthetic), and is taken first, from the whole
    dataset. ``train_subset`` keeps that many training images (seeded by ``seed``, stratified), after
    calibration is held out. ``root`` (default :func:`default_root`) holds the dataset files; they are
    downloaded only with ``download=True``, otherwise missing files raise :class:`UserError` naming where
    they were looked for. ``augment`` adds random crop (pad 4) + horizontal flip to the train split of
    datasets that allow it (see ``Splits.augment``). ``options`` are dataset-specific (synthetic:
    ``num_classes``, ``n``, ``image_size``, ``noise``).
    """
    spec = _check(name, options)
    check_split(name, spec.info(**options), calibration_fraction, test_fraction, train_subset)
    raw = spec.load(Path(root).expanduser() if root is not None else default_root(), download, **options)
    labels = raw.labels.numpy()
    pool = np.arange(len(labels))
    if raw.test_images is None:
        pool, test_idx = _split(labels, pool, test_fraction, seed, "test_fraction", test_fraction)
        test_x, test_y = raw.images[test_idx], raw.labels[test_idx]
    else:
        test_idx = np.arange(len(raw.test_labels))
        test_x, test_y = raw.test_images, raw.test_labels
    train_idx, cal_idx = _split(labels, pool, calibration_fraction, seed, "calibration_fraction",
                                calibration_fraction)
    if train_subset is not None and train_subset < len(train_idx):
        # files smaller than the official ones (checked against those in check_split) are caught here
        train_idx = _split(labels, train_idx, len(train_idx) - train_subset, seed, "train_subset", train_subset)[0]
    elif train_subset is not None and train_subset > len(train_idx):
        raise UserError(f"dataset.train_subset: {train_subset} is more than the {len(train_idx)} training images of "
                        f"{name} found on disk; use at most {len(train_idx)}")
    aug = augment and spec.augment
    m, s = raw.info.mean, raw.info.std
    return Splits(
        train=ImageDataset(raw.images[train_idx], raw.labels[train_idx], m, s, augment=aug),
        calibration=ImageDataset(raw.images[cal_idx], raw.labels[cal_idx], m, s),
        test=ImageDataset(test_x, test_y, m, s),
        info=raw.info, train_indices=train_idx, calibration_indices=cal_idx, test_indices=test_idx, augment=aug)


def to_tensors(dataset: Dataset, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Materialise a split as (images [N, C, H, W] float, labels [N] long).

    An :class:`ImageDataset` is normalised in one op and never augmented; any other dataset is read
    through a DataLoader in order.
    """
    if isinstance(dataset, ImageDataset):
        return dataset.tensors()
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return torch.cat(xs), torch.cat(ys).long()


def crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, pad: int = 4) -> Tensor:
    """A batch's random crops and flips as tensor ops: each image ``x[i]`` zero-padded by ``pad``, the window
    at (``offsets[i, 0]``, ``offsets[i, 1]``) cut out, mirrored where ``flips[i]`` -- what
    :class:`ImageDataset` does sample by sample, for a whole batch at once on its device."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # [N, H]
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # [N, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)  # advanced indices first: [N, H, W, C] -> [N, C, H, W]


class DeviceLoader:
    """An in-memory split held on ``device``, batches gathered, augmented and normalised there: no worker
    processes, no per-sample Python, no host-to-device copy per batch. The shuffling order and the crop and
    flip draws come from a CPU generator seeded with ``seed`` (reproducible on any device); the data path a
    CUDA run trains through (:func:`make_loader`), recorded as :attr:`kind` in its training stats."""

    kind = "device-resident: batches gathered, augmented and normalised on the device"

    def __init__(self, dataset: ImageDataset, batch_size: int, shuffle: bool, seed: int, device: torch.device):
        self.images, self.labels = dataset.images.to(device), dataset.labels.to(device)
        self.mean, self.std = dataset.mean.to(device), dataset.std.to(device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, dataset.augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        n, device = len(self.labels), self.labels.device
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for idx in order.to(device).split(self.batch_size):
            x = self.images.index_select(0, idx)
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            if self.augment:
                draws = torch.randint(0, 9, (len(idx), 2), generator=self.generator)
                flips = torch.rand(len(idx), generator=self.generator) < 0.5
                x = crop_flip(x, draws.to(device), flips.to(device))
            yield (x - self.mean) / self.std, self.labels.index_select(0, idx)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
                device: torch.device | None = None) -> DataLoader | DeviceLoader:
    """The batches of a split. On a CUDA ``device`` an in-memory split is a :class:`DeviceLoader` (held and
    augmented on the GPU); otherwise a DataLoader whose shuffling order (and worker seeds) come from a
    generator seeded with ``seed`` (on CUDA, for other datasets: 2 workers into pinned memory)."""
    cuda = device is not None and device.type == "cuda"
    if cuda and isinstance(dataset, ImageDataset):
        return DeviceLoader(dataset, batch_size, shuffle, seed, device)
    workers = max(num_workers, 2) if cuda else num_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, pin_memory=cuda,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0)


__all__ = [
    "DATASETS", "DEFAULT_DATASET", "DatasetInfo", "DatasetSpec", "DeviceLoader", "ImageDataset", "RawData", "Splits",
    "check_split", "crop_flip", "dataset_info", "default_root", "list_datasets", "load_splits", "make_loader",
    "split_sizes", "to_tensors",
]
