"""Generate answers under programs of layers: the prompt pass, then cached
decoding, one KV-cache slot per program step (polar_core.engine.cache).

The model's own `forward` and `generate` are never called: the forward
passes run each row's program layer by layer (polar_core.engine.forward).
Greedy decoding under the full program gives exactly the model's own greedy
tokens (tests/polar_core/engine/test_generate.py).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from polar_core.engine.decoder import Decoder, Stopping
from polar_core.engine.drafts import DraftStats, decode_with_drafts
from polar_core.engine.forward import prefill
from polar_core.engine.inputs import EncodedBatch, encode_prompts, resolve_programs
from polar_core.engine.models import LoadedModel
from polar_core.program import Program

FINISH_REASONS = ("eos", "stop", "length", "time", "cancelled")


class PromptPassStopped(RuntimeError):
    """The prompt pass ended between two program steps, before any token:
    the time limit passed ("time") or `should_stop` turned true ("cancelled")."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Trace:
    """What running one program on one prompt produced."""

    program: Program
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, without the stop token
    text: str
    finish_reason: str  # one of FINISH_REASONS
    final_logits: torch.Tensor  # (V,) next-token logits at the last prompt token
    step_hidden: torch.Tensor | None = None  # (K+1, d) or (K+1, T, d); row 0 = embeddings
    # (K+1, d) at the first answer token, where the second is chosen: the lens
    # follows answers that open with a bare space token (SmolLM2's " 7" is " ", "7").
    answer_step_hidden: torch.Tensor | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    drafts: DraftStats | None = None  # what decoding with drafts saved (None: no drafts)

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 = greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("sampling needs temperature >= 0, 0 < top_p <= 1, top_k >= 0")

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A seeded generator for sampling (None when greedy)."""
        if self.temperature == 0:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed if self.seed is not None else torch.seed())
        return generator


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row (B,) from logits (B, V)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > sampling.top_p  # keep the token that crosses top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    lm: LoadedModel,
    prompts: Sequence[str] | str | EncodedBatch,
    programs: Program | Sequence[Program] | None = None,
    *,
    max_new_tokens: int = 32,
    stopping: Stopping = Stopping(),
    chat: bool | None = None,
    sampling: Sampling = Sampling(),
    capture: str | None = None,
    use_cache: bool = True,
    max_prompt_tokens: int | None = None,
    drafts: Sequence[Sequence[int]] = (),
    on_tokens: Callable[[list[list[int]]], None] | None = None,
) -> list[Trace]:
    """Generate under a program per prompt (or one program for all; None = full).

    Args:
        prompts: text prompts (a single string is one prompt) or an EncodedBatch.
        programs: one Program, one per prompt, or None for the full program.
        max_new_tokens: generation stops after this many tokens at the latest.
        stopping: the other ways a row ends (stop strings, end-of-sequence,
            a time limit, a cancel flag); see `Stopping`.
        chat: wrap prompts in the chat template (default: when the tokenizer has one).
        sampling: greedy by default; a seed makes sampling reproducible.
        capture: None, "last" (per-step hidden state of the last prompt token)
            or "all" (every prompt token); either also keeps the per-step
            states at the first answer token (`Trace.answer_step_hidden`,
            cached decoding only, answers of two or more tokens).
        use_cache: False recomputes the whole sequence for every new token (the
            slow reference the cached path is tested against).
        max_prompt_tokens: refuse longer prompts (PromptError).
        drafts: token-id sequences the answer probably resembles (see
            polar_core.engine.drafts). Needs one prompt, greedy decoding and
            the cache. The answer is the one plain decoding gives (up to float
            rounding: a multi-token pass may break a near-tie differently, as
            a different batch size may), in fewer passes when it follows a
            draft; `Trace.drafts` counts the passes and the draft tokens kept.
        on_tokens: called after every decoding pass with each row's tokens
            so far (read-only; the stop token left out), e.g. to show an
            answer as it grows.
    Returns:
        One Trace per prompt, in order.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    batch = prompts if isinstance(prompts, EncodedBatch) else encode_prompts(lm, prompts, chat, max_prompt_tokens)
    programs = resolve_programs(lm, programs, len(batch.lengths))
    drafts = [list(d) for d in drafts]
    if drafts and (len(programs) != 1 or sampling.temperature > 0 or not use_cache):
        raise ValueError("drafts need one prompt, greedy decoding and use_cache=True")

    started = time.perf_counter()  # the time limit counts from here: the prompt pass is part of it
    # Draft checks fit too: a proposal never runs past max_new_tokens (see decode_with_drafts).
    capacity = batch.input_ids.shape[1] + max_new_tokens if use_cache else None
    pre = prefill(lm, batch, programs, capture=capture, cache_capacity=capacity,
                  check=_prompt_pass_check(stopping, started, batch, programs))
    prefill_seconds = time.perf_counter() - started

    decode_started = time.perf_counter()
    decoder = Decoder(lm, batch, programs, pre, stopping, capture_answer=capture is not None)
    interrupted = _interruption(decoder, stopping, started)
    stats = None
    if drafts and max_new_tokens > 0:
        stats = decode_with_drafts(decoder, pre.logits, drafts, max_new_tokens, interrupted, on_tokens)
    else:
        _decode(decoder, pre.logits, max_new_tokens, sampling, interrupted, on_tokens)
    decode_seconds = time.perf_counter() - decode_started

    traces = []
    for row, program in enumerate(programs):
        tokens, text, reason = decoder.result(row)
        answer_states = decoder.answer_states[row] if decoder.answer_states and len(tokens) >= 2 else None
        traces.append(Trace(
            program=program, prompt_ids=batch.input_ids[row, -batch.lengths[row]:].tolist(), token_ids=tokens,
            text=text, finish_reason=reason, final_logits=pre.logits[row],
            step_hidden=pre.step_hidden[row] if pre.step_hidden else None, answer_step_hidden=answer_states,
            prefill_seconds=prefill_seconds, decode_seconds=decode_seconds, drafts=stats))
    return traces


def _prompt_pass_check(stopping: Stopping, started: float, batch: EncodedBatch, programs) -> Callable[[], None] | None:
    """A check, made between the prompt pass's program steps, that raises PromptPassStopped."""
    if stopping.time_limit_s is None and stopping.should_stop is None:
        return None

    def check() -> None:
        if stopping.time_limit_s is not None and time.perf_counter() - started > stopping.time_limit_s:
            tokens, steps = batch.input_ids.shape[1], max(p.layer_calls for p in programs)
            raise PromptPassStopped("time", f"the prompt pass ({tokens} tokens x {steps} layer calls) did not "
                                            f"finish within the time limit of {stopping.time_limit_s:g} s")
        if stopping.should_stop is not None and stopping.should_stop():
            raise PromptPassStopped("cancelled", "the prompt pass was cancelled")

    return check


def _interruption(decoder: Decoder, stopping: Stopping, started: float) -> Callable[[], bool]:
    """A check, made between tokens, that ends every unfinished row on the time limit or a cancel."""

    def interrupted() -> bool:
        if stopping.time_limit_s is not None and time.perf_counter() - started > stopping.time_limit_s:
            decoder.interrupt("time")
            return True
        if stopping.should_stop is not None and stopping.should_stop():
            decoder.interrupt("cancelled")
            return True
        return False

    return interrupted


def _decode(decoder: Decoder, logits: torch.Tensor, max_new_tokens: int, sampling: Sampling,
            interrupted: Callable[[], bool], on_tokens) -> None:
    """Plain decoding: one token per row per forward pass."""
    generator = sampling.generator(logits.device)
    for step in range(max_new_tokens):
        finished = decoder.push(choose(logits, sampling, generator))
        if on_tokens is not None:
            on_tokens(decoder.tokens)
        if finished or step == max_new_tokens - 1 or interrupted():
            break  # no forward pass for a token nobody will read
        logits = decoder.next_logits()
