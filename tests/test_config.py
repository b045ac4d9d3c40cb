"""Matrix expansion: shared exits, overrides, training regimes, grids and field-path errors."""

from __future__ import annotations

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


def test_the_stored_config_says_the_regime_as_init_where_it_can_and_reads_back():
    import json

    from exitbench.benchmarks.config import Cell

    for method, regime, init, written in (("sdn", "disjoint", "backbone", None), ("sdn", "mixed", "backbone", "mixed"),
                                          ("eenet", "mixed", "backbone", None), ("eenet", "joint", "scratch", None),
                                          ("eenet", "disjoint", "backbone", "disjoint")):
        cell = expand({**BASE, "seeds": [0], "methods": [{"name": method, "regime": regime}]})[0]
        d = json.loads(json.dumps(cell.to_dict()))  # as a result stores it
        assert (d["init"], d.get("regime")) == (init, written)
        assert Cell.from_config(d).regime == regime and Cell.from_config(d).key() == cell.key()


def test_a_stored_result_keeps_its_key():
    import json
    from pathlib import Path

    from exitbench.benchmarks.config import Cell

    cells = Path(__file__).parent / "data" / "results" / "cells"
    stored = cells / "digits__resnet18__pteenet-lam1__seed0__74a4cb5553.json"
    config = json.loads(stored.read_text())["config"]
    assert "init" in config and "regime" not in config  # written before regimes
    assert Cell.from_config(config).key() == "74a4cb5553"
