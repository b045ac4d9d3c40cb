"""pytest-benchmark: the harness's training loop against a minimal plain-PyTorch loop (``tox -e bench``).

One epoch of :func:`exitbench.benchmarks.training.train_backbone` (the loop every backbone and, through
``fit``, every method trains in: the harness's DataLoader over an in-memory split, autocast context, loss
read, cosine schedule) against one epoch of the shortest loop that trains the same way: the split's
images normalised once into a tensor, a seeded permutation sliced into batches, forward, loss, backward,
step. Same model (resnet18, standard stem, 1 x 32 x 32: the ``fashion`` matrix's backbone), same data (3,000
Fashion-MNIST training images when Debian's files are here, else synthetic images of the same shape),
batch size (128), optimiser (AdamW, lr 2e-3, weight decay 0.05) and schedule. Both epochs run side by
side, the order alternating, 6 pairs; the target (issue 20) is harness / minimal <= 1.10 on the CPU, read
as the median of the per-pair ratios with its IQR.

On a GPU (marked ``gpu``): the harness's epoch (the device-resident loader, crop + flip on the device, bf16
autocast) against a minimal GPU-resident loop doing the same (CIFAR ResNet-56, 3 x 32 px, batch 256, 10,000
CIFAR-shaped images); target <= 1.15.
"""

from __future__ import annotations

import copy
import math
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from exitbench.benchmarks.backbones import create_backbone
from exitbench.benchmarks.data import ImageDataset, load_splits, make_loader
from exitbench.benchmarks.training import make_optimizer, train_backbone
from exitbench.core.errors import UserError
from exitbench.core.spec import BackboneTraining

torch.set_num_threads(2)
N, BATCH, PAIRS = 3000, 128, 6


def _split() -> tuple[ImageDataset, str]:
    try:
        s = load_splits("fashion_mnist", seed=0, train_subset=N)
        return s.train, "fashion_mnist (Debian's files)"
    except UserError:
        s = load_splits("synthetic", seed=0, num_classes=10, n=2 * N, image_size=32, channels=1)
        return s.train, "synthetic 1x32x32 (Fashion-MNIST not installed)"


def _minimal_epoch(model: torch.nn.Module, budget: BackboneTraining, x: torch.Tensor, y: torch.Tensor,
                   g: torch.Generator, augment=None, amp: torch.dtype | None = None) -> None:
    batch = budget.batch_size
    opt = make_optimizer(list(model.parameters()), budget)  # as the harness: a fresh optimiser per fit
    steps = math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    perm = torch.randperm(len(x), generator=g).to(x.device)
    for i in range(0, len(x), batch):
        idx = perm[i:i + batch]
        xb = x[idx] if augment is None else augment(x[idx])
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def _paired_epochs(runs: dict, pairs: int, sync=lambda: None) -> dict[str, list[float]]:
    for run in runs.values():  # warm-up: allocator, kernels' first calls, cuDNN's choices
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(pairs):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            sync()
            t = time.perf_counter()
            runs[name]()
            sync()
            times[name].append(time.perf_counter() - t)
    return times


def _report(benchmark, times: dict, info: dict, target: float) -> dict:
    ratios = sorted(h / m for h, m in zip(times["harness"], times["minimal"]))
    q = statistics.quantiles(ratios, n=4)
    info = {**info, "harness_epoch_s": statistics.median(times["harness"]),
            "minimal_epoch_s": statistics.median(times["minimal"]), "ratio_median": statistics.median(ratios),
            "ratio_iqr": q[2] - q[0], "ratio_min": ratios[0], "ratio_max": ratios[-1], "target": target}
    benchmark.extra_info.update(info)
    print(f"\ntraining epoch ({info['data']}): harness {info['harness_epoch_s']:.2f} s, minimal "
          f"{info['minimal_epoch_s']:.2f} s; harness / minimal {info['ratio_median']:.3f} "
          f"(IQR {info['ratio_iqr']:.3f}, min {ratios[0]:.3f}, max {ratios[-1]:.3f}; target <= {target})")
    return info


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_harness_epoch_vs_minimal_gpu_resident_loop(benchmark):
    from exitbench.benchmarks.data import ImageDataset, crop_flip
    from exitbench.benchmarks.device import prepare

    device = torch.device("cuda")
    prepare(device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10000, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(10000) % 10
    split = ImageDataset(images, labels, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), augment=True)
    torch.manual_seed(0)
    harness_model = create_backbone("cifar_resnet56", 10, (3, 32, 32)).to(device)
    minimal_model = copy.deepcopy(harness_model)
    budget = BackboneTraining(epochs=1, batch_size=256, optimizer="sgd", lr=0.1, weight_decay=5e-4, precision="bf16")
    loader = make_loader(split, 256, True, seed=0, device=device)
    x, y = images.to(device), labels.to(device)
    mean, std = split.mean.to(device), split.std.to(device)

    def augment(xb: torch.Tensor) -> torch.Tensor:  # the same work the harness's loader does, written out
        n = len(xb)
        offsets, flips = torch.randint(0, 9, (n, 2), device=device), torch.rand(n, device=device) < 0.5
        return (crop_flip(xb.float() / 255, offsets, flips) - mean) / std

    runs = {"harness": lambda: train_backbone(harness_model, {"train": loader}, budget),
            "minimal": lambda: _minimal_epoch(minimal_model, budget, x, y, g, augment, torch.bfloat16)}
    benchmark.group = "training epoch on CUDA, cifar_resnet56 3x32x32, batch 256, bf16"
    times = benchmark.pedantic(_paired_epochs, args=(runs, 4, torch.cuda.synchronize), rounds=1, iterations=1)
    _report(benchmark, times, {"data": "10,000 CIFAR-shaped images on the GPU", "device": torch.cuda.get_device_name()},
            1.15)


def test_harness_epoch_vs_minimal_loop(benchmark):
    train, source = _split()
    torch.manual_seed(0)
    harness_model = create_backbone("resnet18", 10, (1, 32, 32), small_stem=False)
    minimal_model = copy.deepcopy(harness_model)
    budget = BackboneTraining(epochs=1, batch_size=BATCH)
    loader = make_loader(train, BATCH, True, seed=0)
    x, y = train.tensors()  # normalised once: the minimal loop's whole data path
    g = torch.Generator().manual_seed(0)
    runs = {"harness": lambda: train_backbone(harness_model, {"train": loader}, budget),
            "minimal": lambda: _minimal_epoch(minimal_model, budget, x, y, g)}
    benchmark.group = "training epoch, resnet18 1x32x32, batch 128"
    times = benchmark.pedantic(_paired_epochs, args=(runs, PAIRS), rounds=1, iterations=1)
    info = _report(benchmark, times, {"data": f"{len(x)} images, {source}", "threads": torch.get_num_threads()}, 1.10)
    assert info["harness_epoch_s"] > 0


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
