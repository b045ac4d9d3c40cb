"""The house: one namespace, floors that import only downwards, a torch-free ground floor, and the
runner as a short sequence of named stages (docs/architecture.md)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> package, and which packages each floor may import from exitbench
FOLDERS = {"exitbench": "exitbench", "methods": "exitbench.methods", "benchmarks": "exitbench.benchmarks",
           "reports": "exitbench.reports"}
GROUND = ("exitbench.core",)  # the ground floor: a folder of its own, exitbench/core/
ALLOWED = {
    "ground": GROUND,
    "exitbench.methods": (*GROUND, "exitbench.methods"),
    "exitbench.benchmarks": (*GROUND, "exitbench.methods", "exitbench.benchmarks"),
    "exitbench.reports": (*GROUND, "exitbench.reports"),
}


def _modules():
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = ".".join([package, *path.relative_to(ROOT / folder).with_suffix("").parts])
            yield name.removesuffix(".__init__"), path


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append(node.module)
    return out


def _floor(module: str) -> str | None:
    if any(module == g or module.startswith(g + ".") for g in GROUND):
        return "ground"
    return next((p for p in ALLOWED if p != "ground" and (module == p or module.startswith(p + "."))), None)


@pytest.mark.parametrize("module, path", list(_modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_floors_import_only_downwards_and_only_through_the_namespace(module, path):
    imports = _imports(path)
    old = [m for m in imports if m.split(".")[0] in ("methods", "benchmarks", "reports")]
    assert not old, f"{path}: imports {old}; import through the exitbench namespace"
    floor = _floor(module)
    if floor is None:  # the package root and the CLI sit on top and may import anything
        return
    ours = [m for m in imports if m == "exitbench" or m.startswith("exitbench.")]
    bad = [m for m in ours if not any(m == a or m.startswith(a + ".") for a in ALLOWED[floor])]
    assert not bad, f"{module} ({floor}) imports {bad}, above its floor"


def test_the_exitbench_folder_holds_only_the_cli_above_the_ground_floor():
    """The floors can be seen from the folders: exitbench/ is the top floor (the CLI), its core/ the ground."""
    top = sorted(p.name for p in (ROOT / "exitbench").iterdir() if p.name != "__pycache__")
    assert top == ["__init__.py", "__main__.py", "cli.py", "core"], top


def test_the_ground_floor_imports_no_torch():
    ground = ", ".join(f"exitbench.core.{p.stem}" for p in sorted((ROOT / "exitbench" / "core").glob("*.py"))
                       if p.stem != "__init__")
    code = (f"import sys; import {ground}; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'torch']; assert not bad, bad[:3]")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_run_cell_is_a_short_sequence_of_named_stages():
    from exitbench.benchmarks import runner, stages

    src = inspect.getsource(runner.run_cell)
    body = [line for line in src.splitlines() if line.strip() and not line.strip().startswith(('"""', "#"))]
    assert len(body) <= 30, f"run_cell has {len(body)} lines"
    for stage in ("prepare_data", "prepare_backbone", "fit_method", "record_traces", "save_artifacts",
                  "evaluate_points", "time_latency", "control_risk", "assemble"):
        assert f"st.{stage}(" in src and callable(getattr(stages, stage))
