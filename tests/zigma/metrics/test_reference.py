"""Reference statistics: computed once per key, cached, recomputed on a key change (the command that builds them:
``tests/zigma_lightning/test_reference_stats.py``)."""

import pytest
import torch
from torch import nn

from zigma.metrics.reference import key_hash, load_reference, reference_stats


class CountingExtractor(nn.Module):
    """uint8 (N, 3, H, W) -> (N, 6): per-channel mean and std, counting its calls (a stand-in for Inception)."""

    num_features = 6
    name = "counting"

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.images = 0

    def forward(self, x):
        assert x.dtype == torch.uint8
        self.calls += 1
        self.images += x.shape[0]
        x = x.float()
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _batches(n: int, size: int = 8, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return [images[i : i + batch] for i in range(0, n, batch)]


KEY = {"dataset": "faces", "resolution": 8, "count": 10, "extractor": "counting", "antialias": False}


def test_second_call_loads_the_cache_without_extracting(tmp_path):
    extractor = CountingExtractor()
    first = reference_stats(_batches(12), extractor=extractor, key=KEY, cache_dir=tmp_path)
    assert first.count == 10 and extractor.images == 10  # the last batch is cut to reach exactly `count`
    assert (tmp_path / f"{key_hash(KEY)}.npz").is_file()

    def never():
        raise AssertionError("the image source must not be read on a cache hit")
        yield

    second = reference_stats(never(), extractor=extractor, key=dict(KEY), cache_dir=tmp_path)
    assert extractor.calls == 3
    assert second.meta["dataset"] == "faces" and second.count == 10
    torch.testing.assert_close(second.cov, first.cov)


@pytest.mark.parametrize("change", [{"dataset": "other"}, {"count": 8}, {"resolution": 16}, {"antialias": True}])
def test_a_key_change_recomputes(tmp_path, change):
    extractor = CountingExtractor()
    reference_stats(_batches(12), extractor=extractor, key=KEY, cache_dir=tmp_path)
    calls = extractor.calls
    key = {**KEY, **change}
    stats = reference_stats(_batches(12, seed=1), extractor=extractor, key=key, cache_dir=tmp_path)
    assert extractor.calls > calls
    assert stats.count == key["count"] and len(list(tmp_path.glob("*.npz"))) == 2


def test_too_few_images_and_incomplete_keys_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"asked for 10 images.*only 8"):
        reference_stats(_batches(8), extractor=CountingExtractor(), key=KEY, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"lacks \['antialias'\]"):
        key = {k: v for k, v in KEY.items() if k != "antialias"}
        reference_stats(_batches(12), extractor=CountingExtractor(), key=key, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.npz"))


def test_a_file_for_another_resolution_is_refused(tmp_path):
    stats = reference_stats(_batches(12), extractor=CountingExtractor(), key=KEY, cache_dir=tmp_path)
    path = stats.save(tmp_path / "faces_8.npz")
    assert load_reference(path, expect={"resolution": 8, "dataset": "faces"}).count == 10
    with pytest.raises(ValueError, match=r"resolution: file has 8, this run needs 256.*zigma reference-stats"):
        load_reference(path, expect={"resolution": 256, "dataset": "faces"})
