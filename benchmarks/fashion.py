"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017): 70,000 real 28x28 grayscale images of 10 kinds of clothing,
read from the original IDX files (``*-ubyte.gz``, or the same files uncompressed).

Where the files are looked for, in order: ``ROOT/fashion-mnist/`` (``ROOT`` is the dataset's ``root``,
default ``$EXITBENCH_DATA`` or ``~/.cache/exitbench/data``), ``ROOT/FashionMNIST/raw/`` (where torchvision
puts them), then Debian's package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``).
``download: true`` (or ``--download``) fetches the four files through torchvision into
``ROOT/fashion-mnist/``, checked against torchvision's md5 sums.

Geometry (docs/datasets.md): one channel, each image zero-padded by 2 px to 32 x 32 (the background is
black, so the padding is more background). At 32 px every backbone family the harness cuts sees the
geometry it has on CIFAR and SVHN: VGG's five 2x2 pools end at 1 x 1 (at 28 px the fifth would leave
nothing), the CIFAR ResNets and DenseNet-BC end on 8 x 8 maps, and a ViT with the small-image patch of 4
gets an 8 x 8 grid. Padding costs 31 % more MACs than 28 px; replicating the channel three times would
cost memory and stem MACs and add nothing.

Normalisation: the mean and standard deviation of every pixel of the official 60,000 training images
after padding (the test images never enter; the calibration split, held out of those 60,000, does:
two scalars carry no label information worth speaking of). A test recomputes them from the Debian files.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from exitbench.benchmarks.data import DataMissing, DatasetInfo, DatasetSpec, RawData
from exitbench.core.errors import UserError

NAME = "fashion_mnist"
FOLDER = "fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
OFFICIAL_SIZES = (60000, 10000)
SIDE, PAD = 28, 2
# over the 60,000 official training images, zero-padded to 32 px, on [0, 1] pixels (test_fashion.py recomputes)
MEAN, STD = 0.2190, 0.3318

_IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only type Fashion-MNIST uses


class DataCorrupt(UserError):
    """A dataset file that is there but cannot be what it claims to be (truncated, garbage, mismatched)."""


def _corrupt(path: Path, why: str) -> DataCorrupt:
    return DataCorrupt(f"dataset: {NAME} file {path} is corrupt ({why}); delete it and fetch a fresh copy with "
                       f"--download, or reinstall Debian's {DEBIAN_PACKAGE} (apt-get install --reinstall "
                       f"{DEBIAN_PACKAGE})")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The unsigned-byte array of an IDX file (gzip-compressed when its name ends in ``.gz``) with ``ndim``
    dimensions; anything else raises :class:`DataCorrupt` naming the file and what is wrong with it.

    IDX (LeCun's MNIST format): two zero bytes, the type code (0x08: unsigned byte), the number of
    dimensions, each dimension as a big-endian uint32, then the data in C order.
    """
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)  # checks the CRC: a flipped byte anywhere is caught
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise _corrupt(path, f"not a complete gzip file: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise _corrupt(path, f"bad IDX header {raw[:4].hex() or 'empty'}, expected 0000080{ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, "the IDX header is cut short")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise _corrupt(path, f"{len(raw)} bytes for dimensions {dims}, expected {expected}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def candidate_dirs(root: Path) -> list[Path]:
    """Where the files are looked for, in order."""
    return [root / FOLDER, root / "FashionMNIST" / "raw", DEBIAN_DIR]


def _file(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)


def find_files(root: Path) -> dict[str, Path] | None:
    """The four files from the first folder that holds all of them, or None."""
    for folder in candidate_dirs(root):
        found = {k: _file(folder, stem) for k, stem in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def download(root: Path) -> None:
    """Fetch the four gzip files through torchvision (its mirrors and md5 sums) into ``root/fashion-mnist``."""
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_url

    target = root / FOLDER
    md5 = dict(FashionMNIST.resources)
    for stem in FILES.values():
        name = f"{stem}.gz"
        errors = []
        for mirror in FashionMNIST.mirrors:
            try:
                download_url(f"{mirror}{name}", str(target), filename=name, md5=md5[name])
                break
            except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad md5 is a RuntimeError
                errors.append(f"{mirror}: {e}")
        else:
            raise UserError(f"dataset: downloading {NAME} into {target} failed ({'; '.join(errors)}); check the "
                            f"network, or install Debian's {DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE}) and "
                            "run without download") from None


def _images(path: Path) -> torch.Tensor:
    x = read_idx(path, 3)
    if x.shape[1:] != (SIDE, SIDE):
        raise _corrupt(path, f"images of {x.shape[1]}x{x.shape[2]} pixels, expected {SIDE}x{SIDE}")
    return F.pad(torch.from_numpy(x.copy()).unsqueeze(1), (PAD, PAD, PAD, PAD))  # uint8 [N, 1, 32, 32]


def _labels(path: Path, n_images: int, images: Path) -> torch.Tensor:
    y = read_idx(path, 1)
    if len(y) != n_images:
        raise _corrupt(path, f"{len(y)} labels for the {n_images} images of {images.name}")
    if len(y) and int(y.max()) >= len(CLASS_NAMES):
        raise _corrupt(path, f"label {int(y.max())} outside 0..{len(CLASS_NAMES) - 1}")
    return torch.from_numpy(y.astype(np.int64))


class FashionMNIST(DatasetSpec):
    """Fashion-MNIST (IDX files: $EXITBENCH_DATA/fashion-mnist or Debian's dataset-fashion-mnist), 1 x 32 px"""

    name = NAME
    augment = True  # crop + flip: clothes are left-right symmetric enough (the matrix decides)

    def info(self) -> DatasetInfo:
        return DatasetInfo(NAME, len(CLASS_NAMES), (1, SIDE + 2 * PAD, SIDE + 2 * PAD), (MEAN,), (STD,), CLASS_NAMES,
                           *OFFICIAL_SIZES)

    def load(self, root: Path, download_: bool) -> RawData:
        files = find_files(root)
        if files is None and download_:
            download(root)
            files = find_files(root)
        if files is None:
            looked = ", ".join(str(d) for d in candidate_dirs(root))
            raise DataMissing(f"dataset: {NAME} files ({FILES['train_images']}.gz and 3 more) not found in {looked}; "
                              f"install Debian's {DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE}), or pass "
                              "--download (download: true in the matrix) to fetch them")
        x, xt = _images(files["train_images"]), _images(files["test_images"])
        y = _labels(files["train_labels"], len(x), files["train_images"])
        yt = _labels(files["test_labels"], len(xt), files["test_images"])
        info = DatasetInfo(NAME, len(CLASS_NAMES), tuple(x.shape[1:]), (MEAN,), (STD,), CLASS_NAMES, len(x), len(xt))
        return RawData(info, x, y, xt, yt)


FASHION_MNIST = FashionMNIST()
