"""Inference: KV cache, sampling, generation."""
