"""Latency variants: the ways of running a multi-exit net that the timing protocol puts side by side.

A variant is a registered :class:`LatencyVariant`; ``prepare(backbone, net, policy, batches)`` returns
one callable per batch (anything a variant precomputes happens there, outside the timed region). A
variant that ``exits`` returns ``(logits, exit index)`` per batch, so its record carries where samples
left, the MACs ratio that implies and the realisation. ``simulation`` marks variants that are not a
deployable execution (they are references, and are labelled so in every record and figure).

- ``backbone``: the plain backbone, the reference of every ratio.
- ``compaction``: ``MultiExitNet.forward_dynamic``, real per-sample exit; rows that leave are removed
  from the batch (one host read per exit).
- ``masking``: no compaction; every stage runs on the whole batch, rows that left are carried along and
  their outputs kept; it stops when every row has left (one host read per exit).
- ``batch-uniform``: the whole batch leaves at the first exit where every sample qualifies, else goes
  on (earlyon's batched mode); its samples leave later than under compaction.
- ``full+select`` (simulation): every exit is run, then each sample's exit is picked -- what an offline
  evaluation on traces assumes; it saves no time by construction.
- ``fast-compile`` / ``fast-graphs``: compaction with every (stage, bucketed batch size) compiled or
  captured as a CUDA graph (``exitbench.benchmarks.fast``); timed when ``evaluation.fast`` turns it on,
  together with ``backbone-compile`` / ``backbone-graphs``, the backbone run the same way, which the fast
  path's ratio is taken against (the eager ratio is kept beside it).
- ``per-stage-ideal`` (simulation): each stage and head timed alone on exactly the samples that reach
  it under compaction (inputs precomputed): the time compaction would take with zero overhead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from exitbench.benchmarks.fast import FastForward, FastModule, buckets_for
from exitbench.core.registry import Registry
from exitbench.methods.base import Carry, MultiExitNet, Policy, _split_head_output

Run = Callable[[], object]


@dataclass(frozen=True)
class LatencyVariant:
    """One way of running a network under the timing protocol (see the module docstring)."""

    name: str
    prepare: Callable[[nn.Module, MultiExitNet, Policy, Sequence[Tensor]], list[Run]]
    exits: bool = False
    simulation: bool = False
    fast: str | None = None  # the fast path's mode (compile | graphs): fast-* and the backbone run the same way
    # its exits are the policy's per-sample decisions, so its predictions and exits should equal the offline
    # trace's (batch-uniform's are not: the whole batch leaves together); `exitbench doctor` checks these
    per_sample: bool = True


LATENCY_VARIANTS: Registry[LatencyVariant] = Registry("latency variant", base=LatencyVariant,
                                                      group="exitbench.latency_variants",
                                                      field="evaluation.latency_variants")


def _each(fn: Callable[[Tensor], object], batches: Sequence[Tensor]) -> list[Run]:
    return [lambda b=b: fn(b) for b in batches]


@torch.no_grad()
def masked_forward(net: MultiExitNet, x: Tensor, policy: Policy) -> tuple[Tensor, Tensor]:
    """Per-sample exit without compaction: (logits [B, C], exit index [B])."""
    n, last = x.shape[0], net.num_exits - 1
    exit_index = torch.full((n,), last, dtype=torch.long, device=x.device)
    done = torch.zeros(n, dtype=torch.bool, device=x.device)
    out: Tensor | None = None
    carry: Carry = ()
    for k in range(net.num_exits):
        x, head_out, carry = net.step(k, x, carry)
        logits, conf = _split_head_output(head_out)
        out = logits if out is None else torch.where(done[:, None], out, logits)
        if k == last:
            break
        leave = policy.accept(k, logits, conf) & ~done
        exit_index = torch.where(leave, k, exit_index)
        done = done | leave
        if bool(done.all()):  # the one host read of this exit
            break
    assert out is not None
    return out, exit_index


@torch.no_grad()
def batch_uniform_forward(net: MultiExitNet, x: Tensor, policy: Policy) -> tuple[Tensor, Tensor]:
    """The whole batch leaves at the first exit where every sample qualifies: (logits, exit index)."""
    last = net.num_exits - 1
    carry: Carry = ()
    for k in range(net.num_exits):
        x, head_out, carry = net.step(k, x, carry)
        logits, conf = _split_head_output(head_out)
        if k == last or bool(policy.accept(k, logits, conf).all()):  # one host read per exit
            return logits, torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
    raise AssertionError("unreachable: the last exit always returns")


@torch.no_grad()
def full_select_forward(net: MultiExitNet, x: Tensor, policy: Policy) -> tuple[Tensor, Tensor]:
    """Run every exit, then pick each sample's first accepting exit: (logits, exit index)."""
    out = net.forward_all(x)
    conf = out.confidence or [None] * net.num_exits
    n, last = x.shape[0], net.num_exits - 1
    exit_index = torch.full((n,), last, dtype=torch.long, device=x.device)
    for k in range(last):  # in order (a stateful policy needs it); the first accepting exit wins
        first = policy.accept(k, out.logits[k], conf[k]) & (exit_index == last)
        exit_index = torch.where(first, k, exit_index)
    stacked = torch.stack(out.logits)  # [E, B, C]
    return stacked.gather(0, exit_index[None, :, None].expand(1, n, stacked.shape[-1]))[0], exit_index


def _ideal(backbone: nn.Module, net: MultiExitNet, policy: Policy, batches: Sequence[Tensor]) -> list[Run]:
    """Per batch: the inputs each stage (and the carry each exit) sees under compaction, precomputed; the
    timed call runs every stage and exit alone on exactly those inputs."""
    runs = []
    for b in batches:
        _, exit_idx = net.forward_dynamic(b, policy)
        inputs, x, carry = [], b, ()
        with torch.no_grad():
            for k in range(net.num_exits):
                keep = torch.nonzero(exit_idx >= k).flatten()  # outside the timed region
                if len(keep) < len(x):
                    inputs.append((x.index_select(0, keep), tuple(c.index_select(0, keep) for c in carry)))
                else:
                    inputs.append((x, carry))
                x, _, carry = net.step(k, x, carry)
        def run(inputs=inputs) -> Tensor | None:
            out = None
            with torch.no_grad():
                for k, (x_k, carry_k) in enumerate(inputs):
                    if len(x_k):
                        _, out, _ = net.step(k, x_k, carry_k)
            return None if out is None else _split_head_output(out)[0]  # the request's end reads the last logits
        runs.append(run)
    return runs


def _fast_backbone(mode: str) -> Callable[[nn.Module, MultiExitNet, Policy, Sequence[Tensor]], list[Run]]:
    def prepare(backbone: nn.Module, net: MultiExitNet, policy: Policy, batches: Sequence[Tensor]) -> list[Run]:
        fast = FastModule(backbone, mode)
        with torch.no_grad():
            for b in batches:  # compile or capture every shape these batches have, outside the timed region
                fast(b)
        return _each(fast, batches)
    return prepare


def _fast(mode: str) -> Callable[[nn.Module, MultiExitNet, Policy, Sequence[Tensor]], list[Run]]:
    def prepare(backbone: nn.Module, net: MultiExitNet, policy: Policy, batches: Sequence[Tensor]) -> list[Run]:
        fast = FastForward(net, mode, buckets_for(max(len(b) for b in batches)))
        for b in batches:  # build every (stage, bucket) these batches reach, outside the timed region
            fast(b, policy)
        return _each(lambda x: fast(x, policy), batches)
    return prepare


for _name, _variant, _help in (
    ("backbone", LatencyVariant("backbone", lambda bb, net, pol, bs: _each(bb, bs)),
     "the plain backbone: the reference every ratio is taken against"),
    ("compaction", LatencyVariant("compaction", lambda bb, net, pol, bs: _each(lambda x: net.forward_dynamic(x, pol),
                                                                              bs), exits=True),
     "real per-sample exit: rows that leave are removed from the batch (MultiExitNet.forward_dynamic)"),
    ("masking", LatencyVariant("masking", lambda bb, net, pol, bs: _each(lambda x: masked_forward(net, x, pol), bs),
                               exits=True),
     "per-sample exit without compaction: rows that left are carried along until all have left"),
    ("batch-uniform", LatencyVariant("batch-uniform", lambda bb, net, pol, bs:
                                     _each(lambda x: batch_uniform_forward(net, x, pol), bs), exits=True,
                                     per_sample=False),
     "the whole batch leaves at the first exit where every sample qualifies (earlyon's batched mode)"),
    ("full+select", LatencyVariant("full+select", lambda bb, net, pol, bs:
                                   _each(lambda x: full_select_forward(net, x, pol), bs), exits=True, simulation=True),
     "simulation: every exit is run, then each sample's exit is picked (what trace evaluation assumes)"),
    ("per-stage-ideal", LatencyVariant("per-stage-ideal", _ideal, simulation=True),
     "simulation: each stage and head timed alone on exactly the samples that reach it under compaction"),
    ("fast-compile", LatencyVariant("fast-compile", _fast("compile"), exits=True, fast="compile"),
     "compaction with each (stage, bucketed batch) run by torch.compile (evaluation.fast: compile)"),
    ("fast-graphs", LatencyVariant("fast-graphs", _fast("graphs"), exits=True, fast="graphs"),
     "compaction with each (stage, bucketed batch) replayed as a CUDA graph (evaluation.fast: graphs; CUDA)"),
    ("backbone-compile", LatencyVariant("backbone-compile", _fast_backbone("compile"), fast="compile"),
     "the backbone compiled per batch size: what fast-compile is compared with (timed with it)"),
    ("backbone-graphs", LatencyVariant("backbone-graphs", _fast_backbone("graphs"), fast="graphs"),
     "the backbone captured as a CUDA graph per batch size: what fast-graphs is compared with (timed with it)"),
):
    LATENCY_VARIANTS.register(_name, _variant, help=_help)
