"""Run a program of layers on a model: prefill and generation, with a KV cache
slot per program step.

The model's own `forward` is never called or patched: the executor embeds the
tokens, calls `layers[i]` for each step i of the program, then applies the
final norm and LM head. The program is an argument of every call; nothing is
stored on the model, so one loaded model serves many threads at once.

Why a slot per *step*: attention modules write their keys under their own
`layer_idx`. If a looped layer wrote into its layer's slot, its second visit
would append the same positions twice (the reference implementation's bug:
cached decoding then diverges from recomputation). We hand each step a view of
its own slot, whatever layer runs there.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from polar_core.adapter import Adapter, Positions
from polar_core.models import LoadedModel
from polar_core.program import Program, ProgramError

CAPTURE_MODES = (None, "last", "all")


class PromptError(ValueError):
    """A prompt that cannot be run (empty, too long)."""


# ---------------------------------------------------------------- KV cache


class StepCache:
    """KV cache with one slot per program step, preallocated to `capacity` tokens.

    All rows share one time axis (prompts are left-padded), so one `length`
    counts the cached positions of every row.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self._slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def view(self, step: int, rows: torch.Tensor | None, batch_size: int) -> "_SlotView":
        return _SlotView(self, step, rows, batch_size)

    def _slot(self, step: int, batch_size: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self._slots.get(step)
        if slot is None:
            _, heads, _, head_dim = like.shape
            shape = (batch_size, heads, self.capacity, head_dim)  # (B, H_kv, T_max, Dh)
            slot = (like.new_zeros(shape), like.new_zeros(shape))
            self._slots[step] = slot
        return slot


class _SlotView:
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


# ---------------------------------------------------------------- schedule


def _schedule(paths: Sequence[tuple[int, ...]], device: torch.device) -> list[list[tuple[int, torch.Tensor | None]]]:
    """Per step: the (layer, rows) groups to run. rows=None means every row.

    Rows whose program is shorter than the longest simply stop being scheduled;
    their hidden state stays at their last step.
    """
    batch = len(paths)
    steps = max(len(p) for p in paths)
    schedule = []
    for k in range(steps):
        groups: dict[int, list[int]] = {}
        for row, path in enumerate(paths):
            if k < len(path):
                groups.setdefault(path[k], []).append(row)
        step = []
        for layer, rows in groups.items():
            all_rows = len(rows) == batch
            step.append((layer, None if all_rows else torch.tensor(rows, device=device)))
        schedule.append(step)
    return schedule


# ---------------------------------------------------------------- one forward


def _run_steps(
    adapter: Adapter,
    schedule,
    hidden: torch.Tensor,
    pos: Positions,
    cache: StepCache | None,
    capture: str | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Apply every scheduled step to hidden (B, t, d). Returns the final hidden
    states and, if asked, the hidden state after each step (last token or all)."""
    batch = hidden.shape[0]
    snapshots = []
    for k, groups in enumerate(schedule):
        if len(groups) == 1 and groups[0][1] is None:
            layer, _ = groups[0]
            view = cache.view(k, None, batch) if cache is not None else None
            hidden = adapter.run_layer(layer, hidden, pos, None, view)
        else:
            new_hidden = hidden.clone()  # groups read the pre-step state; rows are disjoint
            for layer, rows in groups:
                view = cache.view(k, rows, batch) if cache is not None else None
                new_hidden[rows] = adapter.run_layer(layer, hidden[rows], pos, rows, view)
            hidden = new_hidden
        if capture == "last":
            snapshots.append(hidden[:, -1].clone())
        elif capture == "all":
            snapshots.append(hidden.clone())
    if cache is not None:
        cache.length += hidden.shape[1]
    return hidden, snapshots


# ---------------------------------------------------------------- inputs


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
    return pad_left(rows, _pad_id(lm), lm.device)


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


def _pad_id(lm: LoadedModel) -> int:
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


# ---------------------------------------------------------------- public API


@dataclass
class PrefillResult:
    """The prompt pass of a batch: next-token logits, hidden states, the cache."""

    logits: torch.Tensor  # (B, V) float32, at the last prompt position
    hidden: torch.Tensor  # (B, T, d) final hidden states before the norm
    step_hidden: list[torch.Tensor] | None  # per row: (K_r + 1, d) or (K_r + 1, T_r, d); row 0 = embeddings
    cache: StepCache | None


@torch.inference_mode()
def prefill(
    lm: LoadedModel,
    batch: EncodedBatch,
    programs: Sequence[Program],
    *,
    capture: str | None = None,
    cache_capacity: int | None = None,
) -> PrefillResult:
    """Run each row's program over its prompt. With `cache_capacity` (total
    tokens incl. those to be generated) a step cache is filled for decoding."""
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
    adapter = lm.adapter
    paths = [p.path for p in programs]
    hidden = adapter.embed(batch.input_ids)  # (B, T, d)
    pos = adapter.positions(hidden, batch.attention_mask, 0)
    cache = StepCache(cache_capacity) if cache_capacity else None
    first = hidden[:, -1].clone() if capture == "last" else hidden.clone()
    hidden, snapshots = _run_steps(adapter, _schedule(paths, hidden.device), hidden, pos, cache, capture)
    logits = adapter.logits(hidden[:, -1]).float()
    step_hidden = None
    if capture:
        step_hidden = [_row_trajectory(first, snapshots, row, len(path), batch.lengths[row]) for row, path in enumerate(paths)]
    return PrefillResult(logits, hidden, step_hidden, cache)


def _row_trajectory(first, snapshots, row: int, steps: int, length: int) -> torch.Tensor:
    states = [first[row]] + [s[row] for s in snapshots[:steps]]
    stacked = torch.stack(states).float()  # (K+1, d) or (K+1, T, d)
    return stacked if stacked.dim() == 2 else stacked[:, -length:]  # drop left padding


@torch.inference_mode()
def forward_logits(lm: LoadedModel, batch: EncodedBatch, programs: Sequence[Program]) -> torch.Tensor:
    """Logits at every position (B, T, V) under each row's program, no cache.

    The reference path: teacher forcing and the cache-equivalence tests use it.
    """
    adapter = lm.adapter
    hidden = adapter.embed(batch.input_ids)
    pos = adapter.positions(hidden, batch.attention_mask, 0)
    hidden, _ = _run_steps(adapter, _schedule([p.path for p in programs], hidden.device), hidden, pos, None, None)
    return adapter.logits(hidden).float()


def _forward_cached(lm: LoadedModel, tokens: torch.Tensor, key_mask: torch.Tensor, programs: Sequence[Program],
                    cache: StepCache, capture: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Feed new tokens (B, t) through the cached programs: the final hidden
    states (B, t, d) and, with capture="all", [embeddings, after step 1, ...]."""
    adapter = lm.adapter
    hidden = adapter.embed(tokens)  # (B, t, d)
    first = [hidden.clone()] if capture else []
    pos = adapter.positions(hidden, key_mask, cache.length)
    hidden, snapshots = _run_steps(adapter, _schedule([p.path for p in programs], hidden.device), hidden, pos, cache,
                                   capture)
    return hidden, first + snapshots


@dataclass
class Trace:
    """What running one program on one prompt produced."""

    program: Program
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, without the stop token
    text: str
    finish_reason: str  # "eos" | "stop" | "length" | "time" | "cancelled"
    final_logits: torch.Tensor  # (V,) next-token logits at the last prompt token
    step_hidden: torch.Tensor | None = None  # (K+1, d) or (K+1, T, d); row 0 = embeddings
    # (K+1, d) at the first answer token, where the second is chosen: the lens
    # follows answers that open with a bare space token (SmolLM2's " 7" is " ", "7").
    answer_step_hidden: torch.Tensor | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    extras: dict = field(default_factory=dict)

    @property
    def layers_per_token(self) -> int:
        return self.program.num_steps

    @property
    def compute_fraction(self) -> float:
        """Layer calls per token relative to the full program."""
        return self.program.num_steps / self.program.num_layers

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


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
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
    chat: bool | None = None,
    sampling: Sampling = Sampling(),
    stop_strings: Sequence[str] = (),
    stop_at_eos: bool = True,
    capture: str | None = None,
    use_cache: bool = True,
    max_prompt_tokens: int | None = None,
    time_limit_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    drafts: Sequence[Sequence[int]] = (),
    on_tokens: Callable[[list[list[int]]], None] | None = None,
) -> list[Trace]:
    """Generate under a program per prompt (or one program for all; None = full).

    Args:
        prompts: text prompts (a single string is one prompt) or an EncodedBatch.
        programs: one Program, one per prompt, or None for the full program.
        max_new_tokens: generation stops after this many tokens at the latest.
        chat: wrap prompts in the chat template (default: when the tokenizer has one).
        sampling: greedy by default; a seed makes sampling reproducible.
        stop_strings: generation of a row stops once its text contains one of
            these; the text is cut before it.
        capture: None, "last" (per-step hidden state of the last prompt token)
            or "all" (every prompt token); either also keeps the per-step
            states at the first answer token (`Trace.answer_step_hidden`,
            cached decoding only, answers of two or more tokens).
        use_cache: False recomputes the whole sequence for every new token (the
            slow reference the cached path is tested against).
        time_limit_s: stop decoding after this much wall time; unfinished rows
            end with finish_reason "time".
        should_stop: polled between tokens; True ends decoding early the same
            way (finish_reason "cancelled"), e.g. when a web request is cancelled.
        drafts: token-id sequences the answer probably resembles, e.g. the
            full program's answer and the previous edit's when running an
            edited program. Needs one prompt, greedy decoding and the cache.
            While the answer so far is a prefix of a draft, that draft's next
            tokens are checked in one forward pass and kept only where they
            equal the program's own greedy choice (speculative decoding with
            the drafts as proposer), so the answer is the one plain decoding
            gives (up to float rounding: a multi-token pass may break a
            near-tie differently, as a different batch size may), in fewer
            passes when it follows a draft. `Trace.extras` counts the passes
            and the draft tokens kept.
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
    size = batch.input_ids.shape[0]
    programs = resolve_programs(lm, programs, size)
    drafts = [list(d) for d in drafts]
    if drafts and (size != 1 or sampling.temperature > 0 or not use_cache):
        raise ValueError("drafts need one prompt, greedy decoding and use_cache=True")
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator(device=lm.device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())

    started = time.perf_counter()
    # Draft checks fit too: a proposal never runs past max_new_tokens (see _decode_with_drafts).
    capacity = batch.input_ids.shape[1] + max_new_tokens if use_cache else None
    pre = prefill(lm, batch, programs, capture=capture, cache_capacity=capacity)
    prefill_seconds = time.perf_counter() - started

    started = time.perf_counter()
    decoder = _Decoder(lm, batch, programs, pre, stop_strings, stop_at_eos, use_cache, capture is not None)

    def interrupted() -> bool:
        if time_limit_s is not None and time.perf_counter() - started > time_limit_s:
            decoder.interrupt("time")
            return True
        if should_stop is not None and should_stop():
            decoder.interrupt("cancelled")
            return True
        return False

    extras: dict = {}
    if drafts and max_new_tokens > 0:
        extras = _decode_with_drafts(decoder, pre.logits, drafts, max_new_tokens, interrupted, on_tokens)
    else:
        logits = pre.logits
        for step in range(max_new_tokens):
            finished = decoder.push(_choose(logits, sampling, generator))
            if on_tokens is not None:
                on_tokens(decoder.tokens)
            if finished or step == max_new_tokens - 1 or interrupted():
                break  # no forward pass for a token nobody will read
            logits = decoder.next_logits()
    decode_seconds = time.perf_counter() - started

    traces = []
    for row, program in enumerate(programs):
        tokens, text, reason = decoder.result(row)
        traces.append(
            Trace(
                program=program,
                prompt_ids=batch.input_ids[row, -batch.lengths[row] :].tolist(),
                token_ids=tokens,
                text=text,
                finish_reason=reason,
                final_logits=pre.logits[row],
                step_hidden=pre.step_hidden[row] if pre.step_hidden else None,
                answer_step_hidden=decoder.answer_states[row] if decoder.answer_states and len(tokens) >= 2 else None,
                prefill_seconds=prefill_seconds,
                decode_seconds=decode_seconds,
                extras=dict(extras),
            )
        )
    return traces


# ---------------------------------------------------------------- drafts

# Draft tokens checked in one pass. Most proposals are rejected early, and a
# pass costs more the more rows it checks: with the GGUF codes on a
# CPU (polar_core.packed) 8 rows cost ~4 one-row passes, 33 rows ~12. Measured
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


def _decode_with_drafts(decoder: "_Decoder", logits: torch.Tensor, drafts: list[list[int]], max_new_tokens: int,
                        interrupted: Callable[[], bool], on_tokens=None) -> dict:
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
        if finished or produced == max_new_tokens:
            return {"decode_passes": passes, "draft_tokens_kept": kept}
        if interrupted():
            return {"decode_passes": passes, "draft_tokens_kept": kept}
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


class _Decoder:
    """Per-row bookkeeping of a generation loop: tokens, stop conditions, cache."""

    def __init__(self, lm, batch, programs, pre, stop_strings, stop_at_eos, use_cache, capture_answer=False):
        self.lm, self.batch, self.programs = lm, batch, programs
        # Per-step states at the first answer token, taken in the first decoding pass.
        self.capture_answer = capture_answer and use_cache
        self.answer_states: list[torch.Tensor] | None = None
        self.cache = pre.cache if use_cache else None
        self.eos = eos_token_ids(lm) if stop_at_eos else set()
        self.stop_strings = tuple(s for s in stop_strings if s)
        size = batch.input_ids.shape[0]
        self.tokens: list[list[int]] = [[] for _ in range(size)]
        self.reasons: list[str | None] = [None] * size
        self.ids = batch.input_ids
        self.mask = batch.attention_mask
        self.pad = _pad_id(lm)

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
            full = EncodedBatch(self.ids, self.mask, self.batch.lengths)
            return forward_logits(self.lm, full, self.programs)[:, -1]
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
        hidden, snapshots = _forward_cached(self.lm, tokens, key_mask, self.programs, self.cache, capture)
        if capture:  # the first pass: its first position is the first answer token
            self.capture_answer = False
            first, steps = snapshots[0], snapshots[1:]
            self.answer_states = [_row_trajectory(first, steps, row, len(p.path), tokens.shape[1])[:, 0]
                                  for row, p in enumerate(self.programs)]
        return hidden

    def rewind(self, positions: int) -> None:
        """Forget the last `positions` cached positions (rejected proposals)."""
        self.cache.length -= positions

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
