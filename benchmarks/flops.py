"""MACs per block and per exit head, and exit cost tables (docs/measurement.md, "MACs").

Every number here is multiply-accumulates at batch 1, from one counter on every torch version,
named ``ptflops-aten+attention`` in results:

- ptflops with ``backend='aten'`` counts the aten ops ``convolution``, ``mm``/``addmm``/``bmm``/
  ``matmul`` (bias adds of convs and linears included). Its default ``pytorch`` backend is wrong for
  timm models (it misses timm's Linear subclasses and double-counts functional ReLU/pooling).
- Attention matmuls are counted here, analytically: ``F.scaled_dot_product_attention`` (timm's fused
  attention) dispatches to a fused kernel on some torch versions and devices and to a decomposed
  ``bmm`` path on others, so neither ptflops-aten nor FlopCounterMode sees it the same way everywhere.
  While counting, every call is replaced by one that adds ``QK^T`` and ``AV`` (``L*S*(E + Ev)`` per
  head) and runs the original with the counters switched off, so its inner ops are never counted twice.
  Unfused attention (``q @ k.transpose``, ``attn @ v``) is ordinary ``bmm`` that ptflops-aten counts.
  ViT-Tiny at 32 px / patch 4 (65 tokens) is 346.99 M by ptflops-aten alone and 365.2 M with attention
  (+ 12 x 2 x 65^2 x 192).

The cross-check is ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) with the same attention
counting. The two agree within 1 % on CNNs and ViTs (they differ only by bias adds).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode

from exitbench.methods.base import Carry, ExitPoint, MultiExitNet, StagedBackbone, UserError

ACCOUNTINGS = ("strict", "paper")
MACS_COUNTER = "ptflops-aten+attention"  # recorded beside every MACs number in results


@contextmanager
def _attention_counted() -> Iterator[list[int]]:
    """While active, ``F.scaled_dot_product_attention`` adds its QK^T and AV MACs to the yielded
    one-element list and runs with every dispatch mode (ptflops', FlopCounterMode) switched off."""
    original = F.scaled_dot_product_attention
    tally = [0]

    def counted(q: Tensor, k: Tensor, v: Tensor, *args, **kwargs) -> Tensor:
        # q [..., L, E], k [..., S, E], v [..., S, Ev]: L*S*E for QK^T and L*S*Ev for AV per head
        tally[0] += math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        with _disable_current_modes():
            return original(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = counted
    try:
        yield tally
    finally:
        F.scaled_dot_product_attention = original


class _Opaque(nn.Module):
    """Runs ``inner`` and keeps its output, hiding ``inner`` from ``named_children``.

    Why: ptflops 0.7.5 (aten backend) registers forward hooks on the model's children and never
    removes them, so counting a block would leave hooks on it for good (slower forwards, a leak).
    With no visible children there is nothing to hook; the count is the same.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        object.__setattr__(self, "inner", inner)
        self.output: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.output = self.inner(x)
        return self.output


def _probe_input(module: nn.Module, shape: Sequence[int]) -> Tensor:
    p = next(module.parameters(), None)
    return torch.zeros((1, *shape), dtype=p.dtype if p is not None else torch.float32,
                       device=p.device if p is not None else "cpu")


def _count(module: nn.Module, x: Tensor) -> tuple[int, Tensor]:
    """(MACs, output) of ``module`` on the batch-1 tensor ``x``, in eval mode, no grad: ptflops-aten
    plus the attention matmuls (see the module docstring)."""
    from ptflops import get_model_complexity_info  # lazy: importing ptflops costs seconds

    wrapper = _Opaque(module)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), _attention_counted() as attention:
            macs, _ = get_model_complexity_info(wrapper, tuple(x.shape[1:]), as_strings=False,
                                                print_per_layer_stat=False, backend="aten",
                                                input_constructor=lambda _: x)
            if macs is None or wrapper.output is None:
                # ptflops prints and swallows the exception; run once more so the real error surfaces.
                module(x)
                raise RuntimeError(f"ptflops could not count {type(module).__name__} on input {tuple(x.shape[1:])}")
    finally:
        module.train(was_training)
    return int(macs) + attention[0], wrapper.output


def count_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of ``module`` on one sample of per-sample shape ``input_shape`` (ptflops-aten + attention).

    ``input_shape`` excludes the batch: (C, H, W) for images and CNN features, (tokens, C) for ViT
    features. The module runs once in eval mode under ``no_grad``; its training mode is restored.
    """
    return _count(module, _probe_input(module, input_shape))[0]


def flop_counter_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of ``module`` on one sample by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2).

    Counts matmuls and convolutions, but no bias adds; attention is counted as in :func:`count_macs`
    (so the cross-check does not depend on which attention kernel this torch dispatches to).
    """
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), _attention_counted() as attention, FlopCounterMode(display=False) as counter:
            module(_probe_input(module, input_shape))
    finally:
        module.train(was_training)
    return int(counter.get_total_flops()) // 2 + attention[0]


def measure_blocks(backbone: StagedBackbone) -> list[tuple[int, ...]]:
    """Fill ``backbone.block_macs``, ``head_macs`` and ``macs`` (:func:`count_macs`, batch 1) and return the
    per-sample output shape of every block.

    One batch-1 pass: each block is counted on the previous block's real output, so every block sees
    its true input shape and the blocks plus the head sum exactly to the whole network's MACs.
    """
    x = _probe_input(backbone, backbone.input_size)
    block_macs, shapes = [], []
    for block in backbone.blocks:
        macs, x = _count(block, x)
        block_macs.append(macs)
        shapes.append(tuple(x.shape[1:]))
    backbone.block_macs = block_macs
    backbone.head_macs = _count(backbone.head, x)[0]
    backbone.macs = sum(block_macs) + backbone.head_macs
    return shapes


def head_macs(head: nn.Module, exit_point: ExitPoint) -> int:
    """MACs of an exit head attached at ``exit_point`` (:func:`count_macs`, batch 1)."""
    return count_macs(head, exit_point.feature_shape)


class _ExitStep(nn.Module):
    """``net.run_head(k, feats, carry)`` with the carry fixed, as a module to count; keeps the next carry."""

    def __init__(self, net: MultiExitNet, k: int, carry: Carry):
        super().__init__()
        object.__setattr__(self, "net", net)
        self.k, self.carry, self.next_carry = k, carry, ()

    def forward(self, feats: Tensor) -> Tensor:
        out, self.next_carry = self.net.run_head(self.k, feats, self.carry)
        return out[0] if isinstance(out, tuple) else out


def exit_head_macs(net: MultiExitNet, exits: Sequence[ExitPoint]) -> list[int]:
    """MACs (batch 1) of each early exit of ``net`` beyond the backbone: its head, and for a net whose exits
    read earlier ones (``MultiExitNet.run_head``; ZTW) whatever it does with what they carried -- counted
    on the carry the exits before it really produce."""
    out, carry = [], ()
    for k, e in enumerate(exits):
        step = _ExitStep(net, k, carry)
        out.append(_count(step, _probe_input(net.heads[k], e.feature_shape))[0])
        carry = tuple(c.detach() for c in step.next_carry)
    return out


# ----------------------------------------------------------------------------------------------
# Cost tables


@dataclass
class CostTable:
    """Cost of leaving at each exit (N early exits + the final one), absolute and relative to the
    plain backbone's MACs ``F``.

    ``paper``: backbone prefix + the head taken (as PTEENet/EENet report); the final exit is 1 exactly.
    ``strict``: backbone prefix + every head evaluated on the way, rejected ones included; the final
    exit costs F plus all early heads. Never mix the two in one column.
    """

    strict: list[float]
    paper: list[float]
    macs_strict: list[int]
    macs_paper: list[int]
    backbone_macs: int

    def relative(self, accounting: str) -> list[float]:
        """The relative column for ``accounting`` ('strict' or 'paper')."""
        if accounting not in ACCOUNTINGS:
            raise UserError(f"accounting: unknown {accounting!r}; use one of {', '.join(ACCOUNTINGS)}")
        return self.strict if accounting == "strict" else self.paper


def cost_table(backbone: StagedBackbone, exits: Sequence[ExitPoint], head_macs_list: Sequence[int]) -> CostTable:
    """The cost table for early ``exits`` (in depth order) with heads costing ``head_macs_list`` MACs.

    Needs ``backbone.macs`` (filled by :func:`measure_blocks`); the final exit is the backbone itself.
    """
    if len(exits) != len(head_macs_list):
        raise ValueError(f"{len(exits)} exits need {len(exits)} head MACs, got {len(head_macs_list)}")
    total = int(backbone.macs)
    if total <= 0:
        raise ValueError("backbone.macs is not measured; call exitbench.benchmarks.flops.measure_blocks first")
    prefixes = [int(e.macs_cumulative) for e in exits]
    heads = [int(h) for h in head_macs_list]
    macs_paper = [p + h for p, h in zip(prefixes, heads)] + [total]
    seen_heads = np.cumsum(heads).tolist() if heads else []
    macs_strict = [p + s for p, s in zip(prefixes, seen_heads)] + [total + sum(heads)]
    paper = [m / total for m in macs_paper[:-1]] + [1.0]  # exactly 1, not a rounded ratio
    strict = [m / total for m in macs_strict]
    return CostTable(strict=strict, paper=paper, macs_strict=[int(m) for m in macs_strict],
                     macs_paper=macs_paper, backbone_macs=total)


def expected_rel_macs(exit_fractions: Sequence[float] | np.ndarray, table: CostTable,
                      accounting: str) -> float | np.ndarray:
    """Mean relative cost when a fraction ``exit_fractions[k]`` of samples leaves at exit k.

    ``exit_fractions`` has one entry per exit (final last) and sums to 1; a 2-D array [G, K] (one row
    per operating point) gives G costs at once. This is an estimate from MACs, not a measurement.
    """
    costs = np.asarray(table.relative(accounting), dtype=np.float64)
    fractions = np.asarray(exit_fractions, dtype=np.float64)
    if fractions.shape[-1] != costs.shape[0]:
        raise ValueError(f"exit_fractions has {fractions.shape[-1]} exits, the cost table {costs.shape[0]}")
    out = fractions @ costs
    return float(out) if out.ndim == 0 else out


__all__ = ["ACCOUNTINGS", "MACS_COUNTER", "CostTable", "cost_table", "count_macs", "expected_rel_macs",
           "exit_head_macs", "flop_counter_macs", "head_macs", "measure_blocks"]
