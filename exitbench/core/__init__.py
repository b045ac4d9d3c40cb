"""exitbench's ground floor: the typed, torch-free result contract and cell specification, the atomic store,
the cell claims, the registry type and ``UserError``. It imports nothing above it (docs/architecture.md)."""
