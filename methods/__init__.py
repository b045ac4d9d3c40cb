"""Early-exit models and algorithms. Plugins depend on :mod:`exitbench.methods.base` only."""
