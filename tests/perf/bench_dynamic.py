"""pytest-benchmark suite (``tox -e bench``; not part of the default test run).

1. ``forward_dynamic`` against the plain backbone on the same batch (resnet18, small-image stem,
   32 px, batch 256, untrained PTEENet heads with thresholds that send about half the batch out at
   the first exit and a quarter at the second — the set-up of docs/measurement.md).
2. A 100-threshold sweep on a trace against one network pass over the same data.

Each benchmark also times its reference in the same run and stores the ratio in ``extra_info``
(printed with ``--benchmark-json`` or ``--benchmark-verbose``); ratios, not absolute times, are the
targets.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from exitbench.benchmarks.backbones import create_backbone
from exitbench.benchmarks.data import load_splits, to_tensors
from exitbench.benchmarks.flops import cost_table, exit_head_macs
from exitbench.benchmarks.latency import realisation
from exitbench.benchmarks.traces import collect_trace, evaluate
from exitbench.methods.base import get_method
from exitbench.methods.calibration import quantile_grid
from exitbench.methods.policies import ThresholdPolicy

torch.set_num_threads(2)


def _median_seconds(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    bb = create_backbone("resnet18", num_classes=10, input_size=(3, 32, 32)).eval()
    method = get_method("pteenet")(n_exits=3, placement="linear")
    exits = method.place_exits(bb)
    net = method.build(bb, exits, 10).eval()
    table = cost_table(bb, exits, exit_head_macs(net, exits))
    # real images (the embedded digits' 540 test images, repeated up to the largest batch timed), so that the
    # scores the thresholds cut are those of real inputs
    digits = to_tensors(load_splits("digits", seed=0).test)[0]
    images = digits.repeat(2, 1, 1, 1)[:1024]
    x = images[:256]
    trace = collect_trace(net, x, torch.zeros(256, dtype=torch.long))
    s = trace.scores("confidence")
    # thresholds: half the batch leaves at exit 0, half of the rest at exit 1, nobody at exit 2
    t0 = float(s[0].quantile(0.5))
    rest = s[1][s[0] < t0]
    policy = ThresholdPolicy("confidence", (t0, float(rest.quantile(0.5)), float("inf")))
    return bb, net, x, policy, trace, table, images


def test_forward_dynamic_vs_backbone(benchmark, setup):
    bb, net, x, policy, _, table, _ = setup
    with torch.no_grad():
        base = _median_seconds(lambda: bb(x))
    benchmark.group = "dynamic forward, resnet18 32px batch 256"
    _, exit_idx = benchmark.pedantic(net.forward_dynamic, args=(x, policy), rounds=5, warmup_rounds=1)
    fractions = torch.bincount(exit_idx, minlength=net.num_exits).double() / len(exit_idx)
    macs_ratio = float(fractions @ torch.tensor(table.strict, dtype=torch.float64))
    ratio = benchmark.stats.stats.median / base
    benchmark.extra_info.update({"backbone_median_s": base, "ratio_vs_backbone": ratio,
                                 "macs_ratio_strict": macs_ratio, "realisation": realisation(ratio, macs_ratio),
                                 "exit_fractions": fractions.tolist()})


def test_trace_sweep_vs_network_pass(benchmark, setup):
    _, net, x, _, trace, table, _ = setup
    grid = quantile_grid(trace.scores("confidence"), n=100)
    with torch.no_grad():
        one_pass = _median_seconds(lambda: net.forward_all(x))
    benchmark.group = "100-threshold sweep on a 256-sample trace"
    benchmark(evaluate, trace, "confidence", grid, table.strict, table.paper)
    benchmark.extra_info["network_pass_median_s"] = one_pass
    benchmark.extra_info["ratio_vs_network_pass"] = benchmark.stats.stats.median / one_pass


def _paired(fns: dict, repeats: int = 12) -> dict[str, list[float]]:
    """Every callable timed once per repeat, the order rotating: the protocol of benchmarks/latency.py."""
    names = list(fns)
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return times


def _ratio(times: dict, a: str, b: str) -> tuple[float, float]:
    """Median and IQR of the per-repeat ratios a / b."""
    r = sorted(x / y for x, y in zip(times[a], times[b]))
    q = statistics.quantiles(r, n=4)
    return statistics.median(r), q[2] - q[0]


def test_compaction_vs_per_stage_ideal_and_no_exit_overhead(benchmark, setup):
    """Issue targets on CPU, batch 256: compaction >= 0.97 of the per-stage ideal (ideal / compaction), and
    with no exit firing the dynamic forward <= 1.05 x (backbone + heads timed alone). Ratios measured side by
    side in one run, with their IQR, stored in extra_info."""
    from exitbench.benchmarks.variants import LATENCY_VARIANTS

    bb, net, x, policy, _, _, _ = setup
    never = ThresholdPolicy("confidence", (float("inf"),) * (net.num_exits - 1))
    with torch.no_grad():
        ideal = LATENCY_VARIANTS.get("per-stage-ideal").prepare(bb, net, policy, [x])[0]
        feats, h = [], x
        for stage in net.stages:
            h = stage(h)
            feats.append(h)
        fns = {"compaction": lambda: net.forward_dynamic(x, policy), "ideal": ideal,
               "no-exit": lambda: net.forward_dynamic(x, never), "backbone": lambda: bb(x),
               "heads": lambda: [head(f) for head, f in zip(net.heads[:-1], feats)]}
        times = benchmark.pedantic(_paired, args=(fns,), rounds=1, iterations=1)
    eff, eff_iqr = _ratio(times, "ideal", "compaction")
    plus = {"no-exit": times["no-exit"], "bh": [b + h for b, h in zip(times["backbone"], times["heads"])]}
    over, over_iqr = _ratio(plus, "no-exit", "bh")
    benchmark.extra_info.update({"compaction_efficiency_vs_ideal": eff, "efficiency_iqr": eff_iqr,
                                 "no_exit_overhead_vs_backbone_plus_heads": over, "overhead_iqr": over_iqr})
    print(f"\ncompaction efficiency (ideal / compaction): {eff:.3f} (IQR {eff_iqr:.3f}); "
          f"no-exit overhead vs backbone + heads: {over:.3f} (IQR {over_iqr:.3f})")


def _paired_passes(runs: dict, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Each variant's pass over its batches, once per repeat in rotated order, timed as the harness does
    (CUDA events on a GPU): ``benchmarks.latency``'s protocol."""
    from exitbench.benchmarks.latency import GPU_WARMUP, _pass

    names = list(runs)
    for _ in range(GPU_WARMUP if device.type == "cuda" else 1):
        for r in runs.values():
            _pass(r, device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for n in names[i % len(names):] + names[:i % len(names)]:
            times[n].append(_pass(runs[n], device))
    return times


def _fast_targets(benchmark, setup, device: torch.device, batch: int, mode: str, repeats: int) -> dict:
    import copy

    from exitbench.benchmarks.device import prepare
    from exitbench.benchmarks.latency import on_device
    from exitbench.benchmarks.variants import LATENCY_VARIANTS

    bb, net, _, policy, _, _, images = setup
    bb, net = copy.deepcopy(bb).to(device), copy.deepcopy(net).to(device)
    images = images.to(device)
    batches = list(torch.split(images[:64], 1)) if batch == 1 else [images[:batch]]
    prepare(device)  # the harness's device preparation, then its timed-region settings
    with torch.no_grad(), on_device(device):
        names = ("backbone", "compaction", "per-stage-ideal", f"fast-{mode}", f"backbone-{mode}")
        runs = {v: LATENCY_VARIANTS.get(v).prepare(bb, net, policy, batches) for v in names}
        exits = torch.cat([r()[1] for r in runs["compaction"]]).cpu()
        times = benchmark.pedantic(_paired_passes, args=(runs, device, repeats), rounds=1, iterations=1)
    eff, eff_iqr = _ratio(times, "per-stage-ideal", "compaction")
    gain, gain_iqr = _ratio(times, "compaction", f"fast-{mode}")
    vs_ideal, vs_ideal_iqr = _ratio(times, f"fast-{mode}", "per-stage-ideal")
    vs_fast_bb, vs_fast_bb_iqr = _ratio(times, f"fast-{mode}", f"backbone-{mode}")
    info = {"device": str(device), "batch": batch, "fast": mode, "repeats": repeats,
            "exit_fractions": (torch.bincount(exits, minlength=net.num_exits).double() / len(exits)).tolist(),
            "compaction_efficiency_vs_ideal": eff, "efficiency_iqr": eff_iqr,
            "fast_speedup_vs_compaction": gain, "speedup_iqr": gain_iqr,
            "fast_vs_ideal": vs_ideal, "fast_vs_ideal_iqr": vs_ideal_iqr,
            "fast_vs_fast_backbone": vs_fast_bb, "fast_vs_fast_backbone_iqr": vs_fast_bb_iqr}
    benchmark.extra_info.update(info)
    print(f"\n{device} batch {batch}: compaction efficiency (ideal / compaction) {eff:.3f} (IQR {eff_iqr:.3f}); "
          f"fast-{mode} speed-up over compaction {gain:.3f} (IQR {gain_iqr:.3f}); fast / ideal {vs_ideal:.3f} "
          f"(IQR {vs_ideal_iqr:.3f}); fast / fast backbone {vs_fast_bb:.3f} (IQR {vs_fast_bb_iqr:.3f}); exit fractions "
          f"{[round(f, 3) for f in info['exit_fractions']]}")
    return info


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 256, 1024])
def test_gpu_compaction_and_fast_path(benchmark, setup, batch):
    """Issue targets on GPU: compaction >= 0.90 of the per-stage ideal at batch 256 and 1024; the fast path
    (CUDA graphs) >= the eager compaction there; at batch 1 the fast path <= 1.1 x the per-stage ideal."""
    _fast_targets(benchmark, setup, torch.device("cuda"), batch, "graphs", repeats=100)


def test_cpu_fast_path_compile(benchmark, setup):
    """The torch.compile fast path on this CPU at batch 256, beside the eager compaction (no target on CPU:
    reported; building it compiles every stage once, a minute or more on 2 cores)."""
    _fast_targets(benchmark, setup, torch.device("cpu"), 256, "compile", repeats=12)
