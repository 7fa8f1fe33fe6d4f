"""Training-free suggestions: on a tiny random model of every supported family,
every suggestion reproduces the full program's answer under greedy decoding,
and they come cheapest first."""
from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, build_tiny, tiny_lm_with_chars

from polar_core.engine.generate import Stopping, generate
from polar_core.engine.inputs import pad_left
from polar_core.program import Program
from polar_core.study.suggest import candidate_programs, suggest_programs

PROMPT = [5, 9, 12, 30, 44, 17, 8, 61, 23, 70, 11, 4, 52]


def _decode(lm, ids, program, n):
    batch = pad_left([ids], 0, lm.device)
    return generate(lm, batch, program, max_new_tokens=n, stopping=Stopping(strings=()))[0].token_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_suggestions_keep_the_full_answer_on_every_family(family):
    lm = build_tiny(family)
    found = suggest_programs(lm, PROMPT, k=5, answer_tokens=4)
    assert found.candidates > 0 and len(found.influence) == lm.num_layers
    full = _decode(lm, PROMPT, None, 5)
    m = len(found.answer_ids)
    assert found.answer_ids == full[:m]
    calls = [s.program.layer_calls for s in found.suggestions]
    assert calls == sorted(calls)
    for s in found.suggestions:
        assert s.margin > 0 and not s.program.is_full
        # Greedy decoding under the suggestion writes the full program's answer and its next token.
        assert _decode(lm, PROMPT, s.program, m + 1)[: m + 1] == full[: m + 1], (family, s.program.format())


def test_some_family_gets_a_shorter_suggestion():
    """The test above must not pass vacuously: some tiny model keeps its answer with fewer layers."""
    shorter = [s for f in FAMILIES for s in suggest_programs(build_tiny(f), PROMPT, answer_tokens=2).suggestions
               if s.program.layer_calls < 4]
    assert shorter


def test_text_prompt_with_a_tokenizer_and_the_few_shot_newline():
    lm = tiny_lm_with_chars()
    found = suggest_programs(lm, "Q: one\nA: two\n\nQ: three\nA:", k=3)
    assert len(found.suggestions) <= 3 and found.notes


def test_candidates_follow_this_inputs_influence():
    influence = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.7, 0.3], dtype=torch.float64)
    distances = torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    cands = candidate_programs(influence, distances)
    programs = [p for p, _ in cands]
    assert programs[0] == Program.drop_layers(6, [3])  # the quietest layer goes first
    assert Program.drop_layers(6, [1, 3]) in programs
    assert Program.loop(6, 0, 0, 2) in programs  # the loudest layer runs twice
    assert len({p.path for p in programs}) == len(programs) and not any(p.is_full for p in programs)


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k must be"):
        suggest_programs(build_tiny("llama"), PROMPT, k=0)
