"""The risk-control trial protocol for one cell (docs/risk_control.md, "The protocol").

The cell's calibration and test traces are pooled (M samples). That pool is the population: each of
``trials`` trials draws n_cal calibration samples from it *with replacement* (iid from the pool's
empirical distribution), every rule picks lambda on them, and the choice is judged on the whole pool,
whose risk at that lambda is then the exact population risk. So the violation frequency
P(R(lambda_hat) > eps) is the quantity UCB/LTT bound, and the mean population risk the one CRC bounds,
with no test-part sampling noise and no optimism from re-using the calibration samples; only the
trial noise of a frequency estimated from T trials remains (``allowance``, two binomial standard errors).
All per-lambda statistics of all trials come from a few matrix products (draw counts [T, M] x
per-sample values [M, G]); only WSR needs the ordered calibration losses [T, G, n_cal].

Baselines: ``oracle`` picks the cheapest lambda whose population risk <= eps (not deployable, the same
in every trial); ``random`` sends each sample to an exit at random with the oracle's per-exit exit
fractions, so it has the oracle's cost and shows what the confidence signal buys. ``ltt-per-exit`` fits
a per-exit shape a_l on the first half of each calibration draw and certifies lambda_l = lambda * a_l
with LTT on the second half; ``pareto-testing`` finds the (risk, MACs) front of free per-exit threshold
vectors on the first half and tests along it on the second (methods.risk_control).

Conventions: exit indices are 0-based (the final exit of a 4-exit net is 3); std is over trials
(population, ddof = 0); ``violation_freq`` is the share of trials with population risk > eps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from exitbench.benchmarks.traces import Trace
from exitbench.core.results import RiskControlResult, RiskRow
from exitbench.core.spec import RiskControl
from exitbench.methods.base import UserError
from exitbench.methods.risk_control import (
    LAMBDAS,
    SELECTION_RULES,
    CalLosses,
    confidence_scores,
    exit_index,
    exit_losses,
    family_mean_loss,
    fit_shape,
    get_risk,
    get_rule,
    monotonise,
    pareto_sequence,
    per_exit_family,
    select,
)

PROTOCOL_RULES = SELECTION_RULES  # every registered rule except the protocol's own references
SAMPLING = "with replacement from the pool; judged on the pool's (population) risk"


def allowance(delta: float, trials: int) -> float:
    """Trial noise allowed on a violation frequency estimated from ``trials`` trials: two binomial
    standard errors at frequency delta. A high-probability rule breaks its promise when its violation
    frequency exceeds delta + allowance."""
    return 2 * (delta * (1 - delta) / trials) ** 0.5


def pool(a: Trace, b: Trace) -> Trace:
    """One trace with the samples of ``a`` then ``b``."""
    conf = None
    if a.confidence is not None and b.confidence is not None:
        conf = torch.cat([a.confidence, b.confidence], dim=1)
    return Trace(torch.cat([a.logits, b.logits], dim=1), torch.cat([a.labels, b.labels]), conf)


def _row(rule: str, risk: str, eps: float, risk_t: Tensor, exit_mean: Tensor, macs: Tensor,
         lam: Tensor | None) -> RiskRow:
    """One (rule, risk, eps) summary over trials; ``risk_t`` [T] is the population risk of each trial's
    choice. ``violation_freq`` = P(population risk > eps)."""
    tr = risk_t.double()
    return RiskRow(
        rule, risk, float(eps), get_rule(rule).guarantee, get_rule(rule).promise,
        test_risk_mean=tr.mean().item(), test_risk_std=tr.std(unbiased=False).item(),
        violation_freq=(tr > eps + 1e-12).double().mean().item(), mean_exit_index=exit_mean.double().mean().item(),
        rel_macs_strict_mean=macs.double().mean().item(),
        lambda_mean=None if lam is None else lam.double().mean().item())


def _per_exit_ltt(scores: Tensor, el: Tensor, cost: Tensor, draws: Tensor, n_cal: int, risk: str,
                  eps: Sequence[float], delta: float, grid_size: int, sweeps: int,
                  chunk: int = 25) -> dict[float, tuple[Tensor, ...]]:
    """Per trial: shape on draw[:n_cal // 2], LTT on draw[n_cal // 2:], read on the whole pool.
    Batched over trials (``chunk`` at a time, to bound memory). Returns {eps: (population risk [T],
    mean exit [T], strict MACs [T], lambda [T])}."""
    n_shape = n_cal // 2
    n_cert = n_cal - n_shape
    bound = get_risk(risk).bound
    k_early = scores.shape[0]
    eps_t = torch.tensor(eps, dtype=torch.float64)
    parts: list[list[Tensor]] = [[] for _ in range(4)]

    def take(idx: Tensor) -> tuple[Tensor, Tensor]:  # [T, n] sample ids -> scores [T, K, n], losses [T, E, n]
        return scores[:, idx].permute(1, 0, 2), el[:, idx].permute(1, 0, 2)

    everyone = torch.arange(scores.shape[1])
    for p in draws.split(chunk):
        s_shape, l_shape = take(p[:, :n_shape])
        s_cert, l_cert = take(p[:, n_shape:n_cal])
        s_test, l_test = take(everyone.expand(len(p), -1))
        a = fit_shape(s_shape, l_shape, cost, eps_t, grid_size=grid_size, sweeps=sweeps)  # [t, P, K]
        thr = per_exit_family(a)  # [t, P, G, K]
        # LTT reads only the mean [0, 1]-loss per lambda: the family's curve, without [t, P, G, n] exits
        unit = family_mean_loss(s_cert[:, None], thr, l_cert[:, None].clamp(min=0) / bound)  # [t, P, G]
        k = torch.stack([select("ltt", CalLosses.from_means(unit[:, i], unit[:, i], n_cert, risk), e, delta, risk)
                         for i, e in enumerate(eps)], dim=1)  # [t, P]
        chosen = thr.gather(2, k[..., None, None].expand(-1, -1, 1, k_early))[:, :, 0]  # [t, P, K]
        test_ex = exit_index(s_test, chosen)  # [t, P, n_test]
        parts[0].append(l_test.gather(1, test_ex).mean(-1))
        parts[1].append(test_ex.double().mean(-1))
        parts[2].append(cost[test_ex].mean(-1))
        parts[3].append(LAMBDAS[k])
    cols = [torch.cat(x) for x in parts]  # each [T, P]
    return {e: tuple(c[:, i] for c in cols) for i, e in enumerate(eps)}


PARETO_OPT_FRACTION = 0.5  # the share of each calibration draw that finds the front; the rest tests along it


def _pareto(scores: Tensor, el: Tensor, cost: Tensor, draws: Tensor, n_cal: int, risk: str, eps: Sequence[float],
            delta: float, chunk: int = 25, opt_fraction: float | None = None) -> dict[float, tuple[Tensor, ...]]:
    """Per trial: Pareto testing with its front on the first ``opt_fraction`` of the draw and its test on the
    rest, read on the whole pool. Returns {eps: (population risk [T], mean exit [T], strict MACs [T], None)}."""
    n_opt = max(1, int(round(n_cal * (PARETO_OPT_FRACTION if opt_fraction is None else opt_fraction))))
    out: dict[float, list[list[Tensor]]] = {e: [[], [], []] for e in eps}

    def take(idx: Tensor) -> tuple[Tensor, Tensor]:
        return scores[:, idx].permute(1, 0, 2), el[:, idx].permute(1, 0, 2)

    for p in draws.split(chunk):
        s_opt, l_opt = take(p[:, :n_opt])
        s_cert, l_cert = take(p[:, n_opt:n_cal])
        seq = pareto_sequence(s_opt, l_opt, s_cert, l_cert, cost, delta, risk)  # the same front for every eps
        for e in eps:
            thr = seq.choose(e).thresholds
            ex = exit_index(scores, thr[:, None, :])[:, 0]  # [t, M]: every pooled sample
            out[e][0].append(el.T.gather(1, ex.T).T.double().mean(-1))  # [t, M]: loss at its exit
            out[e][1].append(ex.double().mean(-1))
            out[e][2].append(cost[ex].mean(-1))
    return {e: (*(torch.cat(c) for c in cols), None) for e, cols in out.items()}


@dataclass(frozen=True)
class _Population:
    """The pooled traces and every trial's calibration draw, shared by all risks: the scores [K, M], the exit
    of every sample at every lambda [G, M], the draws [T, n_cal] and their counts [T, M], the population's
    exit fractions [G, E], mean exit and strict MACs per lambda [G], each trial's calibration MACs [T, G],
    and the random orders of the ``random`` baseline [T, M]."""

    data: Trace
    cost: Tensor
    scores: Tensor
    exits: Tensor
    draws: Tensor
    counts: Tensor
    pop_frac: Tensor
    pop_exit: Tensor
    pop_macs: Tensor
    cal_macs: Tensor
    order: Tensor

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def trials(self) -> int:
        return self.draws.shape[0]

    @property
    def n_cal(self) -> int:
        return self.draws.shape[1]


def _n_cal(spec: RiskControl, m: int) -> int:
    """The calibration draw's size: ``spec.n_cal``, or (0) min(1000, M // 4) for M pooled samples."""
    for r in spec.rules:
        if r not in PROTOCOL_RULES:
            raise UserError(f"risk protocol: unknown rule {r!r}; use some of {', '.join(PROTOCOL_RULES)}")
    n_cal = int(spec.n_cal) if spec.n_cal else max(2, min(1000, m // 4))
    if not 2 <= n_cal <= m:
        raise UserError(f"risk protocol: n_cal={n_cal} must lie in [2, {m}] for {m} pooled samples")
    return n_cal


def _population(data: Trace, strict_costs: Sequence[float], score: str, n_cal: int, trials: int,
                seed: int) -> _Population:
    """Every trial's draw from the pool and what it reads, computed once for all risks."""
    m, e_exits = len(data), data.num_exits
    cost = torch.as_tensor(strict_costs, dtype=torch.float64)
    if cost.numel() != e_exits:
        raise UserError(f"risk protocol: {cost.numel()} strict costs for {e_exits} exits")
    scores = confidence_scores(data, score)  # [K, M]
    exits = exit_index(scores)  # [G, M]
    g = exits.shape[0]
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(m, (trials, n_cal), generator=gen)  # [T, n_cal], with replacement
    counts = torch.zeros(trials, m, dtype=torch.float64).scatter_add_(1, draws, torch.ones(trials, n_cal,
                                                                                          dtype=torch.float64))
    onehot = torch.nn.functional.one_hot(exits.T, e_exits).double()  # [M, G, E]
    pop_frac = onehot.mean(0)  # [G, E] exit fractions of the population
    cal_frac = (counts @ onehot.reshape(m, g * e_exits)).reshape(trials, g, e_exits) / n_cal
    order = torch.rand(trials, m, generator=gen).argsort(dim=1)  # random orders for the random baseline
    return _Population(data, cost, scores, exits, draws, counts, pop_frac,
                       pop_frac @ torch.arange(e_exits, dtype=torch.float64), pop_frac @ cost, cal_frac @ cost, order)


def _cal_losses(pop: _Population, losses: Tensor, risk: str, wsr: bool) -> CalLosses:
    """Every trial's calibration statistics of the per-lambda ``losses`` [G, M] (means from the draw counts)."""
    bound = get_risk(risk).bound
    unit = losses.clamp(min=0) / bound
    # WSR reads the calibration losses in order; float32 halves the work of the [T, G, n] passes
    if wsr:
        seq = losses.float().T[pop.draws].permute(0, 2, 1).contiguous()  # [T, G, n_cal]
    else:
        seq = torch.zeros(()).expand(pop.trials, losses.shape[0], pop.n_cal)  # only its shape is read
    n = pop.n_cal
    return CalLosses(seq, pop.counts @ losses.T / n, pop.counts @ unit.T / n, bound,
                     pop.counts @ monotonise(losses.double()).T / n)


def _references(pop: _Population, el: Tensor, pop_risk: Tensor, risk: str, e: float) -> list[RiskRow]:
    """The ``oracle`` (the cheapest lambda whose population risk <= e) and ``random`` (random exits with the
    oracle's exit fractions) rows."""
    ok = pop_risk <= e + 1e-12
    ok[0] = True
    k = int(torch.where(ok, pop.pop_macs, torch.full_like(pop.pop_macs, float("inf"))).argmin())
    one = torch.ones(pop.trials, dtype=torch.float64)
    oracle = _row("oracle", risk, e, pop_risk[k] * one, pop.pop_exit[k] * one, pop.pop_macs[k] * one, LAMBDAS[k] * one)
    # random exits with the oracle's fractions: positions [0, M f_0) of a random order -> exit 0, ...
    m, e_exits = pop.size, pop.cost.numel()
    bounds = torch.round(pop.pop_frac[k].cumsum(0) * m)  # [E]
    pos = torch.arange(m, dtype=torch.float64)
    rand_exit_sorted = (pos[:, None] >= bounds[None, :]).sum(-1).clamp(max=e_exits - 1)  # [M]
    rand_exit = torch.empty(pop.trials, m, dtype=torch.long).scatter_(1, pop.order,
                                                                      rand_exit_sorted.expand(pop.trials, -1))
    rand_loss = el.T.gather(1, rand_exit.T).T  # [T, M]
    return [oracle, _row("random", risk, e, rand_loss.mean(1), rand_exit.double().mean(1),
                         pop.cost[rand_exit].mean(1), None)]


def _risk_rows(pop: _Population, spec: RiskControl, risk: str, per_exit_grid: int, per_exit_sweeps: int
               ) -> list[RiskRow]:
    """Every rule's row and the two references' for one risk, eps by eps in ``spec.eps``'s order."""
    rules = [get_rule(r) for r in spec.rules]
    el = exit_losses(pop.data.logits, pop.data.labels, risk)  # [E, M]
    losses = el.gather(0, pop.exits)  # [G, M]
    pop_risk = losses.double().mean(1)  # [G]: the population risk of every lambda
    cal = _cal_losses(pop, losses, risk, any("wsr" in r.name for r in rules if not r.per_exit))
    per_exit: dict[float, tuple] = {}
    front: dict[float, tuple] = {}
    if any(r.per_exit and not r.front for r in rules):
        per_exit = _per_exit_ltt(pop.scores, el, pop.cost, pop.draws, pop.n_cal, risk, spec.eps, spec.delta,
                                 per_exit_grid, per_exit_sweeps)
    if any(r.front for r in rules):
        front = _pareto(pop.scores, el, pop.cost, pop.draws, pop.n_cal, risk, spec.eps, spec.delta)
    done: dict[float, list[RiskRow]] = {}
    for e in sorted(spec.eps, reverse=True):  # descending: WSR re-tests only rows that passed a higher eps
        block = done[e] = []
        for rule in rules:
            if rule.per_exit:
                block.append(_row(rule.name, risk, e, *(front if rule.front else per_exit)[e]))
                continue
            k = select(rule.name, cal, e, spec.delta, risk, pop.cal_macs if rule.union_bound else None)
            block.append(_row(rule.name, risk, e, pop_risk[k], pop.pop_exit[k], pop.pop_macs[k], LAMBDAS[k]))
        block += _references(pop, el, pop_risk, risk, e)
    return [r for e in spec.eps for r in done[e]]


def run_protocol(calibration: Trace, test: Trace, strict_costs: Sequence[float], spec: RiskControl, *,
                 score: str = "max_softmax", seed: int = 0, per_exit_grid: int = 30,
                 per_exit_sweeps: int = 2) -> RiskControlResult:
    """Run the risk-control protocol ``spec`` (its rules, risks, eps, delta, trials and n_cal; ``enabled`` is
    the caller's matter) on one cell's traces. The result's rows cover every (rule, risk, eps) plus ``oracle``
    and ``random`` (lambda_mean None) per (risk, eps); "test risk" is the population (pool) risk of the
    chosen lambda.

    ``strict_costs``: relative strict cost of each exit (final last). ``spec.n_cal`` 0 means
    min(1000, M // 4) for M pooled samples: small against the pool, as the reference's 100 of 2000.
    """
    start = time.perf_counter()
    data = pool(calibration, test)
    pop = _population(data, strict_costs, score, _n_cal(spec, len(data)), spec.trials, seed)
    risks = [get_risk(r).name for r in spec.risks]
    rows = [row for risk in risks for row in _risk_rows(pop, spec, risk, per_exit_grid, per_exit_sweeps)]
    return RiskControlResult(score, float(spec.delta), pop.n_cal, pop.size, int(spec.trials), SAMPLING,
                             allowance(spec.delta, spec.trials), time.perf_counter() - start, rows)


__all__ = ["PROTOCOL_RULES", "SAMPLING", "allowance", "pool", "run_protocol"]
