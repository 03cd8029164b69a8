"""FrozenVAE on a tiny random AutoencoderKL saved to tmp_path and loaded through the real loading code."""

import copy
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from zigma.vae import SD_LATENT_SCALE, FrozenVAE

pytest.importorskip("diffusers", reason="FrozenVAE wraps diffusers' AutoencoderKL")

LATENT_CHANNELS = 4
CLOSE = dict(rtol=1e-5, atol=1e-5)  # same maths, different batch splits: oneDNN may reorder sums


@pytest.fixture(scope="module")
def vae_dir(tiny_vae_dir):
    """The shared random AutoencoderKL of tests/conftest.py (downsample factor 2, 4 latent channels)."""
    return tiny_vae_dir


@pytest.fixture(scope="module")
def vae(vae_dir):
    return FrozenVAE(str(vae_dir), chunk_size=4)


def images(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vae_import_does_not_import_diffusers():
    code = (
        "import sys, zigma, zigma.vae\nassert 'diffusers' not in sys.modules\nassert 'lightning' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_vae_loads_from_saved_directory(vae_dir, vae):
    assert (vae_dir / "config.json").is_file()
    assert vae.latent_channels == LATENT_CHANNELS
    assert vae.downsample_factor == 2
    assert vae.scale == SD_LATENT_SCALE
    assert vae.device == torch.device("cpu") and vae.dtype == torch.float32
    assert "FrozenVAE(" in repr(vae)


def test_vae_loads_from_subfolder(vae_dir):
    vae = FrozenVAE(str(vae_dir.parent), subfolder=vae_dir.name)
    assert vae.latent_channels == LATENT_CHANNELS and vae.config()["subfolder"] == vae_dir.name


def test_vae_uncached_hub_id_raises_with_download_instructions():
    with pytest.raises(FileNotFoundError) as info:
        FrozenVAE("zigma-tests/no-such-vae")  # local_files_only=True: the hub is never contacted
    message = str(info.value)
    assert "name_or_path='zigma-tests/no-such-vae'" in message
    assert "local_files_only=True" in message
    assert "hf download zigma-tests/no-such-vae" in message
    assert "save_pretrained" in message


def test_vae_missing_or_invalid_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        FrozenVAE(str(tmp_path / "nowhere" / "vae"))
    with pytest.raises(FileNotFoundError, match="not a diffusers AutoencoderKL directory"):
        FrozenVAE(str(tmp_path))  # exists, but holds no config.json


def test_vae_is_frozen_and_never_a_submodule(vae):
    assert not isinstance(vae, torch.nn.Module)
    assert all(not p.requires_grad for p in vae._vae.parameters())
    assert not vae._vae.training
    x = images(2, 3, 16, 16).requires_grad_(True)
    z = vae.encode(x)
    assert not z.requires_grad and not vae.decode(z).requires_grad

    holder = torch.nn.Linear(2, 2)
    holder.vae = vae  # a plain attribute: not in modules(), parameters() or the state dict
    assert len(list(holder.modules())) == 1
    assert set(holder.state_dict()) == {"weight", "bias"}
    clone = copy.deepcopy(holder)  # what AveragedModel does to a LightningModule
    assert clone.vae is vae and copy.copy(vae) is vae


def test_vae_encode_decode_image_shapes(vae):
    x = images(5, 3, 16, 16)
    z = vae.encode(x)
    assert z.shape == (5, LATENT_CHANNELS, 8, 8) and z.dtype == torch.float32
    out = vae.decode(z)
    assert out.shape == (5, 3, 16, 16) and out.dtype == torch.float32
    mean, std = vae.encode_moments(images(2, 3, 32, 32))
    assert mean.shape == std.shape == (2, LATENT_CHANNELS, 16, 16) and bool((std > 0).all())


def test_vae_decode_output_is_clamped(vae):
    out = vae.decode(50 * torch.randn(3, LATENT_CHANNELS, 8, 8))  # far outside the latent range
    assert out.min() >= -1 and out.max() <= 1
    assert bool((out.abs() == 1).any())  # the clamp was needed


def test_vae_video_frames_coded_independently(vae):
    videos = images(2, 3, 3, 16, 16)  # (B, T, 3, H, W)
    mean, std = vae.encode_moments(videos)
    assert mean.shape == (2, 3, LATENT_CHANNELS, 8, 8)
    frame_mean, frame_std = vae.encode_moments(videos.reshape(6, 3, 16, 16))
    torch.testing.assert_close(mean, frame_mean.reshape(2, 3, LATENT_CHANNELS, 8, 8), **CLOSE)
    torch.testing.assert_close(std, frame_std.reshape(2, 3, LATENT_CHANNELS, 8, 8), **CLOSE)
    for b in range(2):
        for t in range(3):  # each frame alone gives the same latents
            single, _ = vae.encode_moments(videos[b, t : t + 1])
            torch.testing.assert_close(mean[b, t], single[0], **CLOSE)

    changed = videos.clone()
    changed[1] = images(3, 3, 16, 16, seed=1)  # replace video 1 only: video 0's latents must not move
    changed_mean, _ = vae.encode_moments(changed)
    torch.testing.assert_close(changed_mean[0], mean[0], **CLOSE)
    assert not torch.allclose(changed_mean[1], mean[1])

    decoded = vae.decode(vae.encode(videos))
    assert decoded.shape == videos.shape
    frames = vae.decode(vae.scale_latents(frame_mean))
    torch.testing.assert_close(vae.decode(vae.scale_latents(mean)), frames.reshape(videos.shape), **CLOSE)


def test_vae_chunking_matches_one_call(vae_dir):
    x = images(7, 3, 16, 16)  # 7 = 3 + 3 + 1: a ragged last chunk
    big, small = FrozenVAE(str(vae_dir), chunk_size=64), FrozenVAE(str(vae_dir), chunk_size=3)
    for a, b in zip(big.encode_moments(x), small.encode_moments(x)):
        torch.testing.assert_close(a, b, **CLOSE)
    z_big = big.encode(x, generator=torch.Generator().manual_seed(3))
    z_small = small.encode(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z_big, z_small, **CLOSE)
    torch.testing.assert_close(big.decode(z_big), small.decode(z_big), **CLOSE)


def test_vae_scale_unscale_round_trip(vae_dir, vae):
    raw = torch.randn(2, 3, LATENT_CHANNELS, 8, 8)
    torch.testing.assert_close(vae.scale_latents(raw), raw * SD_LATENT_SCALE)
    torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(raw)), raw)

    shifted = FrozenVAE(str(vae_dir), scale=0.5, shift=0.25)
    torch.testing.assert_close(shifted.scale_latents(raw), (raw - 0.25) * 0.5)
    torch.testing.assert_close(shifted.unscale_latents(shifted.scale_latents(raw)), raw)

    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 1.0, 0.5, 4.0]
    per_channel = FrozenVAE(str(vae_dir), mean=mean, std=std)
    expected = (raw - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    torch.testing.assert_close(per_channel.scale_latents(raw), expected)
    torch.testing.assert_close(per_channel.unscale_latents(expected), raw)


def test_vae_encode_mean_mode_is_deterministic(vae_dir):
    vae = FrozenVAE(str(vae_dir), sample=False)
    x = images(3, 3, 16, 16)
    z = vae.encode(x)
    torch.testing.assert_close(z, vae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(z, vae.scale_latents(vae.encode_moments(x)[0]))


def test_vae_encode_sample_mode_is_reproducible_with_a_generator(vae):
    x = images(3, 3, 16, 16)
    a = vae.encode(x, generator=torch.Generator().manual_seed(7))
    b = vae.encode(x, generator=torch.Generator().manual_seed(7))
    c = vae.encode(x, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    mean, std = vae.encode_moments(x)  # encode = scale_latents(sample_from_moments(*encode_moments))
    raw = vae.sample_from_moments(mean, std, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, vae.scale_latents(raw), **CLOSE)


def test_vae_bfloat16_on_cpu(vae_dir, vae):
    bf16 = FrozenVAE(str(vae_dir), dtype="bfloat16", sample=False)
    assert bf16.dtype == torch.bfloat16 and next(bf16._vae.parameters()).dtype == torch.bfloat16
    x = images(2, 3, 16, 16)
    z = bf16.encode(x)
    assert z.dtype == torch.float32 and z.shape == (2, LATENT_CHANNELS, 8, 8)
    z32 = vae.scale_latents(vae.encode_moments(x)[0])
    torch.testing.assert_close(z, z32, rtol=0.1, atol=0.05)
    assert bf16.decode(z).dtype == torch.float32
    assert bf16.config()["dtype"] == "bfloat16"


def test_vae_ignores_outer_autocast(vae):
    x = images(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under Lightning's bf16-mixed
        inside = vae.encode_moments(x)[0]
    torch.testing.assert_close(inside, vae.encode_moments(x)[0], **CLOSE)


def test_vae_config_is_plain_and_rebuilds(vae_dir, vae):
    config = vae.config()
    assert json.loads(json.dumps(config)) == config
    assert set(config) == {"name_or_path", "subfolder", "scale", "shift", "mean", "std", "sample", "dtype"}
    assert FrozenVAE(**config).config() == config


def test_vae_scale_defaults_to_its_own_scaling_factor(vae_dir, tmp_path, caplog):
    """scale=None takes the VAE config's scaling_factor (an SDXL-like 0.13025 here), so no warning; a VAE config
    without one falls back to SD_LATENT_SCALE; mean/std accept the default scale as given (config() round trip)."""
    sdxl_like = tmp_path / "vae"
    shutil.copytree(vae_dir, sdxl_like)
    config = json.loads((sdxl_like / "config.json").read_text())
    (sdxl_like / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.13025}))
    with caplog.at_level(logging.WARNING, logger="zigma.vae"):
        vae = FrozenVAE(str(sdxl_like))
    assert vae.scale == 0.13025 and vae.config()["scale"] == 0.13025 and "scaling_factor" not in caplog.text
    assert FrozenVAE(str(sdxl_like), scale=0.5).scale == 0.5
    del config["scaling_factor"]
    (sdxl_like / "config.json").write_text(json.dumps(config))
    assert FrozenVAE(str(sdxl_like)).scale == SD_LATENT_SCALE
    stats = FrozenVAE(str(vae_dir), mean=[0.0] * 4, std=[2.0] * 4)
    assert FrozenVAE(**stats.config()).config() == stats.config()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float64"}, r"dtype='float64'; must be one of \['float32', 'float16', 'bfloat16'\]"),
        ({"chunk_size": 0}, "chunk_size=0; must be an int >= 1"),
        ({"scale": 0.0}, "scale=0.0; must be a finite number > 0"),
        ({"mean": [0.0] * 4}, "mean and std go together"),
        ({"mean": [0.0] * 4, "std": [1.0] * 3}, "mean has 4 entries but std has 3"),
        ({"mean": [0.0] * 4, "std": [1.0, 1.0, 0.0, 1.0]}, "std finite and > 0"),
        ({"mean": [0.0] * 4, "std": [1.0] * 4, "scale": 0.5}, "either a global scale/shift or per-channel mean/std"),
        ({"mean": [0.0] * 3, "std": [1.0] * 3}, "mean/std have 3 entries but .* has 4 latent channels"),
    ],
)
def test_vae_bad_arguments_raise(vae_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FrozenVAE(str(vae_dir), **kwargs)


def test_vae_bad_inputs_raise(vae):
    with pytest.raises(ValueError, match=r"must be \(B, 3, H, W\) or \(B, T, 3, H, W\)"):
        vae.encode(images(3, 16, 16))
    with pytest.raises(ValueError, match="need 3 channels"):
        vae.encode(images(2, 4, 16, 16))
    with pytest.raises(ValueError, match="floating point"):
        vae.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not divisible by the VAE's downsample_factor 2"):
        vae.encode(images(1, 3, 15, 16))
    with pytest.raises(ValueError, match="need 4 channels"):
        vae.decode(torch.zeros(1, 3, 8, 8))


def test_vae_warns_when_its_own_scaling_factor_differs(vae_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="zigma.vae"):
        FrozenVAE(str(vae_dir), scale=0.13025)
    assert "scaling_factor=0.18215" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vae_cuda_matches_cpu_and_returns_on_input_device(vae_dir, vae):
    gpu = FrozenVAE(str(vae_dir), device="cuda", chunk_size=4)
    x = images(3, 3, 16, 16)
    z_cpu = vae.encode(x, generator=torch.Generator().manual_seed(5))
    z_gpu = gpu.encode(x, generator=torch.Generator().manual_seed(5))  # CPU generator, CUDA VAE: same noise
    assert z_gpu.device == x.device
    torch.testing.assert_close(z_gpu, z_cpu, rtol=1e-3, atol=1e-3)
    on_gpu = gpu.decode(z_cpu.cuda())
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), vae.decode(z_cpu), rtol=1e-3, atol=1e-3)
    half = FrozenVAE(str(vae_dir), device="cuda", dtype="float16", sample=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z_half = half.encode(x.cuda())
    assert z_half.dtype == torch.float32
    torch.testing.assert_close(z_half.cpu(), vae.scale_latents(vae.encode_moments(x)[0]), rtol=0.02, atol=0.02)
