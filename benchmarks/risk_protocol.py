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

import torch
from torch import Tensor

from exitbench.benchmarks.traces import Trace
from exitbench.methods.base import UserError
from exitbench.methods.risk_control import (
    LAMBDAS,
    RISKS,
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
EPS = (0.01, 0.02, 0.05, 0.1, 0.2)
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
         lam: Tensor | None) -> dict:
    """One (rule, risk, eps) summary over trials; ``risk_t`` [T] is the population risk of each trial's
    choice. ``violation_freq`` = P(population risk > eps)."""
    tr = risk_t.double()
    return {
        "rule": rule, "risk": risk, "eps": float(eps), "guarantee": get_rule(rule).guarantee,
        "promise": get_rule(rule).promise,
        "test_risk_mean": tr.mean().item(), "test_risk_std": tr.std(unbiased=False).item(),
        "violation_freq": (tr > eps + 1e-12).double().mean().item(),
        "mean_exit_index": exit_mean.double().mean().item(), "rel_macs_strict_mean": macs.double().mean().item(),
        "lambda_mean": None if lam is None else lam.double().mean().item(),
    }


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


def run_protocol(calibration: Trace, test: Trace, strict_costs: Sequence[float], *, score: str = "max_softmax",
                 rules: Sequence[str] = PROTOCOL_RULES, risks: Sequence[str] | None = None,
                 eps: Sequence[float] = EPS, delta: float = 0.1, n_cal: int | None = None, trials: int = 100,
                 seed: int = 0, per_exit_grid: int = 30, per_exit_sweeps: int = 2) -> dict:
    """Run the risk-control protocol on one cell's traces; returns a JSON-ready dict
    {score, delta, n_cal, population, trials, sampling, allowance, seconds, rows: [{rule, risk, eps,
    guarantee, test_risk_mean, test_risk_std, violation_freq, mean_exit_index, rel_macs_strict_mean,
    lambda_mean}]}, with rows for every (rule, risk, eps) plus ``oracle`` and ``random`` (lambda_mean
    None) per (risk, eps). "test risk" is the population (pool) risk of the chosen lambda.

    ``strict_costs``: relative strict cost of each exit (final last). ``n_cal`` defaults to
    min(1000, M // 4) for M pooled samples: small against the pool, as the reference's 100 of 2000.
    """
    start = time.perf_counter()
    for r in rules:
        if r not in PROTOCOL_RULES:
            raise UserError(f"risk protocol: unknown rule {r!r}; use some of {', '.join(PROTOCOL_RULES)}")
    risks = [get_risk(r).name for r in (RISKS.names() if risks is None else risks)]
    data = pool(calibration, test)
    m = len(data)
    n_cal = max(2, min(1000, m // 4)) if n_cal is None else int(n_cal)
    if not 2 <= n_cal <= m:
        raise UserError(f"risk protocol: n_cal={n_cal} must lie in [2, {m}] for {m} pooled samples")
    cost = torch.as_tensor(strict_costs, dtype=torch.float64)
    e_exits = data.num_exits
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
    pop_exit, pop_macs = pop_frac @ torch.arange(e_exits, dtype=torch.float64), pop_frac @ cost  # [G]
    cal_macs = cal_frac @ cost  # [T, G]
    order = torch.rand(trials, m, generator=gen).argsort(dim=1)  # random orders for the random baseline
    pos = torch.arange(m, dtype=torch.float64)

    rows: list[dict] = []
    simple = [r for r in rules if not get_rule(r).per_exit]
    for risk in risks:
        el = exit_losses(data.logits, data.labels, risk)  # [E, M]
        losses = el.gather(0, exits)  # [G, M]
        pop_risk = losses.double().mean(1)  # [G]: the population risk of every lambda
        unit = losses.clamp(min=0) / get_risk(risk).bound
        # WSR reads the calibration losses in order; float32 halves the work of the [T, G, n] passes
        if any("wsr" in r for r in simple):
            seq = losses.float().T[draws].permute(0, 2, 1).contiguous()  # [T, G, n_cal]
        else:
            seq = torch.zeros(()).expand(trials, g, n_cal)  # only its shape is read
        cal = CalLosses(seq, counts @ losses.T / n_cal, counts @ unit.T / n_cal, get_risk(risk).bound,
                        counts @ monotonise(losses.double()).T / n_cal)
        per_exit = {}
        if any(get_rule(r).per_exit and not get_rule(r).front for r in rules):
            per_exit = _per_exit_ltt(scores, el, cost, draws, n_cal, risk, eps, delta, per_exit_grid, per_exit_sweeps)
        front = _pareto(scores, el, cost, draws, n_cal, risk, eps, delta) if any(
            get_rule(r).front for r in rules) else {}
        done: dict[float, list[dict]] = {}
        for e in sorted(eps, reverse=True):  # descending: WSR re-tests only rows that passed a higher eps
            block = done[e] = []
            for rule in rules:
                if get_rule(rule).per_exit:
                    block.append(_row(rule, risk, e, *(front if get_rule(rule).front else per_exit)[e]))
                    continue
                k = select(rule, cal, e, delta, risk, cal_macs if get_rule(rule).union_bound else None)
                block.append(_row(rule, risk, e, pop_risk[k], pop_exit[k], pop_macs[k], LAMBDAS[k]))
            ok = pop_risk <= e + 1e-12
            ok[0] = True
            k = int(torch.where(ok, pop_macs, torch.full_like(pop_macs, float("inf"))).argmin())
            one = torch.ones(trials, dtype=torch.float64)
            block.append(_row("oracle", risk, e, pop_risk[k] * one, pop_exit[k] * one, pop_macs[k] * one,
                              LAMBDAS[k] * one))
            # random exits with the oracle's fractions: positions [0, M f_0) of a random order -> exit 0, ...
            bounds = torch.round(pop_frac[k].cumsum(0) * m)  # [E]
            rand_exit_sorted = (pos[:, None] >= bounds[None, :]).sum(-1).clamp(max=e_exits - 1)  # [M]
            rand_exit = torch.empty(trials, m, dtype=torch.long).scatter_(1, order,
                                                                          rand_exit_sorted.expand(trials, -1))
            rand_loss = el.T.gather(1, rand_exit.T).T  # [T, M]
            block.append(_row("random", risk, e, rand_loss.mean(1), rand_exit.double().mean(1),
                              cost[rand_exit].mean(1), None))
        rows.extend(r for e in eps for r in done[e])
    return {"score": score, "delta": float(delta), "n_cal": n_cal, "population": m, "trials": int(trials),
            "sampling": SAMPLING, "allowance": allowance(delta, trials),
            "seconds": time.perf_counter() - start, "rows": rows}


__all__ = ["EPS", "PROTOCOL_RULES", "SAMPLING", "allowance", "pool", "run_protocol"]
