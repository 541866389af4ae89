"""The GPU check's stages, in run order, with their time budgets (seconds on one H100/H200; they sum to the
8-minute total). Correctness stages run ``cuda``-marked pytest tests; performance stages run the project's own
benchmark code (``benchmarks.kernels``, ``engine.benchmark``, ``benchmarks.fast_step``, ``benchmarks.cost_model``)
through the ``perf_*`` children."""

from __future__ import annotations

from benchmarks.gpu_check.child import DEVICE_ENV, TINY_ENV
from benchmarks.gpu_check.runner import Stage, python

TOTAL_S = 480.0

# tiny (CPU self-test): a subset of a stage's tests that still runs each code path (-k expression)
TINY_SELECT = {"train_step": "dino-fp16-eager or intl-fp16-compile"}
# name, test files, per-test limit s, stage budget s, what
CORRECTNESS = [
    ("kernels", ["tests/gpu/test_cuda_kernels.py"], 40, 100,
     "fused loss kernels vs float64 reference at ImageNet shapes, forward + gradients, fp32 and bf16"),
    ("augment", ["tests/gpu/test_cuda_augment.py"], 30, 30,
     "device augmentation on the device vs the per-image torchvision reference; fused-path deviation bound"),
    ("dali", ["tests/pipeline/test_dali_loader.py"], 20, 10,
     "DALI mixed (GPU) decode vs the CPU-only graph of the same function"),
    ("train_step", ["tests/gpu/test_cuda_train_step.py"], 80, 100,
     "one DINO and one INTL training step: fp16+GradScaler / bf16, channels-last, eager / compile vs fp32"),
    ("nccl", ["tests/gpu/test_cuda_nccl.py"], 30, 10, "two-process NCCL equivalence (DINO), needs 2 GPUs"),
]

# name, module, budget s, what, required modules
PERFORMANCE = [
    ("kernel_perf", "benchmarks.gpu_check.perf_kernels", 60, "fused vs reference loss: time and peak memory", ()),
    ("augment_perf", "benchmarks.gpu_check.perf_augment", 25, "device augmentation images/s per op and DINO recipe",
     ()),
    ("model_step", "benchmarks.gpu_check.perf_step", 45,
     "model step only: eager fp32 / channels-last / bf16 / fp16, DINO ResNet-50 and ViT-S/16", ()),
    ("end_to_end", "benchmarks.gpu_check.perf_end_to_end", 50,
     "train.py --benchmark (torchvision loader on the CPUs) vs benchmarks.cost_model, ResNet-50 and ViT-S/16", ()),
    ("compile_step", "benchmarks.gpu_check.perf_compile", 40,
     "model step with torch.compile vs eager (channels-last bf16), DINO ResNet-50", ()),
]


def stage_env(device: str, tiny: bool) -> dict[str, str]:
    """Environment of every stage: the device/size switches; on the CPU the Triton interpreter, and in tiny mode no
    dynamo (the compile variants run their code path eagerly in seconds; compilation is tested in tests/losses)."""
    env = {DEVICE_ENV: device, TINY_ENV: "1" if tiny else "0"}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    if tiny:
        env["TORCHDYNAMO_DISABLE"] = "1"
    return env


def build_stages(device: str, tiny: bool, only: list[str] | None = None, inductor_cache: str | None = None,
                 budget_scale: float = 1.0) -> list[Stage]:
    """The stage list for this run (``only``: a subset by name, in run order; ``budget_scale`` multiplies every
    budget and per-test limit: the CPU self-test's slower machine)."""
    env = stage_env(device, tiny)
    if inductor_cache:  # one compile cache for all stages: the compile perf stage reuses the train-step graphs
        env["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
    stages = []
    for name, files, per_test, budget, what in CORRECTNESS:
        argv = [*python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:timeout", "-p",
                "benchmarks.gpu_check.pytest_budget", "-m", "cuda", "--continue-on-collection-errors",
                "-o", "addopts=", *files]
        if tiny and name in TINY_SELECT:
            argv += ["-k", TINY_SELECT[name]]
        stages.append(Stage(name, "correctness", what, budget * budget_scale, argv,
                            env={**env, "GPU_CHECK_TEST_TIMEOUT": str(per_test * budget_scale)}))
    for name, module, budget, what, requires in PERFORMANCE:
        stages.append(Stage(name, "performance", what, budget * budget_scale, [*python(), "-m", module], requires,
                            env=dict(env)))
    known = [s.name for s in stages]
    unknown = sorted(set(only or []) - set(known))
    if unknown:
        raise ValueError(f"--only: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(known)}")
    return [s for s in stages if not only or s.name in only]
