"""Early-exit models and algorithms. Plugins depend on :mod:`methods.base` only."""
