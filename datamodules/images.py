"""Image files: listing (folders of images, folders of video frames) in natural order, loading, and the images
stored in tar shards, all cropped by ``zigma.images.resize_center_crop`` (the data tool, the loaders and the FID
reference statistics must agree on it)."""

from __future__ import annotations

import io
import itertools
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from datamodules.tars import shard_samples
from zigma.images import resize_center_crop

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def natural_key(name: str) -> tuple[list[Any], str]:
    """Sort key putting ``f2`` before ``f10`` (digit runs compare as numbers, text case-insensitively; ties by the
    exact name, so the order never depends on the file system's listing order)."""
    parts = re.split(r"(\d+)", name)
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(parts)], name


def is_image(path: Path) -> bool:
    """A visible file with an image extension (:data:`IMAGE_EXTENSIONS`, any case)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _image_folders(folder: Path, accept: Callable[[Path], bool] = is_image) -> Iterator[tuple[Path, list[Path]]]:
    """(directory, the files directly in it that ``accept`` takes: images) for ``folder`` and every folder below it;
    hidden folders skipped."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield Path(root), [Path(root) / f for f in files if accept(Path(root) / f)]


def files_under(folder: str | os.PathLike, accept: Callable[[Path], bool]) -> list[Path]:
    """The files under ``folder`` (recursive, hidden folders skipped) that ``accept`` takes, in natural order of
    their path relative to ``folder``."""
    folder = Path(folder)
    files = [f for _, found in _image_folders(folder, accept) for f in found]
    return sorted(files, key=lambda p: natural_key(p.relative_to(folder).as_posix()))


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), in natural order of their path relative to ``folder``.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images: {folder} is not a directory")
    return files_under(folder, is_image)


def frame_folders(folder: str | os.PathLike) -> list[Path]:
    """The folders below ``folder`` (not itself) that directly hold images: one video's frames each."""
    folder = Path(folder)
    return [d for d, images in _image_folders(folder) if images and d != folder]


def frame_files(folder: str | os.PathLike) -> list[Path]:
    """The frame images directly inside ``folder``, in natural order."""
    return sorted((p for p in Path(folder).iterdir() if is_image(p)), key=lambda p: natural_key(p.name))


def load_image(path: str | os.PathLike, resolution: int) -> Image.Image:
    """The RGB ``resolution`` x ``resolution`` centre crop of an image file; raises (OSError, ValueError, ...) if it
    cannot be decoded."""
    with Image.open(path) as image:
        image.load()  # decode now: a truncated file raises here, not later
        return resize_center_crop(image, resolution)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_image_uint8(path: str | os.PathLike, resolution: int) -> torch.Tensor:
    """An image file -> uint8 (3, S, S): RGB, shorter side resized to S (PIL bicubic), centre crop."""
    return to_uint8_tensor(load_image(path, resolution))


def batches_of(items: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stacks consecutive tensors into batches of ``batch_size`` (the last one may be smaller)."""
    items = iter(items)
    while batch := list(itertools.islice(items, batch_size)):
        yield torch.stack(batch)


def folder_batches(files: Sequence[Path], resolution: int, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches (B, 3, S, S) of the given files, in order."""
    return batches_of((load_image_uint8(f, resolution) for f in files), batch_size)


def shard_images(shards: Sequence[str], image_key: str, resolution: int) -> Iterator[torch.Tensor]:
    """uint8 (3, S, S) images stored under suffix ``image_key`` (e.g. ``jpg``) in tar shards (webdataset layout:
    member ``<key>.<suffix>``), in shard and member order; shards may be URLs (``datamodules.tars``). A shard that
    cannot be read raises (``ShardUnreachable``, a ``DataError``, when it delivers nothing); a member that does not
    decode raises with its name (reference statistics must not silently drop images)."""
    suffix = image_key.lstrip(".").lower()
    found = False
    for shard in shards:
        for sample in shard_samples(shard):
            if suffix not in sample:
                continue
            found = True
            try:
                with Image.open(io.BytesIO(sample[suffix])) as image:
                    image = resize_center_crop(image, resolution)
            except Exception as err:
                raise ValueError(f"reference shards: {shard}:{sample['__key__']}.{suffix} is not a readable "
                                 f"image: {err}") from err  # fmt: skip
            yield to_uint8_tensor(image)
    if not found:
        raise ValueError(f"reference shards {shards[0]}...: no member with suffix {'.' + suffix!r} (set the image key)")


__all__ = [
    "IMAGE_EXTENSIONS",
    "batches_of",
    "files_under",
    "folder_batches",
    "frame_files",
    "frame_folders",
    "is_image",
    "list_images",
    "load_image",
    "load_image_uint8",
    "natural_key",
    "shard_images",
    "to_uint8_tensor",
]
