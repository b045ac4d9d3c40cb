"""The plugin contract: exit points, staged backbones, multi-exit nets, methods and their registry.

Everything a method plugin needs lives here, so a plugin (in this repo or in a package of its own)
imports ``exitbench.methods.base`` and nothing from the harness. Vocabulary (README, "Layout"):
a *backbone* is cut into *blocks*; an *exit point* is a block boundary; the blocks between two chosen
exit points form a *stage*; a *multi-exit net* is stages + exit heads; a *method* places exits,
builds heads and defines the training loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from exitbench.core.errors import UserError, did_you_mean
from exitbench.core.registry import Registry
from exitbench.core.spec import Budget  # noqa: F401  (re-exported: the plugin contract names it)

ENTRY_POINT_GROUP = "exitbench.methods"


# ----------------------------------------------------------------------------------------------
# Exit points and staged backbones


@dataclass(frozen=True)
class ExitPoint:
    """A block boundary where an exit head may attach.

    ``index`` is the block after which the point sits (0-based, in the backbone's block list);
    ``feature_shape`` is the per-sample shape there: (C, H, W) for CNNs, (H, W, C) when
    ``channels_last`` (Swin, MambaOut), (tokens, C) for ViTs, whose first ``prefix_tokens`` tokens are
    class/register tokens; ``macs_cumulative`` is the backbone's MACs (batch 1) from the input up to and
    including that block. ``exitbench.methods.heads.to_map`` turns any of these into a [B, C, H, W] map.
    """

    index: int
    name: str
    channels: int
    feature_shape: tuple[int, ...]
    macs_cumulative: int
    prefix_tokens: int = 0
    channels_last: bool = False


class StagedBackbone(nn.Module):
    """A classifier cut at block boundaries: ``head(blocks[-1](...blocks[0](x)))`` is its forward.

    ``blocks[0]`` includes the stem. ``head`` is the backbone's own classifier (pooling, norm, fc),
    the final exit. ``candidates`` are the exit points after every block but the last, and ``macs``
    the whole network's MACs; both are filled in by the harness (``exitbench.benchmarks.backbones``).
    """

    def __init__(self, blocks: Sequence[nn.Module], block_names: Sequence[str], head: nn.Module,
                 *, name: str = "", num_classes: int = 0, input_size: tuple[int, int, int] = (3, 32, 32)):
        super().__init__()
        if len(blocks) != len(block_names):
            raise ValueError("one name per block")
        self.blocks = nn.ModuleList(blocks)
        self.block_names = list(block_names)
        self.head = head
        self.name = name
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        self.candidates: list[ExitPoint] = []
        self.macs: int = 0
        self.block_macs: list[int] = []
        self.head_macs: int = 0

    def forward_features(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# Exit placement (EENet's cost rule, reused by PTEENet and shared by every method)

PHI = 1.6180339887
# A placement distribution gives T_i / F, the cost fraction of the backbone at which exit i of N goes
# (EENet's exit placement by cost).
PLACEMENTS: Registry[Callable[[int, int], float]] = Registry("placement", field="placement")
PLACEMENTS.register("fine", lambda i, n: 1 - 0.95 ** (i + 1), help="EENet's fine: T_i/F = 1 - 0.95^(i+1)")
PLACEMENTS.register("pareto", lambda i, n: 1 - 0.8 ** (i + 1), help="EENet's pareto: T_i/F = 1 - 0.8^(i+1)")
PLACEMENTS.register("linear", lambda i, n: (i + 1) / (n + 1), help="evenly spaced: T_i/F = (i+1)/(N+1)")
PLACEMENTS.register("gold_ratio", lambda i, n: PHI ** (i - n), help="EENet's golden ratio: T_i/F = phi^(i-N)")


def place_exits(candidates: Sequence[ExitPoint], total_macs: int, n_exits: int,
                placement: str | Sequence[str | float] = "fine") -> list[ExitPoint]:
    """Choose ``n_exits`` exit points among ``candidates``.

    ``placement`` is a distribution name (exit i goes after the first unused candidate whose
    cumulative MACs reach T_i * total_macs) or an explicit list of block names or cost fractions.
    Raises :class:`UserError` when the placement is impossible on this backbone.
    """
    if not candidates:
        raise UserError("placement: the backbone has no exit-point candidates")
    if isinstance(placement, str):
        if n_exits < 1:
            raise UserError(f"n_exits: must be at least 1, got {n_exits}")
        targets: list[str | float] = [PLACEMENTS.get(placement)(i, n_exits) for i in range(n_exits)]
    else:
        targets = list(placement)
        if not targets:
            raise UserError("placement: the explicit list is empty; give block names or cost fractions")
        fracs = [t for t in targets if not isinstance(t, str)]
        if any(not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t < 1 for t in fracs):
            raise UserError(f"placement: cost fractions must be numbers strictly between 0 and 1, "
                            f"got {list(placement)}")
        if any(b <= a for a, b in zip(fracs, fracs[1:])):
            raise UserError(f"placement: the list {list(placement)} must increase (exits in depth order), "
                            f"e.g. {sorted(fracs)}")
    by_name = {c.name: c for c in candidates}
    chosen: list[ExitPoint] = []
    for i, t in enumerate(targets):
        last = chosen[-1].index if chosen else -1
        if isinstance(t, str):
            if t not in by_name:
                raise UserError(f"placement[{i}]: no exit point named {t!r}; {did_you_mean(t, list(by_name))}")
            c = by_name[t]
            if c.index <= last:
                raise UserError(f"placement[{i}]: {t!r} is not after the previous exit; list exits in depth order")
        else:
            frac = float(t)
            c = next((c for c in candidates if c.index > last and c.macs_cumulative >= frac * total_macs), None)
            if c is None:
                have = len([c for c in candidates if c.index > last])
                raise UserError(
                    f"placement: exit {i} needs a block boundary at >= {frac:.1%} of the backbone's MACs after "
                    f"the previous exit, but none is left ({have} candidates remain); use fewer exits "
                    f"(n_exits), another placement (linear, pareto, gold_ratio) or an explicit list")
        chosen.append(c)
    return chosen


# ----------------------------------------------------------------------------------------------
# Multi-exit nets


@dataclass
class ExitOutputs:
    """Every exit's output for a batch: ``logits[k]`` is [B, classes] (final exit last);
    ``confidence[k]`` is [B] in [0, 1] for methods with learned confidence or exit gates (1 at the final exit)."""

    logits: list[Tensor]
    confidence: list[Tensor] | None = None


class Policy(Protocol):
    """Decides per sample whether to leave at exit ``k`` (see ``exitbench.methods.policies.ThresholdPolicy``)."""

    def accept(self, k: int, logits: Tensor, confidence: Tensor | None) -> Tensor: ...


Carry = tuple[Tensor, ...]
"""What an exit hands the next one (per-sample tensors, batch first); empty for independent heads. ZTW's
cascading heads carry the previous head's logits and the log-probabilities its ensembles combine."""

Step = Callable[[int, Tensor, Carry], "tuple[Tensor, Tensor | tuple[Tensor, Tensor], Carry]"]
"""``step(k, x, carry) -> (features after stage k, exit k's output, carry for exit k+1)``: one stage of the
dynamic forward."""


def _split_head_output(out: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


class MultiExitNet(nn.Module):
    """Stages + heads. ``heads[k]`` maps the features after ``stages[k]`` to logits, or to
    ``(logits, confidence)``; the last head is the backbone's own classifier.

    ``rel_costs[k]`` is exit k's cost relative to the plain backbone in ``paper`` accounting
    (prefix + its own head; the final exit is 1). The harness sets it from measured MACs; methods
    with a cost-aware loss (EENet, PTEENet) read it.
    """

    def __init__(self, backbone: StagedBackbone, exits: Sequence[ExitPoint], heads: Sequence[nn.Module],
                 *, freeze_backbone: bool = False):
        super().__init__()
        if len(heads) != len(exits):
            raise ValueError(f"{len(exits)} exits need {len(exits)} heads, got {len(heads)}")
        bounds = [e.index + 1 for e in exits] + [len(backbone.blocks)]
        starts = [0] + bounds[:-1]
        self.stages = nn.ModuleList(nn.Sequential(*backbone.blocks[a:b]) for a, b in zip(starts, bounds))
        self.heads = nn.ModuleList([*heads, backbone.head])
        self.exits = list(exits)
        self.backbone_name = backbone.name
        self.num_classes = backbone.num_classes
        self.freeze_backbone = freeze_backbone
        self.register_buffer("rel_costs", torch.ones(len(exits) + 1), persistent=False)
        if freeze_backbone:
            for m in (*self.stages, self.heads[-1]):
                m.requires_grad_(False)
        self.train(True)

    @property
    def num_exits(self) -> int:
        """Exits including the final one."""
        return len(self.heads)

    def train(self, mode: bool = True) -> MultiExitNet:
        super().train(mode)
        if self.freeze_backbone:
            # A frozen backbone stays in eval mode: BatchNorm statistics must not drift and dropout
            # must not run while branches train (the PTEENet reference code gets this wrong).
            self.stages.eval()
            self.heads[-1].eval()
        return self

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Freeze (and keep in eval mode) or release the backbone's stages and final head: how the harness
        applies a cell's training regime to any method's net."""
        self.freeze_backbone = frozen
        for m in (*self.stages, self.heads[-1]):
            m.requires_grad_(not frozen)
        self.train(self.training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def run_head(self, k: int, feats: Tensor, carry: Carry = ()) -> tuple[Tensor | tuple[Tensor, Tensor], Carry]:
        """Exit ``k``'s output on the features after stage ``k``, and the carry for exit ``k+1``.

        Default: ``heads[k](feats)``, nothing carried. A net whose exits depend on earlier ones (ZTW's
        cascading heads and ensembles) overrides this; every forward (all exits, dynamic, the latency
        variants, the fast path, the profile and the MACs count) goes through it, and the dynamic forward
        compacts the carry with the features."""
        return self.heads[k](feats), carry

    def forward_all(self, x: Tensor) -> ExitOutputs:
        """Run the whole network and return every exit's output (no early termination)."""
        return self.exits_on(self.stage_outputs(x))

    def stage_outputs(self, x: Tensor) -> list[Tensor]:
        """Every stage's output on ``x``: what exit k reads is the k-th."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def exits_on(self, feats: Sequence[Tensor]) -> ExitOutputs:
        """Every exit's output on the stages' outputs ``feats`` (:meth:`stage_outputs`), through
        :meth:`run_head` in order (so carries pass from exit to exit)."""
        logits, confs = [], []
        carry: Carry = ()
        for k, f in enumerate(feats):
            out, carry = self.run_head(k, f, carry)
            lg, c = _split_head_output(out)
            logits.append(lg)
            confs.append(c)
        if all(c is None for c in confs[:-1]):
            return ExitOutputs(logits)
        confs[-1] = torch.ones_like(confs[0])
        return ExitOutputs(logits, confs)

    def forward(self, x: Tensor) -> ExitOutputs:
        return self.forward_all(x)

    def step(self, k: int, x: Tensor, carry: Carry = ()) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor], Carry]:
        """Stage ``k`` on ``x``, then its exit: (features, exit output, carry). The eager step of
        :meth:`forward_dynamic`; the harness's fast path substitutes a compiled or captured one."""
        x = self.stages[k](x)
        out, carry = self.run_head(k, x, carry)
        return x, out, carry

    @torch.no_grad()
    def forward_dynamic(self, x: Tensor, policy: Policy, step: Step | None = None) -> tuple[Tensor, Tensor]:
        """Real per-sample early exit: returns (logits [B, classes], exit index [B]).

        After each early exit the samples that leave are written into the output and removed from the
        batch (compaction), so later stages run only on the rest. The batch is partitioned once per exit
        -- a stable sort on the reject flag puts the leavers first, one count read splits them from the
        rest, ``index_select`` gathers each side -- so an exit costs exactly one device->host read
        (``torch.cuda.set_sync_debug_mode`` finds no other); boolean-mask indexing, a hidden ``nonzero``
        per use, is never used. Nothing is gathered at an exit nobody leaves. What an exit carries to the next
        (:meth:`run_head`) is compacted with the features. A stateful policy (PABEE's patience) is told
        which rows stayed through its ``compact(index)``. ``step`` (default
        :meth:`step`) runs one stage and its head; the gating and partitioning stay here either way.
        """
        step = step or self.step
        n = x.shape[0]
        rows = torch.arange(n, device=x.device)
        out: Tensor | None = None
        exit_index = torch.full((n,), len(self.heads) - 1, dtype=torch.long, device=x.device)
        last = len(self.heads) - 1
        compact = getattr(policy, "compact", None)
        carry: Carry = ()
        for k in range(len(self.heads)):
            x, head_out, carry = step(k, x, carry)
            logits, conf = _split_head_output(head_out)
            if out is None:
                out = logits.new_empty((n, logits.shape[1]))
            if k == last:
                out.index_copy_(0, rows, logits)
                break
            accept = policy.accept(k, logits, conf)
            order = torch.sort((~accept).to(torch.uint8), stable=True).indices  # leavers first, in order
            n_accept = int(accept.sum())  # the one host sync of this exit
            if n_accept == 0:
                continue  # nobody leaves: skip the gather
            leave, stay = order[:n_accept], order[n_accept:]
            gone = rows.index_select(0, leave)
            out.index_copy_(0, gone, logits.index_select(0, leave))
            exit_index.index_fill_(0, gone, k)
            if n_accept == rows.numel():
                break
            x, rows = x.index_select(0, stay), rows.index_select(0, stay)
            carry = tuple(c.index_select(0, stay) for c in carry)
            if compact is not None:
                compact(stay)
        assert out is not None
        return out, exit_index


# ----------------------------------------------------------------------------------------------
# Methods


OPTIMIZERS = ("adam", "adamw", "sgd")  # what Budget.optimizer may name (benchmarks.training.make_optimizer)


REGIMES = ("disjoint", "mixed", "joint")  # training regimes, see Method.regimes

Trainer = Callable[..., dict]
"""The harness's shared loop: ``trainer(net, loss_fn, params, loaders, budget) -> stats``."""


def merge_phases(phases: dict[str, dict]) -> dict:
    """One stats dict for a training run made of several ``trainer`` calls (ZTW's two phases, JEI-DNN's
    warm-up and bi-level stage): the first phase's budget, seconds, epochs and losses summed or chained over
    all, and each phase's own stats under ``phases``."""
    stats = list(phases.values())
    seconds = sum(s["seconds"] for s in stats)
    epochs = sum(s["epochs_run"] for s in stats)
    return {**stats[0], "phases": phases, "seconds": seconds, "epochs_run": epochs,
            "seconds_per_epoch": seconds / max(epochs, 1),
            "stopped_by_wall_time": any(s["stopped_by_wall_time"] for s in stats),
            "loss_per_epoch": [v for s in stats for v in s["loss_per_epoch"]]}


@dataclass
class HParam:
    """A method hyper-parameter: its default, a one-line help, allowed values (if a choice) and, for
    numbers, a range [low, high] (``positive``: > 0). The type is the default's: an int default takes
    integers, a float default any number, a tuple default a list or tuple. Shared names (epochs, lr,
    batch_size, ...) get their usual range from ``COMMON_RANGES`` unless the HParam sets its own."""

    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    positive: bool = False
    list_ok: bool = False  # a text default that also takes a list (placement: a name, or block names/fractions)

    def check(self, name: str, value: Any, method: str) -> Any:
        """The value, checked (an integral float for an int default becomes an int); a one-line
        UserError when it has the wrong type or lies outside the range."""
        where = f"method {method}: {name}={value!r}"
        if self.choices is not None:
            if value not in self.choices:
                raise UserError(f"{where} is not one of {list(self.choices)}")
            return value
        d = self.default
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(d, bool):
            if not isinstance(value, bool):
                raise UserError(f"{where}: expected true or false")
            return value
        hint = self.help or "see exitbench list"
        if isinstance(value, str) and isinstance(d, (int, float)):
            try:
                float(value)
                hint = f"YAML reads {value} as text: write it with a dot, e.g. {float(value)!r}"
            except ValueError:
                pass
        if number and not math.isfinite(value):
            raise UserError(f"{where}: expected a finite number")
        listed = self.list_ok and isinstance(value, (list, tuple))
        if isinstance(d, str) and not isinstance(value, str) and not listed:
            raise UserError(f"{where}: expected {'a name or a list' if self.list_ok else 'a name'} ({hint})")
        if isinstance(d, int) and not (number and float(value).is_integer()):
            raise UserError(f"{where}: expected an integer ({hint})")
        if isinstance(d, float) and not number:
            raise UserError(f"{where}: expected a number ({hint})")
        if isinstance(d, tuple) and not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list like {list(d)}")
        low, high, positive = self.low, self.high, self.positive
        if (low, high, positive) == (None, None, False):
            low, high, positive = COMMON_RANGES.get(name, (None, None, False))
        if number:
            if positive and not value > 0:
                raise UserError(f"{where}: must be > 0")
            if low is not None and value < low:
                raise UserError(f"{where}: must be >= {low:g}")
            if high is not None and value > high:
                raise UserError(f"{where}: must be <= {high:g}")
            if isinstance(d, int):
                return int(value)
        return value


# Usual ranges of the hyper-parameter names methods share: (low, high, strictly positive).
COMMON_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "epochs": (1, None, False),  # a method must train: 0 would report an untrained net as a result
    "batch_size": (1, None, False),
    "lr": (None, None, True),
    "weight_decay": (0, None, False),
    "n_exits": (1, None, False),
    "lam": (0, None, False),
    "tau": (0, 1, False),
    "branch_depth": (0, None, False),
    "pool_size": (1, None, False),
}



# The hyper-parameters every method with placed exits and the shared loop declares the same way; a method
# file writes ``"n_exits": N_EXITS`` rather than repeating the declaration (and may declare its own instead).
N_EXITS = HParam(3, "number of early exits")
PLACEMENT = HParam("fine", "fine | pareto | linear | gold_ratio | list of block names or cost fractions",
                   list_ok=True)
PRECISION = HParam("fp32", "training precision: fp32, bf16 or fp16 (autocast; fp16 needs CUDA)",
                   ("fp32", "bf16", "fp16"))


class Method:
    """Base class of early-exit methods. Subclass, set the class attributes, register.

    ``hparams`` declares every accepted hyper-parameter; ``__init__`` rejects unknown keys and
    values outside ``choices``. ``place_exits`` picks exit points, ``build`` makes the net, ``loss``
    is the training objective; ``fit`` runs the harness's shared loop with that loss unless a method
    needs its own procedure.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    score: ClassVar[str] = "max_softmax"
    scores: ClassVar[tuple[str, ...]] = ("max_softmax", "neg_entropy")
    trains_backbone: ClassVar[bool] = False  # the method's own regime trains the backbone (joint methods)
    # Training regimes (Kubaty et al. 2024) a matrix may ask for: disjoint (backbone first, then the heads on
    # it frozen), mixed (backbone first, then all together), joint (all together from a fresh backbone).
    # The default is the method's own: mixed when it trains the backbone, else disjoint.
    regimes: ClassVar[tuple[str, ...]] = REGIMES
    per_exit_thresholds: ClassVar[bool] = False  # calibrate one threshold per exit (e.g. BranchyNet's T_n)
    hparams: ClassVar[dict[str, HParam]] = {}

    def __init__(self, **hparams: Any):
        self.hp: dict[str, Any] = self.resolve(hparams)

    @classmethod
    def resolve(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Every hyper-parameter's value: ``hparams`` checked (unknown keys, choices, ranges) over the
        declared defaults. Raises UserError naming the first bad one."""
        unknown = [k for k in hparams if k not in cls.hparams]
        if unknown:
            k = unknown[0]
            raise UserError(f"method {cls.name}: unknown hyper-parameter {k!r}; {did_you_mean(k, list(cls.hparams))}")
        hp: dict[str, Any] = {k: v.default for k, v in cls.hparams.items()} | dict(hparams)
        for k, spec in cls.hparams.items():
            if k in hparams or spec.choices is not None:
                hp[k] = spec.check(k, hp[k], cls.name)
        placement = hparams.get("placement")
        if isinstance(placement, (list, tuple)) and "n_exits" in hparams and len(placement) != hp["n_exits"]:
            raise UserError(f"method {cls.name}: placement lists {len(placement)} exits but n_exits is "
                            f"{hp['n_exits']}; make them agree, or leave n_exits out")
        return hp

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.hp.items())})"

    def place_exits(self, backbone: StagedBackbone) -> list[ExitPoint]:
        """Default: ``n_exits`` exits by the ``placement`` hyper-parameter (EENet's cost rule)."""
        return place_exits(backbone.candidates, backbone.macs, int(self.hp.get("n_exits", 3)),
                           self.hp.get("placement", "fine"))

    def build(self, backbone: StagedBackbone, exits: Sequence[ExitPoint], num_classes: int) -> MultiExitNet:
        raise NotImplementedError

    def loss(self, outputs: ExitOutputs, target: Tensor, net: MultiExitNet) -> Tensor:
        raise NotImplementedError

    @classmethod
    def default_regime(cls) -> str:
        """The method's own regime: ``mixed`` when it trains the backbone (from the trained one), else ``disjoint``."""
        return "mixed" if cls.trains_backbone else "disjoint"

    def budget(self) -> Budget:
        """The training budget from the hyper-parameters (keys named like Budget's fields)."""
        known = Budget.__dataclass_fields__
        return Budget(**{k: v for k, v in self.hp.items() if k in known})

    def fit(self, net: MultiExitNet, loaders: dict[str, Any], budget: Budget, trainer: Trainer) -> dict:
        """Train ``net``; returns training stats (epochs run, seconds, losses). Default: shared loop."""
        return trainer(net, self.loss, net.trainable_parameters(), loaders, budget)

    def default_thresholds(self) -> float | None:
        """The method's own inference threshold (e.g. PTEENet's tau), reported as an operating point."""
        return None


# ----------------------------------------------------------------------------------------------
# Registry: built-ins and plugins both come through the entry-point group, loaded lazily.


def _check_method(name: str, cls: type[Method]) -> None:
    if cls.name != name:  # results record cls.name: two names for one method would split its rows
        raise UserError(f"method: entry point {name!r} loads a class named {cls.name!r}; "
                        f"make the entry-point name and the class's `name` the same")


METHODS: Registry[type[Method]] = Registry("method", base=Method, classes=True, group=ENTRY_POINT_GROUP,
                                           check=_check_method)
# The built-ins, registered like every registry's built-ins: lazily, beside the registry (so listing them
# imports no method file, and a checkout that was never installed has them too). Plugins come through the
# entry-point group; in-process (a notebook, a test) a class is added with ``METHODS.register(cls.name, cls)``.
BUILTIN_METHODS = {"pteenet": "exitbench.methods.pteenet:PTEENet",
                   "branchynet": "exitbench.methods.branchynet:BranchyNet",
                   "eenet": "exitbench.methods.eenet:EENet", "sdn": "exitbench.methods.sdn:SDN",
                   "ztw": "exitbench.methods.ztw:ZTW", "jeidnn": "exitbench.methods.jeidnn:JEIDNN"}
for _name, _target in BUILTIN_METHODS.items():
    METHODS.register(_name, _target)


def list_methods() -> list[str]:
    """Names of every registered or discoverable method, sorted."""
    return sorted(METHODS.names())


def get_method(name: str) -> type[Method]:
    """The method class called ``name``; an unknown name raises UserError with the nearest names."""
    return METHODS.get(name)


__all__ = [
    "ENTRY_POINT_GROUP", "METHODS", "OPTIMIZERS", "PHI", "PLACEMENTS", "Budget", "Carry", "ExitOutputs", "ExitPoint",
    "HParam", "Method",
    "MultiExitNet", "Policy", "REGIMES", "StagedBackbone", "Trainer", "UserError", "did_you_mean", "get_method",
    "list_methods", "merge_phases", "N_EXITS", "PLACEMENT", "PRECISION", "place_exits",
]
