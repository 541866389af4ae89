"""Top floor: assembles the full ``Config`` from the component configs and holds the trainer, the benchmark mode and
the device/precision/augmentation set-up. Nothing below it (runtime, pipeline, models, losses, optim, methods)
imports it."""
