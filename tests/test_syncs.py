"""forward_dynamic reads the device once per early exit: counted on CPU at the dispatcher (every op that
makes a device->host read on CUDA: a scalar read, nonzero, masked_select, boolean-mask indexing), and on
CUDA with torch.cuda.set_sync_debug_mode."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from exitbench.methods.base import MultiExitNet, place_exits
from exitbench.methods.policies import PatiencePolicy, ThresholdPolicy
from tests.conftest import midpoint_thresholds, tiny_backbone

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "item"}


def _is_bool_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool


class CountSyncs(TorchDispatchMode):
    """Counts the ops that force a device->host read on CUDA."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            _is_bool_tensor(i) for a in args if isinstance(a, (list, tuple)) for i in a)
        if name in SYNC_OPS or bool_index:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def _net(n_exits: int = 3) -> MultiExitNet:
    bb = tiny_backbone(num_classes=5, side=16)
    exits = place_exits(bb.candidates, bb.macs, n_exits, [c.name for c in bb.candidates[:n_exits]])
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(e.channels, 5)) for e in exits]
    return MultiExitNet(bb, exits, heads).eval()


@pytest.mark.parametrize("policy_kind", ["threshold", "patience"])
def test_one_host_read_per_early_exit(policy_kind):
    torch.manual_seed(0)
    net = _net(3)
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        out = net.forward_all(x)
    if policy_kind == "threshold":
        scores = torch.stack([lg.softmax(-1).amax(-1) for lg in out.logits[:-1]])
        policy = ThresholdPolicy("max_softmax", midpoint_thresholds(scores))
    else:
        policy = PatiencePolicy.shared(1, 3)
    with CountSyncs() as mode:
        _, exit_idx = net.forward_dynamic(x, policy)
    reached = int(exit_idx.max()) + 1  # exits the batch got to (the last one needs no read)
    assert len(mode.syncs) <= min(reached, 3), mode.syncs
    assert set(mode.syncs) <= {"_local_scalar_dense"}, mode.syncs


def test_the_old_boolean_indexing_would_be_counted():
    """The counter is not blind: boolean-mask indexing and a scalar read are each caught."""
    x, m = torch.randn(8, 3), torch.rand(8) > 0.5
    with CountSyncs() as mode:
        x[m]
        int(m.sum())
    assert "index" in mode.syncs and "_local_scalar_dense" in mode.syncs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_sync_per_exit_on_cuda():
    net = _net(3).cuda()
    x = torch.randn(64, 3, 16, 16, device="cuda")
    with torch.no_grad():
        scores = torch.stack([lg.softmax(-1).amax(-1) for lg in net.forward_all(x).logits[:-1]]).cpu()
    policy = ThresholdPolicy("max_softmax", midpoint_thresholds(scores))
    net.forward_dynamic(x, policy)  # warm up (lazy init, cuDNN)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")  # every synchronising call warns once
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, exit_idx = net.forward_dynamic(x, policy)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert 1 <= len(syncs) <= 3, [str(w.message) for w in syncs]
