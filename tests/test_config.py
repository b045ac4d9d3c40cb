"""Matrix expansion: shared exits, overrides, training regimes, grids and field-path errors."""

from __future__ import annotations

from dataclasses import replace

import pytest

from exitbench.benchmarks.config import expand
from exitbench.methods.base import UserError

BASE = {"datasets": [{"name": "synthetic", "n": 160, "num_classes": 3, "image_size": 16}],
        "backbones": ["test_resnet"], "seeds": [0, 1]}


def test_shared_exits_apply_to_every_method_unless_overridden():
    cells = expand({**BASE, "exits": {"n_exits": 2, "placement": "linear"},
                    "methods": [{"name": "pteenet"}, {"name": "pteenet", "hparams": {"placement": "pareto"}}]})
    assert len(cells) == 4
    assert [c.hparams["placement"] for c in cells] == ["linear", "linear", "pareto", "pareto"]
    assert all(c.hparams["n_exits"] == 2 for c in cells)
    assert len({c.key() for c in cells}) == 4 and len({c.slug() for c in cells}) == 4


def test_grid_expands_and_records_the_swept_keys():
    grid = {"lam": [0.5, 1], "loss": ["v1", "v2"]}
    cells = expand({**BASE, "seeds": [0], "methods": [{"name": "pteenet", "grid": grid}]})
    assert [(c.hparams["lam"], c.hparams["loss"]) for c in cells] == [(0.5, "v1"), (0.5, "v2"), (1, "v1"), (1, "v2")]
    assert all(c.swept == ("lam", "loss") for c in cells)
    assert "lam0.5-lossv1" in cells[0].slug()


@pytest.mark.parametrize("matrix, message", [
    ({"methods": [{"name": "eenet", "init": "scratch"}]}, "methods[0].init: replaced by `regime`; write regime: joint"),
    ({"methods": [{"name": "ztw", "regime": "mixed"}]}, "methods[0].regime: ztw trains in disjoint, not 'mixed'"),
    ({"methods": [{"name": "sdn", "regime": "joined"}]}, "not 'joined'; did you mean 'joint'"),
    ({"exits": {"n_exit": 2}, "methods": ["pteenet"]}, "exits.n_exit: unknown key; did you mean 'n_exits'"),
    ({"methods": ["pteenet"], "seeds": ["a"]}, "seeds[0]: expected a whole number from 0 to"),
    ({"methods": ["pteenet"], "evaluation": {"grid_size": "many"}}, "evaluation.grid_size: expected a number"),
    ({"methods": ["pteenet"], "backbone_training": {"epoch": 2}}, "did you mean 'epochs'"),
    ({"methods": [{"name": "pteenet", "grid": {"lam": [1], "bogus": [1]}}]}, "unknown hyper-parameter 'bogus'"),
    ({"backbones": ["test_resnet"], "datasets": [{"name": "synthetic", "nn": 3}], "methods": ["pteenet"]},
     "datasets[0].nn: unknown option for synthetic; did you mean 'n'?"),
])
def test_errors_name_the_field(matrix, message):
    with pytest.raises(UserError) as e:
        expand({**BASE, **matrix})
    assert message in str(e.value)


def test_regimes_default_to_the_methods_own_and_are_in_the_key_and_the_budget():
    cells = expand({**BASE, "seeds": [0], "methods": ["sdn", "branchynet", {"name": "sdn", "regime": "mixed"},
                                                      {"name": "branchynet", "regime": "disjoint"},
                                                      {"name": "branchynet", "regime": "joint"}]})
    assert [c.regime for c in cells] == ["disjoint", "mixed", "mixed", "disjoint", "joint"]
    assert len({c.key() for c in cells}) == 5


def test_a_stored_cell_reads_back_with_its_regime_and_key():
    import json

    from exitbench.core.results import CellResult

    for method, regime in (("sdn", "disjoint"), ("sdn", "mixed"), ("eenet", "mixed"), ("eenet", "joint"),
                           ("eenet", "disjoint")):
        cell = expand({**BASE, "seeds": [0], "methods": [{"name": method, "regime": regime}]})[0]
        stored = json.loads(json.dumps(CellResult("error", cell.slug(), cell).to_dict()))  # as a result stores it
        back = CellResult.from_dict(stored).config
        assert back == cell and back.regime == regime and back.key() == cell.key()
        assert stored["config"]["regime"] == regime and back.init == ("scratch" if regime == "joint" else "backbone")


def test_the_key_says_the_regime_only_where_init_and_the_method_cannot():
    """Keys of results stored before regimes hash ``init`` and no regime: a cell in its method's own regime,
    or joint, keeps that key; SDN mixed and EENet disjoint get their own."""
    keys = {}
    for method, regime in (("sdn", "disjoint"), ("sdn", "mixed"), ("eenet", "mixed"), ("eenet", "disjoint")):
        cell = expand({**BASE, "seeds": [0], "methods": [{"name": method, "regime": regime}]})[0]
        keys[method, regime] = cell.key()
        assert cell.key() == replace(cell, regime="").key() or regime != cell.method_regime
    assert keys["sdn", "disjoint"] != keys["sdn", "mixed"] and keys["eenet", "mixed"] != keys["eenet", "disjoint"]
