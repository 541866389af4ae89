"""Evaluation of frozen backbones: feature extraction, weighted kNN, linear probe."""
