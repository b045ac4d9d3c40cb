"""Timing protocol for the real dynamic forward against the plain backbone (docs/measurement.md).

Both variants run on the same inputs, interleaved repeat by repeat, and the order alternates
(backbone first on even repeats, dynamic first on odd ones) so that drift in machine load and
cache warmth hit both alike. A repeat times one pass over a fixed set of batches; we report the
median, IQR and p90 of the per-batch time. The latency ratio is the median of the per-repeat
paired ratios (dynamic / backbone of the same repeat), which cancels load shared by a pair. A
record whose IQR exceeds ``NOISY_IQR`` of its median is flagged ``noisy``.
``realisation = (1 - latency_ratio) / (1 - macs_ratio)``: the share of the MACs saved on these
very inputs that became wall-clock time saved; ``realisation_note`` says what its sign means.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from exitbench.methods.base import MultiExitNet, Policy

NOISY_IQR = 0.10  # a record whose IQR exceeds this share of its median is flagged noisy


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block only; the caller's setting is restored."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(xs: Sequence[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q * 100) - 1] if len(xs) > 1 else xs[0]


def _pass(fn: Callable[[Tensor], object], batches: list[Tensor], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for b in batches:
        fn(b)
    _sync(device)  # around the whole call: heads and gating included
    return time.perf_counter() - start


def _stats(seconds: list[float], n_batches: int) -> dict:
    ms = [s * 1e3 / n_batches for s in seconds]
    median, iqr = statistics.median(ms), _quantile(ms, 0.75) - _quantile(ms, 0.25)
    return {"median_ms": median, "iqr_ms": iqr, "p90_ms": _quantile(ms, 0.90), "repeats": len(ms),
            "noisy": bool(iqr > NOISY_IQR * median)}


def realisation(latency_ratio: float, macs_ratio: float) -> float | None:
    """(1 - latency_ratio) / (1 - macs_ratio); None only when the MACs ratio is exactly 1 (undefined).
    See :func:`realisation_note` for how to read it when MACs or time went up."""
    return None if abs(1 - macs_ratio) < 1e-9 else (1 - latency_ratio) / (1 - macs_ratio)


def realisation_note(latency_ratio: float, macs_ratio: float) -> str:
    """A label for the realisation's sign: the number alone hides whether MACs or time went up."""
    if abs(1 - macs_ratio) < 1e-9:
        return "undefined: MACs ratio 1"
    saved_macs, saved_time = macs_ratio < 1, latency_ratio < 1
    if saved_macs:
        return "MACs and time saved" if saved_time else "slowdown although MACs were saved"
    return "MACs and time above the backbone" if not saved_time else "faster although MACs went up"


@torch.no_grad()
def measure_latency(backbone: nn.Module, net: MultiExitNet, policy: Policy, images: Tensor,
                    strict_costs: Sequence[float], *, batch_sizes: Sequence[int] = (1, 256), repeats: int = 5,
                    warmup: int = 2, max_samples_batch1: int = 32, max_batches: int = 1,
                    threads: int | None = None) -> list[dict]:
    """Time the plain backbone and ``net.forward_dynamic`` on ``images`` for each batch size.

    For batch size b > 1 we use up to ``max_batches`` full batches (one smaller batch when ``images``
    holds fewer than b); at b = 1 the first ``max_samples_batch1`` samples one by one. Returns one
    record per (variant, batch size); the dynamic record carries the exit fractions on these inputs,
    the strict MACs ratio they imply, the latency ratio and the realisation.
    """
    with num_threads(threads):
        return _measure(backbone, net, policy, images, strict_costs, batch_sizes, repeats, warmup,
                        max_samples_batch1, max_batches)


def _measure(backbone: nn.Module, net: MultiExitNet, policy: Policy, images: Tensor, strict_costs: Sequence[float],
             batch_sizes: Sequence[int], repeats: int, warmup: int, max_samples_batch1: int,
             max_batches: int) -> list[dict]:
    device = images.device
    backbone.eval()
    net.eval()
    records: list[dict] = []
    for b in batch_sizes:
        n = min(len(images), max_samples_batch1) if b == 1 else max(b, min(len(images) // b, max_batches) * b)
        batches = list(torch.split(images[:n], b))
        exit_idx = torch.cat([net.forward_dynamic(x, policy)[1] for x in batches])
        fractions = torch.bincount(exit_idx.cpu(), minlength=net.num_exits).double() / len(exit_idx)
        macs_ratio = float(fractions @ torch.tensor(strict_costs, dtype=torch.float64))
        run_backbone = backbone.__call__
        run_dynamic = lambda x: net.forward_dynamic(x, policy)
        for _ in range(warmup):
            _pass(run_backbone, batches, device)
            _pass(run_dynamic, batches, device)
        t_backbone, t_dynamic = [], []
        for i in range(repeats):
            if i % 2 == 0:  # alternate which variant goes first
                t_backbone.append(_pass(run_backbone, batches, device))
                t_dynamic.append(_pass(run_dynamic, batches, device))
            else:
                t_dynamic.append(_pass(run_dynamic, batches, device))
                t_backbone.append(_pass(run_backbone, batches, device))
        common = {"batch_size": b, "n_batches": len(batches), "samples": len(exit_idx), "device": str(device),
                  "dtype": str(images.dtype).removeprefix("torch."), "threads": torch.get_num_threads()}
        base = {"variant": "backbone", **common, **_stats(t_backbone, len(batches))}
        dyn = {"variant": "dynamic", **common, **_stats(t_dynamic, len(batches))}
        ratio = statistics.median(d / bk for d, bk in zip(t_dynamic, t_backbone))  # paired, per repeat
        dyn.update({"latency_ratio": ratio, "ratio_of": "median of per-repeat paired ratios",
                    "macs_ratio_strict": macs_ratio, "realisation": realisation(ratio, macs_ratio),
                    "realisation_note": realisation_note(ratio, macs_ratio), "exit_fractions": fractions.tolist()})
        records += [base, dyn]
    return records
