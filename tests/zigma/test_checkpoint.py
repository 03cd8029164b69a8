"""Upstream checkpoint loading and our safetensors export."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from zigma import ZigMa, from_pretrained, load_upstream_checkpoint, save_pretrained
from zigma.checkpoint import RELEASED_CHECKPOINTS

PARAMS = {
    "img_dim": 8,
    "in_channels": 4,
    "patch_size": 2,
    "embed_dim": 32,
    "depth": 3,
    "scan_type": "zigzagN8",
    "use_pe": 2,
}


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def upstream_checkpoint(raw, ema, params=PARAMS, with_args=True):
    """What upstream's train_acc.py saves under DDP: module. prefixes and a pickled OmegaConf Hydra config."""
    ckpt = {
        "model": {f"module.{k}": v for k, v in raw.state_dict().items()},
        "ema": {f"module.{k}": v for k, v in ema.state_dict().items()},
        "opt": {},
        "train_steps": 1000,
        "best_fid": 666,
    }
    if with_args:
        ckpt["args"] = OmegaConf.create(
            {"data": {"video_frames": 0}, "model": {"name": "x", "target": "model_zigma.ZigMa", "params": params}}
        )
    return ckpt


def test_loads_upstream_training_checkpoint_file(tmp_path):
    raw, ema = perturbed(ZigMa(**PARAMS)), perturbed(ZigMa(**PARAMS))
    path = tmp_path / "0001000.pt"
    torch.save(upstream_checkpoint(raw, ema), path)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    model = load_upstream_checkpoint(path)
    assert not model.training
    torch.testing.assert_close(model(x, t), ema.eval()(x, t))
    torch.testing.assert_close(load_upstream_checkpoint(path, weights="model")(x, t), raw.eval()(x, t))


def test_config_interpolations_resolve():
    params = {**PARAMS, "video_frames": "${data.video_frames}"}
    model = load_upstream_checkpoint(upstream_checkpoint(ZigMa(**PARAMS), ZigMa(**PARAMS), params=params))
    assert model.video_frames == 0


def test_missing_and_extra_keys_are_named():
    ckpt = upstream_checkpoint(ZigMa(**PARAMS), ZigMa(**PARAMS))
    del ckpt["ema"]["module.blocks.1.mixer.A_log"]
    ckpt["ema"]["module.blocks.0.mixer.A_b_log"] = torch.zeros(64, 16)
    with pytest.raises(KeyError, match=r"blocks\.1\.mixer\.A_log.*blocks\.0\.mixer\.A_b_log"):
        load_upstream_checkpoint(ckpt)
    assert isinstance(load_upstream_checkpoint(ckpt, strict=False), ZigMa)


def test_released_file_names_select_presets_and_text_is_inferred(tmp_path):
    assert RELEASED_CHECKPOINTS["faceshq1024_0090000.pt"] == "s1024_zigzag8_b2_old"
    small = {"embed_dim": 32, "depth": 2, "img_dim": 8, "patch_size": 1}
    text = ZigMa(**{**PARAMS, **small, "patch_size": 1, "in_channels": 4, "has_text": True, "d_context": 12})
    path = tmp_path / "zigzagN8_b1_pe2_coco14_bs48_0400000.pt"
    torch.save(upstream_checkpoint(text, text, with_args=False), path)
    model = load_upstream_checkpoint(path, **small)  # preset zigzag8_b1_pe2 shrunk; has_text from msa keys
    assert model.has_text and model.config["d_context"] == 12 and model.config["scan_type"] == "zigzagN8"
    with pytest.raises(ValueError, match="released checkpoints"):
        load_upstream_checkpoint(upstream_checkpoint(text, text, with_args=False))


def test_bad_weights_choice_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="weights must be one of"):
        load_upstream_checkpoint({}, weights="swa")
    with pytest.raises(FileNotFoundError):
        load_upstream_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("scan_type", ["zigzagN8", "randomN3", "v2"])
def test_save_pretrained_round_trip(tmp_path, scan_type):
    model = perturbed(ZigMa(**{**PARAMS, "scan_type": scan_type, "scan_seed": 7})).eval()
    save_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "export" / "config.json").read_text())["scan_type"] == scan_type
    loaded = from_pretrained(tmp_path / "export")
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    torch.testing.assert_close(loaded(x, t), model(x, t))


def test_from_pretrained_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        from_pretrained(tmp_path)
