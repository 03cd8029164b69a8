"""Randomly initialised stand-ins for the pretrained networks, written to files and loaded through the real loading
code (``zigma.metrics.load_inception`` / ``load_i3d``, ``zigma.vae.FrozenVAE``), so tests and CPU benchmarks download
nothing."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zigma.metrics.inception import INCEPTION_WEIGHTS_FILE


def write_random_inception_weights(folder: Path) -> Path:
    """A randomly initialised torch-fidelity ``FeatureExtractorInceptionV3`` state dict saved under the real file
    name (the constructor's download and weight loading are bypassed once, here)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    cls = fe.FeatureExtractorInceptionV3
    original_load, original_url = cls.load_state_dict, fe.load_state_dict_from_url
    cls.load_state_dict = lambda self, state_dict, *a, **k: None  # keep the random init
    fe.load_state_dict_from_url = lambda *a, **k: None
    try:
        net = cls("inception-v3-compat", ["2048"])
    finally:
        cls.load_state_dict, fe.load_state_dict_from_url = original_load, original_url
    path = Path(folder) / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


class TinyI3D(nn.Module):
    """StyleGAN-V's I3D call signature on a tiny random network: uint8 (B, 3, T, H, W) -> (B, 400).

    It refuses anything but the protocol's inputs (uint8, rescale=True, resize=True, return_features=True) and is
    sensitive to the order of frames (a temporal convolution), so scrambled time axes change its features.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 8, kernel_size=(2, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(8 * 4, 400)
        self.num_features = 400

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        if x.dtype != torch.uint8:
            raise RuntimeError("TinyI3D: expects uint8 clips in [0, 255]")
        if not (rescale and resize and return_features):
            raise RuntimeError("TinyI3D: the StyleGAN-V protocol calls rescale=True, resize=True, return_features=True")
        v = x.float() / 127.5 - 1  # rescale: [0, 255] -> [-1, 1]
        v = F.interpolate(v, size=(v.shape[2], 16, 16), mode="trilinear", align_corners=False)  # resize
        h = torch.tanh(self.conv(v))  # (B, 8, T-1, 16, 16): mixes neighbouring frames
        h = F.adaptive_avg_pool3d(h, (4, 1, 1)).flatten(2)  # (B, 8, 4): keeps the temporal layout
        return self.head(h.flatten(1))


def write_tiny_i3d(folder: Path) -> Path:
    """A TorchScript ``TinyI3D`` saved as ``i3d_torchscript.pt``."""
    torch.manual_seed(0)
    path = Path(folder) / "i3d_torchscript.pt"
    with warnings.catch_warnings():  # torch.jit.script is deprecated, but StyleGAN-V's I3D is a TorchScript file
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(TinyI3D().eval()).save(str(path))
    return path


def write_tiny_vae(folder: Path) -> Path:
    """A random 2-block diffusers AutoencoderKL (downsample 2, 4 latent channels) written by ``save_pretrained`` into
    ``folder``, which ``FrozenVAE(str(folder))`` loads; returns ``folder``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    model.save_pretrained(folder)
    return Path(folder)
