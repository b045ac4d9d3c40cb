"""The exitbench harness: backbones, data, FLOPs, traces, training, latency, runner and CLI."""
