"""Benchmark and hardware-check entry points that combine several components (``python -m benchmarks.<name>``)."""
