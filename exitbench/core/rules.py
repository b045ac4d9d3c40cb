"""The vocabulary of risk control, torch-free: the risks (per-sample losses) and the selection rules,
each with what it promises (docs/risk_control.md). ``exitbench.methods.risk_control`` implements them;
configs validate against these registries without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from exitbench.core.registry import Registry


@dataclass(frozen=True)
class Risk:
    """A per-sample loss: its range [lo, hi] and the bound B used by CRC and to map into [0, 1]."""

    name: str
    lo: float
    hi: float
    bound: float
    needs_labels: bool


RISKS: Registry[Risk] = Registry("risk", base=Risk, field="risk_control.risks")
for _r, _help in ((Risk("gap-prediction", -1.0, 1.0, 1.0, True), "1[last exit right] - 1[chosen exit right]"),
                  (Risk("gap-brier", -2.0, 2.0, 2.0, True), "Brier score of the chosen exit minus the last's"),
                  (Risk("consistency-prediction", 0.0, 1.0, 1.0, False), "1[chosen exit disagrees with the last]"),
                  (Risk("consistency-brier", -2.0, 2.0, 2.0, False), "Brier distance to the last exit's softmax")):
    RISKS.register(_r.name, _r, help=_help)


@dataclass(frozen=True)
class Rule:
    """A threshold-selection rule and what it promises (docs/risk_control.md, "Rules").

    ``promise``: ``"expectation"`` (E[R] <= eps), ``"high-probability"`` (P(R > eps) <= delta) or
    ``"none"`` -- the promise the harness checks; ``guarantee`` says it with its assumptions. ``scans``:
    the rule tests lambda from 1 down, stops at the first failure and certifies [lambda_hat, 1] (without it,
    every grid value whose test passes is certified: any subset); ``union_bound``: WSR at delta / G on
    every lambda, then the cheapest certified; ``per_exit``: per-exit thresholds (lambda * a_l, or a
    free vector); ``front``: Pareto testing (a cost-risk front found on one half, tested along it on the
    other); ``reference``: a protocol reference (oracle, random), not something a user can deploy.
    """

    name: str
    promise: str
    guarantee: str
    scans: bool = False
    union_bound: bool = False
    per_exit: bool = False
    front: bool = False
    reference: bool = False


RULES: Registry[Rule] = Registry("rule", base=Rule, field="risk_control.rules")
for _rule, _help in (
    # Strict, as the reference's naive_lam (rc/risk_control.py): an empirical risk exactly at eps is not taken.
    (Rule("naive", "none", "none"), "the smallest lambda on the grid with empirical risk < eps (strict, as the "
     "reference's naive_lam); no guarantee"),
    (Rule("crc", "expectation", "E[R(lambda_hat)] <= eps; any loss (applied to the monotonised loss)", True),
     "conformal risk control on the monotonised loss"),
    # The reference's crc_lam (rc/risk_control.py): the largest grid index (smallest lambda) anywhere on the
    # grid whose CRC bound holds on the raw loss -- no scan, so not ``scans``. Its expectation bound holds only
    # for losses monotone in lambda, which gap losses are not: checked as a baseline.
    (Rule("crc-raw", "none", "E[R(lambda_hat)] <= eps only if every per-sample loss is monotone in lambda "
          "(the reference's crc_lam)"),
     "the reference's CRC (crc_lam) on the raw loss: the smallest lambda on the whole grid (not a scan) "
     "whose bound holds"),
    (Rule("ucb-wsr", "high-probability", "P(R(lambda_hat) <= eps) >= 1 - delta; population risk monotone in lambda",
          True), "RCPS with the Waudby-Smith-Ramdas betting bound"),
    (Rule("ucb-hb", "high-probability", "P(R(lambda_hat) <= eps) >= 1 - delta; none beyond iid (fixed-sequence test)",
          True), "RCPS with the Hoeffding-Bentkus bound"),
    (Rule("ucb-hoeffding", "high-probability",
          "P(R(lambda_hat) <= eps) >= 1 - delta; none beyond iid (fixed-sequence test)", True),
     "RCPS with Hoeffding's bound on the clipped loss"),
    (Rule("ltt", "high-probability", "P(R(lambda_hat) <= eps) >= 1 - delta; none beyond iid (fixed-sequence test)",
          True), "Learn-then-Test, fixed-sequence from lambda = 1"),
    (Rule("ucb-wsr-macs", "high-probability",
          "P(R(lambda_hat) <= eps) >= 1 - delta; none beyond iid (union bound over the grid)", union_bound=True),
     "WSR at delta/G on every lambda, then the cheapest certified"),
    (Rule("ltt-per-exit", "high-probability",
          "P(R(thresholds) <= eps) >= 1 - delta; none beyond iid (shape fitted on disjoint data)", per_exit=True),
     "per-exit thresholds lambda * a_l: shape fitted on half, LTT on the other half"),
    (Rule("pareto-testing", "high-probability",
          "P(R(thresholds) <= eps) >= 1 - delta; none beyond iid (front and order chosen on disjoint data)",
          per_exit=True, front=True),
     "per-exit thresholds: (risk, MACs) Pareto front on half, fixed-sequence LTT along it on the other half"),
    (Rule("oracle", "none", "baseline", reference=True), "protocol reference: the best lambda on the population"),
    (Rule("random", "none", "baseline", reference=True), "protocol reference: a uniformly random lambda"),
):
    RULES.register(_rule.name, _rule, help=_help)
GUARANTEES: dict[str, str] = {n: RULES.get(n).guarantee for n in RULES.names()}
SELECTION_RULES = tuple(n for n in RULES.names() if not RULES.get(n).reference)  # what a user can deploy
SHARED_RULES = tuple(n for n in SELECTION_RULES if not RULES.get(n).per_exit)  # one shared lambda


def get_risk(name: str) -> Risk:
    """The risk called ``name``; unknown names raise UserError with the nearest ones."""
    return RISKS.get(name)


def get_rule(name: str) -> Rule:
    """The selection rule called ``name``; unknown names raise UserError with the nearest ones."""
    return RULES.get(name)
