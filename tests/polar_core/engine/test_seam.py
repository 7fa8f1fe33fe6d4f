"""The seam's contract with transformers, per supported family.

These are the tests that fail, and say what changed, when a transformers
release changes how a decoder layer is called or how its attention uses the
cache. Every other model test skips then (tests/tiny.py), pointing here.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from tiny import FAMILIES, tiny_config
from torch import nn

from polar_core.engine import adapter as seam
from polar_core.engine.adapter import SeamError, check_seam, expected_kv_shape, get_adapter, probe_layer

VERSION = transformers.__version__


def _unchecked_adapter(family: str) -> seam.Adapter:
    config = tiny_config(family)
    torch.manual_seed(0)
    impl = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    return get_adapter(model, check=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_decoder_layer_call_writes_once_into_its_own_slot(family):
    adapter = _unchecked_adapter(family)
    for layer in range(adapter.num_layers):  # full and sliding layers alike
        report = probe_layer(adapter, layer, batch=2, tokens=3)
        kv = expected_kv_shape(adapter, 2, 3)
        assert len(report.writes) == 1, (
            f"transformers {VERSION}: {family} layer {layer} called cache.update {len(report.writes)} times "
            f"(the step cache expects exactly one call per layer call)")
        assert report.writes[0] == (kv, kv), (
            f"transformers {VERSION}: {family} layer {layer} wrote keys/values {report.writes[0]}, expected {kv}")
        assert report.cache_reads == (), (
            f"transformers {VERSION}: {family} layer {layer} read cache.{report.cache_reads} besides update()")
        assert report.output_shape == (2, 3, adapter.hidden_size), (
            f"transformers {VERSION}: {family} layer {layer} returned {report.output_shape}, not hidden states")


class _Echo:
    """A slot holding nothing before this call: hands back the new keys (b, H, t, Dh)."""

    def __init__(self, copies: int = 1):
        self.copies = copies

    def write(self, key, value):
        return torch.cat([key] * self.copies, 2), torch.cat([value] * self.copies, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_layer_attends_over_what_the_cache_returns(family):
    """The attention must attend over what `update` hands back (the step's
    cached history), not over the keys it just computed: with every key handed
    back twice and nothing masked, the softmax weights, hence the output, are
    those of attending once to every key."""
    adapter = _unchecked_adapter(family)
    torch.manual_seed(1)
    hidden = torch.randn(1, 3, adapter.hidden_size)
    outputs = []
    for copies in (1, 2):
        pos = adapter.positions(hidden, torch.ones(1, 3, dtype=torch.long), 0)
        pos.masks = {t: torch.zeros(1, 1, 3, 3 * copies) for t in pos.masks}
        with torch.inference_mode():
            outputs.append(adapter.run_layer(0, hidden, pos, slot=_Echo(copies)))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_check_seam_passes_on_this_release(family):
    check_seam(_unchecked_adapter(family))


def test_a_changed_update_signature_is_named(monkeypatch):
    """Guards the transformers 5.24 break: attention began to call
    cache.update(k, v, layer_idx, kwargs=...), and the old update() took no
    such keyword. An update() that no longer matches the call must fail
    here, by name, not as a TypeError in every executor test."""
    def narrow_update(self, key_states, value_states):  # takes neither layer_idx nor kwargs
        return self.slot.write(key_states, value_states)

    monkeypatch.setattr(seam._AttentionCache, "update", narrow_update)
    with pytest.raises(SeamError, match=r"calling a decoder layer through the seam failed.*TypeError.*update\(\)"):
        check_seam(_unchecked_adapter("llama"))


def test_a_cache_attribute_read_is_named(monkeypatch):
    adapter = _unchecked_adapter("llama")
    attention = adapter.layers[0].self_attn
    original = type(attention).forward

    def reads_seq_length(self, *args, **kwargs):
        cache = kwargs.get(adapter.cache_argument)
        getattr(cache, "get_seq_length", None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(attention), "forward", reads_seq_length)
    with pytest.raises(SeamError, match=r"read cache\.get_seq_length"):
        check_seam(adapter)


def test_a_renamed_cache_argument_is_named():
    class Layer(nn.Module):
        def forward(self, hidden_states, attention_mask=None, kv_store=None):
            return hidden_states

    with pytest.raises(SeamError, match="neither `cache` nor `past_key_values`"):
        seam._cache_argument(Layer(), "llama")
