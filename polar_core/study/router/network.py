"""The router network: per-layer queries over frozen prompt features."""
from __future__ import annotations

import torch
from torch import nn

from polar_core.program import OPS
from polar_core.study.router.config import RouterConfig


class Block(nn.Module):
    """Pre-norm transformer block over the layer axis."""

    def __init__(self, d: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D, d)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Router(nn.Module):
    """Per-layer queries over frozen prompt features -> boundary and op logits."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        c = self.config = config
        d = c.d_model
        self.in_norm = nn.LayerNorm(c.feature_size)
        self.proj = nn.Linear(c.feature_size, d)
        self.token_pos = nn.Parameter(torch.zeros(c.max_tokens, d))  # index = distance from the prompt's end
        self.queries = nn.Parameter(torch.randn(c.num_layers, d) * 0.02)
        self.pool = nn.Linear(d, d) if c.pooled else None  # the mean token, added to every query
        self.cross_norm = nn.LayerNorm(d)
        self.cross = nn.MultiheadAttention(d, c.num_heads, dropout=c.dropout, batch_first=True)
        self.blocks = nn.ModuleList(Block(d, c.num_heads, c.mlp_ratio, c.dropout) for _ in range(c.num_blocks))
        self.out_norm = nn.LayerNorm(d)
        self.boundary_head = nn.Linear(d, 1)
        self.op_head = nn.Linear(d, len(OPS))
        self.loss_history: list[float] = []  # mean training loss per epoch (not saved)
        if c.familiar_bank:  # kept, not trained: what the training prompts looked like (familiarity.py)
            self.register_buffer("familiar_center", torch.zeros(d))
            self.register_buffer("familiar_bank", torch.zeros(c.familiar_bank, d, dtype=torch.float16))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, T, F) -> the router's own token vectors (B, T, d), before positions."""
        return self.proj(self.in_norm(features))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for features (B, T, F) with mask (B, T) (True = real token, left padding).

        Returns:
            boundary (B, D) and ops (B, D, 3) logits.
        """
        batch, length, _ = features.shape
        if length > self.config.max_tokens:
            features, mask = features[:, -self.config.max_tokens :], mask[:, -self.config.max_tokens :]
            length = self.config.max_tokens
        tokens = self.project(features)  # (B, T, d)
        tokens = tokens + self.token_pos[:length].flip(0)  # the last token gets position 0
        q = self.queries.expand(batch, -1, -1)  # (B, D, d)
        if self.pool is not None:
            weights = mask.float()[..., None]  # (B, T, 1)
            mean = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, d)
            q = q + self.pool(mean)[:, None]
        x = q + self.cross(self.cross_norm(q), tokens, tokens, key_padding_mask=~mask, need_weights=False)[0]
        for block in self.blocks:
            x = block(x)
        x = self.out_norm(x)
        return self.boundary_head(x).squeeze(-1), self.op_head(x)

    def num_parameters(self) -> int:
        """Trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
