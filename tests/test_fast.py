"""The fast path: buckets, exactly the eager dynamic forward's predictions and exits (torch.compile on the
CPU, CUDA graphs on a GPU), its latency records labelled, and one-line errors for what cannot run."""

from __future__ import annotations

import warnings

import pytest
import torch

from exitbench.benchmarks.fast import FastForward, buckets_for, check_fast, triton_missing
from exitbench.benchmarks.latency import TimingProtocol, measure_latency
from exitbench.core.errors import UserError
from exitbench.methods.policies import PatiencePolicy, ThresholdPolicy
from tests.conftest import midpoint_thresholds
from tests.test_syncs import _net


def _setup(device: str = "cpu"):
    torch.manual_seed(0)
    net = _net(3).to(device)
    x = torch.randn(44, 3, 16, 16, device=device)  # 44: the survivors' counts are no bucket sizes
    with torch.no_grad():
        scores = torch.stack([lg.softmax(-1).amax(-1) for lg in net.forward_all(x).logits[:-1]]).cpu()
    # thresholds in the middle of a wide gap between scores: a rounding difference cannot flip a decision
    return net, x, ThresholdPolicy("max_softmax", midpoint_thresholds(scores))


def test_buckets_are_powers_of_two_up_to_the_batch():
    assert buckets_for(1) == (1,)
    assert buckets_for(44) == (1, 2, 4, 8, 16, 32, 44)
    assert buckets_for(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    fast = FastForward(_net(2), "compile", buckets_for(44))
    assert [fast.bucket(n) for n in (1, 3, 17, 33, 44)] == [1, 4, 32, 44, 44]


def _equal_to_eager(net, x, policy, fast, make=None):
    ref_logits, ref_exit = net.forward_dynamic(x, make() if make else policy)
    logits, exit_idx = fast(x, make() if make else policy)
    assert torch.equal(exit_idx, ref_exit)
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    return ref_exit


def test_compile_gives_the_eager_predictions_and_exits():
    net, x, policy = _setup()
    fast = FastForward(net, "compile", buckets_for(len(x)))
    ref_exit = _equal_to_eager(net, x, policy, fast)
    counts = torch.bincount(ref_exit, minlength=4).tolist()
    assert len([c for c in counts if c]) >= 3  # samples really leave at different exits
    reached = [len(x) - sum(counts[:k]) for k in range(4)]
    assert fast.built == [(k, fast.bucket(n)) for k, n in enumerate(reached) if n]
    assert any(fast.bucket(n) > n for n in reached if n)  # a surviving batch was padded
    _equal_to_eager(net, x, policy, fast, make=lambda: PatiencePolicy.shared(1, 3))  # a stateful policy too


def test_the_fast_variant_is_timed_labelled_and_equal_to_compaction():
    net, x, policy = _setup()
    backbone = torch.nn.Sequential(*net.stages, net.heads[-1])
    logits, exits = net.forward_dynamic(x, policy)
    protocol = TimingProtocol(batch_sizes=(44,), repeats=2, warmup=1, variants=("compaction",), fast="compile")
    recs = measure_latency(backbone, net, policy, x, [0.3, 0.5, 0.8, 1.1], protocol,
                           expected=(logits.argmax(-1), exits)).records
    by = {r.variant: r for r in recs}
    fast = by["fast-compile"]
    assert fast.fast == "compile" and fast.buckets == list(buckets_for(44)) and not fast.simulation
    assert fast.differ_predictions == fast.differ_exits == 0 and fast.checked == 44
    assert fast.exit_fractions == by["compaction"].exit_fractions
    assert fast.latency_ratio > 0 and by["compaction"].fast is None
    # set against the backbone run the same way (compiled), the eager ratio beside it
    assert fast.against == "backbone-compile" and fast.latency_ratio_eager > 0
    assert by["backbone-compile"].fast == "compile" and by["backbone-compile"].buckets is None
    assert by["compaction"].against is None and by["compaction"].latency_ratio_eager is None


def test_what_cannot_run_is_a_one_line_error():
    with pytest.raises(UserError, match=r"^evaluation.fast: graphs needs a CUDA device but the cell runs on cpu; "
                                        r"use fast: compile"):
        check_fast("graphs", torch.device("cpu"))
    with pytest.raises(UserError, match=r"^--fast: unknown fast path 'jit'; use none, compile, graphs$"):
        check_fast("jit", torch.device("cpu"), "--fast")
    check_fast("compile", torch.device("cpu"))
    check_fast("none", torch.device("cpu"))


def test_the_fast_path_is_switched_on_by_evaluation_fast(tmp_path, capsys):
    from exitbench.benchmarks.config import expand
    from exitbench.cli import main
    from tests.test_runner import TINY, _write

    cell = expand({**TINY, "evaluation": {**TINY["evaluation"], "fast": "compile"}})[0]
    assert cell.evaluation.timed_variants == (*cell.evaluation.latency_variants, "fast-compile")
    assert expand(TINY)[0].evaluation.timed_variants == expand(TINY)[0].evaluation.latency_variants
    assert cell.analysis_keys()["latency"] != expand(TINY)[0].analysis_keys()["latency"]  # re-timed, not retrained
    listed = {**TINY, "evaluation": {**TINY["evaluation"], "latency_variants": ["compaction", "fast-graphs"]}}
    with pytest.raises(UserError, match="'fast-graphs' is the fast path; set evaluation.fast: graphs"):
        expand(listed)
    with pytest.raises(UserError, match="evaluation.fast: unknown fast path 'yes'"):
        expand({**TINY, "evaluation": {**TINY["evaluation"], "fast": "yes"}})
    out = tmp_path / "out"
    assert main(["run", _write(tmp_path, TINY), "--out", str(out), "--fast", "graphs", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exitbench: error: --fast: graphs needs a CUDA device") and "\n" not in err
    assert not list(out.glob("cells/*.json"))  # nothing written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["graphs", "compile"])
def test_the_fast_path_gives_the_eager_predictions_on_cuda(mode):
    missing = triton_missing()
    if mode == "compile" and missing:
        pytest.skip(f"torch.compile on CUDA needs Triton's launcher build: {missing}")
    net, x, policy = _setup("cuda")
    fast = FastForward(net, mode, buckets_for(len(x)))
    _equal_to_eager(net, x, policy, fast)
    _equal_to_eager(net, x, policy, fast)  # replays: the static buffers are reused correctly
    _equal_to_eager(net, x[:13], policy, fast)  # other survivors, other buckets
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")  # every synchronising call warns once
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, exit_idx = fast(x, policy)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert 1 <= len(syncs) <= min(int(exit_idx.max()) + 1, 3), syncs  # one host read per exit reached
