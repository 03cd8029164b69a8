"""Selective-scan backends behind one function, :func:`selective_scan`, with mamba_ssm's contract.

Backends (see :mod:`zigma.ops.reference` for the contract and formulas):

* ``torch``  – exact pure PyTorch (:mod:`zigma.ops.torch_scan`); CPU default and universal fallback.
* ``triton`` – fused Triton kernel for CUDA tensors (:mod:`zigma.ops.triton_scan`), needs ``triton``.
* ``cuda``   – mamba_ssm's compiled kernel as custom ops (:mod:`zigma.ops.cuda_scan`), only when its
  ``selective_scan_cuda`` extension imports and tensors are on CUDA.

``backend="auto"`` picks ``cuda`` if importable, else ``triton``, else ``torch`` for CUDA tensors, and ``torch``
on every other device.

Runtime guard. The first call that would run Triton on a (device, dtype) first runs :func:`zigma.ops.guard.
check_triton_scan` there: a tiny forward + backward against the torch backend. If it fails (numbers out of tolerance,
or a compile/launch error), ``auto`` warns once with the numbers and uses ``torch`` for that (device, dtype) from then
on, and an explicit ``triton`` raises :class:`ScanBackendError`. The choice for each (requested backend, device,
dtype) is made once per process and logged.

Under ``torch.compile`` the choice is made eagerly at trace time: :func:`_chosen_backend` is marked as a constant
for Dynamo (what ``torch.compiler.assume_constant_result`` does), so Dynamo calls it with the traced tensors' real
device and dtype and bakes the answer into the graph; the guard itself is never traced.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings
from typing import Literal, get_args

import torch

from zigma.ops.cuda_scan import cuda_extension, selective_scan_cuda
from zigma.ops.reference import selective_scan_ref
from zigma.ops.torch_scan import selective_scan_torch

log = logging.getLogger(__name__)

ScanBackend = Literal["auto", "torch", "triton", "cuda"]
SCAN_BACKENDS: tuple[str, ...] = get_args(ScanBackend)

__all__ = [
    "SCAN_BACKENDS",
    "ScanBackend",
    "ScanBackendError",
    "available_backends",
    "resolve_backend",
    "selective_scan",
    "selective_scan_cuda",
    "selective_scan_ref",
    "selective_scan_torch",
]


@functools.cache
def _triton_available() -> bool:
    return (
        importlib.util.find_spec("triton") is not None and importlib.util.find_spec("zigma.ops.triton_scan") is not None
    )


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this environment (``torch`` always can)."""
    device = torch.device(device)
    out = ["torch"]
    if device.type == "cuda":
        if _triton_available():
            out.append("triton")
        if cuda_extension() is not None:
            out.append("cuda")
    return out


class ScanBackendError(RuntimeError):
    """An explicitly requested scan backend failed its runtime self-check on this device and dtype."""


# (requested backend, device, dtype or None) -> backend that runs; dtype None = the device-level choice, made without
# the guard (PerformanceSwitches checks it ahead of the first step). Written by resolve_backend only.
_RESOLVED: dict[tuple[str, torch.device, torch.dtype | None], str] = {}
# (device, dtype) -> GuardResult of the Triton self-check, run at most once per process
_GUARDED: dict[tuple[torch.device, torch.dtype], object] = {}


def _device(device: torch.device | str) -> torch.device:
    """torch.device with the current index filled in for a bare ``cuda`` (the guard runs per card)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _triton_passes_guard(device: torch.device, dtype: torch.dtype):
    """The cached :class:`zigma.ops.guard.GuardResult` for (device, dtype), running the check the first time."""
    key = (device, dtype)
    if key not in _GUARDED:
        from zigma.ops.guard import check_triton_scan

        result = check_triton_scan(device, dtype)
        log.info("selective scan: Triton self-check on %s %s took %.2f s: %s", device, dtype, result.seconds,
                 result.detail)  # fmt: skip
        _GUARDED[key] = result
    return _GUARDED[key]


def _device_choice(backend: str, device: torch.device) -> str:
    """The backend before the guard: raises ValueError if ``backend`` cannot run on ``device`` at all."""
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"scan_backend={backend!r} is not one of {list(SCAN_BACKENDS)}")
    usable = available_backends(device)
    if backend == "auto":
        return next(b for b in ("cuda", "triton", "torch") if b in usable)
    if backend in usable:
        return backend
    hint = {
        "cuda": "install mamba-ssm built for this torch (requirements-gpu.txt) and use CUDA tensors",
        "triton": "install triton and use CUDA tensors",
    }[backend]
    raise ValueError(f"scan_backend={backend!r} cannot run on device {device.type!r}: {hint}; usable: {usable}")


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """Turn a requested backend into the one that will run on ``device`` for inputs of ``dtype``.

    With ``dtype`` None only availability is checked (no guard). With a dtype, a Triton choice is first checked by
    the runtime guard (see the module docstring).

    Raises:
        ValueError: ``backend`` is unknown or cannot run on the device (the message names how to install it).
        ScanBackendError: ``backend="triton"`` failed its self-check on (device, dtype).
    """
    device = _device(device)
    key = (backend, device, dtype)
    if key in _RESOLVED:
        return _RESOLVED[key]
    chosen = _device_choice(backend, device)
    if chosen == "triton" and dtype is not None:
        result = _triton_passes_guard(device, dtype)
        if not result.ok:
            what = f"the Triton selective scan failed its self-check on {device} {dtype} ({result.detail})"
            if backend == "triton":
                raise ScanBackendError(f"scan_backend='triton': {what}; use scan_backend='auto' or 'torch'")
            warnings.warn(f"{what}; using the torch backend for {device} {dtype} instead", RuntimeWarning,
                          stacklevel=2)  # fmt: skip
            chosen = "torch"
    log.info("selective scan: backend %r requested on %s %s -> using %r", backend, device, dtype or "", chosen)
    _RESOLVED[key] = chosen
    return chosen


def _chosen_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Cached :func:`resolve_backend` for a call's tensors; Dynamo runs it eagerly at trace time (see below)."""
    chosen = _RESOLVED.get((backend, device, dtype))
    return chosen if chosen is not None else resolve_backend(backend, device, dtype)


# What torch.compiler.assume_constant_result(_chosen_backend) sets (torch 2.4 to 2.14), written here because that
# function imports torch._dynamo, which `import zigma` must not (tests/test_imports.py); tests/zigma/ops/test_guard.py
# checks that the two still agree and that a compiled call resolves eagerly, at trace time, in one graph.
_chosen_backend._dynamo_marked_constant = True


def selective_scan(
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
    *,
    backend: str = "auto",
):
    """Selective scan ``(B, D, L) -> (B, D, L)`` with mamba_ssm's ``selective_scan_fn`` signature.

    See :mod:`zigma.ops.reference` for shapes and formulas; ``backend`` selects the implementation.
    """
    chosen = _chosen_backend(backend, u.device, u.dtype)
    if chosen == "cuda":
        fn = selective_scan_cuda
    elif chosen == "triton":
        from zigma.ops.triton_scan import selective_scan_triton as fn
    else:
        fn = selective_scan_torch
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
