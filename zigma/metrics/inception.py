"""The Inception-v3 feature extractor of FID, loaded offline, and the model-space -> uint8 conversion.

:func:`load_inception` wraps torch-fidelity's ``FeatureExtractorInceptionV3("inception-v3-compat")`` (the TF-FID
weights ported to PyTorch; also torchmetrics' default, reference ecosystem §2.1). It never downloads: the weights come
from ``weights_path`` or from torch hub's cache if the file is already there, else one FileNotFoundError says where to
put them. By default images are resized to 299 px by torch-fidelity's TF1-compatible bilinear resize, so values are
comparable with published (TF-FID, torch-fidelity) numbers; ``antialias=True`` resizes with
``F.interpolate(bilinear, antialias=True)`` first (torchmetrics' 1.8+ default), which gives different values.
torch-fidelity is imported only when the extractor is loaded.
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


class InceptionFeatures(nn.Module):
    """uint8 images (N, 3, H, W) -> float32 Inception pool features (N, 2048); frozen, eval mode."""

    num_features = INCEPTION_DIM  # torchmetrics reads this when the module is passed as ``feature``

    def __init__(self, net: nn.Module, *, antialias: bool = False):
        super().__init__()
        self.net = net
        self.antialias = antialias

    @property
    def name(self) -> str:
        """The extractor's name for statistics metadata; the resize path is part of it."""
        return INCEPTION_NAME + ("+antialias" if self.antialias else "")

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # always eval: batch norm must use the stored statistics

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"InceptionFeatures: expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}; "
                "convert model-space pixels with to_uint8"
            )
        if self.antialias and images.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            resized = nn.functional.interpolate(
                images.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", antialias=True
            )
            images = resized.round().clamp(0, 255).to(torch.uint8)  # at 299 px the TF resize below is the identity
        (features,) = self.net(images)  # torch-fidelity returns one tensor per requested feature
        return features.float()  # (N, 2048)


def load_inception(
    weights_path: str | os.PathLike | None = None, *, antialias: bool = False, device: torch.device | str | None = None
) -> InceptionFeatures:
    """torch-fidelity's Inception-v3 (``inception-v3-compat``, 2048-d pool features), frozen and in eval mode.

    Args:
        weights_path: a local ``weights-inception-2015-12-05-6726825d.pth``; None uses torch hub's cache
            (``$TORCH_HOME/hub/checkpoints``) if the file is already there. Nothing is downloaded.
        antialias: resize to 299 px with ``F.interpolate(antialias=True)`` (torchmetrics' default) instead of the
            TF1-compatible resize (default; comparable with published FIDs).
        device: where to put the network.
    """
    explicit = weights_path is not None
    path = Path(weights_path).expanduser() if explicit else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(_missing_weights_message(path, explicit))
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ImportError("load_inception needs torch-fidelity: pip install torch-fidelity") from err
    net = FeatureExtractorInceptionV3(INCEPTION_NAME, [str(INCEPTION_DIM)], feature_extractor_weights_path=str(path))
    model = InceptionFeatures(net, antialias=antialias).eval()
    return model.to(device) if device is not None else model
