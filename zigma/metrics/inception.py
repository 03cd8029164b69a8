"""The Inception-v3 feature extractor of FID, loaded offline, and the model-space -> uint8 conversion.

:func:`load_inception` builds torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's
``FeatureExtractorInceptionV3("inception-v3-compat")``, the TF-FID weights ported to PyTorch), i.e. exactly the network
and resize of ``torchmetrics.image.fid.FrechetInceptionDistance(feature=d, feature_extractor_weights_path=...,
antialias=...)`` (reference ecosystem §2.1), so reference statistics computed here and the FID callback's features
agree. It never downloads: the weights come from ``weights_path`` or from torch hub's cache if the file is already
there, else one FileNotFoundError says where to put them. By default images are resized to 299 px by the
TF1-compatible bilinear resize, so values are comparable with published (TF-FID, torch-fidelity) numbers;
``antialias=True`` resizes with ``F.interpolate(bilinear, antialias=True)`` (torchmetrics' 1.8+ default), which gives
different values. torchmetrics/torch-fidelity are imported only when the extractor is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_NAME = "inception-v3-compat"
INCEPTION_SIZE = 299  # torch-fidelity's FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE
INCEPTION_DIM = 2048
INCEPTION_FEATURES = (64, 192, 768, 2048)  # the pool layers torch-fidelity exposes; FID uses 2048


def to_uint8(x: Tensor) -> Tensor:
    """Model-space pixels in [-1, 1] -> uint8 [0, 255]: round((x + 1) * 127.5), clamped.

    Upstream ZigMa used ``(x + 1) * 128`` (maps 1 to 256 before clamping, shifting every value up by half a level).
    """
    return ((x.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def default_weights_path() -> Path:
    """Where torch hub (and so torch-fidelity) caches the weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _missing_weights_message(where: Path, explicit: bool) -> str:
    source = "inception weights_path" if explicit else "torch hub's cache ($TORCH_HOME/hub/checkpoints)"
    return (
        f"Inception-v3 FID weights not found at {where} ({source}); they are never downloaded at run time. "
        f"On a machine with internet, fetch {INCEPTION_WEIGHTS_FILE} once (~95 MB), e.g. "
        f"`curl -L -o {INCEPTION_WEIGHTS_FILE} {INCEPTION_WEIGHTS_URL}` or "
        f"`python -c \"import torch; torch.hub.load_state_dict_from_url('{INCEPTION_WEIGHTS_URL}')\"` "
        f"(which stores it in $TORCH_HOME/hub/checkpoints), then copy it to {default_weights_path()} "
        "or pass its path as weights_path / --inception-weights."
    )


def inception_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """The weights file to load: ``weights_path``, else torch hub's cache; FileNotFoundError (saying where to put the
    file and how to get it) if it is not there."""
    explicit = weights_path is not None
    path = Path(weights_path).expanduser() if explicit else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(_missing_weights_message(path, explicit))
    return path


class InceptionFeatures(nn.Module):
    """uint8 images (N, 3, H, W) (or grayscale (N, 1, H, W), repeated to RGB) -> float32 Inception pool features
    (N, d), d = ``num_features`` (2048 for FID); frozen, eval mode. ``net`` maps uint8 (N, 3, H, W) to (N, d)."""

    def __init__(self, net: nn.Module, *, antialias: bool = False, num_features: int = INCEPTION_DIM):
        super().__init__()
        self.net = net
        self.antialias = antialias
        self.num_features = num_features  # torchmetrics reads this when the module is passed as ``feature``

    @property
    def name(self) -> str:
        """The extractor's name for statistics metadata; the resize path and feature layer are part of it."""
        layer = "" if self.num_features == INCEPTION_DIM else f"-pool{self.num_features}"
        return INCEPTION_NAME + layer + ("+antialias" if self.antialias else "")

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # always eval: batch norm must use the stored statistics

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                "InceptionFeatures: expected uint8 images (N, 3, H, W) or (N, 1, H, W), got "
                f"{images.dtype} {tuple(images.shape)}; convert model-space pixels with to_uint8"
            )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grayscale -> RGB, as PIL's convert("RGB") does
        return self.net(images).float()  # (N, d)


def load_inception(
    weights_path: str | os.PathLike | None = None,
    *,
    antialias: bool = False,
    feature: int = INCEPTION_DIM,
    device: torch.device | str | None = None,
) -> InceptionFeatures:
    """Inception-v3 of FID (``inception-v3-compat``), frozen and in eval mode.

    Args:
        weights_path: a local ``weights-inception-2015-12-05-6726825d.pth``; None uses torch hub's cache
            (``$TORCH_HOME/hub/checkpoints``) if the file is already there. Nothing is downloaded.
        antialias: resize to 299 px with ``F.interpolate(antialias=True)`` (torchmetrics' default) instead of the
            TF1-compatible resize (default; comparable with published FIDs).
        feature: the pool layer, one of 64, 192, 768, 2048 (FID: 2048; the smaller ones are for quick checks).
        device: where to put the network.
    """
    if feature not in INCEPTION_FEATURES:
        raise ValueError(f"Inception feature={feature} is not one of {INCEPTION_FEATURES}")
    path = inception_weights(weights_path)
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as err:
        raise ImportError("load_inception needs torchmetrics and torch-fidelity: pip install torch-fidelity") from err
    net = NoTrainInceptionV3(INCEPTION_NAME, [str(feature)], feature_extractor_weights_path=str(path),
                             antialias=antialias)  # fmt: skip
    net.requires_grad_(False)
    model = InceptionFeatures(net, antialias=antialias, num_features=feature).eval()
    return model.to(device) if device is not None else model
