"""The one image preprocessing shared by the data tool, the data loaders and the FID reference statistics.

Training images, stored shard images and FID reals must be cropped identically, or FID compares different
distributions. Like ADM/DiT: the shorter side is resized to S (PIL bicubic, which antialiases when downsampling) and
the centre S x S square is cropped.
"""

from __future__ import annotations

from typing import Any


def resize_center_crop(image: Any, resolution: int) -> Any:
    """RGB PIL image -> RGB PIL image of ``resolution`` x ``resolution`` (shorter side resized, centre crop)."""
    from PIL import Image

    image = image.convert("RGB")
    s = resolution
    w, h = image.size
    scale = s / min(w, h)
    size = (max(s, round(w * scale)), max(s, round(h * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - s) // 2, (size[1] - s) // 2
    return image.crop((left, top, left + s, top + s))
