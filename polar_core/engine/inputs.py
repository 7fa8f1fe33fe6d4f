"""From prompts to token ids: encoding, left padding, the special ids, and
one program per row."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from polar_core.engine.models import LoadedModel
from polar_core.program import Program, ProgramError


class PromptError(ValueError):
    """A prompt that cannot be run (empty, too long)."""


@dataclass(frozen=True)
class EncodedBatch:
    """Left-padded token ids of a batch of prompts."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T), 1 for real tokens
    lengths: tuple[int, ...]


def encode_prompts(
    lm: LoadedModel, prompts: Sequence[str], chat: bool | None = None, max_prompt_tokens: int | None = None
) -> EncodedBatch:
    """Tokenize prompts (through the chat template when `chat`, default: when the
    tokenizer has one) and left-pad them into one batch."""
    tok = lm.tokenizer
    if tok is None:
        raise PromptError("this model has no tokenizer; pass token ids instead")
    use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    rows = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"prompt {i} is empty")
        if use_chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt)["input_ids"]
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise PromptError(f"prompt {i} has {len(ids)} tokens; the limit is {max_prompt_tokens}")
        rows.append(ids)
    return pad_left(rows, pad_id(lm), lm.device)


def pad_left(rows: Sequence[Sequence[int]], pad_id: int, device) -> EncodedBatch:
    """Left-pad lists of token ids into (B, T) ids and attention mask."""
    if not rows or any(len(r) == 0 for r in rows):
        raise PromptError("every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return EncodedBatch(ids.to(device), mask.to(device), tuple(len(r) for r in rows))


def pad_id(lm: LoadedModel) -> int:
    """The id left padding uses: the pad token, else end-of-sequence, else 0."""
    tok = lm.tokenizer
    for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def eos_token_ids(lm: LoadedModel) -> set[int]:
    """Every id that ends generation: the generation config's and the tokenizer's."""
    ids = set()
    gen_config = getattr(lm.model, "generation_config", None)
    for source in (getattr(gen_config, "eos_token_id", None), getattr(lm.tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids


def resolve_programs(lm: LoadedModel, programs, batch_size: int) -> list[Program]:
    """One program per row: None = the full program, one Program = the same for every row."""
    if programs is None:
        programs = Program.full(lm.num_layers)
    if isinstance(programs, Program):
        programs = [programs] * batch_size
    programs = list(programs)
    if len(programs) != batch_size:
        raise ProgramError(f"got {len(programs)} programs for {batch_size} prompts")
    for p in programs:
        if not isinstance(p, Program):
            raise ProgramError(f"expected a Program, got {type(p).__name__}")
        if p.num_layers != lm.num_layers:
            raise ProgramError(
                f"program is for a {p.num_layers}-layer model; {lm.name} has {lm.num_layers} layers"
            )
    return programs
