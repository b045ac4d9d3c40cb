"""Exit policies: the patience (PABEE) score on traces and in the real dynamic forward, strict thresholds,
batched ``first_exit``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exitbench.benchmarks.traces import Trace, collect_trace, evaluate
from exitbench.methods.base import MultiExitNet, UserError
from exitbench.methods.policies import (
    PatiencePolicy,
    ThresholdPolicy,
    first_exit,
    get_score,
    make_policy,
    patience_counters,
)
from tests.conftest import tiny_backbone


def _pabee_loop(preds: torch.Tensor, patience: int) -> torch.Tensor:
    """PABEE's own loop (JetRunner/PABEE, modeling_albert.py): counter += 1 if the argmax is unchanged,
    else 0; leave when counter == patience; the last exit always classifies."""
    e, n = preds.shape
    out = torch.full((n,), e - 1)
    for i in range(n):
        counter = 0
        for k in range(e - 1):
            if k > 0:
                counter = counter + 1 if preds[k, i] == preds[k - 1, i] else 0
            if counter >= patience:
                out[i] = k
                break
    return out


def test_patience_counters_match_the_pabee_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, 3, generator=g)  # 3 classes: repeats are common
    preds = logits.argmax(-1)
    counters = patience_counters(logits)
    assert counters.shape == (6, 300) and torch.all(counters[0] == 0)
    for patience in (1, 2, 3):
        got = first_exit(counters[:-1], torch.tensor([float(patience)]))[0]
        assert torch.equal(got, _pabee_loop(preds, patience))


@torch.no_grad()
def _net(x: torch.Tensor) -> MultiExitNet:
    """Three early exits on a 2-class tiny backbone; each linear head is centred on the batch's pooled
    features so that its prediction varies from sample to sample (and neighbours often agree)."""
    bb = tiny_backbone(num_classes=2)
    ex = bb.candidates[:3]
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(e.channels, 2)) for e in ex]
    net = MultiExitNet(bb, ex, heads).eval()
    h = x
    for stage, head in zip(net.stages[:-1], net.heads[:-1]):
        h = stage(h)
        feat = head[1](head[0](h))
        head[2].bias.copy_(-(feat.mean(0) @ head[2].weight.T))
    return net


@pytest.mark.parametrize("patience", [1, 2])
def test_forward_dynamic_with_patience_equals_the_trace(patience):
    x, y = torch.randn(128, 3, 16, 16), torch.randint(0, 2, (128,))
    net = _net(x)
    trace = collect_trace(net, x, y, batch_size=128)
    scores = trace.scores("patience")  # [3, N]: sequence scores work on traces unchanged
    expected = first_exit(scores, torch.tensor([float(patience)]))[0]
    logits, exit_idx = net.forward_dynamic(x, PatiencePolicy.shared(patience, 3))
    assert torch.equal(exit_idx, expected)
    assert torch.equal(logits.argmax(-1), trace.predictions().gather(0, expected[None])[0])
    counts = torch.bincount(exit_idx, minlength=4)
    # rows leave at several exits, so the policy's per-row state must follow the compaction
    assert int((counts > 0).sum()) >= 2 and counts[3] > 0, counts
    # the offline sweep of the harness gives the same exit fractions
    sweep = evaluate(trace, "patience", torch.tensor([float(patience)]), [1.0] * 4, [1.0] * 4)
    assert torch.allclose(sweep.exit_fractions[0], torch.bincount(exit_idx, minlength=4).double() / 128)


def test_patience_policy_is_reusable_and_refuses_misaligned_batches():
    pol = PatiencePolicy.shared(1, 3)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert pol.accept(0, a, None).tolist() == [False, False, False]
    assert pol.accept(1, a, None).tolist() == [True, True, True]
    assert pol.accept(0, a[:2], None).tolist() == [False, False]  # k = 0 starts a new batch
    with pytest.raises(RuntimeError, match="expected the 2"):
        pol.accept(1, a, None)
    with pytest.raises(RuntimeError, match="in order"):
        PatiencePolicy.shared(1, 3).accept(2, a, None)


def test_strict_thresholds_differ_only_on_ties():
    scores = torch.tensor([[0.5, 0.7, 0.2]])
    assert first_exit(scores, torch.tensor([0.5])).tolist() == [[0, 0, 1]]
    assert first_exit(scores, torch.tensor([0.5]), strict=True).tolist() == [[1, 0, 1]]
    lg = torch.log(torch.tensor([[0.5, 0.5], [0.7, 0.3]]))
    assert ThresholdPolicy("max_softmax", (0.5,), strict=True).accept(0, lg, None).tolist() == [False, True]
    assert ThresholdPolicy("max_softmax", (0.5,)).accept(0, lg, None).tolist() == [True, True]


def test_batched_first_exit_equals_a_loop():
    g = torch.Generator().manual_seed(1)
    scores, thr = torch.rand(4, 3, 50, generator=g), torch.rand(4, 6, 3, generator=g)
    got = first_exit(scores, thr, strict=True)
    assert got.shape == (4, 6, 50)
    for b in range(4):
        assert torch.equal(got[b], first_exit(scores[b], thr[b], strict=True))


def test_score_names_and_policy_factory():
    with pytest.raises(UserError, match="PatiencePolicy"):
        get_score("patience")
    with pytest.raises(UserError, match="did you mean 'max_softmax'"):
        make_policy("max_sofmax", (0.5,))
    assert isinstance(make_policy("patience", (2, 2)), PatiencePolicy)
    assert make_policy("max_softmax", (0.5, 0.6), strict=True) == ThresholdPolicy("max_softmax", (0.5, 0.6), True)
    assert Trace(torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.long)).scores("patience").shape == (1, 3)
