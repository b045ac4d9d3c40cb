"""The fast path: the dynamic forward with every (stage, bucketed batch size) compiled or captured.

Per-sample exit changes the batch size from stage to stage, and on a GPU a small batch is dominated by
kernel launches and Python. The fast path removes both while keeping compaction's semantics: the samples
that reach stage k (n of them) are padded up to the next *bucket* b >= n, stage k and its head run as one
pre-built callable for (k, b), and the first n rows of the outputs go on. Gating and partitioning are
``MultiExitNet.forward_dynamic``'s own (one host read per exit); only its ``step`` is replaced.

- ``compile``: ``torch.compile(stage + head, dynamic=False)``, one specialisation per bucket.
- ``graphs`` (CUDA only): one CUDA graph captured per (stage, bucket) with static input/output buffers;
  a replay launches the whole stage at once.

Both build lazily, the first time a (stage, bucket) is reached; the latency variants call every batch once
before timing, so building never falls in a timed region. Padding rows are zeros (compile) or stale rows of
an earlier batch (graphs); in eval mode every layer of these networks is per-sample (BatchNorm uses its
running statistics), so padding cannot change a real row -- ``tests/test_fast.py`` checks the predictions
and exits equal the eager forward's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from exitbench.core.errors import UserError
from exitbench.methods.base import Carry, MultiExitNet, Policy

FAST_MODES = ("none", "compile", "graphs")

HeadOut = Tensor | tuple[Tensor, Tensor]


def buckets_for(batch_size: int) -> tuple[int, ...]:
    """The bucket sizes for batches of up to ``batch_size``: the powers of two below it, and itself.
    A surviving batch pads to at most twice its size, and there are only log2(batch) shapes to build."""
    sizes, b = [], 1
    while b < batch_size:
        sizes.append(b)
        b *= 2
    return (*sizes, batch_size)


def triton_missing() -> str | None:
    """What torch.compile on CUDA lacks here, or None: Triton compiles a small C launcher at run time, which
    needs Triton, a C compiler and Python's headers."""
    import shutil
    import sysconfig
    from importlib.util import find_spec
    from pathlib import Path

    if find_spec("triton") is None:
        return "triton is not installed"
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        return "no C compiler (cc, gcc or clang) on PATH"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return f"no Python.h in {sysconfig.get_paths()['include']} (install the Python development headers)"
    return None


def check_fast_mode(mode: str, where: str = "evaluation.fast") -> None:
    """A one-line :class:`UserError` for an unknown mode (what a matrix can check before the device is known)."""
    if mode not in FAST_MODES:
        raise UserError(f"{where}: unknown fast path {mode!r}; use {', '.join(FAST_MODES)}")


def check_fast(mode: str, device: torch.device, where: str = "evaluation.fast") -> None:
    """A one-line :class:`UserError` for an unknown mode, or CUDA graphs off CUDA."""
    check_fast_mode(mode, where)
    if mode == "graphs" and device.type != "cuda":
        raise UserError(f"{where}: graphs needs a CUDA device but the cell runs on {device}; use fast: compile "
                        f"(torch.compile per bucket) or none")


class _StageHead(nn.Module):
    """Stage k followed by its exit (``net.step``), as one module to compile or capture: ``(x, *carry) ->
    (features, exit output, carry)``."""

    def __init__(self, net: MultiExitNet, k: int):
        super().__init__()
        self.stage, self.head, self.k = net.stages[k], net.heads[k], k
        object.__setattr__(self, "net", net)  # not a child: the stage and head above are its parts here

    def forward(self, x: Tensor, *carry: Tensor) -> tuple[Tensor, HeadOut, Carry]:
        return self.net.step(self.k, x, carry)


def _allow_specialisations(n: int) -> None:
    # torch.compile keeps a few specialisations per code object (8 by default) and silently falls back to
    # eager past them; every (stage, bucket) is one, and all share _StageHead.forward's code.
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), n))


class FastPathUnavailable(RuntimeError):
    """The fast path cannot be built here at this size (out of memory, a failed capture): the timing leaves
    that fast variant out at that batch size, with a note, instead of failing the cell."""


def _capture(module: nn.Module, example: Sequence[Tensor]) -> _Graph:
    """A :class:`_Graph`, or :class:`FastPathUnavailable` saying why it could not be captured."""
    try:
        return _Graph(module, example)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        raise FastPathUnavailable(f"out of memory capturing a CUDA graph: {_first_line(e)}") from None
    except RuntimeError as e:  # capture errors (an op that syncs, a disallowed allocation) are RuntimeErrors
        raise FastPathUnavailable(f"CUDA graph capture failed: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


class _Graph:
    """One CUDA graph of ``module`` at fixed input shapes (features and carry), with static buffers."""

    def __init__(self, module: nn.Module, example: Sequence[Tensor]):
        self.static_in = [t.clone() for t in example]
        device = example[0].device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():  # warm-up off the capture: lazy init, cuDNN choice
            for _ in range(3):
                module(*self.static_in)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_out = module(*self.static_in)

    def __call__(self, inputs: Sequence[Tensor]):
        for buf, t in zip(self.static_in, inputs):
            buf[: t.shape[0]].copy_(t)
        self.graph.replay()
        return self.static_out


def _pad(x: Tensor, b: int) -> Tensor:
    """``x`` with zero rows appended up to ``b`` rows (``x`` itself when it has them)."""
    return x if x.shape[0] == b else torch.cat([x, x.new_zeros((b - x.shape[0], *x.shape[1:]))])


class FastForward:
    """``forward_dynamic`` with each stage run through a compiled or captured callable per bucket.

    ``fast(x, policy) -> (logits [B, C], exit index [B])``, the same contract as
    ``MultiExitNet.forward_dynamic``; ``built`` lists the (stage, bucket) pairs made so far.
    """

    def __init__(self, net: MultiExitNet, mode: str, buckets: Sequence[int]):
        if mode not in ("compile", "graphs"):
            raise ValueError(f"fast path mode {mode!r}: use compile or graphs")
        self.net, self.mode, self.buckets = net, mode, tuple(sorted(buckets))
        self._parts = [_StageHead(net, k) for k in range(net.num_exits)]
        self._runners: dict[tuple[int, int], Callable] = {}
        if mode == "compile":
            _allow_specialisations(len(self._parts) * len(self.buckets) + 8)

    @property
    def built(self) -> list[tuple[int, int]]:
        return sorted(self._runners)

    def bucket(self, n: int) -> int:
        """The smallest bucket that holds ``n`` rows."""
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} rows exceed the largest bucket {self.buckets[-1]}")

    def step(self, k: int, x: Tensor, carry: Carry = ()) -> tuple[Tensor, HeadOut, Carry]:
        """Stage k and its exit on ``x`` (and the carry) padded to its bucket; the outputs cut back to
        ``x``'s rows. A graph's outputs are views of its static buffers, valid until that (stage, bucket)
        runs again -- ``forward_dynamic`` has consumed them by then (it copies or gathers what it keeps)."""
        n = x.shape[0]
        b = self.bucket(n)
        runner = self._runners.get((k, b))
        inputs = (x, *carry)
        if self.mode == "graphs":
            if runner is None:
                runner = self._runners[(k, b)] = _capture(self._parts[k], [_pad(t, b) for t in inputs])
            feats, out, carry = runner(inputs)  # copies the inputs into the first n rows of the static ones
        else:
            if runner is None:
                runner = self._runners[(k, b)] = torch.compile(self._parts[k], dynamic=False)
            feats, out, carry = runner(*(_pad(t, b) for t in inputs))
        if b == n:
            return feats, out, tuple(carry)
        return (feats[:n], (tuple(t[:n] for t in out) if isinstance(out, tuple) else out[:n]),
                tuple(t[:n] for t in carry))

    def __call__(self, x: Tensor, policy: Policy) -> tuple[Tensor, Tensor]:
        return self.net.forward_dynamic(x, policy, step=self.step)


class FastModule:
    """A plain network (the backbone, a static model) run the way the fast path runs a stage, so that the fast
    path is compared with a backbone that gets the same treatment: ``compile`` (``torch.compile``, one
    specialisation per input shape) or ``graphs`` (one CUDA graph per input shape, captured on first use).
    A graph's output is its static buffer, valid until the next call of the same shape."""

    def __init__(self, module: nn.Module, mode: str):
        if mode not in ("compile", "graphs"):
            raise ValueError(f"fast path mode {mode!r}: use compile or graphs")
        self.module, self.mode = module, mode
        self._compiled = torch.compile(module, dynamic=False) if mode == "compile" else None
        self._graphs: dict[tuple[int, ...], _Graph] = {}

    def __call__(self, x: Tensor) -> Tensor:
        if self._compiled is not None:
            return self._compiled(x)
        graph = self._graphs.get(tuple(x.shape))
        if graph is None:
            graph = self._graphs[tuple(x.shape)] = _capture(self.module, [x])
        return graph([x])
