"""The ``cuda`` backend: mamba_ssm's compiled selective scan (``selective_scan_cuda``) as ``torch.library`` custom ops.

mamba_ssm's ``selective_scan_fn`` is an ``autograd.Function`` around a pybind11 extension that Dynamo cannot trace, so
``torch.compile`` breaks the graph at every scan. Here the extension's two entry points become custom ops with fake
(meta) implementations and an autograd registration, so a model on this backend compiles as one graph:

* ``zigma::selective_scan_cuda_fwd(u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus)
  -> (out_z, last_state, x, out)``: ``selective_scan_cuda.fwd`` returns ``out`` (B, D, L) before the gate, ``x``
  (B, D, ceil(L / 2048), 2N) fp32 chunk (product, state) pairs, and with z the gated ``out_z``; the last state is
  ``x[:, :, -1, 1::2]`` (B, D, N). Without z, ``out_z`` is ``out`` and the fourth output an empty placeholder
  (backward reads the ungated ``out`` only with z).
* ``zigma::selective_scan_cuda_bwd(dout, u, delta, A, B, C, D?, z?, delta_bias?, x, out, delta_softplus)
  -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``: ``selective_scan_cuda.bwd(u, delta, A, B, C, D, z, delta_bias,
  dout, x, out, None, delta_softplus, False)``; absent D, z, delta_bias get empty (0,) gradients.

Both follow ``mamba_ssm.ops.selective_scan_interface.SelectiveScanFn`` (2.x): inputs made unit-stride along L, B and C
as (B, G, N, L). Every output is returned contiguous and in its input's dtype so that the fake implementations state
the real layouts. The extension is imported on first use only: ``import zigma`` never needs mamba_ssm.
"""

from __future__ import annotations

import functools
import importlib

import torch


@functools.cache
def cuda_extension():
    """mamba_ssm's compiled ``selective_scan_cuda`` module, or None where it does not import (none, ABI mismatch)."""
    try:
        return importlib.import_module("selective_scan_cuda")
    except Exception:  # ImportError, or an undefined-symbol OSError/ImportError of a build for another torch
        return None


def _unit_last_stride(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _grouped(x: torch.Tensor) -> torch.Tensor:
    """B or C as (B, G, N, L), the layout the extension takes for input-dependent B/C."""
    return x.unsqueeze(1) if x.dim() == 3 else x


def _n_chunks(seqlen: int) -> int:
    return (seqlen + 2047) // 2048  # the extension's chunk length along L


_FWD_SCHEMA = (
    "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
    "bool delta_softplus) -> (Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
    "Tensor x, Tensor out, bool delta_softplus) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("zigma::selective_scan_cuda_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("zigma::selective_scan_cuda_fwd: mamba_ssm's selective_scan_cuda extension does not import")
    out, x, *rest = ext.fwd(
        _unit_last_stride(u), _unit_last_stride(delta), A, _grouped(_unit_last_stride(B)),
        _grouped(_unit_last_stride(C)), D.contiguous() if D is not None else None, _unit_last_stride(z),
        delta_bias, delta_softplus,
    )  # fmt: skip
    out = out.to(u.dtype).contiguous()
    last_state = x[:, :, -1, 1::2].contiguous()
    if z is None:  # backward needs the ungated out only with z: return an empty placeholder, no copy
        return out, last_state, x.contiguous(), u.new_empty(0)
    return rest[0].to(u.dtype).contiguous(), last_state, x.contiguous(), out


@_fwd.register_fake
def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    return (
        u.new_empty(batch, dim, seqlen),
        u.new_empty(batch, dim, dstate, dtype=torch.float32),
        u.new_empty(batch, dim, _n_chunks(seqlen), 2 * dstate, dtype=torch.float32),
        u.new_empty(batch, dim, seqlen) if z is not None else u.new_empty(0),
    )


@torch.library.custom_op("zigma::selective_scan_cuda_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _bwd(dout, u, delta, A, B, C, D, z, delta_bias, x, out, delta_softplus):
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("zigma::selective_scan_cuda_bwd: mamba_ssm's selective_scan_cuda extension does not import")
    du, ddelta, dA, dB, dC, dD, dbias, *rest = ext.bwd(
        _unit_last_stride(u), _unit_last_stride(delta), A, _grouped(_unit_last_stride(B)),
        _grouped(_unit_last_stride(C)), D.contiguous() if D is not None else None, _unit_last_stride(z), delta_bias,
        _unit_last_stride(dout), x, out if z is not None else None, None, delta_softplus, False,
    )  # fmt: skip
    return (
        du.to(u.dtype).contiguous(),
        ddelta.to(delta.dtype).contiguous(),
        dA.to(A.dtype).contiguous(),
        dB.reshape(B.shape).to(B.dtype).contiguous(),
        dC.reshape(C.shape).to(C.dtype).contiguous(),
        dD.to(D.dtype).contiguous() if D is not None else A.new_empty(0),  # outputs must not alias: one each
        rest[0].to(z.dtype).contiguous() if z is not None else u.new_empty(0),
        dbias.to(delta_bias.dtype).contiguous() if delta_bias is not None else A.new_empty(0),
    )


@_bwd.register_fake
def _bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, x, out, delta_softplus):
    return (
        u.new_empty(u.shape),
        delta.new_empty(delta.shape),
        A.new_empty(A.shape),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        D.new_empty(D.shape) if D is not None else A.new_empty(0),
        z.new_empty(z.shape) if z is not None else u.new_empty(0),
        delta_bias.new_empty(delta_bias.shape) if delta_bias is not None else A.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    _, last_state, x, out = output
    ctx.mark_non_differentiable(last_state, x, out)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout, _d_last_state, _d_x, _d_out):
    u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
    grads = _bwd(dout, u, delta, A, B, C, D, z, delta_bias, x, out, ctx.delta_softplus)
    du, ddelta, dA, dB, dC, dD, dz, dbias = grads
    present = (D is not None, z is not None, delta_bias is not None)
    return (du, ddelta, dA, dB, dC, *(g if p else None for g, p in zip((dD, dz, dbias), present)), None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_cuda(
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
    """mamba_ssm's compiled selective scan with ``selective_scan_fn``'s contract (see :mod:`zigma.ops.reference`):
    u, delta, z (B, D, L); A (D, N) real; B, C (B, N, L) or (B, G, N, L); D, delta_bias (D,). Returns out (B, D, L)
    contiguous, and with ``return_last_state`` also the last state (B, D, N) fp32 (no gradient flows through it)."""
    out_z, last_state, _, _ = _fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (out_z, last_state) if return_last_state else out_z
