"""Reference statistics: computed once per key, cached, recomputed on a key change; the image-folder command."""

import numpy as np
import pytest
import torch
from torch import nn

from zigma.metrics import reference
from zigma.metrics.frechet import GaussianStats
from zigma.metrics.reference import key_hash, load_reference, main, reference_stats


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
    with pytest.raises(
        ValueError, match=r"resolution: file has 8, this run needs 256.*python -m zigma.metrics.reference"
    ):
        load_reference(path, expect={"resolution": 256, "dataset": "faces"})


def test_command_builds_stats_from_an_image_folder(tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):  # non-square images of mixed formats, one in a subfolder
        where = folder / "sub" if i == 4 else folder
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(where / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    seen = []

    def fake_load_inception(weights_path=None, *, antialias=False, feature=2048, device=None):
        seen.append(weights_path)
        return CountingExtractor()

    monkeypatch.setattr("zigma.metrics.inception.load_inception", fake_load_inception)
    out = main(
        [
            "--images",
            str(folder),
            "--resolution",
            "16",
            "--count",
            "4",
            "--out",
            str(tmp_path / "s.npz"),
            "--inception-weights",
            "w.pth",
            "--batch-size",
            "3",
            "--device",
            "cpu",
        ]
    )
    stats = GaussianStats.load(out)
    assert seen == ["w.pth"] and stats.count == 4 and stats.dim == 6
    assert stats.meta == {
        "dataset": "images",
        "resolution": 16,
        "count": 4,
        "extractor": "counting",
        "antialias": False,
        "dim": 6,
    }
    with pytest.raises(SystemExit):
        main(["--images", str(folder), "--resolution", "16", "--count", "9", "--out", str(tmp_path / "t.npz")])


def test_load_image_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    from PIL import Image

    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, 20:60] = 255  # the centre square is white
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = reference.load_image(tmp_path / "wide.png", 10)
    assert image.shape == (3, 10, 10) and image.dtype == torch.uint8
    assert image[:, :, 1:-1].min() == 255


def test_command_reads_images_from_shards_in_order_and_refuses_a_missing_key(tmp_path, monkeypatch):
    import io
    import tarfile

    from PIL import Image

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(5)]
    for shard, indices in enumerate([(0, 1, 2), (3, 4)]):
        with tarfile.open(tmp_path / f"train-{shard:06d}.tar", "w") as tar:
            for i in indices:
                for suffix, payload in (("latent.npy", b"not read"), ("jpg", None)):
                    if payload is None:
                        buffer = io.BytesIO()
                        Image.fromarray(images[i]).save(buffer, format="PNG")  # lossless, whatever the suffix
                        payload = buffer.getvalue()
                    info = tarfile.TarInfo(f"{i:04d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    pattern = str(tmp_path / "train-{000000..000001}.tar")
    read = list(reference.shard_images(reference.expand_pattern(pattern), "jpg", 12))
    assert len(read) == 5 and all(torch.equal(r, torch.from_numpy(i).permute(2, 0, 1)) for r, i in zip(read, images))

    monkeypatch.setattr("zigma.metrics.inception.load_inception", lambda *a, **k: CountingExtractor())
    out = main(["--shards", pattern, "--image-key", "jpg", "--resolution", "12", "--count", "4", "--out",
                str(tmp_path / "s.npz"), "--batch-size", "3", "--device", "cpu"])  # fmt: skip
    stats = GaussianStats.load(out)
    assert stats.count == 4 and stats.meta["dataset"].startswith("shards:") and stats.meta["dataset"].endswith("(2)")
    with pytest.raises(ValueError, match=r"no member with suffix '\.png'"):
        main(["--shards", pattern, "--image-key", "png", "--resolution", "12", "--count", "4", "--out",
              str(tmp_path / "t.npz"), "--device", "cpu"])  # fmt: skip
