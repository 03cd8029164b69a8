"""SampleStore: shards in any order assemble into one samples.npz in index order (images and clips); a missing or
repeated sample and a manifest of other settings are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from zigma.sample_store import SampleStore, SampleStoreError, check_manifest


def random_uint8(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(7, 4, 4, 3), (7, 2, 4, 4, 1)], ids=["images", "clips"])
def test_shards_in_any_order_assemble_in_index_order(tmp_path, shape):
    pixels = random_uint8(shape)
    store = SampleStore(tmp_path, png=True)
    for index in ([5, 6], [0, 2, 1], [4, 3]):  # DDP predict: each rank's batches hold strided indices
        store.write(np.array(index), pixels[index])
    assert store.assemble() == tmp_path / "samples.npz"
    with np.load(tmp_path / "samples.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], pixels)
        assert data["index"].tolist() == list(range(7))
    frame = pixels[3] if len(shape) == 4 else pixels[3, 1]
    name = "000003.png" if len(shape) == 4 else "000003_001.png"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / name)).reshape(frame.shape), frame)
    assert store.write_grid() == tmp_path / "grid.png"
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_missing_or_repeated_sample_is_refused(tmp_path):
    store = SampleStore(tmp_path)
    store.write(np.array([0, 1]), random_uint8((2, 4, 4, 3)))
    with pytest.raises(SampleStoreError, match=r"lacks 1 of 3 samples \(first: index 2\); run the same command"):
        store.assemble(3)
    store.write(np.array([2, 1]), random_uint8((2, 4, 4, 3)))
    with pytest.raises(SampleStoreError, match="holds sample 1 twice"):
        store.assemble(3)
    assert not (tmp_path / "samples.npz").exists() and not list(tmp_path.rglob("*.tmp"))


def test_the_manifest_refuses_other_settings(tmp_path):
    check_manifest(tmp_path, {"seed": 0, "steps": 25, "shape": (3, 8, 8)})
    check_manifest(tmp_path, {"seed": 0, "steps": 25, "shape": [3, 8, 8]})  # tuples are saved as lists
    with pytest.raises(SampleStoreError) as info:
        check_manifest(tmp_path, {"seed": 1, "steps": 25, "shape": [3, 8, 8]})
    assert str(info.value) == (
        f"{tmp_path} holds samples made with other settings (seed: 0 -> 1); use another output directory or the "
        "same settings"
    )
