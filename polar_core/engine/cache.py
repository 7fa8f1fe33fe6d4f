"""The KV cache of a program run: one slot per program *step*.

Why per step: attention modules write their keys under their own
`layer_idx`. If a looped layer wrote into its layer's slot, its second visit
would append the same positions twice (the reference implementation's bug:
cached decoding then diverges from recomputation). Each step gets a view of
its own slot, whatever layer runs there (`Adapter.run_layer` hands it to the
attention in the form transformers expects).
"""
from __future__ import annotations

import torch


class StepCache:
    """KV cache with one slot per program step, preallocated to `capacity` tokens.

    All rows share one time axis (prompts are left-padded), so one `length`
    counts the cached positions of every row.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self._slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def view(self, step: int, rows: torch.Tensor | None, batch_size: int) -> "SlotView":
        return SlotView(self, step, rows, batch_size)

    def slot(self, step: int, batch_size: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step`'s keys and values, (B, H_kv, capacity, Dh) each, made like `like` (b, H_kv, t, Dh)
        if new: the lean decode step (polar_core.engine.cpu.lean) writes and reads them in place."""
        return self._slot(step, batch_size, like)

    def rewind(self, positions: int) -> None:
        """Forget the last `positions` cached positions (rejected draft tokens)."""
        self.length -= positions

    def _slot(self, step: int, batch_size: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self._slots.get(step)
        if slot is None:
            _, heads, _, head_dim = like.shape
            shape = (batch_size, heads, self.capacity, head_dim)  # (B, H_kv, T_max, Dh)
            slot = (like.new_zeros(shape), like.new_zeros(shape))
            self._slots[step] = slot
        return slot


class SlotView:
    """One step's own slot, for the rows of one step group (the adapter's
    `KVSlot`: what that step's attention writes into and reads back)."""

    __slots__ = ("cache", "step", "rows", "batch_size")

    def __init__(self, cache: StepCache, step: int, rows: torch.Tensor | None, batch_size: int):
        self.cache, self.step, self.rows, self.batch_size = cache, step, rows, batch_size

    def write(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # key, value: (b, H_kv, t, Dh) for the rows of this step group.
        start = self.cache.length
        end = start + key.shape[2]
        if end > self.cache.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.cache.capacity}")
        keys, values = self.cache._slot(self.step, self.batch_size, key)
        if self.rows is None:
            keys[:, :, start:end] = key
            values[:, :, start:end] = value
            return keys[:, :, :end], values[:, :, :end]
        keys[self.rows, :, start:end] = key
        values[self.rows, :, start:end] = value
        return keys[self.rows, :, :end], values[self.rows, :, :end]
