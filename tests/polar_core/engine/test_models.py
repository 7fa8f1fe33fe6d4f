"""Model loading: specs, the dequantized-weight cache, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from tiny import build_tiny

from polar_core.engine import models
from polar_core.engine.models import ModelLoadError, load_model


def test_unknown_spec_is_one_clear_error():
    with pytest.raises(ModelLoadError, match="unknown model 'no such model'"):
        load_model("no such model", device="cpu")


def test_corrupted_checkpoint_directory_is_a_load_error(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(str(tmp_path), device="cpu")


def test_local_directory_round_trip(tmp_path):
    """A saved tiny checkpoint loads through the same path as a real one."""
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    lm = build_tiny("qwen3")
    lm.model.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(lm.model.config.vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="t0")))
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert loaded.describe()["family"] == "qwen3" and loaded.num_layers == 4
    assert not any(p.requires_grad for p in loaded.model.parameters())
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name])


def test_failed_cache_write_leaves_no_partial_cache(tmp_path, monkeypatch):
    lm = build_tiny("llama")

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    target = tmp_path / "models" / "x"
    with pytest.raises(OSError, match="disk full"):
        models._save_atomically(lm.model, BrokenTokenizer(), target)
    assert not target.exists()
    assert list((tmp_path / "models").iterdir()) == []  # the temporary folder is gone too


def test_gguf_quantization_record_is_not_cached(tmp_path):
    lm = build_tiny("llama")
    lm.model.config.quantization_config = {"quant_method": "gguf"}
    try:
        target = tmp_path / "cache"

        class Tok:
            def save_pretrained(self, path):
                pass

        models._save_atomically(lm.model, Tok(), target)
    finally:
        del lm.model.config.quantization_config
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 4
    assert (target / "model.safetensors").stat().st_size > 0


@pytest.mark.real_model
def test_default_model_facts(real_lm):
    info = real_lm.describe()
    assert (info["family"], info["layers"], info["hidden_size"]) == ("llama", 30, 576)
    assert 130e6 < info["parameters"] < 140e6
    assert (models.cache_root() / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
