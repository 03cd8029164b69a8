"""The Mamba-1 mixer with mamba_ssm's parameter names, shapes and initialisation (checkpoint-compatible).

``MambaMixer`` maps (B, L, D) -> (B, L, D) along the sequence order it is given:

    x, z   = split(in_proj(h))                          (B, L, E) each, E = expand·D
    x      = silu(causal_depthwise_conv_k4(x))
    Δ, B, C = split(x_proj(x))  ;  Δ = dt_proj.weight @ Δ  (bias enters the scan as softplus(Δ + dt_proj.bias))
    y      = selective_scan(x, Δ, A = -exp(A_log), B, C, D, z)       (zigma.ops; gate silu(z) fused)
    out    = out_proj(y)

``bidirectional=True`` is upstream's ``v2`` (Vision-Mamba "bimamba v2"): a second parameter set (``*_b``) scans
the flipped sequence (z flipped too) and the two gated outputs are **summed** (no ½) before the shared out_proj.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zigma.ops import selective_scan


def _dt_bias_init(d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None) -> torch.Tensor:
    """softplus⁻¹(dt) with dt = exp(U[ln dt_min, ln dt_max]) clamped at dt_init_floor."""
    dt = torch.exp(torch.rand(d_inner, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def causal_depthwise_conv(x: torch.Tensor, conv1d: nn.Conv1d) -> torch.Tensor:
    """Mamba's causal depthwise conv along the tokens: (B, L, E) -> (B, L, E), i.e.
    ``conv1d(x.transpose(1, 2))[..., :L].transpose(1, 2)`` for ``conv1d`` = Conv1d(E, E, K, groups=E, padding=K-1).

    On CPU it runs as K shifted multiply-adds in the token-major layout the projections use,

        y_t = bias + Σ_{k<K} w[:, k] ⊙ x_{t-K+1+k}        (x_s = 0 for s < 0),

    which is ~2x faster than ``nn.Conv1d`` for forward + backward at the quickstart's sizes (its depthwise backward
    is slow on CPU; ``benchmarks/profile_cpu.py``) and needs no transposes. The same up to rounding order (the sum
    over k). Other devices run ``conv1d`` itself.
    """
    seqlen, k = x.shape[1], conv1d.kernel_size[0]
    if x.device.type != "cpu":
        return conv1d(x.transpose(1, 2))[..., :seqlen].transpose(1, 2)
    weight = conv1d.weight[:, 0, :]  # (E, K)
    padded = F.pad(x, (0, 0, k - 1, 0))  # (B, K-1+L, E)
    if conv1d.bias is not None:
        y = torch.addcmul(conv1d.bias, padded[:, :seqlen], weight[:, 0])
    else:
        y = padded[:, :seqlen] * weight[:, 0]
    for i in range(1, k):
        y = torch.addcmul(y, padded[:, i : i + seqlen], weight[:, i])
    return y


class MambaMixer(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        bidirectional: bool = False,
        scan_backend: str = "auto",
        backward_dt_bias_reinit: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant'; got {dt_init!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.bidirectional = bidirectional
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = self._ssm_parameters(
            d_conv, conv_bias, dt_init, dt_scale, dt_min, dt_max, dt_init_floor, factory, mark_dt_bias=True
        )
        if bidirectional:
            # Upstream leaves dt_proj_b.bias unmarked, so the model-level init zeroes it (softplus(0) ≈ 0.69):
            # reproduced by default; backward_dt_bias_reinit=False keeps the log-uniform init instead.
            self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = self._ssm_parameters(
                d_conv, conv_bias, dt_init, dt_scale, dt_min, dt_max, dt_init_floor, factory,
                mark_dt_bias=not backward_dt_bias_reinit,
            )  # fmt: skip
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _ssm_parameters(
        self, d_conv, conv_bias, dt_init, dt_scale, dt_min, dt_max, dt_init_floor, factory, mark_dt_bias
    ):
        e, device = self.d_inner, factory["device"]
        conv1d = nn.Conv1d(e, e, kernel_size=d_conv, groups=e, padding=d_conv - 1, bias=conv_bias, **factory)
        x_proj = nn.Linear(e, self.dt_rank + 2 * self.d_state, bias=False, **factory)
        dt_proj = nn.Linear(self.dt_rank, e, bias=True, **factory)
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(dt_proj.weight, std)
        else:
            nn.init.uniform_(dt_proj.weight, -std, std)
        with torch.no_grad():
            dt_proj.bias.copy_(_dt_bias_init(e, dt_min, dt_max, dt_init_floor, device))
        dt_proj.bias._no_reinit = mark_dt_bias
        # S4D-real: A = -[1..N] per channel, kept in fp32 and free of weight decay
        a_log = nn.Parameter(
            torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)).repeat(e, 1)
        )
        a_log._no_weight_decay = True
        d_skip = nn.Parameter(torch.ones(e, device=device))
        d_skip._no_weight_decay = True
        return conv1d, x_proj, dt_proj, a_log, d_skip

    def _scan_branch(self, x, z, conv1d, x_proj, dt_proj, a_log, d_skip):
        """x, z (B, L, E) in scan order -> gated scan output (B, L, E)."""
        x = F.silu(causal_depthwise_conv(x, conv1d))  # (B, L, E)
        x_dbl = F.linear(x, x_proj.weight)  # (B, L, R + 2N)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight)  # (B, L, E); the bias goes into the scan's softplus
        delta_bias, softplus = dt_proj.bias.float(), True
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            # Δ' = softplus(Δ + bias) once, here: the torch scan (the only CPU backend) would compute it in forward
            # and again in backward, and CPU softplus is as slow as ~10 of the scan's block products. The same
            # numbers (the scan adds and softplus-es in fp32 too; its backward applies softplus_backward alike).
            # Eager only: compiled (aot_eager), the gradient's strides out of the scan op's permuted view differ
            # from the traced ones and the linear's backward view fails (tests/zigma/test_compile.py).
            delta, delta_bias, softplus = F.softplus(delta + delta_bias), None, False
        y = selective_scan(
            x.transpose(1, 2),
            delta.transpose(1, 2),
            -torch.exp(a_log.float()),
            b.transpose(1, 2),
            c.transpose(1, 2),
            d_skip.float(),
            z=z.transpose(1, 2),
            delta_bias=delta_bias,
            delta_softplus=softplus,
            backend=self.scan_backend,
        )
        return y.transpose(1, 2)

    def forward(self, hidden: torch.Tensor, gather: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, L, D) -> (B, L, D).

        ``gather=(path, inverse)`` reproduces upstream's fused variant: permute the projected ``xz`` (2E channels)
        into scan order and the output rows back. It equals ``mixer(h[:, path])[:, inverse]`` exactly, which is what
        :class:`zigma.scan.LayerScan` does with half the gather traffic.
        """
        xz = self.in_proj(hidden)
        if gather is not None:
            xz = xz[:, gather[0]]
        x, z = xz.chunk(2, dim=-1)
        y = self._scan_branch(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        if self.bidirectional:
            y_b = self._scan_branch(
                x.flip(1), z.flip(1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
            )
            y = y + y_b.flip(1)
        out = self.out_proj(y)
        return out if gather is None else out[:, gather[1]]
