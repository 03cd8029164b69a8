"""``datamodules.images``: listing in natural order and the one resize + centre crop."""

import numpy as np
import torch

from datamodules import images


def test_load_image_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    from PIL import Image

    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, 20:60] = 255  # the centre square is white
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = images.load_image_uint8(tmp_path / "wide.png", 10)
    assert image.shape == (3, 10, 10) and image.dtype == torch.uint8
    assert image[:, :, 1:-1].min() == 255


def test_listing_is_recursive_in_natural_order_and_skips_hidden_and_other_files(tmp_path):
    from PIL import Image

    for rel in ["b/f10.png", "b/f2.JPG", "a10.png", "a9.webp", "B1.png", ".hidden/x.png", "b/._f3.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(tmp_path / rel, format="PNG")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    listed = [p.relative_to(tmp_path).as_posix() for p in images.list_images(tmp_path)]
    assert listed == ["a9.webp", "a10.png", "B1.png", "b/f2.JPG", "b/f10.png"]
    assert [p.name for p in images.frame_files(tmp_path / "b")] == ["f2.JPG", "f10.png"]
    assert images.frame_folders(tmp_path) == [tmp_path / "b"]
    assert sorted(["x.png", "X.png"], key=images.natural_key) == ["X.png", "x.png"]  # ties: by the exact name
