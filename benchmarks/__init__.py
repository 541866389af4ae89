"""Benchmark CLIs (``python -m benchmarks.<name>``): loaders, fused losses, the training step, the GPU cost model.
They measure side by side in one run and print ratios; no library code imports them."""
