"""Accuracy recovery after PTQ: distillation losses and (partial) retraining of quantized models."""
