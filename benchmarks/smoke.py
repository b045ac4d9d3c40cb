"""``exitbench run MATRIX --smoke``: a matrix's whole machinery in minutes, without its data.

Every dataset becomes ``synthetic`` data of the same image shape and number of classes (no files), every
training budget one epoch in fp32 (bf16 autocast crawls on CPUs without bf16 units), the timing one
repeat at batch 8, the risk-control protocol two trials.
Each swept hyper-parameter keeps its first value and only the first seed runs, and cells that became
identical (CIFAR-10 and SVHN are both 32 px with 10 classes) run once. What is left still builds every
backbone (cut, MACs, exits), every method, every stage of a cell and every executor path, so a matrix that
passes its smoke run fails on a cluster only for reasons of scale. Smoke results are not results: they
go to their own directory (``OUT-smoke``) and say ``smoke`` in their matrix name.
"""

from __future__ import annotations

from dataclasses import replace

from exitbench.benchmarks import stages as st
from exitbench.core.spec import Cell
from exitbench.methods.base import get_method

# held-out shares large enough that every class can be stratified into calibration and test even when
# there are only 4 samples per class (the synthetic minimum)
SMOKE_SPLITS = {"test_fraction": 0.3, "calibration_fraction": 0.45}


def smoke_cells(cells: list[Cell]) -> list[Cell]:
    """The smoke version of ``cells`` (module docstring), deduplicated, in order."""
    first_seed = min((c.seed for c in cells), default=0)
    firsts: dict[tuple, dict] = {}
    out: dict[str, Cell] = {}
    for c in cells:
        if c.seed != first_seed:
            continue
        setting = (c.where, c.method)
        swept = {k: c.hparams[k] for k in c.swept}
        if firsts.setdefault(setting, swept) != swept:
            continue  # a later value of a sweep
        info = st.without_data(c).info
        k = info.num_classes
        data = {"num_classes": k, "image_size": info.input_size[1], "n": 4 * k, **SMOKE_SPLITS}
        if info.input_size[0] != 3:  # only when it differs: the smoke cells of 3-channel matrices keep their keys
            data["channels"] = info.input_size[0]
        declared = {} if c.static else get_method(c.method).hparams
        hp = dict(c.hparams)
        for name in declared:  # every epoch budget: epochs and a phase's (ensemble_epochs, warmup_epochs)
            if name == "epochs" or name.endswith("_epochs"):
                hp[name] = 1
        if "batch_size" in declared:
            hp["batch_size"] = min(int(hp.get("batch_size", declared["batch_size"].default)), 64)
        if "precision" in declared:  # bf16 autocast crawls on CPUs without bf16 units; tests cover precisions
            hp["precision"] = "fp32"
        ev = replace(c.evaluation, latency_batch_sizes=(8,), latency_repeats=1, grid_size=10, fast="none")
        rc = replace(c.risk_control, trials=2) if c.risk_control.enabled else c.risk_control
        smoke = replace(c, dataset="synthetic", dataset_options=data, hparams=hp, evaluation=ev, risk_control=rc,
                        backbone_training=replace(c.backbone_training, epochs=1, precision="fp32",
                                                  batch_size=min(c.backbone_training.batch_size, 64)))
        out.setdefault(smoke.slug(), smoke)
    return list(out.values())
