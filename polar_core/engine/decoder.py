"""The bookkeeping of one generation loop: each row's tokens so far, its stop
conditions, and the cached forward pass of the newly chosen tokens."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from polar_core.engine.forward import PrefillResult, forward_cached, forward_hidden, row_trajectory
from polar_core.engine.inputs import EncodedBatch, eos_token_ids, pad_id
from polar_core.engine.models import LoadedModel
from polar_core.program import Program


@dataclass(frozen=True)
class Stopping:
    """When a row's generation ends, besides `max_new_tokens`: whichever comes first.

    Args:
        strings: a row stops once its text contains one of these; the text is
            cut before it.
        at_eos: stop at the model's end-of-sequence tokens.
        time_limit_s: stop decoding after this much wall time (finish_reason "time").
        should_stop: polled between tokens; True ends decoding early
            (finish_reason "cancelled"), e.g. when a web request is cancelled.
    """

    strings: tuple[str, ...] = ()
    at_eos: bool = True
    time_limit_s: float | None = None
    should_stop: Callable[[], bool] | None = None

    def __post_init__(self):
        object.__setattr__(self, "strings", tuple(self.strings))


class Decoder:
    """Per-row bookkeeping of a generation loop: tokens, stop conditions, cache."""

    def __init__(self, lm: LoadedModel, batch: EncodedBatch, programs: Sequence[Program], pre: PrefillResult,
                 stopping: Stopping, capture_answer: bool = False):
        self.lm, self.batch, self.programs = lm, batch, programs
        self.cache = pre.cache  # None: every pass recomputes the whole sequence
        # Per-step states at the first answer token, taken in the first decoding pass.
        self.capture_answer = capture_answer and self.cache is not None
        self.answer_states: list[torch.Tensor] | None = None
        self.eos = eos_token_ids(lm) if stopping.at_eos else set()
        self.stop_strings = tuple(s for s in stopping.strings if s)
        size = batch.input_ids.shape[0]
        self.tokens: list[list[int]] = [[] for _ in range(size)]
        self.reasons: list[str | None] = [None] * size
        self.ids = batch.input_ids
        self.mask = batch.attention_mask
        self.pad = pad_id(lm)

    def push(self, next_tokens: torch.Tensor) -> bool:
        """Record one chosen token per row; True when every row is finished."""
        feed = next_tokens.clone()
        for row, token in enumerate(next_tokens.tolist()):
            if self.reasons[row] is not None:
                feed[row] = self.pad
                continue
            if token in self.eos:
                self.reasons[row] = "eos"
                continue
            self.tokens[row].append(token)
            if self.stop_strings and self._hit_stop(row):
                self.reasons[row] = "stop"
        self.ids = torch.cat([self.ids, feed[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(feed)[:, None]], dim=1)
        return all(r is not None for r in self.reasons)

    def interrupt(self, reason: str) -> None:
        """End every unfinished row with `reason`."""
        self.reasons = [r or reason for r in self.reasons]

    def _hit_stop(self, row: int) -> bool:
        text = self.lm.tokenizer.decode(self.tokens[row][-8:], skip_special_tokens=True)
        return any(s in text for s in self.stop_strings)

    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """Logits (B, V) after the last chosen token of every row."""
        if self.cache is None:
            # Recompute the whole sequence; only the last position's logits are read.
            full = EncodedBatch(self.ids, self.mask, self.batch.lengths)
            return self.lm.adapter.logits(forward_hidden(self.lm, full, self.programs)[:, -1]).float()
        hidden = self._forward(self.ids[:, -1:], self.mask)
        return self.lm.adapter.logits(hidden[:, -1]).float()

    @torch.inference_mode()
    def check(self, proposal: list[int]) -> torch.Tensor:
        """Logits (1 + len(proposal), V) after the last chosen token and after
        each proposed one, cached; one row only."""
        feed = torch.tensor([[*self.ids[0, -1:].tolist(), *proposal]], device=self.ids.device)
        key_mask = torch.cat([self.mask, self.mask.new_ones((1, len(proposal)))], dim=1)
        return self.lm.adapter.logits(self._forward(feed, key_mask)[0]).float()

    def _forward(self, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Cached forward of new tokens (B, t) whose first is the last chosen one."""
        capture = "all" if self.capture_answer else None
        hidden, snapshots = forward_cached(self.lm, tokens, key_mask, self.programs, self.cache, capture)
        if capture:  # the first pass: its first position is the first answer token
            self.capture_answer = False
            first, steps = snapshots[0], snapshots[1:]
            self.answer_states = [row_trajectory(first, steps, row, len(p.path), tokens.shape[1])[:, 0]
                                  for row, p in enumerate(self.programs)]
        return hidden

    def rewind(self, positions: int) -> None:
        """Forget the last `positions` cached positions (rejected proposals)."""
        self.cache.rewind(positions)

    def result(self, row: int) -> tuple[list[int], str, str]:
        tokens = self.tokens[row]
        reason = self.reasons[row] or "length"
        tok = self.lm.tokenizer
        text = tok.decode(tokens, skip_special_tokens=True) if tok is not None else ""
        for stop in self.stop_strings:
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        return tokens, text, reason
