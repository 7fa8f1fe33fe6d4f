"""CPU speed-ups that compute the same model: weights multiplied as their exact
GGUF codes (packed), the lean decode step that runs one program step in one C
call on them (lean; C kernels in csrc/), and weight layouts chosen by timing (layout)."""
