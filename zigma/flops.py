"""Analytic FLOP count of a ZigMa forward pass (multiply-adds count 2 FLOPs).

Profilers cannot see inside fused selective-scan kernels, so MFU uses this count. Per block, with D = embed_dim,
E = expand·D, R = dt_rank, N = d_state, L tokens, k = conv width:

    in_proj 2·L·D·2E   conv 2·L·E·k   x_proj 2·L·E·(R+2N)   dt_proj 2·L·R·E   out_proj 2·L·E·D
    scan    9·L·E·N (upstream's count: exp, 2 mul + add for the state, C contraction) + 2·L·E (D skip, gate)
    adaLN   2·D·(3|6)D   modulation/gates ≈ 6·L·D   norms ≈ 4·L·D
    text cross-attention: 2·L·D·I + 2·2·M·D·I (q, k, v) + 2·2·L·M·I (scores, values) + 2·L·I·D, I = 512, M tokens
    (x2 directions for v2 scans except in/out_proj). Outside blocks: patch conv, t-MLP, final layer.

One training step costs ≈ 3x the forward (forward + backward of activations and weights).
"""

from __future__ import annotations

from zigma.model import ZigMa


def forward_flops_per_sample(model: ZigMa, context_tokens: int = 77) -> int:
    cfg = model.config
    d, p, c = cfg["embed_dim"], cfg["patch_size"], cfg["in_channels"]
    frames = max(cfg["video_frames"], 1)
    tokens = (cfg["img_dim"] // p) ** 2 * frames
    mixer = model.blocks[0].mixer
    e, r, n, k = mixer.d_inner, mixer.dt_rank, mixer.d_state, mixer.d_conv
    directions = 2 if mixer.bidirectional else 1
    ssm = 2 * tokens * e * k + 2 * tokens * e * (r + 2 * n) + 2 * tokens * r * e + 9 * tokens * e * n + 2 * tokens * e
    block = 2 * tokens * d * 2 * e + 2 * tokens * e * d + directions * ssm
    block += 2 * d * (6 if cfg["has_text"] else 3) * d + 10 * tokens * d
    if cfg["has_text"]:
        inner = 512
        block += 2 * tokens * d * inner + 4 * context_tokens * d * inner + 4 * tokens * context_tokens * inner
        block += 2 * tokens * inner * d
    outside = 2 * tokens * c * p * p * d + 2 * (256 * d + d * d) + 2 * tokens * d * p * p * c
    return int(cfg["depth"] * block + outside)


def training_flops_per_sample(model: ZigMa, context_tokens: int = 77) -> int:
    return 3 * forward_flops_per_sample(model, context_tokens)
