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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from exitbench.benchmarks import lease
from exitbench.benchmarks.fast import FastPathUnavailable, buckets_for
from exitbench.benchmarks.variants import LATENCY_VARIANTS, LatencyVariant, Run
from exitbench.core.results import LatencyRecord
from exitbench.core.spec import DEFAULT_VARIANTS, Evaluation, timed_variants
from exitbench.methods.base import MultiExitNet, Policy

NOISY_IQR = 0.10  # a record whose IQR exceeds this share of its median is flagged noisy
PAIRED = "median of per-repeat paired ratios"  # how every latency ratio is formed (the records' ratio_of)


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


@dataclass(frozen=True)
class TimingProtocol:
    """How a cell is timed: one value, built once from the cell's ``Evaluation`` (:meth:`of`) or from the
    ``exitbench time`` options, and passed to every measurement of the cell (dynamic, static, accounting).

    ``batch_sizes`` empty: the device's (:func:`default_batch_sizes`). ``threads`` None: torch's current
    setting. ``variants`` and ``fast``: the latency variants and the fast path (``timed_variants``).
    ``max_samples_batch1`` and ``max_batches``: how many inputs one pass times (:meth:`batches`).
    ``inputs``: what the timed images are, written into every record. The device is not part of it: a
    measurement runs where the networks are."""

    enabled: bool = True
    batch_sizes: tuple[int, ...] = ()
    repeats: int = 5
    warmup: int = 2
    threads: int | None = None
    dtype: str = "float32"
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    fast: str = "none"
    max_samples_batch1: int = 32
    max_batches: int = 1
    inputs: str = "test split"

    @classmethod
    def of(cls, ev: Evaluation) -> TimingProtocol:
        """The protocol a cell's ``evaluation`` asks for."""
        return cls(enabled=ev.latency, batch_sizes=tuple(ev.latency_batch_sizes), repeats=ev.latency_repeats,
                   threads=ev.threads, dtype=ev.dtype, variants=tuple(ev.latency_variants), fast=ev.fast)

    @property
    def timed_variants(self) -> tuple[str, ...]:
        """The latency variants timed: ``variants``, plus the fast path when it is on."""
        return timed_variants(self.variants, self.fast)

    def on(self, device: torch.device) -> tuple[int, int, float | None]:
        """(repeats, warm-up passes, time bound in seconds or None) on ``device``: the CPU protocol as asked, on
        CUDA at least ``GPU_WARMUP`` warm-ups and ``GPU_REPEATS`` repeats or ``GPU_SECONDS``, whichever first."""
        if device.type == "cuda":
            return max(self.repeats, GPU_REPEATS), max(self.warmup, GPU_WARMUP), GPU_SECONDS
        return self.repeats, self.warmup, None

    def sizes(self, device: torch.device, n_images: int) -> list[tuple[int, int]]:
        """(asked, timed) batch sizes on ``n_images`` inputs: see :func:`effective_batch_sizes`."""
        asked = list(self.batch_sizes or default_batch_sizes(device))
        timed = [min(b, n_images) for b in asked]
        return [(asked[timed.index(b)], b) for b in effective_batch_sizes(asked, n_images)]

    def batches(self, images: Tensor, asked: int, b: int) -> Batches:
        """The batches timed at batch size ``b``: up to ``max_batches`` full batches (all the images, as one
        batch of their own size, when they are fewer than ``b``); at b = 1 the first ``max_samples_batch1``."""
        n = min(len(images), self.max_samples_batch1) if b == 1 else max(1, min(len(images) // b, self.max_batches)) * b
        return Batches(asked, b, list(torch.split(images[:n], b)), n)


@dataclass(frozen=True)
class Batches:
    """What one batch size times: the size ``asked`` for, the ``size`` timed (smaller when the split is), the
    batches and how many ``samples`` they hold."""

    asked: int
    size: int
    tensors: list[Tensor]
    samples: int


@dataclass(frozen=True)
class Measured:
    """A measurement's records, and what it had to leave out and why (one line each)."""

    records: list[LatencyRecord]
    notes: list[str]


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


def _savings(latency_ratio: float, macs_ratio: float) -> dict:
    """The record fields of a variant that saves MACs: its MACs ratio and the realisation they imply."""
    return {"macs_ratio_strict": macs_ratio, "realisation": realisation(latency_ratio, macs_ratio),
            "realisation_note": realisation_note(latency_ratio, macs_ratio)}


# --------------------------------------------------------------------------- the paired-timing core


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


@dataclass(frozen=True)
class SideBySide:
    """One batch size timed side by side: seconds per pass of every named set of runs over the same batches,
    and the fields every record of that batch size shares."""

    times: dict[str, list[float]]
    n_batches: int
    common: dict

    def ratio(self, name: str, against: str) -> float:
        """The median of ``name``'s per-repeat ratios to ``against`` in the same repeat (paired)."""
        return statistics.median(t / r for t, r in zip(self.times[name], self.times[against]))

    def record(self, name: str, variant: str | None = None, **fields) -> LatencyRecord:
        """The record of run ``name`` (as ``variant``, default ``name``): the shared fields, its timing
        statistics and ``fields``."""
        return LatencyRecord(variant=variant or name, **self.common, **_stats(self.times[name], self.n_batches),
                             **fields)


def time_side_by_side(runs: dict[str, list[Run]], at: Batches, images: Tensor, protocol: TimingProtocol) -> SideBySide:
    """Every named set of ``runs`` (one run per batch of ``at``) timed side by side under ``protocol`` on
    ``images``' device: the one timing both measurements share."""
    device = images.device
    repeats, warmup, bound = protocol.on(device)
    times = _side_by_side(runs, device, repeats, warmup, bound)
    return SideBySide(times, len(at.tensors), _common(at, images, warmup, protocol.inputs))


def _common(at: Batches, images: Tensor, warmup: int, inputs: str) -> dict:
    device = images.device
    common = {"batch_size": at.size, "n_batches": len(at.tensors), "samples": at.samples, "device": str(device),
              "dtype": str(images.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "warmup": warmup, "timer": "cuda events" if device.type == "cuda" else "perf_counter",
              "host_read": "predictions per request", "inputs": inputs}
    if device.type == "cuda":
        common["cudnn_benchmark"] = torch.backends.cudnn.benchmark  # off in the timed region (on_device)
    if at.asked != at.size:
        common["requested_batch_size"] = at.asked
    return common


def measure_sizes(images: Tensor, protocol: TimingProtocol,
                  at_size: Callable[[Batches, list[str]], list[LatencyRecord]]) -> Measured:
    """The measurement loop both measurements go through: under the protocol's threads and device settings,
    ``at_size(batches, notes)`` for every batch size timed (:meth:`TimingProtocol.sizes`), which prepares
    its runs, times them with :func:`time_side_by_side` and returns its records. A batch size that does not
    fit in memory is left out, with a note ("where memory allows")."""
    device, records, notes = images.device, [], []
    with num_threads(protocol.threads), on_device(device):
        for asked, b in protocol.sizes(device, len(images)):
            try:
                records += at_size(protocol.batches(images, asked, b), notes)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                notes.append(f"batch {b}: out of memory on {device}; not timed")
    return Measured(records, notes)


# ---------------------------------------------------------------------------- the two measurements


@torch.no_grad()
def measure_static(model: nn.Module, references: dict[str, nn.Module], images: Tensor, macs: int,
                   reference_macs: dict[str, int], protocol: TimingProtocol = TimingProtocol()) -> Measured:
    """Time a static baseline ``model`` side by side with each of its ``references`` (the backbones whose
    panels it appears in), one pair at a time, under the same protocol as :func:`measure_latency`. One record
    per (reference, batch size), variant ``static``: the model's own timing statistics, its paired latency
    ratio against that reference (``against``), the MACs ratio and the realisation that implies."""
    model.eval()
    pairs = [measure_sizes(images, protocol, _against(model, name, ref.eval(), macs / reference_macs[name], images,
                                                      protocol))
             for name, ref in references.items()]
    return Measured([r for m in pairs for r in m.records], [n for m in pairs for n in m.notes])


def _against(model: nn.Module, name: str, ref: nn.Module, macs_ratio: float, images: Tensor,
             protocol: TimingProtocol) -> Callable[[Batches, list[str]], list[LatencyRecord]]:
    """One batch size of the static ``model`` timed against the reference ``name``: its record."""
    def at_size(at: Batches, _notes: list[str]) -> list[LatencyRecord]:
        timed = time_side_by_side({"reference": _plain_runs(ref, at.tensors), "static": _plain_runs(model, at.tensors)},
                                  at, images, protocol)
        ratio = timed.ratio("static", "reference")
        return [timed.record("static", against=name, latency_ratio=ratio, ratio_of=PAIRED,
                             **_savings(ratio, macs_ratio))]
    return at_size


def _plain_runs(model: nn.Module, batches: list[Tensor]) -> list[Run]:
    return LATENCY_VARIANTS.get("backbone").prepare(model, None, None, batches)


@torch.no_grad()
def measure_latency(backbone: nn.Module, net: MultiExitNet, policy: Policy, images: Tensor,
                    strict_costs: Sequence[float], protocol: TimingProtocol = TimingProtocol(), *,
                    expected: tuple[Tensor, Tensor] | None = None) -> Measured:
    """Time the protocol's latency variants (``backbone`` always among them, first) on ``images`` for each of
    its batch sizes (:meth:`TimingProtocol.batches`: which inputs; the record says the size timed).

    One record per (variant, batch size): the timing statistics, the latency ratio against the backbone
    (paired per repeat), ``simulation``, and for variants that exit the exit fractions on these inputs, the
    strict MACs ratio they imply and the realisation. ``expected``: the offline trace's (predictions, exit
    index) of ``images`` under the same policy; every exiting variant's record then counts the timed samples
    whose prediction or exit differ from it. A fast variant that cannot be built at a batch size (out of
    memory, a failed capture) is left out there, with a note.
    """
    chosen = [LATENCY_VARIANTS.get(v) for v in dict.fromkeys(["backbone", *protocol.timed_variants])]
    fast = {v.fast for v in chosen if v.fast and v.exits}
    chosen += [LATENCY_VARIANTS.get(f"backbone-{m}") for m in sorted(fast)  # what the fast path is set against
               if f"backbone-{m}" not in {v.name for v in chosen}]
    backbone.eval()
    net.eval()
    costs = torch.tensor(strict_costs, dtype=torch.float64)

    def at_size(at: Batches, notes: list[str]) -> list[LatencyRecord]:
        return _at_batch_size(at, backbone, net, policy, images, costs, protocol, chosen, expected, notes)

    return measure_sizes(images, protocol, at_size)


def _outcome(v: LatencyVariant, runs: list[Run]) -> tuple[Tensor, Tensor] | None:
    """(predictions, exit index) of an exiting variant over its prepared ``runs`` (an untimed pass), else None."""
    if not v.exits:
        return None
    outs = [run() for run in runs]
    return torch.cat([o[0].argmax(-1) for o in outs]).cpu(), torch.cat([o[1] for o in outs]).cpu()


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


def _at_batch_size(at: Batches, backbone: nn.Module, net: MultiExitNet, policy: Policy, images: Tensor,
                   costs: Tensor, protocol: TimingProtocol, variants: list[LatencyVariant],
                   expected: tuple[Tensor, Tensor] | None, notes: list[str]) -> list[LatencyRecord]:
    runs = _prepare(variants, backbone, net, policy, at.tensors, at.size, notes)
    variants = [v for v in variants if v.name in runs]
    outcome = {v.name: _outcome(v, runs[v.name]) for v in variants}
    with _no_recompile(any(v.fast == "compile" for v in variants)):
        timed = time_side_by_side(runs, at, images, protocol)
    return [timed.record(v.name, **_variant_fields(v, timed, at, outcome[v.name], net.num_exits, costs, expected))
            for v in variants]


def _variant_fields(v: LatencyVariant, timed: SideBySide, at: Batches, outcome: tuple[Tensor, Tensor] | None,
                    num_exits: int, costs: Tensor, expected: tuple[Tensor, Tensor] | None) -> dict:
    """A variant's own record fields: what it is, its paired ratio, and for a variant that exits what it saved
    and how many of its decisions differ from the trace's."""
    fields: dict = {"simulation": v.simulation}
    if v.fast:
        fields["fast"] = v.fast
    if v.fast and v.exits:
        fields["buckets"] = list(buckets_for(max(len(x) for x in at.tensors)))
    if v.name != "backbone":
        fields.update(_ratio(v, timed))
    if outcome is not None:
        preds, exit_idx = outcome
        fractions = torch.bincount(exit_idx, minlength=num_exits).double() / len(exit_idx)
        fields.update(_savings(fields["latency_ratio"], float(fractions @ costs)), exit_fractions=fractions.tolist())
        if expected is not None:
            n = at.samples
            want_preds, want_exits = expected[0][:n].cpu(), expected[1][:n].cpu()
            fields.update(checked=n, differ_predictions=int((preds != want_preds).sum()),
                          differ_exits=int((exit_idx != want_exits).sum()))
    return fields


def _ratio(v: LatencyVariant, timed: SideBySide) -> dict:
    """A variant's latency ratio: the median of its per-repeat ratios to the backbone of the same repeat; the
    fast path's to the backbone run the same way (compiled or captured), with the eager ratio beside it."""
    fast_path = v.fast is not None and v.exits
    against = f"backbone-{v.fast}" if fast_path else "backbone"
    rec = {"latency_ratio": timed.ratio(v.name, against), "ratio_of": PAIRED}
    if fast_path:
        rec.update(against=against, latency_ratio_eager=timed.ratio(v.name, "backbone"))
    return rec


@contextmanager
def _no_recompile(on: bool) -> Iterator[None]:
    """While compiled code is timed, a recompilation is an error instead of a silent fall back to eager."""
    if not on:
        yield
        return
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
