"""Drafts: speculative decoding with known answers as the proposer.

When the answer probably resembles known token sequences (an edited
program's answer often runs like the full program's, or like the previous
edit's), the next tokens of a matching draft are checked in one forward pass
and kept only where they equal the program's own greedy choice. The answer
is the one plain greedy decoding gives, in fewer passes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from polar_core.engine.decoder import Decoder

# Draft tokens checked in one pass. Most proposals are rejected early, and a
# pass costs more the more rows it checks: with the GGUF codes on a
# CPU (polar_core.engine.cpu.packed) 8 rows cost ~4 one-row passes, 33 rows ~12. Measured
# on the app-latency edits: drafts 0.93-0.99x plain decoding with 7, 1.07x with 32.
MAX_PROPOSAL = 7


def propose_from_drafts(drafts: Sequence[Sequence[int]], generated: Sequence[int], limit: int) -> list[int]:
    """Up to `limit` tokens that might come next: the longest continuation among
    the drafts of which the answer so far is a prefix, else none.

    Guessing on after the answer left every draft (n-gram lookup) was measured
    and lost: on the app-latency edits the wrong guesses cost more passes than
    the right ones saved.
    """
    done = len(generated)
    best: list[int] = []
    for draft in drafts:
        if limit > 0 and list(draft[:done]) == list(generated) and len(draft) - done > len(best):
            best = list(draft[done : done + limit])
    return best


@dataclass(frozen=True)
class DraftStats:
    """What the drafts saved in one generation."""

    decode_passes: int  # forward passes after the prompt pass
    draft_tokens_kept: int  # draft tokens accepted without a pass of their own


def decode_with_drafts(decoder: Decoder, logits: torch.Tensor, drafts: list[list[int]], max_new_tokens: int,
                       interrupted: Callable[[], bool], on_tokens=None) -> DraftStats:
    """Greedy decoding of one row that checks draft proposals in one pass each.

    A pass feeds the last chosen token plus the proposal; the program's greedy
    choice at every position says how many proposed tokens to keep, and the
    choice after the last kept one comes free. The cache positions of the
    rejected tokens are rewound.
    """
    produced, passes, kept = 0, 0, 0
    new_tokens = [int(logits[0].argmax())]
    while True:
        for token in new_tokens:
            finished = decoder.push(torch.tensor([token], device=logits.device))
            produced += 1
            if finished or produced == max_new_tokens:
                break
        if on_tokens is not None:
            on_tokens(decoder.tokens)
        if finished or produced == max_new_tokens or interrupted():
            return DraftStats(passes, kept)
        passes += 1
        proposal = propose_from_drafts(drafts, decoder.tokens[0], min(MAX_PROPOSAL, max_new_tokens - produced - 1))
        if not proposal:  # off every draft: the plain one-token step
            new_tokens = [int(decoder.next_logits()[0].argmax())]
            continue
        chosen = decoder.check(proposal).argmax(-1).tolist()  # (1 + len(proposal),)
        accepted = 0
        while accepted < len(proposal) and chosen[accepted] == proposal[accepted]:
            accepted += 1
        decoder.rewind(len(proposal) - accepted)
        kept += accepted
        new_tokens = proposal[:accepted] + [chosen[accepted]]
