"""Shared test settings: make the repository importable and keep CPU tests deterministic and small."""

import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. The flag must be set before anything imports triton (the
# Lightning Trainer does), since triton.language's own @jit helpers are wrapped according to it at import time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A random 2-block diffusers AutoencoderKL (downsample 2, 4 latent channels) written by save_pretrained, so
    tests load a VAE through the real loading code without any download."""
    pytest.importorskip("diffusers", reason="FrozenVAE wraps diffusers' AutoencoderKL")
    from tests.stand_ins import write_tiny_vae

    return write_tiny_vae(tmp_path_factory.mktemp("tiny_vae"))


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights, saved as the real weights file (no download)."""
    pytest.importorskip("torch_fidelity", reason="FID's Inception comes from torch-fidelity")
    from tests.stand_ins import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="session")
def tiny_i3d_path(tmp_path_factory):
    """A TorchScript stand-in with StyleGAN-V I3D's call signature (tests.stand_ins.TinyI3D)."""
    from tests.stand_ins import write_tiny_i3d

    return write_tiny_i3d(tmp_path_factory.mktemp("i3d"))
