"""polar_core.study.router: network shapes, targets, beam search, training, checkpoints."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_lm_with_chars

from polar_core.program import OPS, Program, Segment
from polar_core.study.router import (
    Router,
    RouterConfig,
    RouterError,
    beam_search,
    default_router_path,
    load_default_router,
    load_router,
    predict_batch,
    predict_programs,
    save_router,
    train_router,
)
from polar_core.study.router.train import encode_target, router_segments, sample_targets
from polar_core.study.supervision import SupervisionSample, load_supervision

D = 4


@pytest.fixture(scope="module")
def lm():
    return tiny_lm_with_chars()


def tiny_config(**changes):
    base = dict(model_name="tiny-llama", num_layers=D, feature_size=32, d_model=32, num_heads=2, max_tokens=64,
                dropout=0.0)
    return RouterConfig(**{**base, **changes})


def synthetic_samples():
    """Two kinds of questions, each with its own best program, plus the full path."""
    full = Program.full(D)
    skip_a = Program.drop_layers(D, [2])
    loop_b = Program.loop(D, 1, 1, 2)
    samples = []
    for i in range(12):
        samples.append(SupervisionSample(f"alpha alpha question {i}", "x", (skip_a, full), initial_score=1.0))
        samples.append(SupervisionSample(f"zzz beta {i} zzz", "y", (loop_b,), initial_score=0.0))
    return samples


# ---------------------------------------------------------------- network


def test_parameter_count_at_default_model_config():
    """The paper's predictor has 2.11M parameters; ours must stay <= 2.5M."""
    router = Router(RouterConfig("smollm2-135m-instruct", num_layers=30, feature_size=576))
    assert 1_500_000 < router.num_parameters() <= 2_500_000


@pytest.mark.parametrize("pooled", [False, True])
def test_output_shapes_and_padding_invariance(pooled):
    """With or without the pooled input: a left-padded row equals the prompt alone."""
    torch.manual_seed(0)
    router = Router(tiny_config(pooled=pooled)).eval()
    feats = torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    boundary, ops = router(feats, mask)
    assert boundary.shape == (2, D) and ops.shape == (2, D, len(OPS))
    # A padded row must equal the same prompt alone, whatever the padding holds.
    alone_b, alone_o = router(feats[1:, 3:], mask[1:, 3:])
    torch.testing.assert_close(boundary[1:], alone_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops[1:], alone_o, atol=1e-5, rtol=1e-5)


def test_config_validation():
    with pytest.raises(RouterError, match="divisible"):
        tiny_config(d_model=33)
    with pytest.raises(RouterError, match="feature_layer"):
        tiny_config(feature_layer=D)
    with pytest.raises(RouterError, match="num_layers"):
        tiny_config(num_layers=0)


# ---------------------------------------------------------------- targets


def test_router_segments_split_long_segments():
    program = Program.parse("0-9, 12-13x2, 14-15", 16)
    segs = router_segments(program, 4)
    assert [(s.start, s.end, s.op) for s in segs] == [
        (0, 3, "keep"), (4, 7, "keep"), (8, 9, "keep"), (10, 11, "skip"), (12, 13, "repeat"), (14, 15, "keep"),
    ]
    assert Program.from_ops(segs, 16) == program
    assert router_segments(Program.loop(16, 2, 7, 2), 4) is None  # a 6-layer loop cannot be cut
    assert router_segments(Program.loop(16, 2, 3, 3), 4) is None  # run three times
    assert router_segments(Program((3, 1, 2), 4), 4) is None  # no op view


def test_encode_target():
    segs = router_segments(Program.parse("0, 1x2", D), 4)  # keep 0, repeat 1, skip 2-3
    boundary, ops = encode_target(segs, D)
    assert boundary.tolist() == [1, 1, 1, 0]
    assert ops.tolist() == [OPS.index("keep"), OPS.index("repeat"), OPS.index("skip"), -100]


def test_sample_targets_weights_full_path():
    config = tiny_config()
    full, short = Program.full(D), Program.drop_layers(D, [1])
    longer = Program.drop_layers(D, [3]).__class__((0, 1, 2, 2, 3), D)
    s = SupervisionSample("q", "a", (longer, short, full), initial_score=1.0)
    assert dict(sample_targets(s, config)) == {short: 1.0, full: 0.3}
    only_full = SupervisionSample("q", "a", (full,), initial_score=1.0)
    assert dict(sample_targets(only_full, config)) == {full: 1.0}
    assert sample_targets(SupervisionSample("q", "a", ()), config) == []
    cautious = dataclasses.replace(config, full_path_weight=1.0)  # `train --full-path-weight 1.0`
    assert dict(sample_targets(s, cautious)) == {short: 1.0, full: 1.0}


# ---------------------------------------------------------------- beam search


def _segment_logprob(segs, boundary, ops):
    lb, ln = F.logsigmoid(boundary).tolist(), F.logsigmoid(-boundary).tolist()
    lo = F.log_softmax(ops, -1).tolist()
    total = 0.0
    for s in segs:
        total += (lb[s.start] if s.start else 0.0) + sum(ln[s.start + 1 : s.end + 1]) + lo[s.start][OPS.index(s.op)]
    return total


def _all_segmentations(depth, max_segment=4):
    for cuts in itertools.product([0, 1], repeat=depth - 1):
        starts = [0] + [i + 1 for i, c in enumerate(cuts) if c]
        ends = starts[1:] + [depth]
        if any(e - s > max_segment for s, e in zip(starts, ends)):
            continue
        for ops in itertools.product(OPS, repeat=len(starts)):
            if all(o == "skip" for o in ops):
                continue
            yield tuple(Segment(s, e - 1, o, {"skip": 0, "keep": 1, "repeat": 2}[o]) for s, e, o in zip(starts, ends, ops))


def test_beam_search_returns_k_distinct_valid_sorted_programs():
    torch.manual_seed(0)
    depth = 8
    boundary, ops = torch.randn(depth) * 2, torch.randn(depth, 3) * 2
    found = beam_search(boundary, ops, k=5, width=5)
    programs = [Program.from_ops(segs, depth) for segs, _ in found]
    scores = [s for _, s in found]
    assert len(set(programs)) == 5
    assert scores == sorted(scores, reverse=True)
    for (segs, score) in found:
        assert all(s.length <= 4 for s in segs)
        assert math.isclose(score, _segment_logprob(segs, boundary, ops), abs_tol=1e-4)


def test_beam_search_with_a_wide_beam_is_exact():
    """With a beam wider than the lattice, top-1 is the best segmentation overall."""
    torch.manual_seed(1)
    depth = 6
    boundary, ops = torch.randn(depth) * 3, torch.randn(depth, 3) * 3
    best = max(_all_segmentations(depth), key=lambda segs: _segment_logprob(segs, boundary, ops))
    (segs, score), *_ = beam_search(boundary, ops, k=3, width=10_000)
    assert Program.from_ops(segs, depth) == Program.from_ops(best, depth)
    assert math.isclose(score, _segment_logprob(best, boundary, ops), abs_tol=1e-4)


def test_beam_search_never_returns_the_empty_program():
    boundary = torch.full((D,), 5.0)
    ops = torch.tensor([[20.0, 0.0, 0.0]] * D)  # skip everywhere is by far the likeliest
    found = beam_search(boundary, ops, k=5)
    assert found and all(any(s.op != "skip" for s in segs) for segs, _ in found)


# ---------------------------------------------------------------- training


def test_training_reduces_loss_and_learns_the_synthetic_programs(lm):
    samples = synthetic_samples()
    router = train_router(lm, samples, tiny_config(), epochs=40, lr=3e-3, batch_size=8, seed=0, progress=False)
    history = router.loss_history
    assert len(history) == 40
    assert history[-1] < 0.5 * history[0]
    (alpha, _), *_ = predict_programs(lm, router, samples[0].question)
    (beta, _), *_ = predict_programs(lm, router, samples[1].question)
    assert alpha == Program.drop_layers(D, [2])
    assert beta == Program.loop(D, 1, 1, 2)


def test_reference_supervision_file_trains_end_to_end(lm, tmp_path):
    """A file in the reference implementation's format trains a router (2 steps)."""
    reference = [
        {"question": "Solve 1+1", "gt_ans": "\\boxed{2}", "initial_score": 0.0,
         "final_valid_transitions": [[0, 1, 3], [0, 1, 1, 2, 3]], "final_invalid_transitions": [[0, 2, 3]]},
        {"question": "Solve 2+2", "gt_ans": "4", "initial_score": 1.0,
         "final_valid_transitions": [[0, 1, 2, 3], [0, 2, 3]]},
    ]
    path = tmp_path / "merged_mcts_samples.json"
    path.write_text(json.dumps(reference))
    samples = load_supervision(path, D)
    router = train_router(lm, samples, tiny_config(), epochs=5, max_steps=2, batch_size=1, progress=False)
    assert len(router.loss_history) == 1  # two samples, batch 1: the first epoch is the 2 steps
    top = predict_programs(lm, router, "Solve 3+3", k=3)
    assert len(top) == 3 and all(p.num_layers == D for p, _ in top)


def test_training_refuses_samples_without_usable_programs(lm):
    samples = [SupervisionSample("q", "a", (Program.loop(D, 0, 3, 3),))]  # a 3x loop: not expressible
    with pytest.raises(RouterError, match="nothing to train"):
        train_router(lm, samples, tiny_config(), epochs=1, progress=False)


# ---------------------------------------------------------------- prediction and checkpoints


def test_predict_accepts_token_ids_and_text_alike(lm):
    router = Router(tiny_config()).eval()
    text = "what is two plus two"
    ids = lm.tokenizer(text)["input_ids"]
    assert predict_programs(lm, router, text) == predict_programs(lm, router, ids)
    with pytest.raises(RouterError):
        predict_batch(lm, router, [text, ids])


@pytest.mark.parametrize("pooled", [False, True])
def test_save_load_gives_identical_predictions(lm, tmp_path, pooled):
    torch.manual_seed(3)
    router = Router(tiny_config(feature_layer=1, pooled=pooled)).eval()
    prompts = ["alpha beta", "a much longer prompt with more tokens"]
    before = predict_batch(lm, router, prompts, k=4)
    save_router(router, tmp_path / "r")
    loaded = load_router(tmp_path / "r", lm)
    assert loaded.config == router.config
    assert predict_batch(lm, loaded, prompts, k=4) == before
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["model_name"] == "tiny-llama" and config["num_layers"] == D


def test_layer_count_mismatch_raises(lm, tmp_path):
    save_router(Router(tiny_config(num_layers=6, model_name="other-model")), tmp_path / "r")
    with pytest.raises(RouterError, match="6 layers"):
        load_router(tmp_path / "r", lm)
    with pytest.raises(RouterError, match="6 layers"):
        predict_programs(lm, load_router(tmp_path / "r"), "hello")


@pytest.mark.parametrize(
    "damage",
    ["truncate_weights", "garbage_weights", "missing_weights", "garbage_config", "config_shape", "unknown_key", "nan"],
)
def test_corrupted_checkpoint_raises_router_error(lm, tmp_path, damage):
    folder = save_router(Router(tiny_config()), tmp_path / "r")
    weights, config = folder / "model.safetensors", folder / "config.json"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage_weights":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "missing_weights":
        weights.unlink()
    elif damage == "garbage_config":
        config.write_text("{not json")
    elif damage == "config_shape":  # config says d_model 64, weights are 32 wide
        data = json.loads(config.read_text())
        config.write_text(json.dumps({**data, "d_model": 64}))
    elif damage == "unknown_key":
        data = json.loads(config.read_text())
        config.write_text(json.dumps({**data, "surprise": 1}))
    elif damage == "nan":
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        state["queries"][0, 0] = float("nan")
        save_file(state, str(weights))
    with pytest.raises(RouterError):
        load_router(folder, lm)


def test_default_router_path_and_missing_default(lm):
    assert default_router_path("smollm2-135m-instruct").parts[-3:] == ("assets", "router", "smollm2-135m-instruct")
    assert default_router_path("HuggingFaceTB/SmolLM2-135M").name == "HuggingFaceTB--SmolLM2-135M"
    assert load_default_router(lm) is None  # nothing ships for a tiny random model


def test_a_config_saved_before_pooled_existed_still_loads():
    data = tiny_config().to_dict()
    del data["pooled"]
    assert RouterConfig.from_dict(data).pooled is False


# ---------------------------------------------------------------- familiarity gate


STRANGE = "QQQQ ???? !!!!"  # characters no synthetic sample has


@pytest.fixture(scope="module")
def gated_router(lm):
    return train_router(lm, synthetic_samples(), tiny_config(), epochs=40, lr=3e-3, batch_size=8, seed=0,
                        progress=False, familiar_quantile=0.0)


def test_training_keeps_a_familiarity_bank_of_every_distinct_prompt(lm, gated_router):
    config = gated_router.config
    assert config.familiar_bank == 24 and gated_router.familiar_bank.shape == (24, config.d_model)
    assert -1.0 <= config.familiar_threshold <= 1.0
    assert torch.allclose(gated_router.familiar_bank.float().norm(dim=-1), torch.ones(24), atol=1e-2)
    twice = train_router(lm, synthetic_samples() * 2, tiny_config(), epochs=1, progress=False)
    assert twice.config.familiar_bank == 24  # a repeated prompt is kept once
    plain = train_router(lm, synthetic_samples(), tiny_config(), epochs=1, progress=False, familiar_quantile=None)
    assert plain.config.familiar_bank == 0 and plain.config.familiar_threshold is None
    with pytest.raises(RouterError, match="familiar_quantile"):
        train_router(lm, synthetic_samples(), tiny_config(), epochs=1, progress=False, familiar_quantile=1.5)
    # Training from a gated router's config fits a new gate, not the old one's.
    again = train_router(lm, synthetic_samples()[:5], config, epochs=1, progress=False)
    assert again.config.familiar_bank == 5


def test_an_unfamiliar_prompt_gets_the_full_program_first(lm, gated_router):
    from polar_core.study.router import route_batch

    alpha, beta, strange = route_batch(lm, gated_router, ["alpha alpha question 3", "zzz beta 5 zzz", STRANGE], k=3)
    for known in (alpha, beta):
        assert known.familiar and known.familiarity >= known.threshold and known.gated == known.ranked
    assert alpha.ranked[0][0] == Program.drop_layers(D, [2]) and beta.ranked[0][0] == Program.loop(D, 1, 1, 2)
    assert not strange.familiar and -1.0 <= strange.familiarity < strange.threshold
    assert not strange.ranked[0][0].is_full  # the router itself would not run the full program
    gated = strange.gated
    assert gated[0] == (Program.full(D), strange.full_log_prob) and len(gated) == 3
    assert [p for p, _ in gated[1:]] == [p for p, _ in strange.ranked if not p.is_full][:2]
    assert predict_programs(lm, gated_router, STRANGE)[0][0] == Program.full(D)
    assert predict_programs(lm, gated_router, STRANGE, gate=False)[0][0] == strange.ranked[0][0]


def test_the_full_programs_log_prob_is_the_one_an_exact_beam_gives_it():
    from polar_core.study.router.predict import full_program_log_prob

    torch.manual_seed(5)
    for _ in range(5):
        b, o = torch.randn(D), torch.randn(D, 3)
        scores = dict(beam_search(b, o, k=200, width=200, max_segment=2))
        full = next(s for segs, s in scores.items() if Program.from_ops(segs, D).is_full)
        assert full_program_log_prob(b, o, max_segment=2) == pytest.approx(full, abs=1e-5)


def test_a_gated_router_round_trips_through_its_checkpoint(lm, gated_router, tmp_path):
    from polar_core.study.router import route_batch

    prompts = ["alpha alpha question 1", STRANGE]
    loaded = load_router(save_router(gated_router, tmp_path / "r"), lm)
    assert loaded.config == gated_router.config
    assert torch.equal(loaded.familiar_bank, gated_router.familiar_bank)
    assert route_batch(lm, loaded, prompts) == route_batch(lm, gated_router, prompts)


@pytest.mark.parametrize("changes", [
    {"familiar_bank": 3},  # a bank without a threshold
    {"familiar_threshold": 0.5},  # a threshold without a bank
    {"familiar_bank": 3, "familiar_threshold": 1.5},
    {"familiar_bank": 3, "familiar_threshold": float("nan")},
    {"familiar_bank": 3, "familiar_threshold": True},
    {"familiar_bank": -1, "familiar_threshold": 0.5},
    {"familiar_bank": 10**6, "familiar_threshold": 0.5, "d_model": 8192, "num_heads": 8},  # too much memory
])
def test_absurd_familiarity_settings_are_refused(changes):
    with pytest.raises(RouterError):
        tiny_config(**changes)


@pytest.mark.parametrize("damage", ["bank_rows", "no_bank", "nan_bank"])
def test_a_damaged_familiarity_bank_is_refused(lm, gated_router, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    folder = save_router(gated_router, tmp_path / "r")
    weights, config = folder / "model.safetensors", folder / "config.json"
    if damage == "bank_rows":  # config.json says more training prompts than the weights hold
        data = json.loads(config.read_text())
        config.write_text(json.dumps({**data, "familiar_bank": data["familiar_bank"] + 1}))
    else:
        state = load_file(str(weights))
        if damage == "no_bank":
            del state["familiar_bank"]
        else:
            state["familiar_bank"][0, 0] = float("nan")
        save_file(state, str(weights))
    with pytest.raises(RouterError):
        load_router(folder, lm)
