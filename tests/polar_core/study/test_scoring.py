"""Program scoring: teacher forcing agrees with greedy decoding, prefix sharing
changes nothing, and bad inputs fail clearly."""
from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, build_tiny

from polar_core.program import Program, ProgramError
from polar_core.study.scoring import (
    Target,
    count_layer_calls,
    decode_programs,
    ids_valid,
    reference_target,
    teacher_forced_scores,
    teacher_forced_scores_unshared,
    teacher_forced_valid,
    width_groups,
)
from polar_core.study.search import loop_edits, skip_edits

PROMPTS = ([5, 6, 7, 8, 9, 10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14])  # different lengths: padding


def _programs(num_layers: int) -> list[Program]:
    full = tuple(range(num_layers))
    paths = [full] + skip_edits(full, 2) + loop_edits(full, 1, 2)
    return [Program(p, num_layers) for p in dict.fromkeys(paths)]


def _targets_from_decoding(lm, prompt, programs):
    """Targets a program may or may not meet: what some programs greedily
    decode (answer = first tokens, stop = the next one) and a wrong answer."""
    traces = decode_programs(lm, prompt, programs, max_new_tokens=4)
    targets = []
    for trace in traces[:: max(1, len(traces) // 4)]:
        toks = trace.token_ids
        if len(toks) >= 3:
            targets.append(Target(prompt, toks[:2], {toks[2]}))
    wrong = (traces[0].token_ids[0] + 1) % 90 + 3
    targets.append(Target(prompt, [wrong, wrong], {4}))
    return traces, targets


@pytest.mark.parametrize("prompt", PROMPTS)
def test_teacher_forced_validity_equals_decoding_validity(prompt):
    lm = build_tiny("llama")
    programs = _programs(lm.num_layers)
    traces, targets = _targets_from_decoding(lm, prompt, programs)
    assert len(targets) >= 3
    some_valid = 0
    for target in targets:
        forced = teacher_forced_valid(lm, target, programs)
        decoded = [ids_valid(t.token_ids, t.finish_reason, target) for t in traces]
        assert forced == decoded, [p.format() for p, a, b in zip(programs, forced, decoded) if a != b]
        some_valid += sum(forced)
    assert 0 < some_valid < len(targets) * len(programs)  # the sample has both verdicts


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_shared_scores_equal_unshared(family):
    """Shared tries over two prompts of different lengths (right padding, one
    shared causal table; the sliding windows of 5 are crossed; Gemma 2's eager
    attention gets an explicit mask) == each program run alone."""
    lm = build_tiny(family)
    programs = _programs(lm.num_layers)
    targets = [Target(p, [p[-1] + 1, p[-1] + 2], {2, 7}) for p in PROMPTS]
    shared = teacher_forced_scores(lm, [(t, programs) for t in targets], max_rows=7)
    for target, got in zip(targets, shared):
        alone = teacher_forced_scores_unshared(lm, target, programs)
        assert [s.valid for s in got] == [s.valid for s in alone]
        torch.testing.assert_close(torch.tensor([s.margin for s in got]), torch.tensor([s.margin for s in alone]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("call_cost", [0, 10, 1 << 40])
def test_calls_cut_to_their_rows_widths_change_nothing(family, call_cost):
    """Three prompts of three lengths, one call per width (call_cost 0), one
    call at the widest (huge call_cost) or in between (10: the groups change
    from layer to layer with the rows that reach it, so rows of a short prompt
    go through wider calls, zero-padded, and back, cut): the same scores as
    each program alone, so cutting a call at its longest row is exact."""
    lm = build_tiny(family)
    programs = _programs(lm.num_layers)
    prompts = (*PROMPTS, [9, 8, 7, 6, 5, 4, 3, 4, 5])
    targets = [Target(p, [p[-1] + 1, p[-1] + 2], {2, 7}) for p in prompts]
    shared = teacher_forced_scores(lm, [(t, programs) for t in targets], max_rows=5, call_cost=call_cost)
    for target, got in zip(targets, shared):
        alone = teacher_forced_scores_unshared(lm, target, programs)
        assert [s.valid for s in got] == [s.valid for s in alone]
        torch.testing.assert_close(torch.tensor([s.margin for s in got]), torch.tensor([s.margin for s in alone]),
                                   atol=1e-4, rtol=1e-4)


def test_width_groups_trade_padding_for_calls():
    widths = [60, 62, 130, 60, 133, 61]
    assert width_groups(widths, 1 << 40) == [list(range(6))]  # one call, all at 133
    assert width_groups(widths, 0) == [[0, 3], [5], [1], [2], [4]]  # one per width, no padding
    # A call's cost of 32 row-tokens: 60-62 together (4 padded row-tokens), 130-133 together (3).
    assert width_groups(widths, 32) == [[0, 1, 3, 5], [2, 4]]
    groups = width_groups([7, 3, 3, 9, 5, 7, 100], 10)
    assert sorted(r for g in groups for r in g) == list(range(7))  # every row once
    assert width_groups([], 32) == []


def test_margin_sign_matches_validity():
    lm = build_tiny("llama")
    programs = _programs(lm.num_layers)
    _, targets = _targets_from_decoding(lm, list(PROMPTS[0]), programs)
    for s in teacher_forced_scores(lm, [(targets[0], programs)])[0]:
        assert s.valid == (s.margin > 0)


def test_count_layer_calls_counts_unique_prefixes():
    programs = [Program(p, 4) for p in [(0, 1, 2, 3), (0, 1, 3), (0, 2, 3)]]
    assert count_layer_calls(programs, share_prefixes=False) == 10
    assert count_layer_calls(programs) == 7  # 0,1,2,3 + 3 after (0,1) + 2,3 after (0,)


def test_empty_job_list_and_empty_programs():
    lm = build_tiny("llama")
    target = Target([5, 6], [7], {8})
    assert teacher_forced_scores(lm, [(target, [])]) == [[]]


def test_invalid_inputs_raise_clear_errors():
    lm = build_tiny("llama")
    target = Target([5, 6], [7], {8})
    with pytest.raises(ValueError, match="answer token"):
        Target([5, 6], [], {8})
    with pytest.raises(ValueError, match="prompt token"):
        Target([], [1], {8})
    with pytest.raises(ValueError, match="stop token"):
        Target([5], [1], set())
    with pytest.raises(ProgramError, match="layers"):
        teacher_forced_valid(lm, target, [Program((0, 1), 2)])
    with pytest.raises(TypeError, match="Target"):
        teacher_forced_scores(lm, [("not a target", [Program.full(4)])])
    with pytest.raises(ProgramError, match="Program"):
        teacher_forced_valid(lm, target, [(0, 1, 2)])


def test_reference_target_needs_a_tokenizer_and_an_accepted_answer():
    from polar_core.study.tasks import load_suite

    item = load_suite("capitals", "test")[0]
    with pytest.raises(ValueError, match="tokenizer"):
        reference_target(build_tiny("llama"), item)


@pytest.mark.real_model
def test_real_model_teacher_forcing_agrees_with_decoding(real_lm):
    """On the default model, with the full program's own (accepted) answer as
    the target: teacher-forced validity == decoded validity for a few programs."""
    from polar_core.study.checker import check_answer, extract_answer
    from polar_core.study.scoring import decode_texts, decode_valid
    from polar_core.study.tasks import sample_items

    item = sample_items("capitals", 1, "test")[0]
    D = real_lm.num_layers
    programs = [Program.full(D), Program.skip(D, 20, 20), Program.skip(D, 0, 3), Program.loop(D, 10, 11, 2), Program.early_exit(D, 14)]
    own = extract_answer(decode_texts(real_lm, item, programs[:1])[0])
    target = reference_target(real_lm, item, answer=own if check_answer(own, item) else None)
    forced = teacher_forced_valid(real_lm, target, programs)
    assert forced == decode_valid(real_lm, item, programs)
    assert True in forced and False in forced
    with pytest.raises(ValueError, match="not accepted"):
        reference_target(real_lm, item, answer="Atlantis")


@pytest.mark.parametrize("family", FAMILIES)
def test_cascade_verdicts_are_the_exact_ones(family):
    """bfloat16 first, float32 for whatever it does not clearly reject: the
    verdicts equal float32's on every family, and rejected programs are ones
    float32 rejects too."""
    from polar_core.study.scoring import CascadeStats, bfloat16_twin, cascade_scores

    lm = build_tiny(family)
    programs = _programs(lm.num_layers)
    traces, targets = _targets_from_decoding(lm, list(PROMPTS[1]), programs)
    jobs = [(t, programs) for t in targets]
    exact = teacher_forced_scores(lm, jobs)
    stats = CascadeStats()
    got = cascade_scores(lm, bfloat16_twin(lm), jobs, stats=stats)
    assert [[s.valid for s in j] for j in got] == [[s.valid for s in j] for j in exact]
    assert stats.programs == len(targets) * len(programs) and 0 < stats.rescored <= stats.programs
    assert stats.max_valid_shift < 1.0
    alone = cascade_scores(lm, None, jobs)  # no fast model: plain float32
    assert [[s.margin for s in j] for j in alone] == [[s.margin for s in j] for j in exact]
