"""Risk-controlled exit thresholds (docs/risk_control.md).

Paper: Jazbec et al., "Fast yet Safe: Early-Exiting with Risk Control" (2024), code github
metodj/RC-EENN (``rc/risk_control.py``, ``rc/bounds.py``). Statistics: Conformal Risk Control
(Angelopoulos et al., ICLR 2024), RCPS (Bates et al., JACM 2021) and Learn-then-Test (Angelopoulos,
Bates, Candès, Jordan, Lei, 2021).

Set-up: one shared threshold lambda on a confidence score c_l(x) in [0, 1]; a sample leaves at the first
early exit l with c_l(x) > lambda (strict, so lambda = 1 never exits), else at the last exit. The grid
``LAMBDAS`` runs 1.00, 0.99, ..., 0.00 (descending; index 0 is the safe fallback). Every risk is a
function of the exit a sample takes, so ``exit_losses`` [E, N] is computed once and the loss matrix
[G, N] over the grid is one gather. Selection rules take losses [..., G, n] (leading dims = batches
such as trials) and return grid indices [...].

Certified sets. The scanning rules (crc, ucb-*, ltt) test lambda from 1 down and stop at the first
failure, so what they certify is the interval [lambda_hat, 1] by construction; with one shared lambda
the expected MACs fall as lambda falls, so the cheapest certified lambda *is* lambda_hat. ``naive``,
``crc-raw`` and ``ucb-wsr-macs`` certify arbitrary subsets of the grid (not intervals): every lambda whose
test passes, wherever it lies; ``select`` then picks the smallest member (the largest grid index, as the
reference's ``naive_lam`` and ``crc_lam``) or, with ``cost=...``, the cheapest. ``ucb-wsr-macs`` buys
that freedom with a union bound (WSR at delta / G on every lambda); ``naive`` and ``crc-raw`` do not pay
for it and promise nothing. A fixed-sequence scan (``ltt``, ``ucb-hb``) needs no monotonicity either, so
the union bound is not what makes it valid; with one shared lambda the expected cost falls with lambda, the scan's
lambda_hat is already the cheapest it certifies, and ``ucb-wsr-macs`` is dominated: it can only win when
the empirical risk curve has a bump the scan cannot pass (the union bound then still certifies lambdas
below it). It earns its keep only on families whose cost is not ordered like the grid.

CRC's guarantee needs each sample's loss to be monotone in lambda; gap losses are not (an early exit
can be right where a later one is wrong). ``crc`` therefore applies the rule to the monotonised loss
L~_i(lambda) = max over lambda' >= lambda of L_i(lambda') (a cumulative max from lambda = 1 down), which
bounds the raw risk from above; ``crc-raw`` is the reference's rule (``crc_lam``) on the raw loss,
labelled as such: the largest grid index anywhere on the grid whose bound holds, not a scan that stops at
the first failure (the two differ only where the empirical risk curve is not monotone in lambda).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from exitbench.core.rules import (  # noqa: F401  (re-exported)
    GUARANTEES,
    RISKS,
    RULES,
    SELECTION_RULES,
    SHARED_RULES,
    Risk,
    Rule,
    get_risk,
    get_rule,
)
from exitbench.methods.base import UserError, did_you_mean
from exitbench.methods.calibration import coordinate_descent
from exitbench.methods.policies import first_exit, score_matrix

LAMBDAS = torch.arange(100, -1, -1, dtype=torch.float64) / 100  # 1.00, 0.99, ..., 0.00


# ----------------------------------------------------------------------------------------------
# Losses


def brier(probs: Tensor, target: Tensor) -> Tensor:
    """Brier(p, y) = sum_k (p_k - 1[k = y])^2 = sum_k p_k^2 - 2 p_y + 1, over the last dim."""
    return (probs * probs).sum(-1) - 2 * probs.gather(-1, target[..., None])[..., 0] + 1


def exit_losses(logits: Tensor, labels: Tensor | None, risk: str) -> Tensor:
    """[E, N] float64: each sample's loss if it leaves at each exit (``logits`` [E, N, classes]).

    gap-prediction 1[yhat_l != y] - 1[yhat_L != y]; gap-brier Brier(p_l, y) - Brier(p_L, y);
    consistency-prediction 1[yhat_l != yhat_L]; consistency-brier Brier(p_l, yhat_L) - Brier(p_L, yhat_L).
    Row L (the last exit) is 0 for every risk.
    """
    r = get_risk(risk)
    if r.needs_labels and labels is None:
        raise UserError(f"risk: {risk!r} needs labels; the consistency risks do not")
    preds = logits.argmax(-1)  # [E, N]
    target = labels[None].expand_as(preds) if r.needs_labels else preds[-1][None].expand_as(preds)
    if risk.endswith("prediction"):
        miss = (preds != target).double()
        return miss - miss[-1] if r.needs_labels else miss
    b = brier(logits.double().softmax(-1), target)
    return b - b[-1]


def exit_index(scores: Tensor, lambdas: Tensor = LAMBDAS) -> Tensor:
    """[G, N] exit per grid value: the first early exit with score > lambda, else the last (K).

    ``lambdas`` [G] shared or [G, K] per exit."""
    return first_exit(scores, lambdas, strict=True)


def confidence_scores(trace, score: str = "max_softmax") -> Tensor:
    """[K, N] early-exit confidences of a trace (``.logits`` [E, N, C], ``.confidence`` [E, N] or None),
    checked to lie in [0, 1] as the lambda grid assumes."""
    conf = list(trace.confidence) if trace.confidence is not None else None
    s = score_matrix(score, list(trace.logits), conf)
    if s.numel() and (s.min() < 0 or s.max() > 1):
        raise UserError(f"risk control: score {score!r} leaves [0, 1]; use max_softmax or confidence")
    return s


def loss_matrix(trace, risk: str, score: str = "max_softmax", lambdas: Tensor = LAMBDAS) -> Tensor:
    """[G, N] per-sample losses of a trace at every grid value (descending lambda)."""
    el = exit_losses(trace.logits, trace.labels, risk)
    return el.gather(0, exit_index(confidence_scores(trace, score), lambdas))


def to_unit(losses: Tensor, risk: str) -> Tensor:
    """Losses mapped into [0, 1] for Hoeffding-Bentkus / LTT: negative gaps clipped to 0, divided by B.
    The clipped risk bounds the signed one from above, so certifying it certifies the signed risk."""
    return losses.clamp(min=0) / get_risk(risk).bound


# ----------------------------------------------------------------------------------------------
# Bounds


def binom_cdf(k: Tensor, n: int, p: Tensor | float) -> Tensor:
    """P(Binomial(n, p) <= k), elementwise over broadcast ``k`` and ``p`` (float64, log-space sums).

    Why not scipy: methods/ depends on torch and numpy only; n <= a few thousand makes the exact sum cheap.
    """
    k = torch.as_tensor(k)
    p = torch.as_tensor(p, dtype=torch.float64)
    j = torch.arange(n + 1, dtype=torch.float64)
    log_choose = math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
    logpmf = log_choose + torch.special.xlogy(j, p[..., None]) + torch.special.xlog1py(n - j, -p[..., None])
    cdf = torch.logcumsumexp(logpmf, dim=-1).exp().clamp(max=1.0)  # [..., n + 1]
    k, cdf = torch.broadcast_tensors(k.long()[..., None], cdf)
    out = cdf.gather(-1, k[..., :1].clamp(0, n))[..., 0]
    return torch.where(k[..., 0] < 0, torch.zeros_like(out), out)


def hb_p_value(mean: Tensor | float, n: int, eps: Tensor | float) -> Tensor:
    """Hoeffding-Bentkus p-value for H: R > eps, from the mean of n losses in [0, 1] (Bates et al. 2021,
    Prop. 3; LTT eq. 11): p = min(exp(-n h1(min(R_n, eps), eps)), e * BinomCDF(ceil(n R_n); n, eps)),
    h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))."""
    mean = torch.as_tensor(mean, dtype=torch.float64).clamp(0, 1)
    eps = torch.as_tensor(eps, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    a = torch.minimum(mean, eps)
    h1 = torch.special.xlogy(a, a / eps) + torch.special.xlogy(1 - a, (1 - a) / (1 - eps))
    # -1e-9: n * mean of 0/1 losses is an integer up to rounding; 3.0000000001 must not ceil to 4
    k = torch.ceil(n * mean - 1e-9)
    bentkus = math.e * binom_cdf(k, n, eps)
    return torch.minimum(torch.exp(-n * h1), bentkus).clamp(max=1.0)


def hb_ucb(mean: Tensor | float, n: int, delta: float, iters: int = 50) -> Tensor:
    """Hoeffding-Bentkus upper confidence bound sup{a : p_HB(R_n; a) >= delta} (losses in [0, 1]),
    by bisection (the p-value falls as a rises)."""
    mean = torch.as_tensor(mean, dtype=torch.float64).clamp(0, 1)
    lo, hi = mean.clone(), torch.full_like(mean, 1 - 1e-12)  # p(R_n; R_n) = 1 >= delta
    top = hb_p_value(mean, n, hi) >= delta
    for _ in range(iters):
        mid = (lo + hi) / 2
        keep = hb_p_value(mean, n, mid) >= delta
        lo, hi = torch.where(keep, mid, lo), torch.where(keep, hi, mid)
    return torch.where(top, torch.ones_like(hi), hi)


def hoeffding_ucb(mean: Tensor | float, n: int, delta: float, width: float) -> Tensor:
    """R_n + width * sqrt(log(1/delta) / (2n)) for losses in an interval of length ``width``."""
    return torch.as_tensor(mean, dtype=torch.float64) + width * math.sqrt(math.log(1 / delta) / (2 * n))


def _wsr_s2_prev(x: Tensor) -> Tensor:
    """The predictable variance estimates s2_{i-1} of WSR (see ``_wsr_nu``); independent of delta."""
    n = x.shape[-1]
    i = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    mu = (0.5 + x.cumsum(-1)) / (1 + i)
    s2 = (0.25 + ((x - mu) ** 2).cumsum(-1)) / (1 + i)
    return torch.cat([torch.full_like(s2[..., :1], 0.25), s2[..., :-1]], dim=-1)


def _wsr_nu(x: Tensor, delta: float, s2_prev: Tensor | None = None) -> Tensor:
    """WSR betting fractions (Bates et al. 2021, Prop. 5; Waudby-Smith & Ramdas 2020):
    mu_i = (1/2 + sum_{j<=i} x_j) / (1 + i), s2_i = (1/4 + sum_{j<=i} (x_j - mu_j)^2) / (1 + i),
    nu_i = min(1, sqrt(2 log(1/delta) / (n s2_{i-1}))), s2_0 = 1/4. Depends on the order of x."""
    s2_prev = _wsr_s2_prev(x) if s2_prev is None else s2_prev
    return torch.sqrt(2 * math.log(1 / delta) / (x.shape[-1] * s2_prev)).clamp(max=1.0)


def wsr_log_wealth(x: Tensor, level: Tensor | float, delta: float, nu: Tensor | None = None,
                   neg_nu_x: Tensor | None = None) -> Tensor:
    """max_i log K_i(R) at R = ``level``, K_i(R) = prod_{j<=i} (1 - nu_j (x_j - R)), for x [..., n] in
    [-1, 1] and R >= 0 (then every factor is >= 0: the betting martingale stays valid for signed losses).
    H: E[x] >= R is rejected when this exceeds log(1/delta) (Ville's inequality).
    ``nu`` and ``neg_nu_x`` (= -nu * x) may be passed precomputed when many levels are tested."""
    nu = _wsr_nu(x, delta) if nu is None else nu
    neg_nu_x = -nu * x if neg_nu_x is None else neg_nu_x
    level = torch.as_tensor(level, dtype=x.dtype, device=x.device)
    factor = torch.addcmul(neg_nu_x, nu, level[..., None])  # nu (R - x), one pass
    factor.clamp_(min=-1.0)  # rounding must not push 1 + factor below 0
    return factor.log1p_().cumsum(-1).amax(-1)


def wsr_ucb(losses: Tensor, delta: float, bound: float = 1.0, iters: int = 40) -> Tensor:
    """Waudby-Smith–Ramdas upper confidence bound on the mean of ``losses`` [..., n] in [-B, B] (B =
    ``bound``): B * inf{R in [0, 1] : max_i K_i(R) > 1/delta} on x = losses / B, by bisection (K_i rises
    with R). As the reference (rc/bounds.py) it returns B when even R = 1 is not rejected; unlike it,
    the search covers the whole [0, B] for B > 1 rather than [0, 1]."""
    x = losses.double() / bound
    nu = _wsr_nu(x, delta)
    neg_nu_x = -nu * x
    target = math.log(1 / delta)
    lo = torch.zeros(x.shape[:-1], dtype=x.dtype)
    hi = torch.ones_like(lo)
    never = wsr_log_wealth(x, hi, delta, nu, neg_nu_x) <= target
    for _ in range(iters):
        mid = (lo + hi) / 2
        rej = wsr_log_wealth(x, mid, delta, nu, neg_nu_x) > target
        lo, hi = torch.where(rej, lo, mid), torch.where(rej, mid, hi)
    return bound * torch.where(never, torch.ones_like(hi), hi)


# ----------------------------------------------------------------------------------------------
# Selection rules


@dataclass
class CalLosses:
    """Calibration losses [..., G, n] of one risk with the statistics the rules use, computed once
    (a trial loop passes this instead of the raw tensor to avoid recomputing means per rule and eps)."""

    values: Tensor  # [..., G, n]; its order matters to WSR only
    mean: Tensor  # [..., G] signed empirical risk
    unit_mean: Tensor  # [..., G] mean of to_unit(losses), for HB / LTT / Hoeffding
    bound: float
    mono_mean: Tensor | None = None  # [..., G] mean of monotonise(losses), for CRC (None: = mean)
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, losses: Tensor, risk: str) -> CalLosses:
        return cls(losses, losses.double().mean(-1), to_unit(losses, risk).double().mean(-1), get_risk(risk).bound,
                   monotonise(losses.double()).mean(-1))

    @classmethod
    def from_means(cls, mean: Tensor, unit_mean: Tensor, n: int, risk: str,
                   mono_mean: Tensor | None = None) -> CalLosses:
        """Statistics only (enough for every rule but the WSR ones, which read the losses in order)."""
        return cls(torch.zeros(()).expand(*mean.shape, n), mean, unit_mean, get_risk(risk).bound, mono_mean)

    @property
    def n(self) -> int:
        return self.values.shape[-1]

    def x(self) -> Tensor:
        """Losses / B, in [-1, 1], for WSR (cached)."""
        if "x" not in self._cache:
            self._cache["x"] = self.values / self.bound
        return self._cache["x"]

    def wsr_ok(self, level: float, delta: float) -> Tensor:
        """[..., G] bool: WSR rejects H: R >= ``level`` (so the bound is <= level), at level ``delta``.

        Cached per delta: the betting fractions are shared across levels, and since the wealth rises
        with the level, a row that fails at a higher level fails here too, so only the grid range where
        some row passed at the nearest higher level already tested is recomputed (call levels in
        descending order to benefit)."""
        x = self.x()
        if "s2" not in self._cache:
            self._cache["s2"] = _wsr_s2_prev(x)
        if delta not in self._cache:
            nu = _wsr_nu(x, delta, self._cache["s2"])
            self._cache[delta] = (nu, -nu * x, {})
        nu, neg_nu_x, done = self._cache[delta]
        target = math.log(1 / delta)
        higher = [lv for lv in done if lv >= level]
        lo, hi = 0, x.shape[-2]
        if higher:
            alive = done[min(higher)].reshape(-1, x.shape[-2]).any(0).nonzero().flatten()
            lo, hi = (int(alive[0]), int(alive[-1]) + 1) if len(alive) else (0, 0)
        ok = torch.zeros(x.shape[:-1], dtype=torch.bool)
        if hi > lo:
            part = (slice(None),) * (x.dim() - 2) + (slice(lo, hi),)
            ok[part] = wsr_log_wealth(x[part], level, delta, nu[part], neg_nu_x[part]) > target
        done[level] = ok
        return ok


def monotonise(losses: Tensor) -> Tensor:
    """L~(g) = max over g' <= g of L(g') along the grid dim (-2) of [..., G, n]: the grid descends from
    lambda = 1, so this is the cumulative max from lambda = 1 down; non-decreasing as lambda falls."""
    return losses.cummax(dim=-2).values


def pointwise_ok(rule: str, losses: Tensor | CalLosses, eps: float, delta: float, risk: str) -> Tensor:
    """[..., G] bool: the rule's own test at every grid value, before any scanning."""
    get_rule(rule)  # an unknown name: one line with the nearest names
    r = get_risk(risk)
    cal = losses if isinstance(losses, CalLosses) else CalLosses.of(losses, risk)
    n, b = cal.n, r.bound
    if rule == "naive":  # R_n < eps: strict, as the reference's naive_lam (a risk exactly at eps fails)
        return cal.mean < eps
    # (n/(n+1)) R_n + B/(n+1) <= eps (CRC, Angelopoulos et al. 2024, Thm. 1); the reference's crc_lam tests the
    # same inequality rearranged, R_n <= ((n+1) eps - B) / n, on the raw loss
    if rule in ("crc", "crc-raw"):
        if rule == "crc" and cal.mono_mean is None:
            raise ValueError("crc needs the monotonised means (CalLosses.of, or from_means(mono_mean=...))")
        mean = cal.mean if rule == "crc-raw" else cal.mono_mean
        return n / (n + 1) * mean + b / (n + 1) <= eps
    if rule in ("ucb-wsr", "ucb-wsr-macs"):
        # UCB <= eps is decided exactly by testing R = eps (K_i rises with R); the -macs variant needs
        # every lambda covered at once: a union bound over the G grid values
        d = delta / cal.mean.shape[-1] if get_rule(rule).union_bound else delta
        return cal.wsr_ok(eps / b, d)
    if rule == "ucb-hoeffding":  # on the clipped [0, 1] loss, as HB: width 1, not the signed range
        return hoeffding_ucb(cal.unit_mean, n, delta, 1.0) <= eps / b
    if rule in ("ucb-hb", "ltt"):
        if eps >= b:
            return torch.ones(cal.mean.shape, dtype=torch.bool)
        p = hb_p_value(cal.unit_mean, n, eps / b)
        # UCB_HB < eps  <=>  p(eps) < delta (the p-value falls as the level rises), so "ucb-hb" and LTT
        # with fixed-sequence testing are the same procedure, as the reference notes; LTT rejects at <=
        return p < delta if rule == "ucb-hb" else p <= delta
    raise UserError(f"rule: {rule!r} is not a single-threshold selection rule; {did_you_mean(rule, SHARED_RULES)}")


def scan_from_top(ok: Tensor) -> Tensor:
    """Index of the last True before the first False, scanning from grid index 0 (lambda = 1) down;
    0 (the lambda = 1 fallback) when index 0 already fails."""
    leading = ok.long().cumprod(-1).sum(-1)
    return (leading - 1).clamp(min=0)


def certified_set(rule: str, losses: Tensor | CalLosses, eps: float, delta: float, risk: str) -> Tensor:
    """[..., G] bool: the grid values the rule certifies. For scanning rules the interval
    [lambda_hat, 1] (a prefix of the descending grid); for ``naive`` / ``crc-raw`` / ``ucb-wsr-macs``
    every value whose test passes (any subset).

    LTT is fixed-sequence testing (LTT, Prop. 2 with the order 1.00 -> 0.00): reject H_lambda while
    p <= delta; everything rejected before the first non-rejection is certified. The reference
    selector (``get_ltt_lam``) returns the first *non-rejected* lambda, one grid step too low; this
    is the textbook rule.
    """
    ok = pointwise_ok(rule, losses, eps, delta, risk)
    return ok.long().cumprod(-1).bool() if get_rule(rule).scans else ok


def select(rule: str, losses: Tensor | CalLosses, eps: float, delta: float, risk: str,
           cost: Tensor | None = None) -> Tensor:
    """Grid index [...] chosen by ``rule`` from calibration losses [..., G, n] (descending lambda).

    Without ``cost``: the smallest certified lambda, i.e. the largest certified index (for scanning rules,
    lambda_hat of the scan; for ``naive`` and ``crc-raw`` the largest index anywhere on the grid whose test
    passes, as the reference's ``naive_lam`` / ``crc_lam``). With ``cost`` [..., G] (e.g. expected strict
    MACs on calibration): the cheapest certified lambda, ties to the larger lambda. Nothing certified ->
    index 0 (lambda = 1, the full model, risk 0).
    """
    cert = certified_set(rule, losses, eps, delta, risk).clone()
    cert[..., 0] = True
    if cost is None:
        g = torch.arange(cert.shape[-1])
        return torch.where(cert, g, torch.zeros_like(g)).amax(-1)
    c = torch.where(cert, cost.double(), torch.full_like(cost.double(), float("inf")))
    return c.argmin(-1)  # argmin returns the first minimum: the larger lambda on ties


# ----------------------------------------------------------------------------------------------
# Per-exit thresholds lambda_l = lambda * a_l, certified by LTT over the one-parameter family


def per_exit_family(a: Tensor, lambdas: Tensor = LAMBDAS) -> Tensor:
    """Thresholds [..., G, K] = lambda * a_l for shape ``a`` [..., K] (a_l >= 1, +inf = exit l off).

    With min a_l = 1, lambda = 1 never exits (every threshold >= 1) and lambda = 0 exits at the first
    enabled exit, so the fixed-sequence scan starts from the safe end as for a shared lambda."""
    lam = lambdas.to(torch.float64)[:, None]
    a = a.double()[..., None, :]
    return torch.where(torch.isinf(a), torch.full_like(a * lam, float("inf")), a * lam)


def family_mean_loss(scores: Tensor, thresholds: Tensor, exit_loss: Tensor) -> Tensor:
    """Mean loss [..., G] at every setting of a threshold family that falls along the grid, without
    materialising the [..., G, n] exits (strict rule, as ``exit_index``).

    ``scores`` [..., K, n]; ``thresholds`` [..., G, K], non-increasing in g for every exit (true for
    lambda * a_l on the descending grid); ``exit_loss`` [..., E, n]. Exit l accepts sample i from grid
    index g_l(i) = #{g : t_gl >= s_il} on (exact float comparisons, via searchsorted in the scores'
    dtype); with H_l = min_{j<=l} g_j, loss_i(g) = loss_i[K] + sum_l [H_l <= g] (loss_i[l] - loss_i[l+1]),
    so the curve is a scatter-add of n*K steps and a cumsum over g.
    """
    k_early, n = scores.shape[-2:]
    g = thresholds.shape[-2]
    lead = torch.broadcast_shapes(scores.shape[:-2], thresholds.shape[:-2], exit_loss.shape[:-2])
    thr = thresholds.to(scores.dtype).flip(-2).transpose(-1, -2).contiguous()  # [..., K, G] ascending
    s = scores.expand(*lead, k_early, n).contiguous()
    start = g - torch.searchsorted(thr.expand(*lead, k_early, g).contiguous(), s)  # [..., K, n] in 0..G
    h = start.cummin(dim=-2).values  # H_l
    el = exit_loss.double().expand(*lead, k_early + 1, n)
    step = el[..., :-1, :] - el[..., 1:, :]  # [..., K, n]
    bins = torch.zeros(*lead, g + 1, dtype=torch.float64)  # bin G: never accepted on the grid
    bins.scatter_add_(-1, h.flatten(-2), step.flatten(-2))
    return el[..., -1, :].mean(-1, keepdim=True) + bins[..., :g].cumsum(-1) / n


def shape_from_thresholds(t: Tensor) -> Tensor:
    """Shape a [..., K] from per-exit thresholds t: a_l = t_l / min_j t_j, exits with t_l >= 1 off.

    Thresholds below 1e-3 are raised to it so that a stays finite (scores are in [0, 1])."""
    t = t.double().clamp(min=1e-3)
    off = t >= 1
    tmin = torch.where(off, torch.full_like(t, float("inf")), t).amin(-1, keepdim=True)
    a = t / tmin
    return torch.where(off | torch.isinf(tmin), torch.full_like(a, float("inf")), a)


def fit_shape(scores: Tensor, exit_loss: Tensor, strict_costs: Sequence[float] | Tensor, eps: Tensor | float, *,
              grid_size: int = 30,
              sweeps: int = 2) -> Tensor:
    """Shapes a [P, K] (a [K] for a scalar eps; [B, P, K] for batched scores [B, K, n]) fitted on a
    *shaping* split: the per-exit thresholds with the least expected strict MACs whose empirical risk is
    <= eps (coordinate descent, ``exitbench.methods.calibration``), rescaled by ``shape_from_thresholds``. It must
    not see the data that LTT then certifies on."""
    t, _ = coordinate_descent(scores, exit_loss, strict_costs, eps, grid_size=grid_size, sweeps=sweeps, strict=True)
    return shape_from_thresholds(t)


# ----------------------------------------------------------------------------------------------
# Pareto testing (Laufer-Goldshtein, Fisch, Barzilay, Jaakkola, "Efficiently Controlling Multiple Risks
# with Pareto Testing", ICLR 2023): per-exit thresholds whose expected cost is minimised, not only ordered


PARETO_QUANTILES = (0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)  # per-exit values; plus 1.0: off


def pareto_candidates(scores: Tensor, max_candidates: int = 4096, seed: int = 0) -> Tensor:
    """[..., C, K] per-exit threshold vectors from the optimisation split's scores [..., K, n]: every
    shared threshold of ``LAMBDAS`` (so the front can do whatever one shared lambda does), then every
    combination of each exit's ``PARETO_QUANTILES`` score quantiles and 1.0 (the exit off: scores are in
    [0, 1] and the rule is strict). Past ``max_candidates`` combinations (many exits), a seeded random
    subset of them."""
    k = scores.shape[-2]
    q = torch.tensor(PARETO_QUANTILES, dtype=scores.dtype)
    vals = torch.quantile(scores, q, dim=-1).movedim(0, -1)  # [..., K, Q]
    vals = torch.cat([vals, torch.ones_like(vals[..., :1])], dim=-1)  # [..., K, V]
    v = vals.shape[-1]
    if v ** k <= max_candidates:
        idx = torch.cartesian_prod(*[torch.arange(v)] * k).reshape(-1, k)  # [C, K]
    else:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(v, (max_candidates, k), generator=g)
    lead = vals.shape[:-2]
    picked = vals.gather(-1, idx.T.expand(*lead, k, idx.shape[0])).transpose(-1, -2)  # [..., C, K]
    shared = LAMBDAS.to(scores.dtype)[:, None].expand(-1, k).expand(*lead, -1, -1)  # [..., G, K]
    return torch.cat([shared, picked], dim=-2)


def pareto_front(risk: Tensor, cost: Tensor) -> Tensor:
    """[..., C] bool: the candidates no other candidate beats on both risk and cost (lower is better;
    of exact duplicates one is kept)."""
    by_risk = risk.argsort(dim=-1, stable=True)
    order = by_risk.gather(-1, cost.gather(-1, by_risk).argsort(dim=-1, stable=True))  # cost, then risk
    r = risk.gather(-1, order)
    best_before = torch.cat([torch.full_like(r[..., :1], float("inf")), r.cummin(-1).values[..., :-1]], -1)
    front = torch.zeros_like(risk, dtype=torch.bool)
    return front.scatter(-1, order, r < best_before)


@dataclass(frozen=True)
class ParetoChoice:
    thresholds: Tensor  # [..., K] per early exit (all 1.0, every exit off, when nothing is certified)
    front_size: Tensor  # [...] candidates on the optimisation split's front
    certified: Tensor  # [...] of them certified by the fixed-sequence test


@dataclass
class ParetoSequence:
    """The optimisation split's Pareto front, ordered from the safest, with what testing along it on the
    certification split needs; :meth:`choose` runs the test for one eps (built once for every eps)."""

    thresholds: Tensor  # [..., F, K] the front's candidates in test order (padded past each front's end)
    on_front: Tensor  # [..., F] bool: a real front member (False in the padding)
    cost: Tensor  # [..., F] expected strict MACs on both splits
    x: Tensor  # [..., F, n2] certification losses / B, in [-1, 1]
    nu: Tensor  # [..., F, n2] WSR betting fractions at delta
    delta: float
    bound: float

    def choose(self, eps: float) -> ParetoChoice:
        """Fixed-sequence testing along the front (WSR's test of H: R >= eps, as ``ucb-wsr``) until the first
        non-rejection; the cheapest certified candidate, or every exit off when none is."""
        passed = wsr_log_wealth(self.x, eps / self.bound, self.delta, self.nu) > math.log(1 / self.delta)
        rejected = (passed & self.on_front).long().cumprod(-1).bool()
        cost = torch.where(rejected, self.cost, torch.full_like(self.cost, float("inf")))
        k = self.thresholds.shape[-1]
        pick = cost.argmin(-1, keepdim=True)[..., None].expand(*cost.shape[:-1], 1, k)
        chosen = self.thresholds.gather(-2, pick)[..., 0, :]
        chosen = torch.where(rejected.any(-1, keepdim=True), chosen, torch.ones_like(chosen))
        return ParetoChoice(chosen, self.on_front.sum(-1), rejected.sum(-1))


def pareto_sequence(opt_scores: Tensor, opt_loss: Tensor, cert_scores: Tensor, cert_loss: Tensor,
                    strict_costs: Sequence[float] | Tensor, delta: float, risk: str,
                    candidates: Tensor | None = None) -> ParetoSequence:
    """Steps 1-2 of :func:`pareto_test`, batched over leading dims: the front on the optimisation split,
    ordered from the safest, and its candidates' certification losses."""
    b = get_risk(risk).bound
    cost = torch.as_tensor(strict_costs, dtype=torch.float64)
    cand = pareto_candidates(opt_scores) if candidates is None else candidates  # [..., C, K]
    ex_opt = first_exit(opt_scores, cand, strict=True)  # [..., C, n1]
    lead = ex_opt.shape[:-2]
    k = cand.shape[-1]
    cand = cand.expand(*lead, *cand.shape[-2:])
    r_opt = opt_loss.double().expand(*lead, *opt_loss.shape[-2:]).gather(-2, ex_opt).mean(-1)  # [..., C]
    c_opt = cost[ex_opt].mean(-1)
    front = pareto_front(r_opt, c_opt)
    order = torch.where(front, r_opt, torch.full_like(r_opt, float("inf"))).argsort(dim=-1, stable=True)
    f = max(int(front.sum(-1).max()), 1)  # only the front is tested: the first f of the order
    order = order[..., :f]
    thr = cand.gather(-2, order[..., None].expand(*lead, f, k))  # [..., F, K]
    ex_cert = first_exit(cert_scores, thr, strict=True)  # [..., F, n2]
    n1, n2 = ex_opt.shape[-1], ex_cert.shape[-1]
    x = cert_loss.double().expand(*lead, *cert_loss.shape[-2:]).gather(-2, ex_cert) / b
    both = (c_opt.gather(-1, order) * n1 + cost[ex_cert].mean(-1) * n2) / (n1 + n2)
    return ParetoSequence(thr, front.gather(-1, order), both, x, _wsr_nu(x, delta), delta, b)


def pareto_test(opt_scores: Tensor, opt_loss: Tensor, cert_scores: Tensor, cert_loss: Tensor,
                strict_costs: Sequence[float] | Tensor, eps: float, delta: float, risk: str,
                candidates: Tensor | None = None) -> ParetoChoice:
    """Pareto testing for per-exit thresholds, batched over leading dims.

    1. On the optimisation split (``opt_scores`` [..., K, n1], ``opt_loss`` [..., E, n1], the per-sample
       loss at each exit): the empirical risk and expected strict MACs of every candidate
       (``pareto_candidates``), and their Pareto front.
    2. The front ordered from the safest (lowest optimisation risk) to the riskiest, and tested in that
       order on the certification split with ``ucb-wsr``'s betting test until the first non-rejection:
       fixed-sequence testing (LTT), valid because the order was fixed on data the test does not see.
    3. The cheapest certified candidate (expected strict MACs on both splits); nothing certified: every
       exit off (the full model, risk 0).
    """
    return pareto_sequence(opt_scores, opt_loss, cert_scores, cert_loss, strict_costs, delta, risk,
                           candidates).choose(eps)


# ----------------------------------------------------------------------------------------------
# One call for a calibration trace


@dataclass(frozen=True)
class Calibrated:
    """A risk-controlled operating point: deploy ``ThresholdPolicy(score, thresholds, strict=True)``."""

    rule: str
    risk: str
    eps: float
    delta: float
    lam: float  # NaN for pareto-testing (a free threshold vector)
    thresholds: tuple[float, ...]  # per early exit (lambda repeated, lambda * a_l, or Pareto testing's)
    certified_interval: bool  # whether the certified set is [lambda, 1] (scanning rules)
    calibration_risk: float  # empirical risk at the choice on the data that certified it
    n_certify: int


def calibrate(trace, risk: str, eps: float, delta: float = 0.1, rule: str = "ucb-wsr", *,
              score: str = "max_softmax", strict_costs: Sequence[float] | None = None, shape: Tensor | None = None,
              shape_fraction: float = 0.5, seed: int = 0) -> Calibrated:
    """Pick the risk-controlled threshold(s) on a calibration ``trace``.

    ``rule``: a name in ``RULES`` (not a protocol reference). ``strict_costs`` (relative cost per exit) makes the
    selection minimise expected strict MACs among certified lambdas; it is needed for ``ucb-wsr-macs``,
    for fitting a per-exit shape and for ``pareto-testing`` (front on a random ``shape_fraction`` of the
    trace, testing on the rest; ``lam`` is then NaN: there is no shared lambda). ``ltt-per-exit`` uses
    ``shape`` (a_l, fixed in advance) or fits it on a random ``shape_fraction`` of the trace (seeded) and
    certifies with LTT on the rest.
    ``trace``: anything with ``.logits`` [E, N, C], ``.labels`` [N] and ``.confidence`` ([E, N] or None).
    """
    if get_rule(rule).reference:
        raise UserError(f"rule: {rule!r} is a protocol reference, not a selection rule; use one of "
                        f"{', '.join(SELECTION_RULES)}")
    scores = confidence_scores(trace, score)
    el = exit_losses(trace.logits, trace.labels, risk)
    k = scores.shape[0]
    if get_rule(rule).front:
        if strict_costs is None:
            raise UserError("pareto-testing: needs strict_costs (the cost the front trades against risk)")
        n = scores.shape[1]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        opt, cert = perm[:int(round(n * shape_fraction))], perm[int(round(n * shape_fraction)):]
        choice = pareto_test(scores[:, opt], el[:, opt], scores[:, cert], el[:, cert], strict_costs, eps, delta, risk)
        thr = choice.thresholds
        ex = exit_index(scores[:, cert], thr[None])[0]
        return Calibrated(rule, risk, eps, delta, math.nan, tuple(thr.tolist()), False,
                          el[:, cert].gather(0, ex[None])[0].mean().item(), len(cert))
    if get_rule(rule).per_exit:
        n = scores.shape[1]
        if shape is None:
            if strict_costs is None:
                raise UserError("ltt-per-exit: fitting the per-exit shape needs strict_costs (or pass shape)")
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            cut = int(round(n * shape_fraction))
            fit, cert = perm[:cut], perm[cut:]
            shape = fit_shape(scores[:, fit], el[:, fit], strict_costs, eps)
        else:
            cert = torch.arange(n)
        thr = per_exit_family(shape)  # [G, K]
        losses = el[:, cert].gather(0, exit_index(scores[:, cert], thr))
        g = int(select("ltt", losses, eps, delta, risk))
        return Calibrated(rule, risk, eps, delta, LAMBDAS[g].item(), tuple(thr[g].tolist()), True,
                          losses[g].mean().item(), len(cert))
    if get_rule(rule).union_bound and strict_costs is None:
        raise UserError("ucb-wsr-macs: needs strict_costs to rank the certified lambdas by expected MACs")
    exits = exit_index(scores)
    losses = el.gather(0, exits)
    cost = None
    if strict_costs is not None:
        cost = torch.as_tensor(strict_costs, dtype=torch.float64)[exits].mean(-1)
    g = int(select(rule, losses, eps, delta, risk, cost))
    lam = LAMBDAS[g].item()
    return Calibrated(rule, risk, eps, delta, lam, (lam,) * k, get_rule(rule).scans, losses[g].mean().item(),
                      scores.shape[1])


__all__ = [
    "GUARANTEES", "LAMBDAS", "PARETO_QUANTILES", "RISKS", "RULES", "SELECTION_RULES", "SHARED_RULES", "CalLosses",
    "Calibrated", "ParetoChoice", "ParetoSequence", "Risk", "Rule", "get_rule", "pareto_candidates", "pareto_front",
    "pareto_sequence", "pareto_test",
    "binom_cdf", "brier", "calibrate", "certified_set", "confidence_scores", "exit_index", "exit_losses",
    "family_mean_loss", "fit_shape", "get_risk", "hb_p_value", "hb_ucb", "hoeffding_ucb", "loss_matrix", "monotonise",
    "per_exit_family", "pointwise_ok", "scan_from_top", "select", "shape_from_thresholds", "to_unit",
    "wsr_log_wealth", "wsr_ucb",
]
