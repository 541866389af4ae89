"""[2] Batched device-side augmentation with per-sample parameters (flip, colour jitter, grayscale, blur,
solarize, normalize), exact torchvision semantics or the fused colour path."""
