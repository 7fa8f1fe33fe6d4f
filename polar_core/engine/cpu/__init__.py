"""CPU speed-ups that compute the same model: weights multiplied as their exact
GGUF codes (packed, C kernels in csrc/) and weight layouts chosen by timing (layout)."""
