"""Latency accounting: a per-stage latency profile of a cell's net on its device, the latency it predicts
for every operating point (beside MACs), and thresholds chosen for a latency budget.

The profile times every stage and every head alone, on inputs of the features that really reach them,
at a few batch sizes (``sizes``: 1 and, per large batch B, B/4, B/2 and B). Under compaction, at batch B
with exit fractions f (``reach_k`` = the share that reaches stage k), stage k runs on ``B * reach_k``
samples, so the predicted time is ``sum_k T_stage_k(B reach_k) + T_head_k(B reach_k)`` with ``T``
interpolated linearly between the profiled sizes (and through 0 below the smallest); at batch 1 this is
the expectation ``sum_k reach_k (t_stage_k + t_head_k)``. Each early exit also costs its *gate* -- the
score, the partition and its host read -- profiled at the same sizes and added the same way (at batch 1
this is most of the gap between the dynamic forward and its parts). Ratios are to the backbone's profiled time,
``sum_k T_stage_k(B) + T_final_head(B)``. These are **predictions** from a model of the time, labelled
so in every record; the measured records are in ``latency``.

At batch 1 the predicted latency is linear in the exit fractions -- exit k costs the cumulative time of
the stages and heads up to it -- so a latency budget is a MACs budget with those costs: the
``latency_budget`` points reuse ``calibration.macs_budget`` with the per-exit latency costs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from exitbench.methods.base import MultiExitNet, Policy, _split_head_output

PROFILE_REPEATS = 5


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` (after one warm-up), synchronised on CUDA."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def profile_sizes(batch_sizes: Sequence[int]) -> list[int]:
    """1 and, for every large batch B, B/4, B/2 and B."""
    sizes = {1}
    for b in batch_sizes:
        sizes |= {max(1, b // 4), max(1, b // 2), b}
    return sorted(sizes)


@torch.no_grad()
def profile(net: MultiExitNet, images: Tensor, batch_sizes: Sequence[int], repeats: int = PROFILE_REPEATS,
            gate: Policy | None = None) -> dict:
    """{"sizes": [...], "stage_ms": [[per size] per stage], "head_ms": [[per size] per head], "device"}, and
    with a ``gate`` policy that never accepts, "gate_ms": [[per size] per early exit]: the dynamic forward's
    own work at an exit (the score, the partition, its host read, the loop), timed by running
    ``forward_dynamic`` with a step that returns the stages' precomputed outputs, split evenly over the
    early exits (they do the same work on logits of the same shape)."""
    net.eval()
    device = images.device
    sizes = [s for s in profile_sizes(batch_sizes) if s <= len(images)] or [len(images)]
    stage_ms = [[0.0] * len(sizes) for _ in net.stages]
    head_ms = [[0.0] * len(sizes) for _ in net.heads]
    gate_ms = [[0.0] * len(sizes) for _ in net.heads[:-1]]
    for j, s in enumerate(sizes):
        x, outs, carry = images[:s], [], ()
        for k, stage in enumerate(net.stages):
            stage_ms[k][j] = _time(lambda st=stage, inp=x: st(inp), device, repeats)
            x = stage(x)
            head_ms[k][j] = _time(lambda k=k, inp=x, c=carry: _split_head_output(net.run_head(k, inp, c)[0]),
                                  device, repeats)
            out, next_carry = net.run_head(k, x, carry)
            outs.append((x, out, next_carry))
            carry = next_carry
        if gate is not None and gate_ms:
            bookkeeping = _time(lambda inp=images[:s], o=outs: net.forward_dynamic(inp, gate,
                                                                                 step=lambda i, _x, _c: o[i]),
                                device, repeats)
            for g in gate_ms:
                g[j] = bookkeeping / len(gate_ms)
    prof = {"sizes": sizes, "stage_ms": stage_ms, "head_ms": head_ms, "device": str(device), "repeats": repeats,
            "dtype": str(images.dtype).removeprefix("torch."),
            "note": "each stage and head timed alone on the features that reach it"}
    if gate is not None:
        prof["gate_ms"] = gate_ms
    return prof


def _interp(sizes: list[int], ms: list[float], n: float) -> float:
    """Time at ``n`` samples, linear between profiled sizes, through (0, 0) below the smallest, and
    extrapolated from the last two above the largest."""
    if n <= 0:
        return 0.0
    xs, ys = [0.0, *map(float, sizes)], [0.0, *ms]
    for i in range(1, len(xs)):
        if n <= xs[i]:
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (n - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[-1] + (ys[-1] - ys[-2]) * (n - xs[-1]) / (xs[-1] - xs[-2])


def reach(fractions: Sequence[float]) -> list[float]:
    """Share of samples that reach stage k: 1 - (those that left at exits < k)."""
    out, left = [], 0.0
    for f in fractions:
        out.append(max(0.0, 1.0 - left))
        left += f
    return out


def predict(prof: dict, fractions: Sequence[float], batch_size: int) -> dict:
    """Predicted milliseconds per batch under compaction and the ratio to the backbone's profiled time."""
    sizes, r = prof["sizes"], reach(fractions)
    gates = prof.get("gate_ms") or []  # profiles stored before the gates were profiled have none
    t = sum(_interp(sizes, prof["stage_ms"][k], batch_size * r[k]) + _interp(sizes, prof["head_ms"][k],
                                                                            batch_size * r[k])
            + (_interp(sizes, gates[k], batch_size * r[k]) if k < len(gates) else 0.0)
            for k in range(len(r)))
    backbone = sum(_interp(sizes, s, batch_size) for s in prof["stage_ms"]) + _interp(sizes, prof["head_ms"][-1],
                                                                                      batch_size)
    return {"batch_size": batch_size, "predicted_ms": t, "predicted_ratio": t / backbone if backbone else None,
            "estimate": "per-stage profile x exit fractions (a prediction, not a measurement)"}


def exit_costs_batch1(prof: dict) -> list[float]:
    """Per-exit latency at batch 1 relative to the backbone: the cumulative stage and head time up to exit k
    (every head on the way evaluated, like strict MACs)."""
    j = prof["sizes"].index(1) if 1 in prof["sizes"] else 0
    stage = [s[j] for s in prof["stage_ms"]]
    head = [h[j] for h in prof["head_ms"]]
    gate = [g[j] for g in prof.get("gate_ms") or []]
    backbone = sum(stage) + head[-1]
    out, acc = [], 0.0
    for k in range(len(stage)):
        acc += stage[k] + head[k] + (gate[k] if k < len(gate) else 0.0)  # deciding to leave at k runs its gate
        out.append(acc / backbone)
    return out
