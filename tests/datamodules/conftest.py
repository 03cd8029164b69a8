"""Tiny webdataset shards built on the fly in ``tmp_path`` (no download).

Sample ``i`` (counted across all shards of one call) has key ``f"{i:06d}"`` and data that encode ``i``: its latent is
filled with ``i``, its label is ``i % num_classes``, caption ``c`` is filled with ``100 * i + c``, frame ``t`` of its
video latent with ``100 * i + t``; images are random pixels seeded by ``i``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def image_bytes(index: int, size: tuple[int, int], fmt: str) -> bytes:
    """A random RGB image of ``size`` = (width, height), seeded by ``index``, encoded as ``fmt`` (jpg or png)."""
    pixels = np.random.default_rng(index).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG" if fmt == "jpg" else "PNG")
    return buffer.getvalue()


def write_shards(directory: Path, counts: Sequence[int], *, prefix: str = "train", start: int = 0,
                 latent_key: str | None = "img_feature256.npy", latent_shape: tuple[int, ...] = (4, 4, 4),
                 num_classes: int = 0, captions: tuple[int, int, int] | None = None, image: str | None = None,
                 image_size: tuple[int, int] = (12, 10), video_frames: int = 0,
                 video_shape: tuple[int, int, int] = (4, 2, 2),
                 extra: Callable[[int], dict[str, bytes]] | None = None) -> list[str]:  # fmt: skip
    """Shards ``{prefix}-000000.tar ...`` holding ``counts[k]`` samples each; returns their paths.

    Args:
        latent_key: suffix of a (``latent_shape``) float32 latent filled with the sample index; None: no latent.
        num_classes: > 0 adds a ``cls`` label ``index % num_classes``.
        captions: (N_cap, L, d) adds ``caption_feature.npy`` with caption c filled with ``100 * index + c``.
        image: ``"jpg"`` or ``"png"`` adds a random image of ``image_size`` (width, height).
        video_frames: > 0 adds ``frame_feature256.npy`` (video_frames, *video_shape) with frame t = 100 * index + t.
        extra: ``extra(index)`` -> more {suffix: bytes} for the sample.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths, index = [], start
    for shard, count in enumerate(counts):
        path = directory / f"{prefix}-{shard:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            for _ in range(count):
                sample: dict[str, object] = {"__key__": f"{index:06d}"}
                if latent_key is not None:
                    sample[latent_key] = npy_bytes(np.full(latent_shape, index, dtype=np.float32))
                if num_classes > 0:
                    sample["cls"] = str(index % num_classes).encode()
                if captions is not None:
                    n_cap, length, dim = captions
                    feats = np.stack([np.full((length, dim), 100 * index + c, np.float32) for c in range(n_cap)])
                    sample["caption_feature.npy"] = npy_bytes(feats)
                if image is not None:
                    sample[image] = image_bytes(index, image_size, image)
                if video_frames > 0:
                    frames = np.stack([np.full(video_shape, 100 * index + t, np.float32) for t in range(video_frames)])
                    sample["frame_feature256.npy"] = npy_bytes(frames)
                if extra is not None:
                    sample.update(extra(index))
                sink.write(sample)
                index += 1
        paths.append(str(path))
    return paths


@pytest.fixture
def make_shards(tmp_path: Path) -> Callable[..., list[str]]:
    """``make_shards(counts, **kw)``: ``write_shards`` into a fresh folder of ``tmp_path`` per call."""
    calls = iter(range(1000))

    def make(counts: Sequence[int], **kwargs) -> list[str]:
        return write_shards(tmp_path / f"shards{next(calls)}", counts, **kwargs)

    return make
