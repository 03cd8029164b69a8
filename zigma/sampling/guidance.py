"""Classifier-free guidance around a network called as ``model_fn(x, t, y=None, drop_cond=None, **cond)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zigma.sampling.model_calls import ModelFn


def classifier_free_guidance(model_fn: ModelFn, scale: float) -> ModelFn:
    """Wrap ``model_fn`` with classifier-free guidance: out = out_u + scale (out_c - out_u) (Ho & Salimans 2022).

    For scale != 1 the returned function makes ONE batched call
    ``model_fn(cat[x, x], cat[t, t], y=cat[y, y], drop_cond=cat[zeros(B), ones(B)], **cond)``: the first half is
    conditional, the second uses the model's null class / null text (``drop_cond`` True). Guidance applies to every
    channel, and to the model's own prediction (velocity, score and noise are affine in each other at fixed (x, t),
    so guiding any of them guides the others identically). For scale == 1 it calls ``model_fn(x, t, y=y, **cond)``.

    Args:
        model_fn: ``model_fn(x, t, y=None, drop_cond=None, **cond)`` with x (B, *S), t (B,), y class ids (B,) or
            text features (B, N, d), drop_cond (B,) bool.
        scale: guidance scale w; 1 = conditional, 0 = unconditional.
    Returns: ``guided(x, t, y=None, **cond)`` returning (B, *S). Other keyword arguments are passed unchanged to the
        doubled batch, so they must not be per-sample tensors.
    Raises:
        ValueError: (when called) for scale != 1 without ``y`` or with a ``drop_cond`` of its own; (here) for a
            non-finite scale.
    """
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite number")

    def guided(x: Tensor, t: Tensor, y: Tensor | None = None, **cond) -> Tensor:
        if scale == 1:
            return model_fn(x, t, y=y, **cond)
        if y is None:
            raise ValueError(f"classifier_free_guidance(scale={scale}) needs the condition y; got y=None")
        if "drop_cond" in cond:
            raise ValueError("classifier_free_guidance sets drop_cond itself; do not pass it")
        batch = x.shape[0]
        drop = torch.cat(
            [
                torch.zeros(batch, dtype=torch.bool, device=x.device),
                torch.ones(batch, dtype=torch.bool, device=x.device),
            ]
        )
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, y]), drop_cond=drop, **cond)
        out_c, out_u = out[:batch], out[batch:]
        return out_u + scale * (out_c - out_u)

    return guided
