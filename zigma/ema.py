"""Exponential moving average of a network's weights, as a frozen copy of the network.

    θ_ema ← β_k · θ_ema + (1 − β_k) · θ          every ``update_every`` optimizer steps from ``start_step``
    β_k = decay                                   or, with warm-up,  β_k = min(decay, (1 + k) / (10 + k))

where k counts EMA updates. Buffers (e.g. random scan paths) are copied, not averaged. The copy is a plain
``nn.Module`` with ``requires_grad=False``: it follows ``.to(device)``, is saved in ``state_dict`` and gets no
optimizer state or DDP gradient sync. Sampling uses the copy directly, so the live weights are never swapped (a
checkpoint written at any moment stores raw and EMA weights in their own places).

The average always *runs* in eval mode (no drop-path, no condition dropout): calling the ``EMA`` module runs
``network`` in eval mode whatever mode it is held in, and restores that mode. The held copy follows ``train()`` /
``eval()`` like any submodule, so a LightningModule holding it is entirely in train mode at the start of training
(Lightning warns about every submodule found in eval mode then; before issue 17 the copy was pinned to eval and
the warning listed its ~90 modules). Call ``ema(...)``, not ``ema.network(...)``, to sample.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, network: nn.Module, decay: float = 0.9999, warmup: bool = False, update_every: int = 1,
                 start_step: int = 0):  # fmt: skip
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1]; got {decay!r}")
        if update_every < 1 or start_step < 0:
            raise ValueError(f"ema update_every must be >= 1 and start_step >= 0; got {update_every}, {start_step}")
        self.decay = decay
        self.warmup = warmup
        self.update_every = update_every
        self.start_step = start_step
        self.network = copy.deepcopy(network).requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        k = int(self.num_updates)
        return min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay

    def should_update(self, step: int) -> bool:
        """``step`` = optimizer steps taken so far (Lightning's ``global_step`` after the step)."""
        return step >= self.start_step and (step - self.start_step) % self.update_every == 0

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        """Blend ``network``'s parameters into the average and copy its buffers."""
        beta = self.current_decay()
        ema_params = [p for p in self.network.parameters()]
        params = [p.detach() for p in network.parameters()]
        if len(ema_params) != len(params):
            raise RuntimeError("EMA network and trained network have different parameter lists")
        floating = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        if floating:
            torch._foreach_lerp_([e for e, _ in floating], [p.to(e.dtype) for e, p in floating], 1.0 - beta)
        for e, b in zip(self.network.buffers(), network.buffers()):
            e.copy_(b)
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        """``network(*args, **kwargs)`` in eval mode; the mode it was held in is restored afterwards."""
        held = [m for m in self.network.modules() if m.training]
        for m in held:
            m.training = False
        try:
            return self.network(*args, **kwargs)
        finally:
            for m in held:
                m.training = True
