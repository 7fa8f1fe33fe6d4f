"""Tiny random models of every supported family, built from configs (no downloads)."""
from __future__ import annotations

import functools

import torch

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(family: str):
    """A tiny random config of a supported family; sliding windows are small
    (5) so that test sequences cross them."""
    import transformers as tf

    head = dict(head_dim=8)
    gemma = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=5)
    configs = {
        "llama": lambda: tf.LlamaConfig(**TINY),
        "mistral": lambda: tf.MistralConfig(**TINY, sliding_window=5),
        "qwen2": lambda: tf.Qwen2Config(**TINY),
        "qwen3": lambda: tf.Qwen3Config(**TINY, **head),
        "gemma2": lambda: tf.Gemma2Config(**TINY, **gemma, final_logit_softcapping=30.0),
        "gemma3_text": lambda: tf.Gemma3TextConfig(
            **TINY, **gemma, layer_types=["sliding_attention", "full_attention"] * 2
        ),
        "phi3": lambda: tf.Phi3Config(**TINY),
    }
    return configs[family]()


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


@functools.lru_cache(maxsize=None)
def build_tiny(family: str = "llama", seed: int = 0):
    """A LoadedModel wrapping a tiny random model of `family` (no tokenizer).

    Cached: models are read-only to the executor, so tests can share them.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    torch.manual_seed(seed)
    impl = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    return wrap(model, name=f"tiny-{family}")


def q4_grid(weight: torch.Tensor) -> torch.Tensor:
    """Round a weight to what a Q4_1 file stores: per 32 inputs a float16 scale and minimum, 4-bit codes."""
    out_features, in_features = weight.shape
    blocks = weight.reshape(out_features, in_features // 32, 32)
    low = blocks.amin(-1).half().float()
    scale = ((blocks.amax(-1) - low) / 15).half().float()
    codes = ((blocks - low[..., None]) / scale[..., None]).round().clamp(0, 15)
    return (scale[..., None] * codes + low[..., None]).reshape(out_features, in_features)


def q8_grid(weight: torch.Tensor) -> torch.Tensor:
    """Round a weight to what a Q8_0 file stores: per 32 inputs a float16 scale, 8-bit codes."""
    out_features, in_features = weight.shape
    blocks = weight.reshape(out_features, in_features // 32, 32)
    scale = (blocks.abs().amax(-1) / 127).half().float()
    return (scale[..., None] * (blocks / scale[..., None]).round().clamp(-127, 127)).reshape(out_features, in_features)


def q5_0_grid(weight: torch.Tensor) -> torch.Tensor:
    """Round a weight as llama.cpp's Q5_0 does: per 32 inputs d = (the weight of largest |w|) / -16
    in float16 (it may be negative), codes in -16..15; the float32 d * q that gguf dequantizes."""
    out_features, in_features = weight.shape
    blocks = weight.reshape(out_features, in_features // 32, 32)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    d = (extreme / -16).half().float()
    codes = (blocks / d).round().clamp(-16, 15)
    return (d * codes).reshape(out_features, in_features)


def q6_k_grid(weight: torch.Tensor) -> torch.Tensor:
    """Round a weight to Q6_K's grid: per 256 inputs a float16 d, per 16 an int8 scale s, 6-bit codes
    in -32..31; gguf dequantizes (d * s) * q in float32."""
    out_features, in_features = weight.shape
    blocks = weight.reshape(out_features, in_features // 256, 16, 16)
    wanted = blocks.abs().amax(-1) / 31  # each sub-block's own scale
    d = (wanted.amax(-1, keepdim=True) / 127).half().float()
    s = (wanted / d).round().clamp(1, 127)
    scale = (d * s)[..., None]
    return (scale * (blocks / scale).round().clamp(-32, 31)).reshape(out_features, in_features)


def q4_k_grid(weight: torch.Tensor) -> torch.Tensor:
    """Round a weight to Q4_K's grid: per 256 inputs float16 d and dmin, per 32 6-bit s and m, 4-bit
    codes; gguf dequantizes (d * s) * q - dmin * m in float32."""
    out_features, in_features = weight.shape
    blocks = weight.reshape(out_features, in_features // 256, 8, 32)
    low = (-blocks.amin(-1)).clamp(min=0)  # the sub-block's offset, subtracted
    wanted = (blocks.amax(-1) + low) / 15
    d = (wanted.amax(-1, keepdim=True) / 63).half().float()
    dmin = (low.amax(-1, keepdim=True) / 63).half().float()
    s = (wanted / d).round().clamp(1, 63)
    m = (low / dmin.clamp(min=1e-30)).round().clamp(0, 63)
    scale, offset = (d * s)[..., None], (dmin * m)[..., None]
    codes = ((blocks + offset) / scale).round().clamp(0, 15)
    return (scale * codes - offset).reshape(out_features, in_features)


def wrap(model, tokenizer=None, name: str = "custom"):
    """`from_model` for tests: when the seam to transformers is broken, the
    test using the model is skipped with the reason, and
    tests/polar_core/engine/test_seam.py fails naming it."""
    import pytest

    from polar_core.engine.adapter import SeamError
    from polar_core.engine.models import from_model

    try:
        return from_model(model, tokenizer, name=name)
    except SeamError as exc:
        pytest.skip(f"seam to transformers broken (see test_seam.py): {exc}")


class CharTokenizer:
    """A tokenizer for tiny random models (vocab 97): one id per character, so
    the task suite's prompts can run through a tiny model."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + ord(c) % 90 for c in text]}

    def __len__(self):
        return 97

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids if i > 2)

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(ids, skip_special_tokens) for ids in rows]


def tiny_lm_with_chars():
    """A tiny random Llama with the character tokenizer, as a LoadedModel."""
    return wrap(build_tiny("llama").model, CharTokenizer(), name="tiny-llama")


def rigged_router(config, op: str = "keep"):
    """A router that always prefers one op everywhere ("keep" = the full program):
    its top-1 must reproduce the full program's results exactly."""
    from polar_core.program import OPS
    from polar_core.study.router import Router

    router = Router(config)
    with torch.no_grad():
        router.op_head.weight.zero_()
        router.op_head.bias.fill_(-50.0)
        router.op_head.bias[OPS.index(op)] = 50.0
    return router.eval()
