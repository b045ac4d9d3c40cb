"""exitbench.benchmarks, the harness: data, backbones, costs, traces, training, latency, a cell's stages
and the matrix runner (docs/architecture.md)."""
