"""A ready-to-sample ``FlowMatchingModule`` from a checkpoint alone, whichever of three kinds it is.

- a Lightning ``.ckpt`` of ``zigma fit``: the module is rebuilt from the saved hyper-parameters (transport, sampler,
  VAE) and the architecture recorded beside the weights; sampling uses its EMA weights (``weights="model"``: the
  live ones);
- an export directory (``zigma export``: ``model.safetensors`` + ``config.json`` + ``flow.json``);
- an upstream ZigMa ``.pt`` (``zigma.checkpoint.load_upstream_checkpoint``; pickled, so trusted files only), which
  samples with the module's default transport (SiT's Linear path, velocity prediction, as upstream trained).

The chosen weights always sit in ``module.ema.network``, the network ``generate`` samples with.
"""

from __future__ import annotations

import hashlib
import inspect
import pickle
from pathlib import Path
from typing import Any

import torch

from zigma.checkpoint import (
    CONFIG_NAME,
    WEIGHT_CHOICES,
    WEIGHTS_NAME,
    from_pretrained,
    load_upstream_checkpoint,
    read_flow_settings,
)
from zigma.flow_module import FlowMatchingModule

# FlowMatchingModule settings that change what a trained network samples (kept by ``zigma export`` in flow.json)
INFERENCE_SETTINGS = (
    "path_type", "prediction", "loss_weight", "train_eps", "sample_eps", "sample_mode", "sample_method",
    "sample_steps", "guidance_scale", "sample_seed", "atol", "rtol", "diffusion_form", "diffusion_norm", "last_step",
    "last_step_size", "vae", "vae_subfolder", "vae_scale", "vae_dtype", "vae_local_files_only",
)  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that cannot be sampled or exported as asked; one line."""


def open_checkpoint(source: str | Path) -> tuple[str, dict[str, Any] | None]:
    """(kind, checkpoint): ``("export", None)`` for a directory with config.json + model.safetensors,
    ``("lightning", dict)`` for a file with ``state_dict`` and ``hyper_parameters`` (loaded memory-mapped, once), and
    ``("upstream", None)`` for any other file."""
    path = Path(source)
    if path.is_dir():
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path} is a directory without {' and '.join(missing)}: expected a `zigma export` "
                                  "directory, a Lightning .ckpt or an upstream .pt")  # fmt: skip
        return "export", None
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a Lightning .ckpt, a `zigma export` directory or an upstream .pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError):
        return "upstream", None  # pickles objects (upstream's OmegaConf config), or not a zip archive
    if isinstance(ckpt, dict) and "state_dict" in ckpt and "hyper_parameters" in ckpt:
        return "lightning", ckpt
    return "upstream", None


def lightning_state(ckpt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(module hyper-parameters this version knows, recorded backbone config, state dict) of a Lightning ckpt."""
    known = inspect.signature(FlowMatchingModule.__init__).parameters
    hparams = {k: v for k, v in dict(ckpt["hyper_parameters"]).items() if k in known and k != "self"}
    recorded = dict((ckpt.get("zigma") or {}).get("config") or {})
    return hparams, recorded, ckpt["state_dict"]


def network_weights(state_dict: dict[str, torch.Tensor], weights: str, path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone's state dict of a Lightning checkpoint: ``ema.network.*`` or ``model.*``.

    Raises:
        CheckpointError: ``weights="ema"`` but the checkpoint has no EMA average (no ``ema.*`` keys, or no EMA update
            yet: the copy still holds the initial weights).
    """
    if weights not in WEIGHT_CHOICES:
        raise CheckpointError(f"--weights {weights!r}: choose one of {', '.join(WEIGHT_CHOICES)}")
    if weights == "ema":
        updates = state_dict.get("ema.num_updates")
        if updates is None or int(updates) == 0:
            why = "no EMA weights" if updates is None else "an EMA that was never updated (ema.num_updates = 0)"
            raise CheckpointError(f"{path} has {why}; pass --weights model to use the live weights")
    prefix = "ema.network." if weights == "ema" else "model."
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}


def weights_fingerprint(network: torch.nn.Module) -> str:
    """sha256 of the network's state dict (names, dtypes, shapes, bytes): identifies the weights samples came from."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def load_sampling_module(source: str | Path, *, weights: str = "ema", vae: str | None = None,
                         lightning_only: bool = False) -> FlowMatchingModule:  # fmt: skip
    """A ``FlowMatchingModule`` (eval mode, CPU) sampling with the chosen weights of ``source``; ``vae`` replaces the
    checkpoint's VAE setting (loaded on first use); ``lightning_only``: refuse an export or upstream file.

    Raises:
        CheckpointError, FileNotFoundError, KeyError: one line naming the checkpoint.
    """
    kind, ckpt = open_checkpoint(source)
    if lightning_only and kind != "lightning":
        raise CheckpointError(f"{source} is not a Lightning checkpoint of `zigma fit` (it looks like an "
                              f"{'export directory' if kind == 'export' else 'upstream .pt'})")  # fmt: skip
    settings: dict[str, Any]
    if kind == "lightning":
        hparams, recorded, state = lightning_state(ckpt)
        net = {**(hparams.pop("net", None) or {}), **recorded}
        settings, network_state = hparams, network_weights(state, weights, source)
    elif kind == "export":
        if weights != "ema":
            raise CheckpointError(f"{source} is an export (one set of weights): --weights does not apply")
        network = from_pretrained(source)
        net, settings, network_state = dict(network.config), read_flow_settings(source), network.state_dict()
    else:
        network = load_upstream_checkpoint(source, weights=weights)
        net, settings, network_state = dict(network.config), {}, network.state_dict()
    if vae is not None:
        settings["vae"] = vae
    module = FlowMatchingModule(**{**settings, "net": net})
    missing, unexpected = module.ema.network.load_state_dict(network_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: the weights do not fit the recorded architecture (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")  # fmt: skip
    return module.eval()


def inference_settings(module: FlowMatchingModule) -> dict[str, Any]:
    """The module's :data:`INFERENCE_SETTINGS` as plain JSON values (``flow.json`` of an export)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in module.hparams.items() if k in INFERENCE_SETTINGS}
