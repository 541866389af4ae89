"""Backbones (timm only), heads, EMA teacher, multi-crop wrapper and the once-after-construction parallelize step."""
