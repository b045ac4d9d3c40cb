"""Risk control: losses, bounds against independent computations, selection rules, their guarantees on
synthetic traces with a known risk curve, and the trial protocol."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
from scipy import stats

from exitbench.benchmarks.risk_protocol import PROTOCOL_RULES, run_protocol
from exitbench.benchmarks.traces import Trace
from exitbench.core.results import RiskControlResult, RiskRow
from exitbench.core.spec import RiskControl
from exitbench.methods.base import UserError
from exitbench.methods.policies import ThresholdPolicy, first_exit
from exitbench.methods.risk_control import (
    LAMBDAS,
    RISKS,
    CalLosses,
    binom_cdf,
    calibrate,
    certified_set,
    exit_index,
    exit_losses,
    family_mean_loss,
    hb_p_value,
    hb_ucb,
    loss_matrix,
    monotonise,
    pareto_front,
    pareto_test,
    per_exit_family,
    pointwise_ok,
    scan_from_top,
    select,
    shape_from_thresholds,
    wsr_ucb,
)
from tests.conftest import synthetic_trace


@pytest.fixture(autouse=True)
def _one_thread():
    """Why: these tests are many mid-sized tensor passes; on a busy 2-core machine intra-op threads
    cost more than they save (the protocol test: ~3 s on one thread, ~8 s on two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# Losses


def test_exit_losses_by_hand():
    # 2 exits, 3 classes, 2 samples; labels (0, 2)
    p_early = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    p_final = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    logits = torch.stack([p_early.log(), p_final.log()])
    y = torch.tensor([0, 2])
    gp = exit_losses(logits, y, "gap-prediction")
    assert gp[0].tolist() == [0.0, 1.0] and gp[1].tolist() == [0.0, 0.0]
    # Brier(p, y) = sum_k (p_k - 1[k = y])^2
    b_e = [0.3**2 + 0.2**2 + 0.1**2, 0.1**2 + 0.6**2 + 0.7**2]
    b_f = [0.5**2 + 0.3**2 + 0.2**2, 0.2**2 + 0.2**2 + 0.4**2]
    gb = exit_losses(logits, y, "gap-brier")
    assert torch.allclose(gb[0], torch.tensor([b_e[0] - b_f[0], b_e[1] - b_f[1]], dtype=torch.float64))
    cp = exit_losses(logits, None, "consistency-prediction")  # final predicts (0, 2)
    assert cp[0].tolist() == [0.0, 1.0]
    cb = exit_losses(logits, None, "consistency-brier")
    assert torch.allclose(cb[0], gb[0])  # here the final exit's prediction equals the label
    with pytest.raises(UserError, match="needs labels"):
        exit_losses(logits, None, "gap-brier")
    with pytest.raises(UserError, match="did you mean"):
        exit_losses(logits, y, "gap-predction")


def test_exit_rule_is_strict_and_lambda_one_never_exits():
    # exit 0 max-softmax exactly 0.5 (sample 0), 1.0 in float32 (sample 1), 0.8 (sample 2)
    early = torch.tensor([[0.0, 0.0], [40.0, -40.0], [math.log(4.0), 0.0]])
    final = torch.tensor([[0.0, 9.0], [0.0, 9.0], [0.0, 9.0]])
    tr = Trace(torch.stack([early, final]), torch.tensor([1, 1, 1]))
    ex = exit_index(tr.scores("max_softmax"))
    assert torch.all(ex[0] == 1), "lambda = 1 never exits, even at confidence 1.0"
    g50, g49 = int((LAMBDAS - 0.5).abs().argmin()), int((LAMBDAS - 0.49).abs().argmin())
    assert ex[g50, 0] == 1 and ex[g49, 0] == 0, "exit only when confidence > lambda"
    lm = loss_matrix(tr, "gap-prediction")
    assert torch.all(lm[0] == 0) and lm[g49].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        loss_matrix(tr, "gap-prediction", score="neg_entropy")


# ----------------------------------------------------------------------------------------------
# Bounds against independent computations


def test_binomial_cdf_and_hoeffding_bentkus_p_value_against_scipy():
    for n, p in [(100, 0.05), (1000, 0.01), (37, 0.5)]:
        k = torch.arange(-1, n + 2)
        ref = stats.binom.cdf(k.numpy(), n, p)
        assert torch.allclose(binom_cdf(k, n, p), torch.from_numpy(ref), rtol=1e-9, atol=1e-12)
    for n, mean, eps in [(100, 0.0, 0.05), (100, 0.02, 0.05), (1000, 0.013, 0.02), (500, 0.3, 0.2),
                         (100, 0.0305, 0.1)]:
        a = min(mean, eps)
        h1 = (a * math.log(a / eps) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - eps))
        ref = min(math.exp(-n * h1), math.e * stats.binom.cdf(math.ceil(n * mean), n, eps), 1.0)
        assert hb_p_value(mean, n, eps).item() == pytest.approx(ref, rel=1e-9)
    assert hb_p_value(0.0, 100, 0.05).item() == pytest.approx(0.95**100)  # known answer: (1 - eps)^n
    # the HB bound is where the p-value crosses delta
    u = hb_ucb(torch.tensor([0.02, 0.1]), 500, 0.1)
    assert torch.allclose(hb_p_value(torch.tensor([0.02, 0.1]), 500, u), torch.tensor(0.1, dtype=torch.float64),
                          atol=1e-6)


def _wsr_brute(x: list[float], delta: float, step: float = 1e-4) -> float:
    """WSR bound (Bates et al. 2021, Prop. 5) by plain Python: the first R on a grid where the wealth
    process crosses 1/delta."""
    n = len(x)
    mu, s2, nus = [], [], []
    for i in range(1, n + 1):
        mu.append((0.5 + sum(x[:i])) / (1 + i))
        s2.append((0.25 + sum((x[j] - mu[j]) ** 2 for j in range(i))) / (1 + i))
    for i in range(n):
        prev = 0.25 if i == 0 else s2[i - 1]
        nus.append(min(1.0, math.sqrt(2 * math.log(1 / delta) / (n * prev))))
    for r in (j * step for j in range(int(1 / step) + 1)):
        k = 1.0
        for nu, xi in zip(nus, x):
            k *= 1 - nu * (xi - r)
            if k > 1 / delta:
                return r
    return 1.0


@pytest.mark.parametrize("kind", ["binary", "uniform", "signed", "zeros"])
def test_wsr_bound_against_a_brute_force_evaluation(kind):
    g = torch.Generator().manual_seed(5)
    n = 60
    x = {"binary": torch.bernoulli(torch.full((n,), 0.2), generator=g),
         "uniform": torch.rand(n, generator=g) * 0.6,
         "signed": torch.randint(-1, 2, (n,), generator=g).double() * (torch.rand(n, generator=g) < 0.3),
         "zeros": torch.zeros(n)}[kind].double()
    got = wsr_ucb(x, 0.1).item()
    assert got == pytest.approx(_wsr_brute(x.tolist(), 0.1), abs=2e-4)
    assert got >= x.mean().item()
    # bound B: the same bound on losses scaled by B
    assert wsr_ucb(2 * x, 0.1, bound=2.0).item() == pytest.approx(2 * got, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Selection rules on hand-made loss matrices


def _rows(means: list[float], n: int = 1000) -> torch.Tensor:
    """[G, n] 0/1 losses whose row means are exactly ``means`` (multiples of 1/n)."""
    return torch.stack([(torch.arange(n) < round(m * n)).double() for m in means])


def test_naive_takes_any_lambda_crc_and_ucb_stop_at_the_first_failure():
    losses = _rows([0.0, 0.01, 0.2, 0.03, 0.5])  # not monotone: row 3 looks safe again
    assert select("naive", losses, 0.05, 0.1, "gap-prediction") == 3
    assert select("crc", losses, 0.05, 0.1, "gap-prediction") == 1
    assert select("ucb-wsr", losses, 0.05, 0.1, "gap-prediction") == 1
    cert = certified_set("naive", losses, 0.05, 0.1, "gap-prediction")
    assert cert.tolist() == [True, True, False, True, False], "naive's set is not an interval"
    assert certified_set("crc", losses, 0.05, 0.1, "gap-prediction").tolist() == [True, True, False, False, False]
    # with a cost, the cheapest certified lambda (here cost falls with the index)
    cost = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2], dtype=torch.float64)
    assert select("naive", losses, 0.05, 0.1, "gap-prediction", cost) == 3
    # a cost not ordered like the grid: the cheapest member, not the smallest lambda
    assert select("naive", losses, 0.05, 0.1, "gap-prediction", torch.tensor([1.0, 0.3, 0.2, 0.5, 0.1])) == 1


def test_crc_raw_takes_the_largest_index_meeting_the_bound_as_the_reference():
    # n = 9, B = 1 (gap-prediction), eps = 0.2: the CRC bound (9/10) R_n + 1/10 <= 0.2  <=>  R_n <= 1/9.
    # Per-sample losses by hand (rows: lambda = grid index 0..4), signed and not monotone in lambda:
    losses = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 0],  # R_n = 0:    0.1 <= 0.2, holds
                           [0, 0, 0, 0, 0, 0, 0, 0, 0],  # R_n = 0:    holds
                           [1, 1, 0, 0, 0, 0, 0, 0, 0],  # R_n = 2/9:  0.3 > 0.2, fails
                           [1, -1, 0, 0, 0, 0, 0, 0, 0],  # R_n = 0:   holds again
                           [1, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)  # R_n = 3/9: 0.4, fails
    assert pointwise_ok("crc-raw", losses, 0.2, 0.1, "gap-prediction").tolist() == [True, True, False, True, False]
    # the reference's crc_lam: max of the indices where the bound holds, over the whole grid -> 3
    # (stopping at the first failure, the old crc-raw, gave 1)
    assert select("crc-raw", losses, 0.2, 0.1, "gap-prediction") == 3
    assert certified_set("crc-raw", losses, 0.2, 0.1, "gap-prediction").tolist() == [True, True, False, True, False]
    # crc on the monotonised loss: rows 3 and 4 of samples 0 and 1 are lifted to 1 (R~ = 2/9, 3/9) -> still 1
    assert monotonise(losses).mean(-1).tolist() == pytest.approx([0, 0, 2 / 9, 2 / 9, 3 / 9])
    assert select("crc", losses, 0.2, 0.1, "gap-prediction") == 1
    # nothing meets the bound (B/(n+1) = 0.1 > eps = 0.05): index 0, lambda = 1, as crc_lam's fallback
    assert select("crc-raw", losses, 0.05, 0.1, "gap-prediction") == 0


def _reference_lam(rule: str, losses: torch.Tensor, eps: float, bound: float) -> int:
    """A line-by-line port of the reference's naive_lam / crc_lam (metodj/RC-EENN, rc/risk_control.py)."""
    n_cal = losses.shape[1]
    risk = losses.mean(1)
    if rule == "naive":
        lams = (risk < eps).nonzero().flatten()
    else:
        ucb = (n_cal + 1) * eps / n_cal - bound / n_cal
        lams = (risk <= ucb).nonzero().flatten()
    return 0 if len(lams) == 0 else int(lams.max())


@pytest.mark.parametrize("rule", ["naive", "crc-raw"])
def test_naive_and_crc_raw_match_the_reference_selectors(rule):
    # continuous signed losses with a bumpy risk curve (no exact ties), batched over trials
    g = torch.Generator().manual_seed(5)
    trials, n = 200, 40
    drift = torch.linspace(-0.2, 0.4, len(LAMBDAS), dtype=torch.float64)[:, None]
    losses = (torch.rand(trials, len(LAMBDAS), n, generator=g, dtype=torch.float64) * 2 - 1) * 0.5 + drift
    losses[:, 0] = 0.0  # lambda = 1 never exits: no loss
    for eps in (0.05, 0.1, 0.2):
        got = select(rule, losses, eps, 0.1, "gap-prediction")
        want = [_reference_lam(rule, losses[t], eps, 1.0) for t in range(trials)]
        assert got.tolist() == want
        # statistics only, as the protocol passes them
        cal = CalLosses.from_means(losses.mean(-1), losses.clamp(min=0).mean(-1), n, "gap-prediction")
        assert select(rule, cal, eps, 0.1, "gap-prediction").tolist() == want


def test_naive_rejects_an_exact_tie_as_the_reference():
    # n = 4, eps = 0.25 (exact in binary): row 1's empirical risk is exactly eps, row 2's just under
    losses = torch.tensor([[0.0, 0.0, 0.0, 0.0],   # R_n = 0
                           [1.0, 0.0, 0.0, 0.0],   # R_n = 1/4 = eps: a tie, not < eps -> not taken
                           [1.0, 1.0, 0.0, 0.0]])  # R_n = 1/2
    assert pointwise_ok("naive", losses, 0.25, 0.1, "gap-prediction").tolist() == [True, False, False]
    assert select("naive", losses, 0.25, 0.1, "gap-prediction") == 0  # (R_n <= eps would take 1)
    assert select("naive", losses, 0.25 + 1e-9, 0.1, "gap-prediction") == 1  # just above the tie: taken
    assert _reference_lam("naive", losses, 0.25, 1.0) == 0


def test_ltt_is_the_textbook_fixed_sequence_rule():
    # p-values: rows 0-2 all-zero losses (p = 0.99^1000, rejected), row 3 mean 0.5 (p = 1), row 4 zeros
    losses = _rows([0.0, 0.0, 0.0, 0.5, 0.0])
    assert select("ltt", losses, 0.01, 0.1, "gap-prediction") == 2  # the last rejection before the first failure
    # (the reference get_ltt_lam returns the first non-rejected index, 3, one step too far)
    assert select("ltt", _rows([0.5, 0.0]), 0.01, 0.1, "gap-prediction") == 0  # nothing certified: lambda = 1
    assert scan_from_top(torch.tensor([[True, True, False, True], [False, True, True, True]])).tolist() == [1, 0]
    # negative gaps are clipped to 0 and losses divided by B before the test
    signed = torch.cat([-torch.ones(1, 1000), _rows([0.0])])
    assert select("ltt", signed, 0.01, 0.1, "gap-prediction") == 1
    with pytest.raises(UserError, match="unknown rule"):
        select("ltt2", losses, 0.01, 0.1, "gap-prediction")


# ----------------------------------------------------------------------------------------------
# Guarantees on synthetic traces with a known risk curve

BETA = 0.8  # early exit wrong w.p. BETA * (1 - s) at confidence s ~ U(0.5, 1); the final exit is always right


def _known_curve(lam: torch.Tensor) -> torch.Tensor:
    """Population gap-prediction risk: R(lambda) = int_lambda^1 2 * BETA (1 - s) ds = BETA (1 - lambda)^2."""
    lam = lam.clamp(min=0.5)
    return BETA * (1 - lam) ** 2


def _synthetic_losses(trials: int, n: int, seed: int) -> torch.Tensor:
    """[trials, G, n] calibration losses drawn from the known-curve trace, through the real loss path."""
    g = torch.Generator().manual_seed(seed)
    m = trials * n
    s = 0.5 + 0.5 * torch.rand(m, generator=g, dtype=torch.float64)
    wrong = torch.rand(m, generator=g, dtype=torch.float64) < BETA * (1 - s)
    d = torch.log(s / (1 - s)).float()
    early = torch.stack([d / 2, -d / 2], -1)  # predicts class 0 with max-softmax s
    y = wrong.long()  # label 1 where the early exit is wrong
    final = torch.nn.functional.one_hot(y, 2).float() * 20
    lm = loss_matrix(Trace(torch.stack([early, final]), y), "gap-prediction")  # [G, m]
    return lm.reshape(len(LAMBDAS), trials, n).permute(1, 0, 2)


def test_rules_keep_their_guarantees_on_a_known_risk_curve():
    trials, n, eps, delta = 300, 200, 0.05, 0.1
    # float32 losses with statistics computed once, as the protocol does (WSR reads them in order)
    cal = CalLosses.of(_synthetic_losses(trials, n, seed=11).float(), "gap-prediction")
    slack = 3 * math.sqrt(delta * (1 - delta) / trials)
    out = {}
    for rule in ("naive", "crc", "ucb-wsr", "ucb-hb", "ltt", "ucb-wsr-macs"):
        risk = _known_curve(LAMBDAS[select(rule, cal, eps, delta, "gap-prediction")])
        out[rule] = (float((risk > eps + 1e-12).double().mean()), float(risk.mean()), float(risk.std()))
    for rule in ("ucb-wsr", "ucb-hb", "ltt", "ucb-wsr-macs"):
        assert out[rule][0] <= delta + slack, (rule, out[rule])
    crc = out["crc"]
    assert crc[1] <= eps + 3 * crc[2] / math.sqrt(trials), crc
    assert out["naive"][0] >= 0.3, f"naive should violate often, got {out['naive']}"
    # the cached WSR tests (levels in descending order, re-testing only rows alive at a higher level)
    # equal fresh ones
    for eps_k in (0.2, 0.05, 0.01):
        fresh = CalLosses.of(cal.values[:40], "gap-prediction").wsr_ok(eps_k, delta)
        assert torch.equal(cal.wsr_ok(eps_k, delta)[:40], fresh)
    # and the certified rules still exit early: the lambda = 1 fallback is not what passes the test
    lam_wsr = LAMBDAS[select("ucb-wsr", cal, eps, delta, "gap-prediction")]
    assert float(lam_wsr.mean()) < 0.95


# ----------------------------------------------------------------------------------------------
# Per-exit family and the one-call calibrator


def test_per_exit_family_and_its_fast_risk_curve():
    a = shape_from_thresholds(torch.tensor([0.6, 0.9, 1.0]))
    assert a[0] == 1 and a[1] == pytest.approx(1.5) and math.isinf(a[2])  # t >= 1: that exit is off
    thr = per_exit_family(a)
    assert torch.all(thr[0] >= 1), "lambda = 1 never exits"
    assert torch.all(thr[:, 2] == float("inf")) and torch.all(thr[-1, :2] == 0)
    g = torch.Generator().manual_seed(2)
    scores = (torch.randint(0, 101, (3, 400), generator=g) / 100).float()  # many ties with the grid
    el = torch.randn(4, 400, generator=g, dtype=torch.float64)
    brute = el.gather(0, first_exit(scores, thr, strict=True)).mean(-1)
    assert torch.allclose(family_mean_loss(scores, thr, el), brute, atol=1e-12)


def _trace(n=800, exits=4, classes=5, seed=0) -> Trace:
    return synthetic_trace(n, exits, classes, seed)


@pytest.mark.parametrize("rule", ["ucb-wsr", "crc", "ltt", "ucb-wsr-macs", "ltt-per-exit", "pareto-testing"])
def test_calibrate_returns_a_deployable_policy(rule):
    tr = _trace()
    costs = [0.3, 0.55, 0.8, 1.1]
    c = calibrate(tr, "gap-prediction", 0.05, 0.1, rule, strict_costs=costs)
    assert len(c.thresholds) == 3 and c.calibration_risk <= 0.05 + 1e-12
    assert math.isnan(c.lam) if rule == "pareto-testing" else 0 <= c.lam <= 1
    assert c.certified_interval == (rule not in ("ucb-wsr-macs", "pareto-testing"))
    # the thresholds, applied as a strict ThresholdPolicy, reproduce the exits on the trace
    pol = ThresholdPolicy("max_softmax", c.thresholds, strict=True)
    scores = tr.scores("max_softmax")
    exits = first_exit(scores, torch.tensor([c.thresholds], dtype=torch.float64), strict=True)[0]
    for k in range(3):
        left_here = exits == k
        reached = exits >= k
        assert torch.equal(pol.accept(k, tr.logits[k][reached], None), left_here[reached])


# ----------------------------------------------------------------------------------------------
# The trial protocol

ROW_KEYS = {"rule", "risk", "eps", "guarantee", "promise", "test_risk_mean", "test_risk_std", "violation_freq",
            "mean_exit_index", "rel_macs_strict_mean", "lambda_mean"}


def test_protocol_schema_baselines_and_runtime():
    tr = _trace(n=1000, exits=4, classes=10, seed=4)
    cal, test = Trace(tr.logits[:, :500], tr.labels[:500]), Trace(tr.logits[:, 500:], tr.labels[500:])
    out = run_protocol(cal, test, [0.3, 0.55, 0.8, 1.1], RiskControl())
    assert isinstance(out, RiskControlResult) and all(isinstance(r, RiskRow) for r in out.rows)  # typed, as stored
    # n_cal small against the pool by default (the reference: 100 of 2000)
    assert (out.score, out.delta, out.n_cal, out.population, out.trials) == ("max_softmax", 0.1, 250, 1000, 100)
    assert out.allowance == pytest.approx(2 * math.sqrt(0.1 * 0.9 / 100))
    rules = {*PROTOCOL_RULES, "oracle", "random"}
    assert len(out.rows) == len(RISKS) * 5 * len(rules)
    for row in out.rows:
        assert set(asdict(row)) == ROW_KEYS and row.rule in rules and row.risk in RISKS
        assert 0 <= row.violation_freq <= 1 and 0 <= row.mean_exit_index <= 3
        assert (row.lambda_mean is None) == (row.rule in ("random", "pareto-testing"))  # no shared lambda
        assert all(math.isfinite(v) for v in asdict(row).values() if isinstance(v, float))
    by = {(r.rule, r.risk, r.eps): r for r in out.rows}
    for risk in RISKS:
        for eps in (0.01, 0.02, 0.05, 0.1, 0.2):
            oracle, rand = by["oracle", risk, eps], by["random", risk, eps]
            assert oracle.violation_freq == 0
            assert rand.mean_exit_index == pytest.approx(oracle.mean_exit_index, abs=0.01)
    # the confidence signal matters: at the oracle's exit rates, random exits break the target
    assert by["random", "gap-prediction", 0.05].test_risk_mean > 0.05
    assert out.seconds > 0  # its own timing is part of the result (speed is not a unit-test matter)
    json.dumps(asdict(out), allow_nan=False)  # JSON-ready
    assert run_protocol(cal, test, [0.3, 0.55, 0.8, 1.1], RiskControl(n_cal=100, trials=3, rules=("crc",))).n_cal == 100
    # learned confidence (EENet / PTEENet): pooled with the logits
    g = torch.Generator().manual_seed(0)
    cal.confidence, test.confidence = torch.rand(4, 500, generator=g), torch.rand(4, 500, generator=g)
    small = run_protocol(cal, test, [0.3, 0.55, 0.8, 1.1], RiskControl(trials=3, rules=("ltt", "ucb-wsr")),
                         score="confidence")
    assert small.score == "confidence" and len(small.rows) == len(RISKS) * 5 * 4
    with pytest.raises(UserError, match="n_cal"):
        run_protocol(cal, test, [0.3, 0.55, 0.8, 1.1], RiskControl(n_cal=1001))
    with pytest.raises(UserError, match="unknown rule 'oracle'"):  # a reference is not a rule one can ask for
        run_protocol(cal, test, [0.3, 0.55, 0.8, 1.1], RiskControl(rules=("oracle",)))


def _known_population(m: int, seed: int) -> Trace:
    """A population of m samples, 3 early exits + a final one that is always right. At early exit l a
    sample has max-softmax s ~ U(0.5, 1) and is wrong w.p. BETA * (1 - s) / (l + 1): later exits are
    better, confidence is informative, and per-sample gap losses are not monotone in lambda."""
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(m, dtype=torch.long)
    early = []
    for lvl in range(3):
        s = 0.5 + 0.5 * torch.rand(m, generator=g, dtype=torch.float64)
        wrong = torch.rand(m, generator=g, dtype=torch.float64) < BETA * (1 - s) / (lvl + 1)
        d = torch.log(s / (1 - s)).float()
        logit = torch.stack([d / 2, -d / 2], -1)
        early.append(torch.where(wrong[:, None], logit.flip(-1), logit))  # wrong: predicts class 1
    final = torch.nn.functional.one_hot(y, 2).float() * 20
    return Trace(torch.stack([*early, final]), y)


def test_every_rule_keeps_its_guarantee_against_a_known_population_risk():
    # The protocol draws calibration iid (with replacement) from the pool and judges the choice by the
    # pool's exact risk: the pool is the known population. Every rule with a guarantee must keep it.
    pop = _known_population(6000, seed=3)
    half = Trace(pop.logits[:, :3000], pop.labels[:3000]), Trace(pop.logits[:, 3000:], pop.labels[3000:])
    trials, delta, eps = 300, 0.1, 0.05
    spec = RiskControl(n_cal=200, trials=trials, eps=(eps,), delta=delta, risks=("gap-prediction", "consistency-brier"),
                       rules=PROTOCOL_RULES)
    out = run_protocol(*half, [0.3, 0.55, 0.8, 1.1], spec)
    slack = out.allowance
    by = {(r.rule, r.risk): asdict(r) for r in out.rows}
    for risk in ("gap-prediction", "consistency-brier"):
        for rule in ("ucb-wsr", "ucb-hb", "ucb-hoeffding", "ltt", "ucb-wsr-macs", "ltt-per-exit", "pareto-testing"):
            assert by[rule, risk]["violation_freq"] <= delta + slack, (rule, risk, by[rule, risk])
        crc = by["crc", risk]
        assert crc["test_risk_mean"] <= eps + 2 * crc["test_risk_std"] / math.sqrt(trials), crc
        # and they exit early: the lambda = 1 fallback is not what keeps them safe
        assert by["ltt-per-exit", risk]["rel_macs_strict_mean"] < 1.0
        assert by["pareto-testing", risk]["rel_macs_strict_mean"] < 1.0
        assert by["ucb-wsr", risk]["mean_exit_index"] < 3
    assert by["naive", "gap-prediction"]["violation_freq"] > delta + slack, "naive has no guarantee"


def test_pareto_front_by_hand():
    risk = torch.tensor([0.10, 0.05, 0.05, 0.20, 0.00, 0.05])
    cost = torch.tensor([0.50, 0.60, 0.70, 0.40, 1.00, 0.60])
    # 0.7 at 0.05 is beaten by 0.6 at 0.05; of the two identical (0.05, 0.6) one is kept
    assert pareto_front(risk, cost).tolist() == [True, True, False, True, True, False]
    batched = pareto_front(torch.stack([risk, -risk]), torch.stack([cost, cost]))
    assert batched[0].tolist() == pareto_front(risk, cost).tolist()
    assert batched[1].tolist() == [False, False, False, True, False, False]  # cheapest and least risky


def test_pareto_test_tests_the_front_from_the_safest_and_keeps_the_cheapest_certified():
    # two exits, three candidates; exit 0 right on everyone with score > 0.9, wrong below
    n = 400
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, n, generator=g, dtype=torch.float64)
    wrong0 = scores[0] <= 0.9
    loss = torch.stack([wrong0.double(), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)])
    cand = torch.tensor([[1.0, 1.0], [0.9, 1.0], [0.5, 1.0]], dtype=torch.float64)  # off, safe, risky
    costs = [0.3, 0.6, 1.0]
    c = pareto_test(scores, loss, scores, loss, costs, 0.05, 0.1, "gap-prediction", candidates=cand)
    # "off" is beaten by "safe" (no risk either, cheaper): the front is safe then risky; the risky one fails
    assert c.thresholds.tolist() == [0.9, 1.0]
    assert int(c.front_size) == 2 and int(c.certified) == 1
    # a target nothing but the full model meets: every exit off
    strict = pareto_test(scores, loss + 0.5, scores, loss + 0.5, costs, 0.01, 0.1, "gap-prediction",
                         candidates=cand[1:])
    assert strict.thresholds.tolist() == [1.0, 1.0] and int(strict.certified) == 0


def test_crc_monotonises_non_monotone_losses():
    # one sample right at lambda index 1 and 3, wrong at 2: the raw loss dips, the monotonised one does not
    losses = torch.tensor([[0.0], [0.0], [1.0], [0.0]]).expand(4, 10).contiguous()
    assert monotonise(losses)[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    cal = CalLosses.of(losses, "gap-prediction")
    assert cal.mono_mean.tolist() == [0.0, 0.0, 1.0, 1.0] and cal.mean.tolist() == [0.0, 0.0, 1.0, 0.0]
    # Hoeffding on the clipped [0, 1] loss: width 1, not the signed range 2
    ok = pointwise_ok("ucb-hoeffding", torch.zeros(1, 100), 0.13, 0.1, "gap-prediction")
    assert bool(ok[0]) == (math.sqrt(math.log(10) / 200) <= 0.13)
