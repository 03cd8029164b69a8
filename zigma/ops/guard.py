"""Runtime self-check of the Triton selective scan, run once per (device, dtype) before the first Triton call.

The Triton kernels can compile and launch on a GPU they were never run on and still return wrong numbers (or fail to
compile there). :func:`check_triton_scan` runs one tiny forward + backward through
``zigma.ops.triton_scan.selective_scan_triton`` with the default tiling and compares the output and all eight input
gradients with the ``torch`` backend (run on the CPU, on the same inputs rounded to the same dtype):

* shape (B, D, L, N) = ``GUARD_SHAPE`` = (2, 32, 160, 16): L = 160 spans three chunks of 64 (the last one partial,
  five of 32) and, at B = 2, the forward splits L across programs; D and L are multiples of 16, like the model's, so
  the kernels compiled for the check share the launcher's specialisations with a real run;
* the model's options and memory layout: D skip, SiLU(z) gate, softplus(Δ + dt bias), u contiguous, Δ and z
  channel-last views, B and C slices of one ``x_proj``-like output, S4D-real A.

Tolerances are mamba_ssm's (``tests/ops/test_selective_scan.py``), shared with ``benchmarks/check_scan_gpu.py``:
``(rtol, atol)`` per dtype for the output, scaled per gradient by :func:`gradient_tolerances`.

:mod:`zigma.ops` calls this from ``resolve_backend``, always eagerly (under ``torch.compile`` at trace time, through a
function Dynamo treats as constant), never traced; its result is cached for the process.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

# (rtol, atol) for outputs, per input dtype (mamba_ssm tests/ops/test_selective_scan.py)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (6e-4, 2e-3),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (3e-2, 5e-2),
}
WEIGHT_TOLERANCE = (1e-3, 1e-3)  # weight gradients; raised to the input tolerances when z is used
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
GUARD_SHAPE = (2, 32, 160, 16)  # (B, D, L, N)


def gradient_tolerances(dtype: torch.dtype, has_z: bool) -> dict[str, tuple[float, float]]:
    """(rtol, atol) per input gradient, as mamba_ssm's test scales them: du ×2, dΔ ×5/×10, dA atol ×5, the weight
    gradients (dA, dD, d bias; dz in fp32) at ``WEIGHT_TOLERANCE`` raised to the input tolerance when z is used."""
    rtol, atol = TOLERANCES[dtype]
    rtol_w, atol_w = (max(WEIGHT_TOLERANCE[0], rtol), max(WEIGHT_TOLERANCE[1], atol)) if has_z else WEIGHT_TOLERANCE
    return {
        "u": (2 * rtol, 2 * atol),
        "delta": (5 * rtol, 10 * atol),
        "A": (rtol_w, 5 * atol_w),
        "B": (rtol, atol),
        "C": (rtol, atol),
        "D": (rtol_w, atol_w),
        "z": (rtol_w, atol_w) if dtype == torch.float32 else (rtol, atol),
        "delta_bias": (rtol_w, atol_w),
    }


@dataclass(frozen=True)
class GuardResult:
    """Outcome of one self-check: ``ok``; ``detail`` = the worst mismatch with its numbers, or the error's first
    line; ``seconds`` = wall time of the check (kernel compilation included on a cold cache)."""

    ok: bool
    detail: str
    seconds: float


def guard_inputs(device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """u, Δ, A, B, C, D, z, dt bias at ``GUARD_SHAPE``, laid out as ``zigma/mamba.py`` passes them (drawn on the CPU,
    then moved, so every device sees the same numbers)."""
    batch, dim, seqlen, dstate = GUARD_SHAPE
    gen = torch.Generator().manual_seed(seed)
    rank = 16  # dt_rank: R + 2N = 48 keeps the B/C strides multiples of 16, as at the model's R = 48

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype)

    u = randn(batch, dim, seqlen)
    delta = randn(batch, seqlen, dim, scale=0.5).transpose(1, 2)
    x_dbl = randn(batch, seqlen, rank + 2 * dstate)
    B = x_dbl[..., rank : rank + dstate].transpose(1, 2)
    C = x_dbl[..., rank + dstate :].transpose(1, 2)
    A = -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1)
    D = torch.randn(dim, generator=gen)
    z = randn(batch, seqlen, dim).transpose(1, 2)
    dt = torch.exp(torch.rand(dim, generator=gen) * math.log(100.0) + math.log(1e-3))  # dt in [1e-3, 0.1]
    bias = dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt)
    # .to(device) keeps the strides of these dense views on any device
    return [x.to(device) for x in (u, delta, A, B, C, D, z, bias)]


def _forward_backward(fn, inputs, grad):
    """out and the gradients of every input for one call of ``fn`` with softplus, on fresh leaves."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]  # clone keeps the strides of dense views
    out = fn(*leaves, delta_softplus=True)
    out.backward(grad)
    return [out.detach()] + [x.grad for x in leaves]


def _worst_mismatch(actual, expected, dtype) -> str | None:
    """None if every tensor is within its tolerance, else the first failing one with its max abs/rel error."""
    tolerances = {"out": TOLERANCES[dtype], **gradient_tolerances(dtype, has_z=True)}
    for name, a, e in zip(("out", *(f"d{n}" for n in NAMES)), actual, expected):
        rtol, atol = tolerances[name.removeprefix("d") if name != "out" else name]
        a, e = a.detach().float().cpu(), e.detach().float().cpu()
        if a.shape != e.shape:
            return f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if not torch.isfinite(a).all():
            return f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values"
        close = torch.isclose(a, e, rtol=rtol, atol=atol)
        if not close.all():
            diff = (a - e).abs()
            rel = diff / e.abs().clamp_min(atol)
            return (
                f"{name}: max abs err {diff.max().item():.3e}, max rel err {rel.max().item():.3e} "
                f"({int((~close).sum())} of {close.numel()} outside rtol {rtol:g}, atol {atol:g})"
            )
    return None


def check_triton_scan(device: torch.device | str, dtype: torch.dtype) -> GuardResult:
    """Run the Triton scan once forward + backward on ``device`` in ``dtype`` and compare with the torch backend.

    Never raises for a kernel problem: an exception from compiling or launching becomes ``ok=False`` with its
    first line. Grad mode, inference mode and autocast of the caller do not leak in.
    """
    from zigma.ops.torch_scan import selective_scan_torch

    device = torch.device(device)
    start = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad(), _no_autocast():
        inputs = guard_inputs(device, dtype)
        grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        expected = _forward_backward(selective_scan_torch, [x.cpu() for x in inputs], grad)
        try:
            from zigma.ops import triton_scan

            actual = _forward_backward(triton_scan.selective_scan_triton, inputs, grad.to(device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as err:  # compile, launch or shape errors: any of them disqualifies the kernel
            first_line = (str(err).strip().splitlines() or [""])[0]
            return GuardResult(False, f"{type(err).__name__}: {first_line}", time.perf_counter() - start)
    mismatch = _worst_mismatch(actual, expected, dtype)
    return GuardResult(mismatch is None, mismatch or "ok", time.perf_counter() - start)


@contextlib.contextmanager
def _no_autocast():
    """Autocast off on the CPU and, where there is one, the GPU: the torch backend must compute in fp32 here."""
    with contextlib.ExitStack() as stack:
        for kind in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            stack.enter_context(torch.autocast(kind, enabled=False))
        yield
