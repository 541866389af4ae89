"""``make gpu-check`` / ``python3 -m benchmarks.gpu_check``: every CUDA-only piece of flashssl in one run of at most
8 minutes on one GPU, with a report in ``gpu_report/`` (docs/gpu_check.md).

Layout: ``stages`` (the stage table and budgets) -> ``runner`` (one process group per stage, killed at its budget)
-> ``report`` (JSON + Markdown, rewritten after every stage). Correctness stages are pytest runs of the ``cuda``-marked
tests in ``tests/gpu/`` (plugin ``pytest_budget``: per-test limit, one result line per test); performance stages are
the ``perf_*`` modules, which call the project's benchmark code and record through ``child.Recorder``.
"""
