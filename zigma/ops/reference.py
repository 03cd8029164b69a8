"""The selective-scan oracle: a plain sequential loop with mamba_ssm's ``selective_scan_ref`` semantics.

This is the specification every backend is tested against. It is slow and keeps every state for autograd,
so it is used only by tests and as the "naive loop" baseline of ``benchmarks/scan_cpu.py``.

Contract (shared by all backends, identical to ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``)::

    u, delta, z : (B, D, L)            A : (D, N) real          B, C : (B, N, L) or (B, 1, N, L)
    D, delta_bias : (D,)               out : (B, D, L) in u's dtype; last_state : (B, D, N) fp32

    Δ'_t   = softplus(Δ_t + delta_bias)  if delta_softplus  else  Δ_t + delta_bias
    h_t    = exp(Δ'_t ⊗ A) ⊙ h_{t-1} + (Δ'_t ⊙ u_t) ⊗ B_t          h_{-1} = 0   (ZOH for A, Euler for B)
    y_t    = Σ_n C_t[n] h_t[:, n] + D ⊙ u_t
    out_t  = y_t ⊙ silu(z_t)  if z is given  else  y_t
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 stays fp64 (so tests can compare in double precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Sequential reference scan (see the module docstring for shapes and formulas)."""
    dtype_in = u.dtype
    ct = compute_dtype(dtype_in)
    u, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    if B.dim() == 4:
        B = B.squeeze(1)
    if C.dim() == 4:
        C = C.squeeze(1)
    B, C = B.to(ct), C.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, _ = u.shape
    n_state = A.shape[1]
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(batch, dim, n_state)
    ys = []
    # unbind once: indexing [:, :, t] inside the loop would make autograd build a full-size zero tensor per step
    for da_t, dbu_t, c_t in zip(delta_a.unbind(2), delta_b_u.unbind(2), C.unbind(2)):
        h = da_t * h + dbu_t
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out
