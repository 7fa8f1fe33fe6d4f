"""A damaged model cache repairs itself (issue 14).

Regression: a truncated cached safetensors file gave a clear error but the
model never loaded again until someone deleted the cache by hand. The cache
is now removed and rebuilt from the GGUF once, with a warning.

The GGUF step is replaced by a tiny model (no real model is dequantized and
the real cache under ~/.cache is never touched: POLAR_CACHE_DIR is a tmp dir);
the cache written, damaged and read back is real.
"""
from __future__ import annotations

import logging

import pytest
import torch
from tiny import tiny_config

from polar_core.engine import models

NAME = "tiny-embedded"


def _tiny_from_gguf(calls):
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    def dequantize(path):
        calls.append(path)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
        words = Tokenizer(tok_models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
        return model, PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    return dequantize


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("POLAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(models.MODEL_ALIASES, NAME, models.EmbeddedModel("json", "tiny.gguf", "nobody/tiny"))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda entry: tmp_path / "tiny.gguf")
    monkeypatch.setattr(models, "_dequantize", _tiny_from_gguf(calls))
    return calls, tmp_path / "cache" / "models" / NAME


def test_a_truncated_cache_is_removed_and_rebuilt_once(embedded, caplog):
    calls, cached = embedded
    first, _ = models._load(NAME, torch.float32)
    assert len(calls) == 1 and (cached / "model.safetensors").is_file()
    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # a crash mid-copy, a full disk
    with caplog.at_level(logging.WARNING, logger="polar_core.engine.models"):
        repaired, _ = models._load(NAME, torch.float32)
    assert len(calls) == 2 and "damaged" in caplog.text and "rebuilding them from the GGUF" in caplog.text
    again, _ = models._load(NAME, torch.float32)  # the rebuilt cache loads: no third dequantization
    assert len(calls) == 2
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
