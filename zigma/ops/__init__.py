"""Selective-scan backends behind one function, :func:`selective_scan`, with mamba_ssm's contract.

Backends (see :mod:`zigma.ops.reference` for the contract and formulas):

* ``torch``  – exact pure PyTorch (:mod:`zigma.ops.torch_scan`); CPU default and universal fallback.
* ``triton`` – fused Triton kernel for CUDA tensors (:mod:`zigma.ops.triton_scan`), needs ``triton``.
* ``cuda``   – mamba_ssm's compiled kernel, only when ``mamba_ssm`` imports and tensors are on CUDA.

``backend="auto"`` picks ``cuda`` if importable, else ``triton``, else ``torch`` for CUDA tensors, and ``torch``
on every other device. The choice made for each (requested backend, device type) is logged once.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Literal, get_args

import torch

from zigma.ops.reference import selective_scan_ref
from zigma.ops.torch_scan import selective_scan_torch

log = logging.getLogger(__name__)

ScanBackend = Literal["auto", "torch", "triton", "cuda"]
SCAN_BACKENDS: tuple[str, ...] = get_args(ScanBackend)

__all__ = [
    "SCAN_BACKENDS",
    "ScanBackend",
    "available_backends",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_torch",
]


@functools.cache
def _cuda_scan_fn():
    """mamba_ssm's ``selective_scan_fn`` or None (it cannot even be imported without its CUDA extension)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, or a broken build raising at import time
        log.debug("mamba_ssm unavailable: %s", err)
        return None
    return selective_scan_fn


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
        if _cuda_scan_fn() is not None:
            out.append("cuda")
    return out


# (requested backend, device type) -> backend that runs. Filled by eager calls of resolve_backend; selective_scan only
# reads it, which torch.compile folds to a constant (tracing resolve_backend itself would graph-break on logging and
# imports, and torch.compiler.assume_constant_result would import torch._dynamo, and with it triton, at import time).
_RESOLVED: dict[tuple[str, str], str] = {}


def resolve_backend(backend: str, device_type: str) -> str:
    """Turn a requested backend into the one that will run; raises ValueError if it cannot run on the device."""
    if (backend, device_type) in _RESOLVED:
        return _RESOLVED[(backend, device_type)]
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"scan_backend={backend!r} is not one of {list(SCAN_BACKENDS)}")
    usable = available_backends(device_type)
    if backend == "auto":
        chosen = next(b for b in ("cuda", "triton", "torch") if b in usable)
    elif backend in usable:
        chosen = backend
    else:
        hint = {
            "cuda": "install mamba-ssm built for this torch (requirements-gpu.txt) and use CUDA tensors",
            "triton": "install triton and use CUDA tensors",
        }[backend]
        raise ValueError(f"scan_backend={backend!r} cannot run on device {device_type!r}: {hint}; usable: {usable}")
    log.info("selective scan: backend %r requested on %s -> using %r", backend, device_type, chosen)
    _RESOLVED[(backend, device_type)] = chosen
    return chosen


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
    chosen = _RESOLVED.get((backend, u.device.type))
    if (
        chosen is None
    ):  # first call for this (backend, device): resolve eagerly (PerformanceSwitches does it ahead of compile)
        chosen = resolve_backend(backend, u.device.type)
    if chosen == "cuda":
        fn = _cuda_scan_fn()
    elif chosen == "triton":
        from zigma.ops.triton_scan import selective_scan_triton as fn
    else:
        fn = selective_scan_torch
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
