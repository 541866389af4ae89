"""Benchmark CLIs and the GPU check (``python -m benchmarks.<name>``): loaders, fused losses, the training step, the
GPU cost model, ``gpu_check``. They measure side by side in one run and print ratios; no library code imports them."""
