"""The I3D video feature extractor of FVD, loaded offline from a TorchScript file (StyleGAN-V protocol).

FVD (Unterthiner et al. 2018) is the Fréchet distance between Gaussians fitted to 400-d I3D (Kinetics-400) features
of real and generated clips. We follow StyleGAN-V (``src/metrics/frechet_video_distance.py``; reference ecosystem §3):
the TorchScript port of the tf.hub I3D, ``i3d_torchscript.pt``, is called on uint8 clips ``[B, C, T, H, W]`` in
[0, 255] as ``detector(videos, rescale=True, resize=True, return_features=True)`` — the detector itself maps to
[-1, 1] and resizes to 224 px. Upstream ZigMa passed float [0, 255] with ``rescale=False, resize=False`` (reference
zigma-upstream §8), so its FVDs are not comparable; that is the bug this module exists to avoid.

Our clips are (B, T, C, H, W) end to end; :func:`to_i3d_layout` is the one place the axes become (B, C, T, H, W), by
a permutation that never mixes frames of different clips (upstream stacked decoded frames on the wrong axis).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

I3D_FILE = "i3d_torchscript.pt"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
I3D_DIM = 400
I3D_NAME = "i3d-torchscript-stylegan-v"


def to_i3d_layout(videos: Tensor) -> Tensor:
    """Clips (B, T, C, H, W) -> (B, C, T, H, W) (a permutation: clip b's frame t stays clip b's frame t)."""
    if videos.dim() != 5:
        raise ValueError(f"to_i3d_layout: expected clips (B, T, C, H, W), got shape {tuple(videos.shape)}")
    return videos.permute(0, 2, 1, 3, 4)


def _missing_detector_message(path: Path | None) -> str:
    where = "(i3d_path is not set)" if path is None else f"at {path} (i3d_path)"
    return (
        f"I3D detector for FVD not found {where}; it is never downloaded at run time. On a machine with "
        f"internet, fetch StyleGAN-V's TorchScript I3D once: `curl -L -o {I3D_FILE} '{I3D_URL}'`, copy it "
        "to this machine and pass its path as i3d_path."
    )


def i3d_file(path: str | os.PathLike | None) -> Path:
    """``path`` if it is a file, else FileNotFoundError saying where to get StyleGAN-V's I3D."""
    path = None if path is None else Path(path).expanduser()
    if path is None or not path.is_file():
        raise FileNotFoundError(_missing_detector_message(path))
    return path


class I3DFeatures(nn.Module):
    """uint8 clips (B, C, T, H, W) in [0, 255] (C = 3, or 1 repeated to RGB) -> float32 I3D features (B, 400).

    The wrapped ``detector`` is StyleGAN-V's TorchScript I3D (or anything with its call signature
    ``detector(x, rescale: bool, resize: bool, return_features: bool) -> (B, d)``).
    """

    name = I3D_NAME

    def __init__(self, detector: nn.Module, num_features: int = I3D_DIM):
        super().__init__()
        self.detector = detector
        self.num_features = num_features  # torchmetrics reads this when the module is passed as ``feature``

    def train(self, mode: bool = True) -> I3DFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, videos: Tensor) -> Tensor:
        if videos.dtype != torch.uint8 or videos.dim() != 5 or videos.shape[1] not in (1, 3):
            raise ValueError(
                "I3DFeatures: expected uint8 clips (B, C, T, H, W) with C = 3 (or 1), got "
                f"{videos.dtype} {tuple(videos.shape)}; convert (B, T, C, H, W) pixels with to_uint8 and to_i3d_layout"
            )
        if videos.shape[1] == 1:
            videos = videos.expand(-1, 3, -1, -1, -1)
        features = self.detector(videos.contiguous(), rescale=True, resize=True, return_features=True)
        if features.dim() != 2 or features.shape[0] != videos.shape[0] or features.shape[1] != self.num_features:
            raise ValueError(
                f"I3D detector returned {tuple(features.shape)}; expected ({videos.shape[0]}, {self.num_features})"
            )
        return features.float()


def load_i3d(path: str | os.PathLike, *, device: torch.device | str | None = None) -> I3DFeatures:
    """StyleGAN-V's TorchScript I3D from a local file, frozen, in eval mode (width: its ``num_features`` or 400)."""
    path = i3d_file(path)
    try:
        detector = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as err:
        raise ValueError(f"i3d_path={path} is not a TorchScript file ({str(err).splitlines()[0]})") from err
    detector.eval()
    for param in detector.parameters():
        param.requires_grad_(False)
    features = I3DFeatures(detector, num_features=int(getattr(detector, "num_features", I3D_DIM)))
    return features.to(device) if device is not None else features
