"""Building blocks of ZigMa outside the mixer: norms, embedders, cross-attention, final layer, positional tables.

Names, shapes and formulas follow upstream ``model_zigma.py`` exactly, because released checkpoints depend on
them (state-dict keys in parentheses).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm with a weight and no bias (``norm.weight``): ``y = x / sqrt(mean(x²) + eps) · w``, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


def add_and_norm(
    x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module, residual_in_fp32: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """mamba_ssm's fused add + norm (prenorm): ``r = x if residual is None else residual + x``; returns (norm(r), r).

    The residual stream is kept in fp32 when ``residual_in_fp32``; the normalised output has x's dtype.
    """
    dtype = x.dtype
    r = x if residual is None else residual + x
    if residual_in_fp32:
        r = r.float()
    return norm(r).to(dtype), r


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: zero whole samples with probability p and rescale the rest by 1/(1-p)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x·(1 + scale) + shift`` with (B, D) modulation broadcast over the L tokens of x (B, L, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """timm-style patch embedding (``x_embedder.proj``): (B, C, H, W) -> (B, L, D), tokens row-major.

    ``video=True`` folds frames into the batch: (B, T, C, H, W) -> (B, T·L, D), frame-major (index t·L + k).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, video: bool = False):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.video = video
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.video:
            frames = x.shape[1]
            tokens = self.proj(rearrange(x, "b t c h w -> (b t) c h w")).flatten(2).transpose(1, 2)
            return rearrange(tokens, "(b t) n d -> b (t n) d", t=frames)
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): 256-d sinusoid [cos | sin], max period 10⁴, then Linear-SiLU-Linear (``t_embedder.mlp``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """``[cos(t·f_i) | sin(t·f_i)]`` with ``f_i = max_period^(-i/half)``, i < half = dim/2 (GLIDE's formula)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        weight_dtype = self.mlp[0].weight.dtype
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(weight_dtype))


class LabelEmbedder(nn.Module):
    """Class ids (B,) -> (B, D) (``y_embedder.embedding_table``); row ``num_classes`` is the learned null class.

    The null row exists only when ``cfg_embedding`` is set (upstream: when the dropout probability is > 0), so
    upstream class-conditional checkpoints (101 rows for UCF101) load unchanged.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, cfg_embedding: bool):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.has_null = cfg_embedding
        self.embedding_table = nn.Embedding(num_classes + int(cfg_embedding), hidden_size)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class TextEmbedder(nn.Linear):
    """Caption features (B, N, d_context) -> (B, N, D). A plain Linear (keys ``y_embedder.weight/bias``) plus,
    for classifier-free guidance, a learned null token (``y_embedder.null_embedding``, (1, D)) that replaces every
    token of a dropped caption."""

    def __init__(self, d_context: int, hidden_size: int, cfg_embedding: bool):
        super().__init__(d_context, hidden_size)
        self.has_null = cfg_embedding
        if cfg_embedding:
            self.null_embedding = nn.Parameter(torch.zeros(1, hidden_size))

    def forward(self, context: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        emb = super().forward(context)
        if drop is not None:
            emb = torch.where(drop[:, None, None], self.null_embedding.to(emb.dtype).expand_as(emb), emb)
        return emb


class CrossAttention(nn.Module):
    """Unmasked multi-head cross-attention (``msa.to_q/to_k/to_v`` no bias, ``msa.to_out.0`` with bias).

    x (B, L, D_q), context (B, N, D_c) -> (B, L, D_q); inner width heads·dim_head (512 for any D upstream).
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            rearrange(t, "b l (h d) -> b h l d", h=self.heads)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class FinalLayer(nn.Module):
    """LayerNorm (no affine, eps 1e-6) then Linear(D, p²·C) (``final_layer.linear``); not adaLN-conditioned."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


# ---------------------------------------------------------------------------------------------------------------
# Fixed 2D sin-cos positional embedding (MAE's formula, as upstream)
# ---------------------------------------------------------------------------------------------------------------


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, D): ``[sin(p·ω_i) | cos(p·ω_i)]``, ``ω_i = 10000^(-2i/D)``."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid², D) table: first half encodes the column (w), second half the row (h), as MAE's meshgrid(w, h)."""
    if embed_dim % 4:
        raise ValueError(f"use_pe=1 (fixed sin-cos) needs embed_dim divisible by 4; got {embed_dim}")
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([sincos_1d(embed_dim // 2, grid_w), sincos_1d(embed_dim // 2, grid_h)], axis=1)
