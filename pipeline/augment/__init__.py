"""[2] Batched device-side augmentation with per-sample parameters (flip, colour jitter, grayscale, blur, solarize,
normalize), exact torchvision semantics or the fused colour path.

``gpu_augment.DeviceAugment`` runs each view's recipe: ``params`` draws the per-sample parameters (each op unit
samples its own from a fixed draw layout), ``backends.BACKENDS`` names every implementation of every stage once.
The op units: ``pixel_ops`` (flip, solarize, normalise), ``color_ops`` (the torchvision-semantics reference),
``color_pointwise`` (its compiled form), ``color_matrix`` (the fused colour map), ``blur_ops`` (the Gaussian blur);
``color_kernel`` and ``blur_kernel`` hold the numba kernels for CPU batches.
"""
