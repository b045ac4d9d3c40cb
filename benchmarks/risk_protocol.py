"""The risk-control trial protocol for one cell (docs/RISK_CONTROL.md, "Protocol").

The cell's calibration and test traces are pooled (M samples) and re-split at random ``trials`` times
into n_cal calibration and M - n_cal test samples. Every rule picks lambda on the calibration part;
its test risk, exit index and strict MACs are read on the test part. All per-lambda test statistics of
all trials come from a few matrix products (trial masks [T, M] x per-sample values [M, G]), so a
trial costs no pass over the data; only WSR needs the ordered calibration losses [T, G, n_cal].

Baselines: ``oracle`` picks, on each trial's test part, the cheapest lambda whose test risk <= eps
(not deployable); ``random`` sends test samples to exits uniformly at random with the oracle's
per-exit exit fractions, so it has the oracle's cost and shows what the confidence signal buys.
``ltt-per-exit`` fits a per-exit shape a_l on the first half of each calibration part and certifies
lambda_l = lambda * a_l with LTT on the second half (methods.risk_control).

Conventions: exit indices are 0-based (the final exit of a 4-exit net is 3); std is over trials
(population, ddof = 0); ``violation_freq`` is the share of trials with test risk > eps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor

from benchmarks.traces import Trace
from methods.base import UserError
from methods.risk_control import (
    LAMBDAS,
    RISKS,
    CalLosses,
    confidence_scores,
    exit_index,
    exit_losses,
    family_mean_loss,
    fit_shape,
    per_exit_family,
    select,
)

PROTOCOL_RULES = ("naive", "crc", "ucb-wsr", "ucb-hb", "ucb-hoeffding", "ltt", "ucb-wsr-macs", "ltt-per-exit")
EPS = (0.01, 0.02, 0.05, 0.1, 0.2)


def pool(a: Trace, b: Trace) -> Trace:
    """One trace with the samples of ``a`` then ``b``."""
    conf = None
    if a.confidence is not None and b.confidence is not None:
        conf = torch.cat([a.confidence, b.confidence], dim=1)
    return Trace(torch.cat([a.logits, b.logits], dim=1), torch.cat([a.labels, b.labels]), conf)


def _row(rule: str, risk: str, eps: float, test_risk: Tensor, exit_mean: Tensor, macs: Tensor,
         lam: Tensor | None, pool_risk: Tensor | None = None) -> dict:
    """One (rule, risk, eps) summary over trials. ``pool_risk``: the chosen lambda's risk on the whole
    pooled set, a stand-in for the population risk that UCB/LTT bound. Violations judged on the test
    part alone also count its sampling noise (std ~ sqrt(R / n_test)), so they can exceed delta even
    when the bound holds; ``violation_freq_pool`` separates the two."""
    tr = test_risk.double()
    pr = None if pool_risk is None else pool_risk.double()
    return {
        "rule": rule, "risk": risk, "eps": float(eps),
        "test_risk_mean": tr.mean().item(), "test_risk_std": tr.std(unbiased=False).item(),
        "violation_freq": (tr > eps).double().mean().item(),
        "pool_risk_mean": None if pr is None else pr.mean().item(),
        "violation_freq_pool": None if pr is None else (pr > eps + 1e-12).double().mean().item(),
        "mean_exit_index": exit_mean.double().mean().item(), "rel_macs_strict_mean": macs.double().mean().item(),
        "lambda_mean": None if lam is None else lam.double().mean().item(),
    }


def _per_exit_ltt(scores: Tensor, el: Tensor, cost: Tensor, perm: Tensor, n_cal: int, risk: str,
                  eps: Sequence[float], delta: float, grid_size: int, sweeps: int,
                  chunk: int = 100) -> dict[float, tuple[Tensor, ...]]:
    """Per trial: shape on calibration[:n_cal // 2], LTT on calibration[n_cal // 2:], read on test.
    Batched over trials (``chunk`` at a time, to bound memory). Returns {eps: (test risk [T],
    mean exit [T], strict MACs [T], lambda [T])}."""
    n_shape = n_cal // 2
    n_cert = n_cal - n_shape
    bound = RISKS[risk].bound
    k_early = scores.shape[0]
    eps_t = torch.tensor(eps, dtype=torch.float64)
    parts: list[list[Tensor]] = [[] for _ in range(4)]

    def take(idx: Tensor) -> tuple[Tensor, Tensor]:  # [T, n] sample ids -> scores [T, K, n], losses [T, E, n]
        return scores[:, idx].permute(1, 0, 2), el[:, idx].permute(1, 0, 2)

    for p in perm.split(chunk):
        s_shape, l_shape = take(p[:, :n_shape])
        s_cert, l_cert = take(p[:, n_shape:n_cal])
        s_test, l_test = take(p[:, n_cal:])
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


def run_protocol(calibration: Trace, test: Trace, strict_costs: Sequence[float], *, score: str = "max_softmax",
                 rules: Sequence[str] = PROTOCOL_RULES, risks: Sequence[str] = tuple(RISKS),
                 eps: Sequence[float] = EPS, delta: float = 0.1, n_cal: int | None = None, trials: int = 100,
                 seed: int = 0, per_exit_grid: int = 30, per_exit_sweeps: int = 2) -> dict:
    """Run the risk-control protocol on one cell's traces; returns a JSON-ready dict
    {score, delta, n_cal, n_test, trials, seconds, rows: [{rule, risk, eps, test_risk_mean, test_risk_std,
    violation_freq, pool_risk_mean, violation_freq_pool, mean_exit_index, rel_macs_strict_mean,
    lambda_mean}]}, with rows for every (rule,
    risk, eps) plus ``oracle`` and ``random`` (lambda_mean None) per (risk, eps).

    ``strict_costs``: relative strict cost of each exit (final last). ``n_cal`` defaults to
    min(1000, M // 2) for M pooled samples.
    """
    start = time.perf_counter()
    for r in rules:
        if r not in PROTOCOL_RULES:
            raise UserError(f"risk protocol: unknown rule {r!r}; use some of {', '.join(PROTOCOL_RULES)}")
    data = pool(calibration, test)
    m = len(data)
    n_cal = min(1000, m // 2) if n_cal is None else int(n_cal)
    if not 2 <= n_cal <= m - 1:
        raise UserError(f"risk protocol: n_cal={n_cal} must lie in [2, {m - 1}] for {m} pooled samples")
    n_test = m - n_cal
    cost = torch.as_tensor(strict_costs, dtype=torch.float64)
    e_exits = data.num_exits
    if cost.numel() != e_exits:
        raise UserError(f"risk protocol: {cost.numel()} strict costs for {e_exits} exits")
    scores = confidence_scores(data, score)  # [K, M]
    exits = exit_index(scores)  # [G, M]
    g = exits.shape[0]

    gen = torch.Generator().manual_seed(seed)
    perm = torch.rand(trials, m, generator=gen).argsort(dim=1)  # [T, M] random orders
    cal_idx, test_idx = perm[:, :n_cal], perm[:, n_cal:]
    cal_mask = torch.zeros(trials, m, dtype=torch.float64).scatter_(1, cal_idx, 1.0)
    test_mask = 1.0 - cal_mask
    # per-(trial, lambda) exit fractions on each part: one product with the exit one-hots [M, G*E]
    onehot = torch.nn.functional.one_hot(exits.T, e_exits).reshape(m, g * e_exits).double()
    test_frac = (test_mask @ onehot).reshape(trials, g, e_exits) / n_test
    cal_frac = (cal_mask @ onehot).reshape(trials, g, e_exits) / n_cal
    exit_ids = torch.arange(e_exits, dtype=torch.float64)
    test_exit, test_macs, cal_macs = test_frac @ exit_ids, test_frac @ cost, cal_frac @ cost  # [T, G]
    rows_t = torch.arange(trials)
    # the test part of each order is itself a uniformly random order: the random baseline uses it
    pos = torch.arange(n_test, dtype=torch.float64)

    rows: list[dict] = []
    simple = [r for r in rules if r != "ltt-per-exit"]
    for risk in risks:
        el = exit_losses(data.logits, data.labels, risk)  # [E, M]
        losses = el.gather(0, exits)  # [G, M]
        test_risk = test_mask @ losses.T / n_test  # [T, G]
        pool_risk = losses.double().mean(1)  # [G]
        unit = losses.clamp(min=0) / RISKS[risk].bound
        # WSR reads the calibration losses in order; float32 halves the work of the [T, G, n] passes
        if any("wsr" in r for r in simple):
            seq = losses.float().T[cal_idx].permute(0, 2, 1).contiguous()  # [T, G, n_cal]
        else:
            seq = torch.zeros(()).expand(trials, g, n_cal)  # only its shape is read
        cal = CalLosses(seq, cal_mask @ losses.T / n_cal, cal_mask @ unit.T / n_cal, RISKS[risk].bound)
        per_exit = {}
        if "ltt-per-exit" in rules:
            per_exit = _per_exit_ltt(scores, el, cost, perm, n_cal, risk, eps, delta,
                                     per_exit_grid, per_exit_sweeps)
        done: dict[float, list[dict]] = {}
        for e in sorted(eps, reverse=True):  # descending: WSR re-tests only rows that passed a higher eps
            block = done[e] = []
            for rule in rules:
                if rule == "ltt-per-exit":
                    block.append(_row(rule, risk, e, *per_exit[e]))
                    continue
                k = select(rule, cal, e, delta, risk, cal_macs if rule == "ucb-wsr-macs" else None)
                block.append(_row(rule, risk, e, test_risk[rows_t, k], test_exit[rows_t, k], test_macs[rows_t, k],
                                  LAMBDAS[k], pool_risk[k]))
            ok = test_risk <= e + 1e-12
            ok[:, 0] = True
            k = torch.where(ok, test_macs, torch.full_like(test_macs, float("inf"))).argmin(1)
            block.append(_row("oracle", risk, e, test_risk[rows_t, k], test_exit[rows_t, k], test_macs[rows_t, k],
                              LAMBDAS[k], pool_risk[k]))
            # random exits with the oracle's per-exit fractions: positions [0, n f_0) -> exit 0, ...
            bounds = torch.round(test_frac[rows_t, k].cumsum(1) * n_test)  # [T, E]
            rand_exit = (pos[None, :, None] >= bounds[:, None, :]).sum(-1).clamp(max=e_exits - 1)  # [T, n_test]
            rand_loss = el.T[test_idx].gather(2, rand_exit[..., None])[..., 0]
            block.append(_row("random", risk, e, rand_loss.mean(1), rand_exit.double().mean(1),
                              cost[rand_exit].mean(1), None))
        rows.extend(r for e in eps for r in done[e])
    return {"score": score, "delta": float(delta), "n_cal": n_cal, "n_test": n_test, "trials": int(trials),
            "seconds": time.perf_counter() - start, "rows": rows}


__all__ = ["EPS", "PROTOCOL_RULES", "pool", "run_protocol"]
