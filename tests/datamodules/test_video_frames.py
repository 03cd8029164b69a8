"""``VideoWebDataModule(frames_key=...)``: video frames (uint8 (T, H, W, 3) arrays or one image member per frame)
resized, centre-cropped and cropped in time into ``{"pixels": (B, T, 3, S, S)}`` batches that the LightningModule
encodes with its VAE, and a CLI round trip that trains on them.

Sample ``i`` has T=4 frames of 20x24 random pixels whose red channel is the constant ``16 * i + t`` (t the frame
index), which bicubic resizing leaves unchanged: every output frame tells which video and which frame it came from.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from datamodules.decoding import _CROP, SampleDecoder
from datamodules.shards import sample_rng
from datamodules.webdataset import VideoWebDataModule
from tests.e2e.helpers import run_cli

T, H, W = 4, 20, 24


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def png_bytes(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def clip(index: int) -> np.ndarray:
    """(T, H, W, 3) uint8: random green/blue, red = 16 * index + t."""
    frames = np.random.default_rng(index).integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    frames[..., 0] = (16 * index + np.arange(T, dtype=np.uint8))[:, None, None]
    return frames


def write(directory: Path, counts: list[int], sample=None) -> list[str]:
    """Shards of ``counts[k]`` samples: ``sample(index)`` -> members (default ``frames.npy`` + ``cls``)."""
    sample = sample or (lambda i: {"frames.npy": npy_bytes(clip(i)), "cls": str(i % 2).encode()})
    directory.mkdir(parents=True, exist_ok=True)
    paths, index = [], 0
    for shard, count in enumerate(counts):
        path = directory / f"train-{shard:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            for _ in range(count):
                sink.write({"__key__": f"{index:06d}", **sample(index)})
                index += 1
        paths.append(str(path))
    return paths


def attach(dm):
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1)  # what rank_and_world reads
    return dm


def video_and_frames(pixels: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(video index, (T,) frame indices) from one (T, 3, S, S) clip's constant red channel."""
    red = torch.round((pixels[:, 0] + 1) * 127.5).long()  # (T, S, S)
    assert (red == red[:, :1, :1]).all(), "the red channel should stay constant"
    codes = red[:, 0, 0]
    videos = codes // 16
    assert (videos == videos[0]).all(), f"frames of different videos mixed: {codes.tolist()}"
    return int(videos[0]), codes % 16


def test_frames_batches_are_resized_cropped_in_time_and_in_order(tmp_path):
    shards = write(tmp_path / "shards", [4, 4])
    dm = attach(VideoWebDataModule(shards, frames_key="frames.npy", video_frames=3, resolution=16, label_key="cls",
                                   num_classes=2, batch_size=2, num_workers=0))  # fmt: skip
    assert dm.pixel_shape == (3, 3, 16, 16) and dm.sample_shape is None and dm.num_classes == 2
    image = SampleDecoder(kind="image", data_key="png", resolution=16)
    seen = {}
    loader = dm.train_dataloader()
    for batch in loader:
        assert set(batch) == {"pixels", "y"}
        pixels = batch["pixels"]
        assert pixels.shape == (2, 3, 3, 16, 16) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1
        for b in range(2):
            index, frames = video_and_frames(pixels[b])
            start = int(frames[0])
            assert frames.tolist() == [start, start + 1, start + 2]  # consecutive, in temporal order
            assert start == int(sample_rng(0, f"{index:06d}", 0, 0, _CROP).integers(T - 3 + 1))  # as latent clips
            assert int(batch["y"][b]) == index % 2
            for t in range(3):  # each frame exactly as the image mode resizes and crops it
                torch.testing.assert_close(pixels[b, t], image._image(png_bytes(clip(index)[start + t]), False))
            seen[index] = start
    assert sorted(seen) == list(range(8)) and len(loader) == 4  # every video once per epoch


def test_per_frame_image_members_are_read_in_frame_order(tmp_path):
    # members 000003.0.png ... 000003.10.png: frame order is the integer t, not the name's text order
    def sample(i):
        frames = [np.full((H, W, 3), 16 * i + t % 16, np.uint8) for t in range(11)]
        return {**{f"{t}.png": png_bytes(f) for t, f in enumerate(frames)}, "cls": b"0"}

    shards = write(tmp_path / "shards", [2], sample)
    dm = attach(VideoWebDataModule(shards, frames_key="png", video_frames=11, resolution=8, label_key="cls",
                                   num_classes=1, batch_size=2, num_workers=0))  # fmt: skip
    (batch,) = list(dm.train_dataloader())
    assert batch["pixels"].shape == (2, 11, 3, 8, 8)
    for b in range(2):
        _, frames = video_and_frames(batch["pixels"][b])
        assert frames.tolist() == list(range(11))


def test_bad_frames_are_counted_and_skipped(tmp_path, caplog):
    def sample(i):
        frames = clip(i)
        if i == 1:
            frames = frames.astype(np.float32)  # not uint8
        elif i == 5:
            frames = frames[..., 0]  # (T, H, W): wrong rank
        elif i == 6:
            frames = frames[:2]  # fewer frames than video_frames
        return {"frames.npy": npy_bytes(frames), "cls": str(i % 2).encode()}

    shards = write(tmp_path / "shards", [4, 4], sample)
    dm = attach(VideoWebDataModule(shards, frames_key="frames.npy", video_frames=3, resolution=16, label_key="cls",
                                   num_classes=2, batch_size=1, num_workers=0, max_bad_samples=10))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="zigma.data"):
        got = [video_and_frames(batch["pixels"][0])[0] for batch in dm.train_dataloader()]
    # 8 counted samples -> 8 batches; the worker wraps around for the 3 it lost (and skips them again)
    assert len(got) == 8 and set(got) == {0, 2, 3, 4, 7}
    for key, why in (("000001", "dtype float32"), ("000005", r"shape \(4, 20, 24\)"), ("000006", "fewer than")):
        assert re.search(rf"key {key}: ValueError: .*{why}", caplog.text), key
    dm = attach(VideoWebDataModule(shards, frames_key="frames.npy", video_frames=3, resolution=16, label_key="cls",
                                   num_classes=2, batch_size=1, num_workers=0, max_bad_samples=2))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"more than max_bad_samples=2"):
        list(dm.train_dataloader())


@pytest.mark.slow
def test_cli_trains_a_video_model_on_frames_encoded_by_the_vae(tmp_path, tiny_vae_dir):
    shards = tmp_path / "shards"
    write(shards, [4, 4])
    runs = tmp_path / "runs"
    run_cli("fit", "--config", "tests/e2e/shards.yaml", "--data", "datamodules.VideoWebDataModule",
            "--data.init_args.shards", str(shards), "--data.init_args.frames_key", "frames.npy",
            "--data.init_args.video_frames", "3", "--data.init_args.resolution", "16",
            "--data.init_args.label_key", "cls", "--data.init_args.num_classes", "2",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--model.net.video_frames", "3",
            "--model.net.scan_type", "zzvideo_sst", "--model.net.num_classes", "2", "--model.vae", str(tiny_vae_dir),
            runs=runs, timeout=300)  # fmt: skip
    ckpt = next(runs.glob("shards/version_*/checkpoints/last.ckpt"))
    assert torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"] == 2


def test_reference_clips_are_every_video_in_order_with_frames_kept_together(tmp_path):
    shards = write(tmp_path / "shards", [3, 2])
    dm = VideoWebDataModule(shards, frames_key="frames.npy", video_frames=3, resolution=16, batch_size=4,
                            num_workers=0)  # fmt: skip
    batches = list(dm.reference_pixels(batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 3, 16, 16)] * 2 + [(1, 3, 3, 16, 16)]
    clips = torch.cat(batches)
    for index in range(5):  # shard order; each clip's frames consecutive, at the crop validation would take
        video, frames = video_and_frames(clips[index])
        start = int(sample_rng(0, f"{index:06d}", 0, 0, _CROP).integers(T - 3 + 1))
        assert video == index and frames.tolist() == [start, start + 1, start + 2]
