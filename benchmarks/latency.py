"""Timing protocol: the registered latency variants side by side (docs/measurement.md).

Every variant (``exitbench.benchmarks.variants``) runs on the same inputs, interleaved repeat by repeat,
and the order rotates (with two variants it alternates) so that drift in machine load and cache warmth
hit all alike. A repeat times one pass over a fixed set of batches; we report the median, IQR and p90 of
the per-batch time. Each variant's latency ratio is the median of its per-repeat paired ratios against
the backbone of the same repeat, which cancels load shared by a pair. A record whose IQR exceeds
``NOISY_IQR`` of its median is flagged ``noisy``. ``realisation = (1 - latency_ratio) / (1 - macs_ratio)``:
the share of the MACs saved on these very inputs that became wall-clock time saved;
``realisation_note`` says what its sign means.

Fairness (docs/measurement.md, "Latency protocol"): every timed request ends as a real one does, its
predictions read on the host (:func:`host_read`), so no variant overlaps one request with the next; a
record's batch size is the size really timed (a split smaller than the asked size is timed, and recorded,
at its own size); every variant that exits is checked against the offline trace and the record counts the
samples whose prediction or exit differ; on CUDA the timed region runs on the cell's device with cuDNN's
shape autotuning off (a compacted batch has a new shape at every exit; the backbone is timed the same way),
and the fast path is compared with the backbone run the same way (compiled or captured), its ratio to the
eager backbone kept beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from exitbench.benchmarks import lease
from exitbench.benchmarks.fast import FastPathUnavailable, buckets_for
from exitbench.benchmarks.variants import DEFAULT_VARIANTS, LATENCY_VARIANTS, LatencyVariant, Run
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


def host_read(out: object) -> None:
    """The end of a request: its predictions (the argmax of its logits) copied to the host, which waits for
    the device. Every variant's request ends here, so none runs ahead into the next request."""
    logits = out[0] if isinstance(out, tuple) else out
    if isinstance(logits, Tensor):
        logits.argmax(-1).cpu()


def _pass(runs: list[Run], device: torch.device) -> float:
    """Seconds for one pass over the batches, each request ending in :func:`host_read`: CUDA events on a GPU
    (recorded on the stream around the whole call, heads, gating and reads included), ``perf_counter``
    between synchronisations elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for run in runs:
            host_read(run())
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    _sync(device)
    start_s = time.perf_counter()
    for run in runs:
        host_read(run())
    _sync(device)
    return time.perf_counter() - start_s


@contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """The timed region's device settings: the device held exclusively (no other runner's cell works on it
    meanwhile, ``lease.timing``); on CUDA the cell's device is the current one (events, graphs and compiled
    kernels are made there, so ``cuda:1`` works) and cuDNN's shape autotuning is off (restored after)."""
    with lease.timing(device):
        if device.type != "cuda":
            yield
            return
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False
        try:
            with torch.cuda.device(device):
                yield
        finally:
            torch.backends.cudnn.benchmark = before


# The GPU protocol: kernels are asynchronous and clocks ramp up, so far more warm-up and repeats than on the
# CPU; the repeats stop at a time bound (after at least CPU's number) so that a slow variant cannot hold a
# cell for minutes.
GPU_WARMUP, GPU_REPEATS, GPU_SECONDS = 20, 100, 20.0


DEFAULT_BATCH_SIZES = {"cpu": (1, 32, 256), "cuda": (1, 64, 256, 1024)}  # the GPU's large ones where memory allows


def default_batch_sizes(device: torch.device) -> tuple[int, ...]:
    """Batch 1 and large batches: on CUDA 64, 256 and 1024, elsewhere 32 and 256."""
    return DEFAULT_BATCH_SIZES.get(device.type, DEFAULT_BATCH_SIZES["cpu"])


def effective_batch_sizes(batch_sizes: Sequence[int], n_images: int) -> list[int]:
    """The batch sizes really timed on ``n_images`` inputs: a size above ``n_images`` becomes ``n_images``
    (one batch of all of them), and sizes that coincide are timed once."""
    return list(dict.fromkeys(min(b, n_images) for b in batch_sizes if n_images > 0))


def protocol(device: torch.device, repeats: int, warmup: int) -> tuple[int, int, float | None]:
    """(repeats, warm-up passes, time bound in seconds or None) for ``device``: the CPU protocol as asked,
    on CUDA at least ``GPU_WARMUP`` warm-ups and ``GPU_REPEATS`` repeats or ``GPU_SECONDS``, whichever first."""
    if device.type == "cuda":
        return max(repeats, GPU_REPEATS), max(warmup, GPU_WARMUP), GPU_SECONDS
    return repeats, warmup, None


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
                    threads: int | None = None, variants: Sequence[str] = DEFAULT_VARIANTS,
                    expected: tuple[Tensor, Tensor] | None = None, notes: list[str] | None = None) -> list[dict]:
    """Time the registered latency ``variants`` (``backbone`` always among them, first) on ``images``
    for each batch size.

    For batch size b > 1 we use up to ``max_batches`` full batches (all the images, as one batch of their own
    size, when they are fewer than b: the record then says that size); at b = 1 the first
    ``max_samples_batch1`` samples one by one. Returns one record per (variant, batch size): the timing
    statistics, the latency ratio against the backbone (paired per repeat), ``simulation``, and for variants
    that exit the exit fractions on these inputs, the strict MACs ratio they imply and the realisation.
    ``expected``: the offline trace's (predictions, exit index) of ``images`` under the same policy; every
    exiting variant's record then counts the timed samples whose prediction or exit differ from it. A fast
    variant that cannot be built at a batch size (out of memory, a failed capture) is left out there, with a
    line in ``notes``.
    """
    with num_threads(threads), on_device(images.device):
        chosen = [LATENCY_VARIANTS.get(v) for v in dict.fromkeys(["backbone", *variants])]
        fast = {v.fast for v in chosen if v.fast and v.exits}
        chosen += [LATENCY_VARIANTS.get(f"backbone-{m}") for m in sorted(fast)  # what the fast path is set against
                   if f"backbone-{m}" not in {v.name for v in chosen}]
        return _measure(backbone, net, policy, images, strict_costs, batch_sizes, repeats, warmup,
                        max_samples_batch1, max_batches, chosen, expected, notes if notes is not None else [])


def _side_by_side(runs: dict[str, list[Run]], device: torch.device, repeats: int, warmup: int,
                  bound: float | None) -> dict[str, list[float]]:
    """Seconds per pass of each named set of runs: warm-ups, then repeats interleaved, the order rotating
    (with two: alternating), until ``repeats`` or the time ``bound`` (after at least 5 full rounds)."""
    for _ in range(warmup):
        for r in runs.values():
            _pass(r, device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    began = time.perf_counter()
    for i in range(repeats):
        for name in order[i % len(order):] + order[:i % len(order)]:
            times[name].append(_pass(runs[name], device))
        if bound is not None and i + 1 >= 5 and time.perf_counter() - began > bound:
            break
    return times


def _timed_batches(images: Tensor, b: int, max_samples_batch1: int, max_batches: int) -> tuple[list[Tensor], int]:
    """The batches timed at batch size ``b`` (at most ``len(images)``: :func:`effective_batch_sizes`) and how
    many samples they hold (see :func:`measure_latency`)."""
    n = min(len(images), max_samples_batch1) if b == 1 else max(1, min(len(images) // b, max_batches)) * b
    return list(torch.split(images[:n], b)), n


def _common(b: int, batches: list[Tensor], n: int, images: Tensor, warmup: int, requested: int) -> dict:
    device = images.device
    common = {"batch_size": b, "n_batches": len(batches), "samples": n, "device": str(device),
              "dtype": str(images.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "warmup": warmup, "timer": "cuda events" if device.type == "cuda" else "perf_counter",
              "host_read": "predictions per request"}
    if device.type == "cuda":
        common["cudnn_benchmark"] = torch.backends.cudnn.benchmark  # off in the timed region (on_device)
    if requested != b:
        common["requested_batch_size"] = requested
    return common


@torch.no_grad()
def measure_static(model: nn.Module, references: dict[str, nn.Module], images: Tensor, macs: int,
                   reference_macs: dict[str, int], *, batch_sizes: Sequence[int] = (1, 256), repeats: int = 5,
                   warmup: int = 2, max_samples_batch1: int = 32, max_batches: int = 1,
                   threads: int | None = None) -> list[dict]:
    """Time a static baseline ``model`` side by side with each of its ``references`` (the backbones whose
    panels it appears in), one pair at a time, under the same protocol as :func:`measure_latency`. One record
    per (reference, batch size), variant ``static``: the model's own timing statistics, its paired latency
    ratio against that reference (``against``), the MACs ratio and the realisation that implies."""
    with num_threads(threads), on_device(images.device):
        device = images.device
        reps, warm, bound = protocol(device, repeats, warmup)
        model.eval()
        records = []
        for name, ref in references.items():
            ref.eval()
            for asked, b in _sizes(batch_sizes, images):
                batches, n = _timed_batches(images, b, max_samples_batch1, max_batches)
                runs = {"reference": _plain_runs(ref, batches), "static": _plain_runs(model, batches)}
                try:
                    times = _side_by_side(runs, device, reps, warm, bound)
                except torch.cuda.OutOfMemoryError:  # as in measure_latency: a batch size that does not fit
                    torch.cuda.empty_cache()
                    continue
                ratio = statistics.median(t / r for t, r in zip(times["static"], times["reference"]))
                macs_ratio = macs / reference_macs[name]
                records.append({"variant": "static", **_common(b, batches, n, images, warm, asked),
                                **_stats(times["static"], len(batches)), "against": name, "latency_ratio": ratio,
                                "ratio_of": "median of per-repeat paired ratios", "macs_ratio_strict": macs_ratio,
                                "realisation": realisation(ratio, macs_ratio),
                                "realisation_note": realisation_note(ratio, macs_ratio)})
        return records


def _sizes(batch_sizes: Sequence[int], images: Tensor) -> list[tuple[int, int]]:
    """(asked, timed) batch sizes: the device's defaults when none are asked; see :func:`effective_batch_sizes`."""
    asked = list(batch_sizes or default_batch_sizes(images.device))
    timed = [min(b, len(images)) for b in asked]
    keep = effective_batch_sizes(asked, len(images))
    return [(asked[timed.index(b)], b) for b in keep]


def _plain_runs(model: nn.Module, batches: list[Tensor]) -> list[Run]:
    return LATENCY_VARIANTS.get("backbone").prepare(model, None, None, batches)


def _outcome(v: LatencyVariant, runs: list[Run]) -> tuple[Tensor, Tensor] | None:
    """(predictions, exit index) of an exiting variant over its prepared ``runs`` (an untimed pass), else None."""
    if not v.exits:
        return None
    outs = [run() for run in runs]
    return torch.cat([o[0].argmax(-1) for o in outs]).cpu(), torch.cat([o[1] for o in outs]).cpu()


def _measure(backbone: nn.Module, net: MultiExitNet, policy: Policy, images: Tensor, strict_costs: Sequence[float],
             batch_sizes: Sequence[int], repeats: int, warmup: int, max_samples_batch1: int,
             max_batches: int, variants: list[LatencyVariant], expected: tuple[Tensor, Tensor] | None,
             notes: list[str]) -> list[dict]:
    device = images.device
    repeats, warmup, bound = protocol(device, repeats, warmup)
    backbone.eval()
    net.eval()
    costs = torch.tensor(strict_costs, dtype=torch.float64)
    records: list[dict] = []
    for asked, b in _sizes(batch_sizes, images):
        try:
            records += _at_batch_size(b, asked, backbone, net, policy, images, costs, repeats, warmup, bound,
                                      max_samples_batch1, max_batches, variants, expected, notes)
        except torch.cuda.OutOfMemoryError:  # "where memory allows": a batch size that does not fit is left out
            torch.cuda.empty_cache()
            notes.append(f"batch {b}: out of memory on {device}; not timed")
    return records


def _prepare(variants: list[LatencyVariant], backbone: nn.Module, net: MultiExitNet, policy: Policy,
             batches: list[Tensor], b: int, notes: list[str]) -> dict[str, list[Run]]:
    """Every variant's runs for these batches (builds happen here, untimed). A fast variant (or its backbone)
    that cannot be built is left out at this batch size with a note, its partner with it."""
    runs: dict[str, list[Run]] = {}
    dropped: set[str] = set()
    if any(v.fast == "compile" for v in variants):
        torch._dynamo.reset()  # nothing compiled for an earlier net or batch size is reused or counted against limits
    for v in variants:
        mode = v.fast
        if mode in dropped:
            continue
        try:
            runs[v.name] = v.prepare(backbone, net, policy, batches)
        except FastPathUnavailable as e:
            if mode is None:
                raise
            dropped.add(mode)
            notes.append(f"batch {b}: {mode} fast path left out ({e})")
    return {k: r for k, r in runs.items() if LATENCY_VARIANTS.get(k).fast not in dropped}


def _at_batch_size(b: int, asked: int, backbone: nn.Module, net: MultiExitNet, policy: Policy, images: Tensor,
                   costs: Tensor, repeats: int, warmup: int, bound: float | None, max_samples_batch1: int,
                   max_batches: int, variants: list[LatencyVariant], expected: tuple[Tensor, Tensor] | None,
                   notes: list[str]) -> list[dict]:
    device = images.device
    records: list[dict] = []
    batches, n = _timed_batches(images, b, max_samples_batch1, max_batches)
    runs = _prepare(variants, backbone, net, policy, batches, b, notes)
    variants = [v for v in variants if v.name in runs]
    outcome = {v.name: _outcome(v, runs[v.name]) for v in variants}
    with _no_recompile(any(v.fast == "compile" for v in variants)):
        times = _side_by_side(runs, device, repeats, warmup, bound)
    common = _common(b, batches, n, images, warmup, asked)
    for v in variants:
        rec = {"variant": v.name, **common, **_stats(times[v.name], len(batches)), "simulation": v.simulation}
        if v.fast:
            rec["fast"] = v.fast
        if v.fast and v.exits:
            rec["buckets"] = list(buckets_for(max(len(x) for x in batches)))
        if v.name != "backbone":
            rec.update(_ratio(v, times))
        if outcome[v.name] is not None:
            preds, exit_idx = outcome[v.name]
            fractions = torch.bincount(exit_idx, minlength=net.num_exits).double() / len(exit_idx)
            macs_ratio, ratio = float(fractions @ costs), rec["latency_ratio"]
            rec.update({"macs_ratio_strict": macs_ratio, "realisation": realisation(ratio, macs_ratio),
                        "realisation_note": realisation_note(ratio, macs_ratio),
                        "exit_fractions": fractions.tolist()})
            if expected is not None:
                want_preds, want_exits = expected[0][:n].cpu(), expected[1][:n].cpu()
                rec.update(checked=n, differ_predictions=int((preds != want_preds).sum()),
                           differ_exits=int((exit_idx != want_exits).sum()))
        records.append(rec)
    return records


def _ratio(v: LatencyVariant, times: dict[str, list[float]]) -> dict:
    """A variant's latency ratio: the median of its per-repeat ratios to the backbone of the same repeat; the
    fast path's to the backbone run the same way (compiled or captured), with the eager ratio beside it."""
    paired = lambda ref: statistics.median(t / r for t, r in zip(times[v.name], times[ref]))
    fast_path = v.fast is not None and v.exits
    against = f"backbone-{v.fast}" if fast_path else "backbone"
    rec = {"latency_ratio": paired(against), "ratio_of": "median of per-repeat paired ratios"}
    if fast_path:
        rec.update(against=against, latency_ratio_eager=paired("backbone"))
    return rec


@contextmanager
def _no_recompile(on: bool) -> Iterator[None]:
    """While compiled code is timed, a recompilation is an error instead of a silent fall back to eager."""
    if not on:
        yield
        return
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
