"""--smoke: the paper matrix's cells become cheap ones on synthetic data of the same shapes (the CI runs
them all, see .ci/run); here, what the transformation keeps and drops, and that the paper matrix validates
offline with its datasets absent (warnings, not errors)."""

from __future__ import annotations

from exitbench.benchmarks.config import expand, load_matrix
from exitbench.benchmarks.smoke import smoke_cells
from exitbench.cli import main


def test_smoke_keeps_every_backbone_and_method_and_drops_the_rest():
    cells = expand(load_matrix("paper"))
    smoke = smoke_cells(cells)
    # 585 early-exit cells and 27 static baselines (3 datasets x 3 models x 3 seeds); 60 + 6 in the smoke run
    assert len(cells) == 612 and len({c.slug() for c in smoke}) == len(smoke) == 66
    assert sum(c.static for c in smoke) == 6
    assert {c.backbone for c in smoke} == {c.backbone for c in cells}
    assert {c.method for c in smoke} == {c.method for c in cells}
    assert {c.seed for c in smoke} == {0} and {c.dataset for c in smoke} == {"synthetic"}
    # CIFAR-10 and SVHN (10 classes, 32 px) became one synthetic dataset; CIFAR-100 the other
    assert sorted({(c.dataset_options["num_classes"], c.dataset_options["image_size"]) for c in smoke}) == [
        (10, 32), (100, 32)]
    assert all(c.hparams["epochs"] == 1 for c in smoke if not c.static)
    assert all(c.hparams["ensemble_epochs"] == 1 for c in smoke if c.method == "ztw")  # a phase's epochs too
    assert all(c.hparams["warmup_epochs"] == 1 for c in smoke if c.method == "jeidnn")
    assert all(c.backbone_training.epochs == 1 for c in smoke)
    assert {c.hparams.get("lam") for c in smoke if c.method == "pteenet"} == {0.5}  # the sweep's first value
    assert all(c.evaluation.latency_repeats == 1 for c in smoke)
    assert all(c.risk_control.trials == 2 for c in smoke if not c.static)  # baselines have no risk control


def test_the_paper_matrix_validates_offline(capsys):
    assert main(["validate", "paper"]) == 0
    out = capsys.readouterr().out
    assert "matrix 'paper' is valid: 612 cells" in out
    assert out.count("warning: dataset:") <= 3  # the data are not on this machine; that is not an error
