"""Trace analyses: block influence, similarity, alignment, logit lens, answer
diff, redundancy presets. Tiny random models for the metrics, one real-model test."""
from __future__ import annotations

import math

import pytest
import torch
from tiny import build_tiny, wrap

from polar_core.engine.generate import Stopping, generate
from polar_core.engine.inputs import pad_left
from polar_core.program import Program
from polar_core.study import analysis
from polar_core.study.analysis import (
    analyze,
    answer_diff,
    block_influence,
    logit_lens,
    similarity_matrix,
    target_logits_and_ranks,
)
from polar_core.study.redundancy import (
    Redundancy,
    gromov_program,
    layer_redundancy,
    load_redundancy,
    save_redundancy,
    shortgpt_program,
)

PROMPT = [5, 17, 33, 8, 61, 12, 9]


def _trace(lm, program, capture="last", max_new_tokens=3):
    batch = pad_left([PROMPT], 0, lm.device)
    return generate(lm, batch, program, max_new_tokens=max_new_tokens, capture=capture, stopping=Stopping(at_eos=False))[0]


@pytest.fixture(scope="module")
def llama():
    return build_tiny("llama")


@pytest.fixture(scope="module")
def full_trace(llama):
    return _trace(llama, Program.full(llama.num_layers), capture="all")


def test_block_influence_of_an_unchanged_step_is_zero():
    torch.manual_seed(0)
    h = torch.randn(3, 16)
    hidden = torch.stack([h[0], h[1], h[1], 2.5 * h[1], h[2]])  # step 2 copies, step 3 rescales
    bi = block_influence(hidden)
    assert bi.shape == (4,)
    assert bi[1].abs() < 1e-6 and bi[2].abs() < 1e-6  # cosine ignores scale
    assert bi[0] > 0.1 and bi[3] > 0.1
    flipped = block_influence(torch.stack([h[0], -h[0]]))
    assert flipped.item() == pytest.approx(2.0, abs=1e-6)


def test_block_influence_per_token(full_trace):
    bi = block_influence(full_trace.step_hidden)  # (D, T)
    assert bi.shape == (4, len(PROMPT))
    assert (bi >= -1e-6).all() and (bi <= 2 + 1e-6).all()


def test_similarity_diagonal_is_one_and_angular_distance_in_unit_interval(llama):
    trace = _trace(llama, Program.parse("0-1, 1-2x2, 3", 4), capture="all")
    for tokens in ("last", "mean"):
        sim = similarity_matrix(trace.step_hidden, tokens=tokens)
        k = trace.program.layer_calls + 1
        assert sim.shape == (k, k)
        torch.testing.assert_close(sim.diagonal(), torch.ones(k), atol=1e-5, rtol=0)
        torch.testing.assert_close(sim, sim.T, atol=1e-5, rtol=0)
        dist = analysis.angular_distance(sim)
        assert (dist >= 0).all() and (dist <= 1).all()
        assert dist.diagonal().abs().max() < 1e-2  # arccos is steep at 1: float noise grows
    with pytest.raises(ValueError, match="capture='all'"):
        similarity_matrix(trace.step_hidden[:, -1], tokens="mean")


def test_alignment_of_the_full_program_to_itself_is_one(llama, full_trace):
    a = analyze(llama, full_trace, full_trace)
    torch.testing.assert_close(a.cos_to_baseline, torch.ones(4), atol=1e-5, rtol=0)
    assert a.cos_to_final[-1] == pytest.approx(1.0, abs=1e-5)
    assert a.answer_diff.identical and a.answer_diff.spans == ()


def test_alignment_pairs_each_step_with_the_same_layer(llama, full_trace):
    """Dropping layer 3 leaves steps 1-3 (layers 0-2) identical to the full run."""
    trace = _trace(llama, Program.drop_layers(4, [3]))
    same, final = analysis.alignment(trace, full_trace)
    torch.testing.assert_close(same, torch.ones(3), atol=1e-5, rtol=0)
    # After a skip, step k runs layer path[k-1], not layer k-1.
    skip = _trace(llama, Program.drop_layers(4, [1]))
    same, _ = analysis.alignment(skip, full_trace)
    assert same[0] == pytest.approx(1.0, abs=1e-5)  # layer 0 in both
    assert same[1] < 0.9999  # layer 2 run on the embedding-layer-0 state, not layer 1's output


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: norm offset 1 and a logit softcap
def test_lens_at_the_last_step_is_the_models_own_top_k(family):
    lm = build_tiny(family)
    trace = _trace(lm, Program.full(lm.num_layers))
    lens = logit_lens(lm, trace.step_hidden, k=5, targets={"t": 7})
    want = trace.final_logits.float().softmax(-1).topk(5)
    assert lens.top_ids[-1].tolist() == want.indices.tolist()
    torch.testing.assert_close(lens.top_probs[-1], want.values, atol=1e-5, rtol=1e-4)
    assert lens.tracks["t"].prob[-1].item() == pytest.approx(trace.final_logits.float().softmax(-1)[7].item(), abs=1e-5)
    assert lens.top_tokens[-1][0] == f"<{want.indices[0].item()}>"  # no tokenizer: ids written out


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_one_matmul_lens_equals_the_streamed_lens(family, monkeypatch):
    """Small lenses take one matmul, large ones the fused kernel + a rank pass: same results."""
    lm = build_tiny(family)
    trace = _trace(lm, Program.parse("0-1, 1-3x2", lm.num_layers))
    targets = {"a": 7, "b": int(trace.final_logits.argmax())}
    small = logit_lens(lm, trace.step_hidden, k=5, targets=targets)
    monkeypatch.setattr(analysis, "MATERIALIZE_LENS_BYTES", 0)
    streamed = logit_lens(lm, trace.step_hidden, k=5, targets=targets)
    assert small.top_ids.tolist() == streamed.top_ids.tolist()
    torch.testing.assert_close(small.top_probs, streamed.top_probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(small.entropy, streamed.entropy, atol=1e-4, rtol=1e-4)
    for name in targets:
        assert small.tracks[name].rank.tolist() == streamed.tracks[name].rank.tolist()
        torch.testing.assert_close(small.tracks[name].prob, streamed.tracks[name].prob, atol=1e-5, rtol=1e-4)
    assert streamed.tracks["b"].rank[-1] == 1


def test_ranks_equal_a_full_count_across_vocabulary_chunks(llama, full_trace):
    a = llama.adapter
    h = full_trace.step_hidden[1:, -1]  # (4, d)
    logits = a.logits(h).float()  # (4, V)
    targets = torch.tensor([[0, 96], [logits[1].argmax().item(), 50], [3, 3], [40, 41]])
    z_t, ranks = target_logits_and_ranks(h, a.norm.weight, a.lm_head.weight, targets, eps=a.norm_eps, chunk=10)
    want = (logits[:, None, :] > logits.gather(1, targets)[:, :, None]).sum(-1) + 1
    assert ranks.tolist() == want.tolist()
    assert ranks[1, 0] == 1
    torch.testing.assert_close(z_t, logits.gather(1, targets), atol=1e-4, rtol=1e-4)


def test_first_top1_and_stays_top1():
    assert analysis._first_top1(torch.tensor([3, 1, 2, 1, 1])) == (2, 4)
    assert analysis._first_top1(torch.tensor([1, 1])) == (1, 1)
    assert analysis._first_top1(torch.tensor([1, 2])) == (1, None)
    assert analysis._first_top1(torch.tensor([2, 2])) == (None, None)


def test_word_marks_highlight_whole_words():
    """Answers were highlighted token by token: a changed number showed as "7 1", words split."""
    full, edited = analysis.word_marks("The answer is 71 apples.", "The answer is 72 🙂 apples.")
    assert full == [("The answer is ", False), ("71", True), (" apples.", False)]
    assert edited == [("The answer is ", False), ("72 🙂", True), (" apples.", False)]  # the space joins a changed phrase
    assert "".join(t for t, _ in edited) == "The answer is 72 🙂 apples."
    assert analysis.word_marks("same", "same") == ([("same", False)], [("same", False)])
    assert analysis.word_marks("", "new") == ([], [("new", True)])


def test_answer_diff():
    assert answer_diff([4, 5, 6], [4, 5, 6]) == analysis.AnswerDiff(True, None, ())
    d = answer_diff([4, 5, 6, 7], [4, 5, 9, 7], decode=lambda ids: "".join(f"<{i}>" for i in ids))
    assert not d.identical and d.first_divergence == 2
    assert [(s.op, s.a_start, s.a_end, s.b_start, s.b_end, s.a_text, s.b_text) for s in d.spans] == [
        ("replace", 2, 3, 2, 3, "<6>", "<9>")]
    assert d.marked(["a", "b", "c", "d"]) == [("ab", None), ("c", "changed"), ("d", None)]
    longer = answer_diff([4, 5], [4, 5, 8])
    assert longer.first_divergence == 2 and longer.spans[0].op == "insert"
    assert answer_diff([], [1]).first_divergence == 0


def test_shortgpt_drops_the_lowest_block_influence_layers():
    bi = [0.9, 0.05, 0.3, 0.01, 0.2, 0.05]
    assert shortgpt_program(bi, 2).path == (0, 2, 4, 5)  # 3 (0.01), then 1 (tie with 5, earlier first)
    assert shortgpt_program(bi, 3).path == (0, 2, 4)
    assert shortgpt_program(bi, 0).is_full
    with pytest.raises(ValueError, match="drop"):
        shortgpt_program(bi, 6)


def test_gromov_drops_the_most_redundant_block():
    nan = math.nan
    dist = [  # [n - 1, l] for D = 5
        [0.5, 0.2, 0.1, 0.3, 0.4],
        [0.6, 0.3, 0.25, 0.2, nan],
        [0.7, 0.5, 0.6, nan, nan],
        [0.8, 0.9, nan, nan, nan],
        [0.9, nan, nan, nan, nan],
    ]
    assert gromov_program(dist, 1).path == (0, 1, 3, 4)
    assert gromov_program(dist, 2).path == (0, 1, 2)  # block 3-4
    assert gromov_program(dist, 3).path == (0, 4)  # block 1-3
    with pytest.raises(ValueError, match="block"):
        gromov_program(dist, 5)


def test_presets_from_a_model_without_a_measurement_say_so(llama):
    with pytest.raises(FileNotFoundError, match="polar_core redundancy"):
        shortgpt_program(llama, 1)


def test_redundancy_round_trip(tmp_path, full_trace):
    bi, bi_last, dist = layer_redundancy(full_trace.step_hidden)
    assert bi.shape == bi_last.shape == (4,) and dist.shape == (4, 4)
    assert torch.isnan(dist[3, 1:]).all() and not torch.isnan(dist[3, 0])
    # d(l, 1) and BI at the last token measure the same pair of states.
    torch.testing.assert_close(torch.cos(math.pi * dist[0]), 1 - bi_last, atol=1e-4, rtol=0)
    red = Redundancy("tiny", 4, bi, bi_last, dist, 1, {"command": "test"})
    path = tmp_path / "tiny.json"
    save_redundancy(red, path)
    back = load_redundancy("tiny", path)
    torch.testing.assert_close(back.angular_distance, dist, atol=1e-6, rtol=0, equal_nan=True)
    assert back.meta == {"command": "test"}
    assert gromov_program(back, 2) == gromov_program(dist, 2)
    assert load_redundancy("no-such-model") is None


def test_shipped_redundancy_of_the_default_model():
    red = load_redundancy("smollm2-135m-instruct")
    assert red is not None and red.num_layers == 30 and red.num_prompts >= 40
    assert "python -m polar_core redundancy" in red.meta["command"]
    assert gromov_program(red, 4).layer_calls == 26 and shortgpt_program(red, 4).layer_calls == 26


def test_analyze_shapes_follow_the_program(llama, full_trace):
    program = Program.parse("0, 1-2x3, 3", 4)  # 8 steps
    trace = _trace(llama, program, capture="all")
    a = analyze(llama, trace, full_trace, expected=[7, 8], k=3)
    k = program.layer_calls
    assert a.labels[:3] == ["s1·L0", "s2·L1", "s3·L2"] and len(a.labels) == k
    assert a.ops == ["keep", "keep", "keep", "repeat", "repeat", "repeat", "repeat", "keep"]
    for x in (a.block_influence, a.block_influence_mean, a.cos_to_baseline, a.cos_to_final, a.lens.entropy):
        assert x.shape == (k,)
    assert a.similarity.shape == a.angular.shape == a.similarity_mean.shape == (k + 1, k + 1)
    assert len(a.similarity_labels) == k + 1
    assert a.lens.top_ids.shape == a.lens.top_probs.shape == (k, 3) and len(a.lens.top_tokens) == k
    assert set(a.lens.tracks) == {"answer", "expected"} and a.lens.tracks["expected"].token_id == 7
    assert a.lens.tracks["answer"].token_id == trace.token_ids[0]
    assert a.baseline_lens.top_ids.shape == (4, 3) and len(a.baseline_labels) == 4
    series = a.answer_probability_series()
    assert [len(v) for _, v in series.values()] == [4, k]
    # Captured at the last token only: no per-token means.
    last = analyze(llama, _trace(llama, program), _trace(llama, Program.full(4)))
    assert last.block_influence_mean is None and last.similarity_mean is None
    torch.testing.assert_close(last.block_influence, a.block_influence, atol=1e-5, rtol=0)


def test_analyze_refuses_mismatched_inputs(llama, full_trace):
    trace = _trace(llama, Program.skip(4, 1, 1))
    with pytest.raises(ValueError, match="full program"):
        analyze(llama, full_trace, trace)
    trace.step_hidden = None
    with pytest.raises(ValueError, match="capture"):
        analyze(llama, trace, full_trace)


@pytest.mark.real_model
def test_real_model_lens_finds_the_answer_before_the_last_layer(real_lm):
    """Few-shot capitals: ' Paris' is top-1 at the last step and the expected answer
    is tokenized with its leading space after "A:", without it after a chat template."""
    from polar_core.study import tasks

    item = tasks.get_item("capitals/france")
    prompt = tasks.build_prompt(item)
    full = Program.full(real_lm.num_layers)
    base = generate(real_lm, [prompt], full, max_new_tokens=4, chat=False, capture="last", stopping=Stopping(strings=("\n",)))[0]
    edited = generate(real_lm, [prompt], Program.skip(real_lm.num_layers, 25, 26), max_new_tokens=4, chat=False, capture="last", stopping=Stopping(strings=("\n",)))[0]
    a = analyze(real_lm, edited, base, expected="Paris")
    tok = real_lm.tokenizer
    track = a.baseline_lens.tracks["expected"]
    assert track.token == " Paris" and track.rank[-1] == 1
    assert a.baseline_lens.top_ids[-1].tolist() == base.final_logits.topk(5).indices.tolist()
    assert track.top1_from is not None and track.top1_from < real_lm.num_layers  # before the last layer
    assert a.baseline_expected_met is True and len(a.labels) == 28
    chat = tok.apply_chat_template([{"role": "user", "content": "Capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    chat_ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert tok.decode(analysis.expected_token_ids(real_lm, chat_ids, "Paris")[:1]) == "Paris"


@pytest.mark.real_model
def test_real_model_lens_follows_a_digit_answer_past_its_leading_space(real_lm):
    """SmolLM2 answers " 8" as " ", "8": the lens must show where "8" is chosen,
    not the probability of the space."""
    from polar_core.engine.forward import prefill
    from polar_core.engine.inputs import encode_prompts
    from polar_core.study import tasks

    item = tasks.load_suite("add_1digit")[0]
    prompt = tasks.build_prompt(item)
    full = Program.full(real_lm.num_layers)
    base = generate(real_lm, [prompt], full, max_new_tokens=4, chat=False, capture="last", stopping=Stopping(strings=("\n",)))[0]
    assert real_lm.tokenizer.decode(base.token_ids[:1]) == " "
    a = analyze(real_lm, base, base, expected=item.answer)
    assert a.lens_offset == a.baseline_lens_offset == 1
    assert a.lens.tracks["expected"].token == item.answer[0] and a.lens.tracks["answer"].token.strip()
    shifted = encode_prompts(real_lm, [prompt], chat=False)
    extended = prefill(real_lm, pad_left([shifted.input_ids[0].tolist() + base.token_ids[:1]], 0, "cpu"), [full],
                       capture="last")
    torch.testing.assert_close(base.answer_step_hidden, extended.step_hidden[0], rtol=1e-4, atol=1e-4)
    assert a.lens.top_ids[-1, 0] == base.token_ids[1]  # the last step's top token is the digit it wrote


def test_analysis_feeds_the_figure_builders_unchanged(llama, full_trace):
    """Guards the contract with app/figures.py: every builder takes the fields as they are."""
    figures = pytest.importorskip("app.figures")
    trace = _trace(llama, Program.loop(4, 1, 2, 2), capture="all")
    a = analyze(llama, trace, full_trace)
    k = trace.program.layer_calls
    figs = [
        figures.similarity_heatmap(a.similarity, a.similarity_labels, metric="angular"),
        figures.block_influence_bar(a.block_influence, a.labels, a.ops, secondary=a.block_influence_mean),
        figures.logit_lens_grid(a.labels, a.lens.top_tokens, a.lens.top_probs,
                                highlight_token=a.lens.tracks["answer"].token),
        figures.answer_probability_curve(a.answer_probability_series(), token=a.lens.tracks["answer"].token),
        figures.alignment_curve(a.labels, a.cos_to_baseline, a.cos_to_final),
    ]
    assert len(figs[0].data[0].z) == k + 1
    assert sum(len(t.x) for t in figs[1].data if t.type == "bar") == k
    assert len(figs[2].data[0].z) == k
    assert [len(t.y) for t in figs[3].data] == [4, k]
    assert len(figs[4].data[0].y) == k


class _BlankFirstTokenizer:
    """Decodes one chosen id as a bare space, the rest as "<id>": SmolLM2's
    " 7" = " ", "7" in miniature."""

    chat_template = None

    def __init__(self, blank_id: int):
        self.blank_id = blank_id

    def batch_decode(self, rows, skip_special_tokens=False):
        return ["".join(" " if i == self.blank_id else f"<{i}>" for i in ids) for ids in rows]

    def decode(self, ids, skip_special_tokens=False):
        return self.batch_decode([ids])[0]


def test_the_lens_looks_past_an_answer_that_opens_with_a_bare_space(llama):
    first = _trace(llama, None).token_ids[0]
    lm = wrap(llama.model, _BlankFirstTokenizer(first), name="tiny-llama-blank")
    full = _trace(lm, None, max_new_tokens=4)
    edited = _trace(lm, Program.parse("0-1, 3", 4), max_new_tokens=4)
    result = analyze(lm, edited, full, expected=[first, full.token_ids[1]])
    assert result.baseline_lens_offset == 1  # the full answer opens with the "space"
    assert result.lens.tracks["expected"].token_id == full.token_ids[1]
    expected_lens = logit_lens(lm, full.answer_step_hidden, k=5)
    assert torch.equal(result.baseline_lens.top_ids, expected_lens.top_ids)
    # Without a tokenizer nothing is blank: the lens stays at the last prompt token.
    plain = analyze(llama, _trace(llama, None, max_new_tokens=4), _trace(llama, None, max_new_tokens=4))
    assert plain.lens_offset == 0
    assert torch.equal(plain.lens.top_ids, logit_lens(llama, _trace(llama, None).step_hidden, k=5).top_ids)


def test_step_frame_holds_the_data_behind_the_per_step_charts(llama):
    full = _trace(llama, None)
    edited = _trace(llama, Program.parse("0, 2-3x2", 4))
    result = analyze(llama, edited, full, k=3)
    frame = result.step_frame()
    assert list(frame["layer"]) == [0, 2, 3, 2, 3] and list(frame["step"]) == [1, 2, 3, 4, 5]
    assert frame["block_influence"].tolist() == pytest.approx(result.block_influence.tolist())
    assert frame["top1_prob"].tolist() == pytest.approx(result.lens.top_probs[:, 0].tolist())
    assert {"top3_token", "answer_token_prob", "answer_token_rank"} <= set(frame.columns)
    similarity = result.similarity_frame()
    assert similarity.shape == (6, 6) and similarity.index[0] == "emb"
    assert similarity.iloc[2, 2] == pytest.approx(1.0, abs=1e-5)
