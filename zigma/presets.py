"""Named model configurations: upstream's model configs and size factories, spelled in one place.

``PRESETS[name]`` is a plain dict of :class:`zigma.ZigMa` arguments; :func:`create_model` builds one with overrides.
Parameter counts (asserted in tests): zigzag8_b1_pe2 134,624,260; sweep2_b1_pe2 140,190,724; s1024_zigzag8_b2_old
133,856,272; 3d_zigzag8sst_b2 137,079,568; 3d_sweep2_b2 142,646,032.
"""

from __future__ import annotations

from typing import Any

from zigma.model import ZigMa

_B = {"in_channels": 4, "embed_dim": 768, "depth": 24}

PRESETS: dict[str, dict[str, Any]] = {
    # upstream config/model/*.yaml (all latent-space, SD-VAE 4 channels)
    "zigzag8_b1_pe2": {**_B, "img_dim": 32, "patch_size": 1, "scan_type": "zigzagN8", "use_pe": 2},
    "sweep2_b1_pe2": {**_B, "img_dim": 32, "patch_size": 1, "scan_type": "v2", "use_pe": 2},
    "s1024_zigzag8_b2_old": {**_B, "img_dim": 128, "patch_size": 2, "scan_type": "zigzagN8", "use_pe": 0},
    "3d_zigzag8sst_b2": {**_B, "img_dim": 32, "patch_size": 2, "scan_type": "zzvideo_sst", "use_pe": 2,
                         "num_classes": 101, "video_frames": 16},
    "3d_sweep2_b2": {**_B, "img_dim": 32, "patch_size": 2, "scan_type": "v2", "use_pe": 2,
                     "num_classes": 101, "video_frames": 16},
}  # fmt: skip

# upstream's size factories zigma_{s,b,m,l,h}_{1,2,4} (width, depth); other arguments come from the caller
SIZES: dict[str, tuple[int, int]] = {"s": (368, 24), "b": (768, 24), "m": (768, 48), "l": (1024, 48), "h": (1536, 48)}
for _size, (_width, _depth) in SIZES.items():
    for _patch in (1, 2, 4):
        PRESETS[f"zigma_{_size}_{_patch}"] = {"embed_dim": _width, "depth": _depth, "patch_size": _patch}


def create_model(name: str, **overrides: Any) -> ZigMa:
    """Build a preset; ``overrides`` replace or complete its arguments (size factories need in_channels, img_dim)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return ZigMa(**{**PRESETS[name], **overrides})
