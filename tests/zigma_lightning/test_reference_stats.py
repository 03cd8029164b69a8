"""``zigma reference-stats``: statistics of an image folder or of the images in shards."""

import numpy as np
import pytest
import torch

from datamodules.images import shard_images
from datamodules.shards import expand_shards
from tests.zigma.metrics.test_reference import CountingExtractor
from zigma.metrics.frechet import GaussianStats
from zigma_lightning.reference_stats import main, reference_stats_from_argv


def test_command_builds_stats_from_an_image_folder(tmp_path, monkeypatch, capsys):
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
    out = reference_stats_from_argv(
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
    assert capsys.readouterr().err == ""  # stderr is no terminal here: no progress bar lines in a log
    assert stats.meta == {
        "dataset": "images",
        "resolution": 16,
        "count": 4,
        "extractor": "counting",
        "antialias": False,
        "dim": 6,
    }
    with pytest.raises(SystemExit):
        reference_stats_from_argv(
            ["--images", str(folder), "--resolution", "16", "--count", "9", "--out", str(tmp_path / "t.npz")]
        )


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
    read = list(shard_images(expand_shards(pattern), "jpg", 12))
    assert len(read) == 5 and all(torch.equal(r, torch.from_numpy(i).permute(2, 0, 1)) for r, i in zip(read, images))

    monkeypatch.setattr("zigma.metrics.inception.load_inception", lambda *a, **k: CountingExtractor())
    out = reference_stats_from_argv(
        [
            "--shards",
            pattern,
            "--image-key",
            "jpg",
            "--resolution",
            "12",
            "--count",
            "4",
            "--out",
            str(tmp_path / "s.npz"),
            "--batch-size",
            "3",
            "--device",
            "cpu",
        ]
    )
    stats = GaussianStats.load(out)
    assert stats.count == 4 and stats.meta["dataset"].startswith("shards:") and stats.meta["dataset"].endswith("(2)")
    with pytest.raises(ValueError, match=r"no member with suffix '\.png'"):
        reference_stats_from_argv(
            [
                "--shards",
                pattern,
                "--image-key",
                "png",
                "--resolution",
                "12",
                "--count",
                "4",
                "--out",
                str(tmp_path / "t.npz"),
                "--device",
                "cpu",
            ]
        )


def test_main_prints_one_error_line_and_returns_1(tmp_path, capsys):
    (tmp_path / "s.tar").write_bytes(bytes(1024))  # an empty tar: no image under any key
    argv = ["--shards", str(tmp_path / "s.tar"), "--resolution", "8", "--count", "2", "--out", str(tmp_path / "o.npz")]
    assert main([*argv, "--device", "cpu", "--inception-weights", str(tmp_path / "none.pth")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
