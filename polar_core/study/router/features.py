"""What the router reads: the base model's own hidden states over the prompt
at an early depth (RouterConfig.feature_layer), frozen."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from polar_core.engine.forward import prefill
from polar_core.engine.inputs import EncodedBatch, encode_prompts, pad_left
from polar_core.engine.models import LoadedModel
from polar_core.program import Program
from polar_core.study.router.config import RouterConfig, RouterError


def encode(lm: LoadedModel, prompts: Sequence[str | Sequence[int]], chat: bool = False) -> EncodedBatch:
    """Prompts as text (tokenized like the executor does) or as token ids -> one batch."""
    if all(isinstance(p, str) for p in prompts):
        return encode_prompts(lm, list(prompts), chat=chat)
    if any(isinstance(p, str) for p in prompts):
        raise RouterError("pass prompts either all as text or all as token ids")
    pad = getattr(lm.tokenizer, "pad_token_id", None) or 0
    return pad_left([list(map(int, p)) for p in prompts], pad, lm.device)


@torch.inference_mode()
def _frozen_features(lm: LoadedModel, config: RouterConfig, batch: EncodedBatch) -> torch.Tensor:
    ids = batch.input_ids[:, -config.max_tokens :]
    if config.feature_layer == 0:
        return lm.adapter.embed(ids).float()  # (B, T, F)
    # Run the whole prompt so attention sees every token, keep the last max_tokens.
    prefix = Program.early_exit(lm.num_layers, config.feature_layer - 1)
    hidden = prefill(lm, batch, [prefix] * len(batch.lengths)).hidden
    return hidden[:, -config.max_tokens :].float()


def router_features(lm: LoadedModel, config: RouterConfig, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (B, T, F) float32 on the CPU and their mask (B, T) for a batch."""
    feats = _frozen_features(lm, config, batch)
    mask = batch.attention_mask[:, -config.max_tokens :].bool()
    # clone() outside inference mode: autograd may then save them for backward.
    return feats.cpu().clone(), mask.cpu().clone()
