"""Loading upstream ZigMa training checkpoints, and our own safetensors + JSON export for inference.

Upstream format (``train_acc.py``): ``torch.save({"model", "ema", "opt", "args", "train_steps", "best_fid"})`` with
state dicts carrying a ``module.`` prefix under DDP and ``args`` a pickled OmegaConf ``DictConfig`` of the whole
Hydra config (``args.model.params`` = the ZigMa arguments). Loading it needs ``weights_only=False`` and omegaconf;
only load files you trust.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from zigma.files import atomic_write, write_bytes_atomically
from zigma.model import ZigMa
from zigma.presets import PRESETS

log = logging.getLogger(__name__)

# The released checkpoints (Hugging Face taohu/zigma): file name -> model preset.
RELEASED_CHECKPOINTS: dict[str, str] = {
    "faceshq1024_0090000.pt": "s1024_zigzag8_b2_old",
    "landscape1024_0210000.pt": "s1024_zigzag8_b2_old",
    "churches256_0280000.pt": "zigzag8_b1_pe2",
    "zigzagN8_b1_pe2_coco14_bs48_0400000.pt": "zigzag8_b1_pe2",
}

_STRIPPED_PREFIXES = ("module.", "_orig_mod.")
WEIGHT_CHOICES = ("ema", "model")


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _STRIPPED_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key.removeprefix(prefix), True
        out[key] = value
    return out


def _plain(config: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (resolving interpolations); plain objects pass through."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:
        return config
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    return config


def _model_args_from_config(args: Any) -> dict[str, Any] | None:
    """``args.model.params`` of an upstream Hydra config (LDM-style target/params), or None."""
    args = _plain(args)
    if isinstance(args, dict):
        model = args.get("model")
        if isinstance(model, dict) and isinstance(model.get("params"), dict):
            return dict(model["params"])
    return None


def _infer_text_args(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The COCO config omits has_text: a ``blocks.*.msa.*`` key means a text model, y_embedder gives d_context."""
    if any(".msa." in key for key in state_dict) and "y_embedder.weight" in state_dict:
        return {"has_text": True, "d_context": int(state_dict["y_embedder.weight"].shape[1])}
    return {}


def _read(path_or_dict: str | os.PathLike | dict) -> tuple[dict, str | None]:
    if isinstance(path_or_dict, dict):
        return path_or_dict, None
    path = Path(path_or_dict)
    if not path.is_file():
        raise FileNotFoundError(f"upstream checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # pickled OmegaConf config inside
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"{path} pickles a {err.name} object; install it: pip install omegaconf") from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected upstream's checkpoint dict (model/ema/args), got {type(ckpt).__name__}")
    return ckpt, path.name


def load_upstream_checkpoint(
    path_or_dict: str | os.PathLike | dict,
    *,
    weights: str = "ema",
    strict: bool = True,
    **overrides: Any,
) -> ZigMa:
    """Build a ready :class:`ZigMa` (eval mode, CPU unless ``device=`` is given) from an upstream checkpoint.

    The architecture comes from the checkpoint's own config (``args.model.params``); without one, from the
    known file names of the released checkpoints. ``weights`` picks ``ema`` (what upstream samples with) or
    ``model``. ``overrides`` replace constructor arguments (e.g. ``device``, ``scan_backend``; ``drop_path_rate``
    has no effect in eval mode). Missing or unexpected keys raise a ``KeyError`` naming them unless
    ``strict=False``, which only logs them.
    """
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}; got {weights!r}")
    ckpt, filename = _read(path_or_dict)
    if weights not in ckpt:
        raise KeyError(f"checkpoint has no {weights!r} state dict; it has keys {sorted(ckpt)}")
    state_dict = _strip_prefixes(ckpt[weights])

    model_args = _model_args_from_config(ckpt.get("args"))
    if model_args is None:
        if filename not in RELEASED_CHECKPOINTS:
            raise ValueError(
                "checkpoint has no model config (args.model.params) and its file name is not one of the released "
                f"checkpoints {sorted(RELEASED_CHECKPOINTS)}: pass the architecture as keyword overrides "
                "(e.g. **zigma.PRESETS['zigzag8_b1_pe2'])"
            )
        model_args = dict(PRESETS[RELEASED_CHECKPOINTS[filename]])
    model_args = {**model_args, **_infer_text_args(state_dict), **overrides}
    model_args.pop("name", None)
    model = ZigMa(**model_args)

    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        message = f"state dict mismatch: missing keys {missing}; unexpected keys {unexpected}"
        if strict:
            raise KeyError(message)
        log.warning(message)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Our inference export: <dir>/model.safetensors + <dir>/config.json (+ <dir>/flow.json)
# ----------------------------------------------------------------------------------------------------------------

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FLOW_NAME = "flow.json"  # optional: how the model samples (transport, sampler, VAE); ``zigma sample`` reads it


def save_pretrained(model: ZigMa, directory: str | os.PathLike, *, flow: dict[str, Any] | None = None) -> Path:
    """Save weights (safetensors, persistent buffers included) and the constructor config (JSON); with ``flow``
    (plain JSON values: the transport, sampler and VAE settings of a ``FlowMatchingModule``) also ``flow.json``.
    The weights are written last, so a directory with ``model.safetensors`` is complete."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(directory / CONFIG_NAME, "w") as f:
        json.dump({"model_type": "zigma", **model.config}, f, indent=2, sort_keys=True)
    if flow is not None:
        with atomic_write(directory / FLOW_NAME, "w") as f:
            json.dump(flow, f, indent=2, sort_keys=True)
    write_bytes_atomically(directory / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    return directory


def read_flow_settings(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``flow.json`` settings of an export directory ({} when it has none: the module's defaults apply)."""
    path = Path(directory) / FLOW_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def from_pretrained(
    directory: str | os.PathLike, *, device: str | torch.device | None = None, **overrides: Any
) -> ZigMa:
    """Load a model written by :func:`save_pretrained` (eval mode)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found (expected a directory written by save_pretrained)")
    config = json.loads((directory / CONFIG_NAME).read_text())
    config.pop("model_type", None)
    model = ZigMa(**{**config, **overrides, "device": device})
    model.load_state_dict(load_file(directory / WEIGHTS_NAME, device=str(model.x_embedder.proj.weight.device)))
    return model.eval()
