"""Speed and memory switches for a run: gradient checkpointing, the selective-scan backend, and torch.compile.

Why in-place compile. ``torch.compile(module)`` returns an ``OptimizedModule`` wrapper that holds the network as
``_orig_mod``, so a ``FlowMatchingModule`` whose ``model`` were replaced by it would save ``model._orig_mod.*`` and
``ema.network._orig_mod.*`` keys: checkpoints would no longer load into an eager model, ``zigma.checkpoint`` or
upstream's code, and a run could not be resumed with compile switched off. ``nn.Module.compile()`` compiles the
module's own ``__call__`` instead: parameters, buffers and ``state_dict`` keys stay exactly as in eager mode.

The backbone and its EMA copy are compiled separately (training runs ``model``; validation and sampling run
``ema.network``). Compilation itself happens lazily at the first call. Every ``zigma`` scan backend (torch, triton,
and mamba-ssm's CUDA kernel wrapped in ``zigma.ops.cuda_scan``) is a custom op that Dynamo keeps whole, so a ZigMa
forward compiles as one graph; which backend runs (the Triton runtime guard included) is decided at trace time.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from zigma.ops import SCAN_BACKENDS, resolve_backend

log = logging.getLogger(__name__)

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


def _compile_backends() -> tuple[list[str], list[str]]:
    """(every registered torch.compile backend, the ones worth naming in an error: non-debug ones plus the two debug
    backends useful on CPU, ``eager`` and ``aot_eager``)."""
    shown = sorted({*torch.compiler.list_backends(), "eager", "aot_eager"})
    return sorted(torch.compiler.list_backends(exclude_tags=())), shown


class PerformanceSwitches(L.Callback):
    """Applies gradient checkpointing, a scan backend and in-place ``torch.compile`` to ``pl_module.model`` (and
    compile to ``pl_module.ema.network``) in ``setup``, before the first step.

    Args:
        compile: compile the backbone and its EMA copy in place with ``nn.Module.compile`` (see the module docstring).
        compile_mode: ``torch.compile`` mode (inductor only; ``reduce-overhead`` uses CUDA graphs); None = default.
        compile_backend: a ``torch.compiler.list_backends()`` name; ``aot_eager`` compiles without a C++ compiler.
        gradient_checkpointing: recompute every block's activations in backward (``ZigMa.use_checkpoint``);
            None leaves the model's setting alone.
        scan_backend: a ``zigma.ops`` scan backend for the backbone and the EMA copy; None leaves it alone.

    Raises:
        ValueError: for a value outside the allowed ones (the message lists them), or ``compile_mode`` without
            ``compile=True`` or with a backend other than inductor.
    """

    def __init__(
        self,
        compile: bool = False,  # shadows the builtin, which this class never uses; named after torch.compile
        compile_mode: CompileMode | None = None,
        compile_backend: str = "inductor",
        gradient_checkpointing: bool | None = None,
        scan_backend: str | None = None,
    ):
        if not isinstance(compile, bool):
            raise ValueError(f"PerformanceSwitches: compile={compile!r} must be True or False")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"PerformanceSwitches: compile_mode={compile_mode!r} is not one of {[None, *COMPILE_MODES]}"
            )
        registered, shown = _compile_backends()
        if compile_backend not in registered:
            raise ValueError(
                f"PerformanceSwitches: compile_backend={compile_backend!r} is not one of {shown} (or another name in "
                "torch.compiler.list_backends(exclude_tags=()))"
            )
        if compile_mode is not None and not compile:
            raise ValueError(
                f"PerformanceSwitches: compile_mode={compile_mode!r} has no effect with compile=False; set "
                "compile=True or drop compile_mode"
            )
        if compile_mode is not None and compile_backend != "inductor":
            raise ValueError(
                f"PerformanceSwitches: compile_mode={compile_mode!r} needs compile_backend='inductor', got "
                f"{compile_backend!r}; drop compile_mode or use inductor"
            )
        if gradient_checkpointing is not None and not isinstance(gradient_checkpointing, bool):
            raise ValueError(
                f"PerformanceSwitches: gradient_checkpointing={gradient_checkpointing!r} must be one of "
                "[None, True, False]"
            )
        if scan_backend is not None and scan_backend not in SCAN_BACKENDS:
            raise ValueError(
                f"PerformanceSwitches: scan_backend={scan_backend!r} is not one of {[None, *SCAN_BACKENDS]}"
            )
        self.compile = compile
        self.compile_mode = compile_mode
        self.compile_backend = compile_backend
        self.gradient_checkpointing = gradient_checkpointing
        self.scan_backend = scan_backend

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Apply the switches; idempotent, so the fit/validate/test/predict stages may each call it.

        Args:
            trainer: the Trainer; its strategy's root device decides whether ``scan_backend`` can run.
            pl_module: a ``zigma.flow_module.FlowMatchingModule`` (anything with ``model`` and ``ema.network``).
            stage: ``fit``, ``validate``, ``test`` or ``predict``.

        Raises:
            ValueError: if ``scan_backend`` cannot run on the Trainer's device (the dispatcher's message says why).
        """
        networks = [pl_module.model, pl_module.ema.network]
        device_type = trainer.strategy.root_device.type
        if self.scan_backend is not None:
            resolve_backend(self.scan_backend, device_type)  # fails now, not at step one, naming how to install it
            for network in networks:
                network.set_scan_backend(self.scan_backend)
        # resolve every mixer's backend eagerly: the compiled graph then reads the choice as a constant
        for backend in {block.mixer.scan_backend for network in networks for block in network.blocks}:
            resolve_backend(backend, device_type)
        if self.gradient_checkpointing is not None:
            # ZigMa checkpoints every block when this is set and gradients are on; the EMA copy never needs it
            pl_module.model.use_checkpoint = self.gradient_checkpointing
        if self.compile:
            for network in networks:
                if getattr(network, "_compiled_call_impl", None) is None:  # set by nn.Module.compile
                    network.compile(mode=self.compile_mode, backend=self.compile_backend)
        rank_zero_info(
            f"PerformanceSwitches ({stage}): compile={self.compile} (backend={self.compile_backend}, "
            f"mode={self.compile_mode}), gradient_checkpointing={pl_module.model.use_checkpoint}, "
            f"scan_backend={pl_module.model.config['scan_backend']}"
        )
