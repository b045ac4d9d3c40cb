"""One generic rule that cuts any timm model built as stem -> stages -> blocks -> head.

The families with an adapter of their own (``benchmarks.backbones``) are cut by hand; every other timm
classifier goes through this rule:

1. **Blocks.** The model's stage container is its first child named ``stages``, ``layers`` or
   ``blocks`` (or children ``s1``, ``s2``, ... as in RegNet); a stage's blocks are the children of its
   ``blocks`` attribute when it has one, else its own children (a stage's ``downsample`` or other
   non-block modules are not blocks: they run with the block after them).
2. **Trace.** ``torch.fx`` traces the model's own ``forward`` (with timm's not-traceable modules and
   functions as leaves, the list timm's FX feature extraction uses), so the graph is exactly timm's
   computation.
3. **Cut.** After the last graph node of each block, the graph may be cut if exactly one activation is
   live there (used later). Where more than one is (a block that hands two tensors on), that boundary is
   no exit point and the block runs with the next. Each piece becomes a ``GraphModule`` over the same
   parameters: the first starts with the stem, the last is the head (final norm, pooling, classifier).

torch.nn's own layers (convolutions, BatchNorm, Dropout, ...) stay modules, so ``train()`` / ``eval()``
switch them as usual; Python-level ``if self.training`` branches inside timm's own modules are traced in
eval mode and stay so (stochastic depth, for one, does not run while a generically cut backbone trains --
timm's default ``drop_path_rate`` is 0 anyway). Running the pieces in order is timm's forward, node for
node; ``tests/test_backbones.py`` checks it for
every family this covers (ConvNeXt, RegNet, ByobNet, Swin, EfficientViT, LeViT, GhostNet). A model the
rule cannot cut (no stage container, untraceable control flow, fewer than two cuttable boundaries) is a
one-line error naming the model.
"""

from __future__ import annotations

import re

from torch import fx, nn

from exitbench.core.errors import UserError

STAGE_CONTAINERS = ("stages", "layers", "blocks")


def _block_paths(model: nn.Module) -> list[str]:
    """Qualified names of the blocks, in forward order (rule 1)."""
    children = dict(model.named_children())
    container = next((n for n in STAGE_CONTAINERS if n in children), None)
    if container is not None:
        stages = [(f"{container}.{n}", m) for n, m in children[container].named_children()]
    else:
        stages = sorted(((n, m) for n, m in children.items() if re.fullmatch(r"s\d+", n)), key=lambda t: int(t[0][1:]))
    paths = []
    for sname, stage in stages:
        inner = getattr(stage, "blocks", None)
        if isinstance(inner, (nn.Sequential, nn.ModuleList)):
            paths += [f"{sname}.blocks.{n}" for n, _ in inner.named_children()]
        elif isinstance(stage, (nn.Sequential, nn.ModuleList)) or re.fullmatch(r"s\d+", sname):
            paths += [f"{sname}.{n}" for n, m in stage.named_children()
                      if not isinstance(m, nn.Identity) and n != "downsample"]
        else:
            paths.append(sname)  # a stage that is one block
    return paths


class _Tracer(fx.Tracer):
    """timm's leaves: modules and functions its FX feature extraction does not trace into."""

    def __init__(self) -> None:
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self._leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


def _owner(node: fx.Node) -> str:
    """The innermost module path a node came from ('' for the model itself)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    path = last[0] if isinstance(last, tuple) else list(stack.keys())[-1]
    return str(path).removeprefix("L['self'].").replace("L__self__.", "")


def _inside(owner: str, path: str) -> bool:
    return owner == path or owner.startswith(path + ".")


def cut_generic(model: nn.Module, name: str) -> tuple[list[nn.Module], list[str], nn.Module]:
    """(blocks, block names, head) of ``model`` by the generic rule (module docstring)."""
    paths = _block_paths(model)
    if len(paths) < 2:
        raise UserError(f"backbone: {name!r} ({type(model).__name__}) has no stages of blocks that exitbench can "
                        "find (children named stages, layers, blocks or s1, s2, ...); pick a supported family "
                        "(exitbench list)")
    was_training = model.training
    model.eval()  # the traced graph keeps timm's eval paths of Python-level branches (see the module docstring)
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001  (any tracing failure means: this model cannot be cut generically)
        raise UserError(f"backbone: {name!r} ({type(model).__name__}) cannot be traced to be cut into blocks "
                        f"({str(e).splitlines()[0][:120]}); pick a supported family (exitbench list)") from None
    finally:
        model.train(was_training)
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in nodes}
    ends = []
    for path in paths:
        mine = [i for i, n in enumerate(nodes) if _inside(_owner(n), path)]
        if mine:
            ends.append((path, max(mine)))
    cuts, names = [], []
    for path, end in ends:
        live = [n for n in nodes[: end + 1] if n.op not in ("get_attr",) and last_use[n] > end]
        if len(live) == 1 and live[0] is nodes[end] and (not cuts or end > cuts[-1]):
            cuts.append(end)
            names.append(path)
    if len(cuts) < 2:
        raise UserError(f"backbone: {name!r} ({type(model).__name__}) has fewer than two block boundaries where "
                        "one tensor flows; it cannot be cut into blocks generically (exitbench list: the "
                        "supported families)")
    pieces = _split(model, graph, nodes, cuts)
    return pieces[:-1], names, pieces[-1]


def _split(model: nn.Module, graph: fx.Graph, nodes: list[fx.Node], cuts: list[int]) -> list[fx.GraphModule]:
    """One GraphModule per piece between cuts (the last one up to the output), over ``model``'s parameters."""
    bounds = [-1, *cuts, len(nodes) - 1]
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        look = env.__getitem__
        if a >= 0:
            env[nodes[a]] = g.placeholder("x")
        for n in nodes[a + 1: b + 1]:
            if n in env:  # a parameter already fetched for an earlier node of this piece
                continue
            if n.op == "output":
                g.output(fx.map_arg(n.args[0], look))
                continue
            for dep in n.all_input_nodes:  # parameters and buffers are fetched again where used
                if dep not in env and dep.op == "get_attr":
                    env[dep] = g.node_copy(dep)
            env[n] = g.node_copy(n, look)
        if nodes[b].op != "output":
            g.output(env[nodes[b]])
        pieces.append(fx.GraphModule(model, g, class_name=f"Piece{len(pieces)}"))
    return pieces


__all__ = ["STAGE_CONTAINERS", "cut_generic"]
