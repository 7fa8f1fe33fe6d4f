"""Weight relayout for CPU decoding (polar_core.engine.cpu.layout): same values, same model."""
from __future__ import annotations

import torch
from tiny import build_tiny

from polar_core.engine.cpu import layout
from polar_core.engine.forward import forward_logits
from polar_core.engine.generate import Stopping, generate
from polar_core.engine.inputs import pad_left, resolve_programs
from polar_core.program import Program


def _favour(monkeypatch, input_major: bool):
    """Make the timing probe prefer one layout, whatever this machine measures."""
    def fake_seconds(weights):
        return 1.0 if layout.is_input_major(weights[0]) != input_major else 0.5
    monkeypatch.setattr(layout, "_seconds_per_product", fake_seconds)


def _fresh(family: str = "llama"):
    """A model of our own: build_tiny's cached ones are shared with other tests."""
    return build_tiny.__wrapped__(family)


def _weights(lm):
    return [m.weight for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]


def test_input_major_keeps_every_value():
    w = torch.randn(7, 5)
    relaid = layout.input_major(w)
    assert torch.equal(relaid, w) and layout.is_input_major(relaid) and not layout.is_input_major(w)


def test_relaid_model_computes_the_same_function(monkeypatch):
    reference, relaid = _fresh(), _fresh()
    _favour(monkeypatch, input_major=True)
    choices = layout.tune_cpu_layouts(relaid.model)
    assert choices and all(c.startswith("input-major") for c in choices.values())
    assert all(layout.is_input_major(w) for w in _weights(relaid))
    batch = pad_left([[5, 6, 7, 8, 9], [3, 4]], pad_id=0, device="cpu")
    programs = resolve_programs(relaid, Program.parse("0-1, 2x2, 3", 4), 2)
    torch.testing.assert_close(forward_logits(relaid, batch, programs), forward_logits(reference, batch, programs),
                               rtol=1e-5, atol=1e-5)
    ours = generate(relaid, batch, programs, max_new_tokens=12, stopping=Stopping(at_eos=False))
    theirs = generate(reference, batch, programs, max_new_tokens=12, stopping=Stopping(at_eos=False))
    assert [t.token_ids for t in ours] == [t.token_ids for t in theirs]
    with torch.no_grad():  # the model's own forward sees the relaid weights too
        own, before = (lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                       for lm in (relaid, reference))
    torch.testing.assert_close(own, before, rtol=1e-5, atol=1e-5)


def test_tied_embedding_and_head_stay_one_tensor(monkeypatch):
    lm = _fresh("gemma3_text")  # ties its LM head to the embedding
    head, embedding = lm.model.get_output_embeddings(), lm.model.get_input_embeddings()
    assert head.weight is embedding.weight
    _favour(monkeypatch, input_major=True)
    layout.tune_cpu_layouts(lm.model)
    assert head.weight is embedding.weight and layout.is_input_major(head.weight)


def test_a_slower_layout_is_left_alone_and_tuning_twice_changes_nothing(monkeypatch):
    lm = _fresh()
    _favour(monkeypatch, input_major=False)
    choices = layout.tune_cpu_layouts(lm.model)
    assert all(c.startswith("row-major") for c in choices.values())
    assert not any(layout.is_input_major(w) for w in _weights(lm))
    _favour(monkeypatch, input_major=True)
    layout.tune_cpu_layouts(lm.model)
    assert layout.tune_cpu_layouts(lm.model) == {}  # every shape already decided


def test_decisions_are_remembered_and_a_damaged_record_is_measured_again(monkeypatch, tmp_path):
    record = tmp_path / "cpu_layouts.json"
    _favour(monkeypatch, input_major=True)
    first = layout.tune_cpu_layouts(_fresh().model, record)
    assert record.is_file() and all("input-major" in c for c in first.values())

    def no_timing(weights):
        raise AssertionError("a remembered decision was timed again")
    monkeypatch.setattr(layout, "_seconds_per_product", no_timing)
    second_model = _fresh()
    second = layout.tune_cpu_layouts(second_model.model, record)
    assert second.keys() == first.keys() and all("earlier load" in c for c in second.values())
    assert all(layout.is_input_major(w) for w in _weights(second_model))

    record.write_text("{not json")
    _favour(monkeypatch, input_major=False)
    assert all(c.startswith("row-major") for c in layout.tune_cpu_layouts(_fresh().model, record).values())
