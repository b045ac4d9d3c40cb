"""Calibrators: pick exit thresholds on a calibration trace for a target.

Four targets, all pure functions of tensors (a trace is read through ``.scores(score)``,
``.predictions()`` and ``.labels``, so this module needs nothing from the harness):

- ``accuracy_drop``: the cheapest shared threshold (expected strict MACs) whose accuracy is at least
  the backbone's (final exit's) minus ``drop``.
- ``macs_budget``: the most accurate shared threshold whose expected strict relative MACs fit a budget.
- ``geometric_thresholds`` / ``geometric_budget``: MSDNet's budgeted per-exit thresholds (Huang et al.,
  ICLR 2018, github gaohuang/MSDNet ``dynamic_evaluate``): exit k takes a share q_k ∝ p^k of *all*
  samples, chosen as the most confident among those still remaining, i.e. the fraction
  q_k / (1 - sum_{j<k} q_j) of the remaining ones; p is swept.
- ``coordinate_descent`` / ``per_exit_accuracy_drop``: per-exit thresholds that scale to 10 exits
  (BranchyNet needs per-exit T_n): minimise expected strict MACs subject to a mean-loss constraint by
  coordinate descent over per-exit quantile grids; a sweep costs O(K * (N log N + K N)) for all grid
  points at once, where a Cartesian grid would cost Q^K evaluations.

Thresholds follow ``exitbench.methods.policies``: leave at the first exit with score >= threshold (``strict``
gives ``>``), +inf = never leave there. Costs are per-exit relative costs (final exit last).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from exitbench.methods.policies import first_exit

_TOL = 1e-12  # slack on ">= target" comparisons of float means


class TraceLike(Protocol):
    labels: Tensor

    def scores(self, score: str) -> Tensor: ...

    def predictions(self) -> Tensor: ...


@dataclass(frozen=True)
class Choice:
    """A calibrated operating point (numbers on the calibration trace), or why there is none."""

    feasible: bool
    thresholds: tuple[float, ...] | None = None  # one per early exit
    accuracy: float | None = None
    rel_macs_strict: float | None = None
    exit_fractions: tuple[float, ...] | None = None
    index: int | None = None  # position in the candidate list that was searched
    reason: str = ""


def quantile_grid(scores: Tensor, n: int = 100) -> Tensor:
    """Ascending unique quantiles (``n - 1`` levels) of ``scores`` plus +inf ("never leave")."""
    q = torch.quantile(scores.flatten().double(), torch.linspace(0, 1, max(n - 1, 2), dtype=torch.float64))
    return torch.cat([torch.unique(q), torch.tensor([float("inf")], dtype=torch.float64)])


def sweep_metrics(scores: Tensor, exit_loss: Tensor, costs: Sequence[float] | Tensor, thresholds: Tensor,
                  strict: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Mean loss [G], expected relative cost [G] and exit fractions [G, E] of every threshold setting.

    ``scores`` [K, N]; ``exit_loss`` [E, N], the loss of each sample if it leaves at each exit
    (E = K + 1; for accuracy use ``1 - correct``); ``thresholds`` [G] shared or [G, K] per exit.
    """
    exits = first_exit(scores, thresholds, strict)  # [G, N]
    cost = torch.as_tensor(costs, dtype=torch.float64)
    loss = exit_loss.double().gather(0, exits).mean(1)
    fractions = torch.nn.functional.one_hot(exits, exit_loss.shape[0]).double().mean(1)
    return loss, fractions @ cost, fractions


def _errors(trace: TraceLike) -> Tensor:
    return (trace.predictions() != trace.labels[None]).double()  # [E, N]


def _choice(g: int, thresholds: Tensor, err: Tensor, cost: Tensor, frac: Tensor, k_early: int) -> Choice:
    th = thresholds[g]
    th = th.expand(k_early) if th.dim() == 0 else th
    return Choice(True, tuple(th.tolist()), 1 - err[g].item(), cost[g].item(), tuple(frac[g].tolist()), g)


def _argmin_where(ok: Tensor, primary: Tensor, secondary: Tensor) -> int | None:
    """Index of the ``ok`` setting with the least ``primary``; ties broken by ``secondary`` (then the first)."""
    if not bool(ok.any()):
        return None
    c = torch.where(ok, primary, torch.full_like(primary, float("inf")))
    tied = ok & (c <= c.min() + _TOL)
    return int(torch.where(tied, secondary, torch.full_like(secondary, float("inf"))).argmin())


def accuracy_drop(trace: TraceLike, score: str, strict_costs: Sequence[float], drop: float,
                  thresholds: Tensor | None = None, reference: float | None = None) -> Choice:
    """Cheapest shared threshold (expected strict MACs) with accuracy >= ``reference`` - ``drop``; ties:
    the more accurate, then the first.

    ``reference`` is the accuracy to stay close to, on this trace: the harness passes the reference
    backbone's calibration accuracy (a joint method's final exit is not the backbone); by default the
    final exit's. ``thresholds`` defaults to ``quantile_grid`` of the scores. Infeasible (with the
    reason) when no threshold on the grid qualifies.
    """
    scores = trace.scores(score)
    grid = quantile_grid(scores) if thresholds is None else thresholds
    err_exit = _errors(trace)
    err, cost, frac = sweep_metrics(scores, err_exit, strict_costs, grid)
    target = (1 - err_exit[-1].mean().item() if reference is None else reference) - drop
    g = _argmin_where(1 - err >= target - _TOL, cost, err)
    if g is None:
        return Choice(False, reason=f"no threshold reaches accuracy {target:.4f} (reference - {drop})")
    return _choice(g, grid, err, cost, frac, scores.shape[0])


def macs_budget(trace: TraceLike, score: str, strict_costs: Sequence[float], budget: float,
                thresholds: Tensor | None = None) -> Choice:
    """Most accurate shared threshold whose expected strict relative MACs are <= ``budget``
    (ties: the cheaper). Infeasible when even the cheapest setting on the grid costs more."""
    scores = trace.scores(score)
    grid = quantile_grid(scores) if thresholds is None else thresholds
    # the default grid starts at the minimum score: "everyone leaves at exit 0" is a candidate
    err, cost, frac = sweep_metrics(scores, _errors(trace), strict_costs, grid)
    ok = cost <= budget + _TOL
    if not bool(ok.any()):
        return Choice(False, reason=f"budget {budget:.4f} is below the cheapest setting's expected strict "
                                    f"MACs {cost.min().item():.4f}")
    g = _argmin_where(ok, err, cost)
    return _choice(g, grid, err, cost, frac, scores.shape[0])


def geometric_thresholds(scores: Tensor, ps: Tensor | Sequence[float]) -> Tensor:
    """MSDNet budgeted thresholds [P, K] for each p in ``ps`` (``scores`` [K, N] early-exit scores).

    q_k = p^(k+1) / sum_j p^(j+1) over all E = K + 1 exits; exit k's threshold is the score of the
    floor(N q_k)-th most confident sample among those not yet gone (as in MSDNet's code; ties at the
    threshold leave too, so a share can exceed q_k). A share of 0 gives +inf. Where ties left fewer
    samples than the share asks for, all remaining leave (MSDNet's code would then let none leave).
    """
    k_early, n = scores.shape
    p = torch.as_tensor(ps, dtype=torch.float64)
    q = p[:, None] ** torch.arange(1, k_early + 2, dtype=torch.float64)[None]  # [P, E]
    q = q / q.sum(1, keepdim=True)
    counts = torch.floor(n * q[:, :k_early] + 1e-9).long()  # [P, K]; 1e-9: n*q = 50 must not floor to 49
    remaining = torch.ones(len(p), n, dtype=torch.bool)
    out = torch.full((len(p), k_early), float("inf"), dtype=torch.float64)
    neg = torch.tensor(-float("inf"), dtype=torch.float64)
    for k in range(k_early):
        s = scores[k].double()[None].expand(len(p), -1)
        ranked = torch.where(remaining, s, neg).sort(dim=1, descending=True).values  # [P, N]
        c = torch.minimum(counts[:, k], remaining.sum(1))
        pick = ranked.gather(1, (c - 1).clamp(min=0)[:, None])[:, 0]
        thr = torch.where(c > 0, pick, torch.full_like(pick, float("inf")))
        out[:, k] = thr
        remaining &= ~(s >= thr[:, None])
    return out


def geometric_budget(trace: TraceLike, score: str, strict_costs: Sequence[float], budget: float | None = None,
                     ps: Tensor | Sequence[float] | None = None) -> tuple[Tensor, list[Choice]]:
    """Sweep MSDNet's p (default 0.05, 0.10, ..., 2.00, as in MSDNet) and return (ps, one Choice per p).

    With a ``budget``, the list holds only the most accurate p whose expected strict MACs fit it (or
    one infeasible Choice). Each Choice's ``index`` is its position in ``ps``.
    """
    p = torch.arange(1, 41, dtype=torch.float64) * 0.05 if ps is None else torch.as_tensor(ps, dtype=torch.float64)
    scores = trace.scores(score)
    thr = geometric_thresholds(scores, p)
    err, cost, frac = sweep_metrics(scores, _errors(trace), strict_costs, thr)
    k = scores.shape[0]
    if budget is None:
        return p, [_choice(g, thr, err, cost, frac, k) for g in range(len(p))]
    g = _argmin_where(cost <= budget + _TOL, err, cost)
    if g is None:
        return p, [Choice(False, reason=f"no p in the sweep fits budget {budget:.4f} "
                                        f"(cheapest {cost.min().item():.4f})")]
    return p, [_choice(g, thr, err, cost, frac, k)]


def coordinate_descent(scores: Tensor, exit_loss: Tensor, costs: Sequence[float] | Tensor,
                       max_loss: float | Tensor, *, grid_size: int = 50, sweeps: int = 4, strict: bool = False,
                       init: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-exit thresholds minimising expected cost subject to mean loss <= ``max_loss``.

    ``scores`` [K, N]; ``exit_loss`` [E, N] (loss if each sample leaves at each exit); ``costs`` [E];
    ``max_loss`` a float or [P] (P problems solved together on the same data). Candidates for exit k
    are ``grid_size`` quantiles of its own scores, +inf, and the current value. The start is the
    cheapest feasible shared threshold on the pooled quantile grid (so the result is never worse than
    the best shared threshold on that grid); each step moves one exit's threshold to its cheapest
    feasible value (ties: lower loss, then the current value), until a sweep changes nothing or
    ``sweeps`` run out. Batched: scores [B, K, N], exit_loss [B, E, N], max_loss [P] or [B, P] solve
    B data sets at once (e.g. trials).

    One move costs O(N log N + N K) for all candidates together: with the other thresholds fixed, a
    sample that reaches exit k leaves there iff s_k >= t, so loss(t) = loss(t = inf) + (1/N) * (sum of
    the loss changes of the count(s_k >= t) most confident samples), a prefix sum over samples
    sorted by s_k. A Cartesian grid would cost Q^K evaluations.

    Returns (thresholds [P, K] float64, feasible [P] bool), or [B, P, K] and [B, P] when batched; a
    scalar ``max_loss`` drops the P dim. Infeasible problems (even the final exit alone breaks the
    constraint) get all +inf.
    """
    batched = scores.dim() == 3
    if not batched:
        scores, exit_loss = scores[None], exit_loss[None]
    limit = torch.as_tensor(max_loss, dtype=torch.float64)
    scalar = limit.dim() == 0
    limit = limit.reshape(1, -1) if limit.dim() <= 1 else limit
    pb = _Descent.of(scores, exit_loss, costs, limit.expand(scores.shape[0], -1), grid_size, strict)
    current, feasible = pb.start(init)
    for _ in range(sweeps):
        changed = False
        for k in range(pb.scores.shape[1]):
            new = pb.move(current, k)
            upd = feasible & (new != current[..., k])
            if bool(upd.any()):
                changed = True
                current[..., k] = torch.where(upd, new, current[..., k])
        if not changed:
            break
    current[~feasible] = float("inf")
    if scalar:
        current, feasible = current[:, 0], feasible[:, 0]
    return (current, feasible) if batched else (current[0], feasible[0])


_INF = torch.tensor(float("inf"), dtype=torch.float64)


@dataclass(frozen=True)
class _Descent:
    """One batched coordinate-descent problem (:func:`coordinate_descent`): the data, the constraint and the
    per-exit candidate grids, with each exit's scores sorted once."""

    scores: Tensor  # [B, K, N]
    loss: Tensor  # [B, E, N] float64
    cost: Tensor  # [E] float64
    limit: Tensor  # [B, P]
    levels: Tensor  # quantile levels
    grids: Tensor  # [B, K, Q]: each exit's score quantiles and +inf
    sorted_scores: Tensor  # [B, K, N] ascending per exit, in the scores' dtype (as first_exit compares them)
    desc: Tensor  # [B, K, N] sample indices by descending score per exit
    strict: bool

    @classmethod
    def of(cls, scores: Tensor, exit_loss: Tensor, costs: Sequence[float] | Tensor, limit: Tensor, grid_size: int,
           strict: bool) -> _Descent:
        n_batch, k_early, _ = scores.shape
        levels = torch.linspace(0, 1, max(grid_size - 1, 2), dtype=torch.float64)
        grids = torch.quantile(scores.double(), levels, dim=-1).permute(1, 2, 0)  # [B, K, Q]
        grids = torch.cat([grids, _INF.expand(n_batch, k_early, 1)], dim=-1)
        asc = scores.sort(dim=-1)
        return cls(scores, exit_loss.double(), torch.as_tensor(costs, dtype=torch.float64), limit, levels, grids,
                   asc.values, asc.indices.flip(-1), strict)

    def pick(self, lo: Tensor, co: Tensor) -> Tensor:
        """Per problem, the index of the cheapest feasible candidate; ties: lower loss, then lowest index."""
        ok = lo <= self.limit[..., None] + _TOL
        c = torch.where(ok, co, _INF)
        tied = ok & (c <= c.amin(-1, keepdim=True) + _TOL)
        return torch.where(tied, lo, _INF).argmin(-1)  # [B, P]

    def start(self, init: Tensor | None) -> tuple[Tensor, Tensor]:
        """(thresholds [B, P, K], feasible [B, P]) to start from: ``init``, or the cheapest feasible shared
        threshold on the pooled quantile grid (so the result is never worse than that)."""
        n_batch, k_early, _ = self.scores.shape
        n_prob = self.limit.shape[1]
        if init is not None:
            current = init.double().reshape(n_batch, n_prob, k_early).clone()
            exits = first_exit(self.scores, current, self.strict)
            return current, self.loss.gather(1, exits).mean(-1) <= self.limit + _TOL
        pooled = torch.quantile(self.scores.reshape(n_batch, -1).double(), self.levels, dim=-1).T  # [B, Q]
        shared = torch.cat([pooled, _INF.expand(n_batch, 1)], dim=1)  # +inf = the final exit alone
        exits = first_exit(self.scores, shared[..., None].expand(-1, -1, k_early), self.strict)  # [B, Q+1, N]
        lo = self.loss.gather(1, exits).mean(-1)[:, None].expand(-1, n_prob, -1)
        co = self.cost[exits].mean(-1)[:, None].expand(-1, n_prob, -1)
        feasible = (lo <= self.limit[..., None] + _TOL).any(-1)
        return shared.gather(1, self.pick(lo, co))[..., None].expand(-1, -1, k_early).clone(), feasible

    def move(self, current: Tensor, k: int) -> Tensor:
        """The best value of threshold ``k`` with the others fixed, per problem [B, P]: every candidate at
        once through prefix sums over the samples sorted by their exit-k score (see coordinate_descent)."""
        n_batch, _, n = self.scores.shape
        n_prob = self.limit.shape[1]
        th = current.clone()
        th[..., k] = float("inf")
        e_off = first_exit(self.scores, th, self.strict)  # [B, P, N] exits with exit k switched off
        reach = e_off > k
        l_off = self.loss.gather(1, e_off)
        d_loss = torch.where(reach, self.loss[:, k, None, :] - l_off, 0.0)
        d_cost = torch.where(reach, self.cost[k] - self.cost[e_off], 0.0)
        order = self.desc[:, k, None, :].expand(-1, n_prob, -1)
        zero = torch.zeros(n_batch, n_prob, 1, dtype=torch.float64)
        pre_l = torch.cat([zero, d_loss.gather(-1, order).cumsum(-1)], dim=-1)  # [B, P, N+1]
        pre_c = torch.cat([zero, d_cost.gather(-1, order).cumsum(-1)], dim=-1)
        vals = torch.cat([current[..., k:k + 1], self.grids[:, k, None, :].expand(-1, n_prob, -1)], dim=-1)
        # count(s_k >= t) = N - #(s_k < t); for strict, count(s_k > t) = N - #(s_k <= t)
        below = torch.searchsorted(self.sorted_scores[:, k].contiguous(),
                                   vals.to(self.scores.dtype).reshape(n_batch, -1), right=self.strict)
        cnt = n - below.reshape(vals.shape)
        lo = l_off.mean(-1, keepdim=True) + pre_l.gather(-1, cnt) / n
        co = self.cost[e_off].mean(-1, keepdim=True) + pre_c.gather(-1, cnt) / n
        return vals.gather(-1, self.pick(lo, co)[..., None])[..., 0]


def per_exit_accuracy_drop(trace: TraceLike, score: str, strict_costs: Sequence[float], drop: float, *,
                           grid_size: int = 50, sweeps: int = 4, reference: float | None = None) -> Choice:
    """Per-exit thresholds (coordinate descent) with the least expected strict MACs whose accuracy
    is >= ``reference`` - ``drop`` (``reference`` as in :func:`accuracy_drop`). At least as cheap as
    ``accuracy_drop`` on the same grid size."""
    scores = trace.scores(score)
    err_exit = _errors(trace)
    limit = (err_exit[-1].mean().item() if reference is None else 1 - reference) + drop
    thr, feasible = coordinate_descent(scores, err_exit, strict_costs, limit, grid_size=grid_size, sweeps=sweeps)
    if not bool(feasible):
        return Choice(False, reason=f"no per-exit thresholds reach accuracy reference - {drop}")
    thr = thr[None]
    err, cost, frac = sweep_metrics(scores, err_exit, strict_costs, thr)
    return _choice(0, thr, err, cost, frac, scores.shape[0])


__all__ = ["Choice", "TraceLike", "accuracy_drop", "coordinate_descent", "geometric_budget", "geometric_thresholds",
           "macs_budget", "per_exit_accuracy_drop", "quantile_grid", "sweep_metrics"]
