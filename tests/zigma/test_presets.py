"""Presets reproduce upstream's model configs exactly (parameter counts from the reference, §2.6)."""

import pytest
import torch

from zigma import PRESETS, create_model


@pytest.mark.parametrize(
    ("name", "overrides", "count"),
    [
        ("zigzag8_b1_pe2", {}, 134_624_260),
        ("sweep2_b1_pe2", {}, 140_190_724),
        ("s1024_zigzag8_b2_old", {}, 133_856_272),
        ("3d_zigzag8sst_b2", {}, 137_079_568),
        ("3d_sweep2_b2", {}, 142_646_032),
        ("zigzag8_b1_pe2", {"has_text": True, "d_context": 768}, 215_504_644),
    ],
)
def test_preset_parameter_counts_match_upstream(name, overrides, count):
    with torch.device("meta"):
        model = create_model(name, **overrides, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count


def test_size_factories_exist_with_upstream_widths():
    assert PRESETS["zigma_b_2"] == {"embed_dim": 768, "depth": 24, "patch_size": 2}
    assert PRESETS["zigma_h_4"] == {"embed_dim": 1536, "depth": 48, "patch_size": 4}
    assert len([k for k in PRESETS if k.startswith("zigma_")]) == 15
    model = create_model("zigma_s_4", in_channels=4, img_dim=8, scan_type="zigzagN8", depth=2)
    assert model.embed_dim == 368


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="zigzag8_b1_pe2"):
        create_model("zigzag8_b1")
