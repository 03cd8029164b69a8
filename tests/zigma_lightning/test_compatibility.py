"""Model/data compatibility: ``ZigMaDataModule.yields`` states what the batches hold, ``FlowMatchingModule.check_data``
checks the backbone against it (the CLI only calls them; tests/e2e/test_bad_configs.py covers the CLI lines)."""

from __future__ import annotations

import pytest

from datamodules import EmbeddedFacesDataModule
from datamodules.base import DataYields
from zigma.flow_module import FlowMatchingModule

TINY = {"in_channels": 1, "img_dim": 32, "patch_size": 4, "embed_dim": 16, "depth": 2, "scan_type": "zigzagN8",
        "use_pe": 2, "drop_path_rate": 0.0}  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return FlowMatchingModule(net=TINY)


def test_embedded_faces_yield_unconditional_grey_images():
    assert EmbeddedFacesDataModule(image_size=16).yields() == DataYields(
        "EmbeddedFacesDataModule", (1, 16, 16), None, num_classes=0, context_dim=0
    )


def test_matching_data_passes(model):
    model.check_data(DataYields("Faces", (1, 32, 32), None, 0, 0))


@pytest.mark.parametrize(
    ("yields", "checkpoint", "message"),
    [
        (DataYields("Faces", (1, 16, 16), None, 0, 0), None,
         "model.net.img_dim=32 does not match the data: Faces yields samples of shape (1, 16, 16); set "
         "model.net.img_dim=16"),
        (DataYields("Faces", (3, 32, 32), None, 0, 0), "a.ckpt",
         "model.net.in_channels=1 does not match the data: Faces yields samples of shape (3, 32, 32); the checkpoint "
         "a.ckpt fixes the architecture: use data that fits it"),
        (DataYields("Clips", (4, 1, 32, 32), None, 0, 0), None,
         "model.net.video_frames=0 does not match the data: Clips yields video clips (T, C, H, W) of shape "
         "(4, 1, 32, 32); set model.net.video_frames=4"),
        (DataYields("Labelled", (1, 32, 32), None, 10, 0), None,
         "model.net.num_classes=-1 but the data has 10 classes"),
        (DataYields("Captions", (1, 32, 32), None, 0, 8), None,
         "the data carries caption features; set model.net.has_text=true and model.net.d_context"),
        (DataYields("Pixels", (), (3, 256, 256), 0, 0), None,
         "the data yields pixels of shape (3, 256, 256) to encode: set model.vae (a diffusers AutoencoderKL directory "
         "or hub id)"),
    ],
)  # fmt: skip
def test_mismatches_name_the_key_and_the_fix(model, yields, checkpoint, message):
    with pytest.raises(ValueError) as info:
        model.check_data(yields, checkpoint=checkpoint)
    assert str(info.value) == message


def test_manifest_facts_of_a_pixel_space_unconditional_model(model):
    assert model.manifest_facts() == {"sample_shape": (1, 32, 32), "vae_config": None, "num_classes": None,
                                      "context_dim": None}  # fmt: skip


def test_the_cli_checks_the_latent_scale_the_data_states_after_the_manifest():
    """``check_model_matches_data`` passes ``DataYields.vae_scale`` to ``FlowMatchingModule.check_latent_scale``
    once the shape and manifest checks passed, and turns its refusal into one ConfigError line."""
    from zigma_lightning.cli import check_model_matches_data
    from zigma_lightning.errors import ConfigError

    calls = []

    class Data:
        def yields(self, stage=None):
            return DataYields("Latents", (4, 32, 32), None, 0, 0, vae_scale=0.5)

        def check_manifest(self, **facts):
            calls.append("manifest")

    class Model:
        def check_data(self, yields, checkpoint=None):
            calls.append("data")

        def manifest_facts(self):
            return {}

        def check_latent_scale(self, scale):
            calls.append(("scale", scale))
            raise ValueError("model.vae_scale=0.18215 but the data's latents are scaled by 0.5")

    with pytest.raises(ConfigError, match=r"^model.vae_scale=0.18215 but the data's latents are scaled by 0.5$"):
        check_model_matches_data(Model(), Data())
    assert calls == ["data", "manifest", ("scale", 0.5)]
