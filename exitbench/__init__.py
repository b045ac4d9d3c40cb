"""exitbench: a benchmark suite for early-exit image classifiers.

The package is one namespace over the repository's folders (docs/architecture.md):

- ``exitbench.core`` (folder ``exitbench/core/``): the ground floor -- the typed, torch-free result contract
  (``exitbench.core.results``), the atomic store (``exitbench.core.store``), the cell claims
  (``exitbench.core.claims``), the registry type (``exitbench.core.registry``), ``UserError``
  (``exitbench.core.errors``);
- ``exitbench`` itself (folder ``exitbench/``): the top floor, the CLI (``exitbench.cli``);
- ``exitbench.methods`` (folder ``methods/``): the early-exit model, policies, calibration, risk control
  and the method files; plugins import ``exitbench.methods.base``;
- ``exitbench.benchmarks`` (folder ``benchmarks/``): the harness -- data, backbones, costs, traces,
  training, latency, the cell's stages and the matrix runner;
- ``exitbench.reports`` (folder ``reports/``): tables, figures and comparisons from stored results only.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

try:
    __version__ = metadata.version("exitbench")
except metadata.PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

# Installed, setuptools' package-dir puts methods/, benchmarks/ and reports/ under this package. Imported
# straight from a source checkout (the repository root on sys.path, as pytest and `python -m` put it,
# ahead of an installed copy) this folder would shadow that mapping, so the checkout's sibling folders
# are made this package's sub-packages too: the same files under the same names either way.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "methods" / "base.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 -- a package's __path__ is set by the import system
