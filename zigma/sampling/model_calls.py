"""How the samplers call the network: a counted, checked ``model_fn(x, t, **cond)`` with t a (B,) tensor."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ModelFn = Callable[..., Tensor]


def time_dtype(x: Tensor) -> torch.dtype:
    """Times are float32 (float64 for float64 states) even when x is half precision."""
    return torch.promote_types(x.dtype, torch.float32)


def batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """A scalar time as a (B,) tensor on x's device."""
    t = torch.as_tensor(t, dtype=time_dtype(x), device=x.device)
    return t.reshape(1).expand(x.shape[0]).contiguous()


class ModelCaller:
    """Calls ``model_fn(x, t, **cond)``, counts the calls and rejects wrong shapes and non-finite outputs."""

    def __init__(self, model_fn: ModelFn, cond: dict, where: str):
        self.model_fn = model_fn
        self.cond = cond
        self.where = where
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor, step: int) -> Tensor:
        """Model output (B, *S) at x (B, *S), t (B,); ``step`` is only used in the error message."""
        out = self.model_fn(x, t, **self.cond)
        self.nfe += 1
        if out.shape != x.shape:
            raise ValueError(f"{self.where}: model output has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(
                f"{self.where}: model output is not finite at step {step}, t={float(t[0]):.6g} "
                f"(model evaluation {self.nfe})"
            )
        return out
