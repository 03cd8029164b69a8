"""A directory of generated samples that is written batch by batch in constant memory, resumes exactly, and hands
external evaluators the single ``samples.npz`` they read.

Layout of ``<directory>``::

    manifest.json          the settings that made the samples (``zigma sample``; :func:`check_manifest`)
    shards/<first>.npz     one per batch: ``arr_0`` uint8 (n, H, W, C) or (n, T, H, W, C), ``index`` int64 (n,)
    <index:06d>.png        optional, one per sample (video: ``<index:06d>_<frame:03d>.png``)
    grid.png               the samples 0 .. 63 (those present), tiled
    samples.npz            ``arr_0``: uint8 (N, H, W, C) (or (N, T, H, W, C)) of samples 0 .. N-1 in order, and
                           ``index`` = 0 .. N-1: the layout of ADM's evaluator and clean-fid; the same samples
                           give the same bytes (fixed zip time stamps)

Every file is written atomically (``zigma.files.atomic_write``), PNGs before their shard, so a shard on disk means
its batch is complete and a killed run leaves no partial file. Memory: one shard at a time. ``samples.npz`` is
assembled by writing each shard's rows at their offsets (``os.pwrite``) into a temporary ``.npy`` file and copying
that file into the zip archive in 16 MiB chunks; a memory-mapped array (``np.lib.format.open_memmap``) would do
the same but counts every written page in the process's resident set until the kernel writes it back, so the peak
RSS would grow with N. The assembly needs the disk space of ``samples.npz`` twice for a moment.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zigma.files import atomic_write, temporary_path, temporary_writer_pid

MANIFEST_NAME = "manifest.json"
SAMPLES_NAME = "samples.npz"
GRID_NAME = "grid.png"
GRID_SIZE = 64  # the grid shows samples 0 .. GRID_SIZE - 1
_COPY_CHUNK = 1 << 24


class SampleStoreError(ValueError):
    """A store that cannot be used as asked (other settings, missing or duplicate samples); one line."""


def to_uint8_hwc(samples: torch.Tensor) -> np.ndarray:
    """Samples (B, C, H, W) or (B, T, C, H, W) in [-1, 1] -> uint8 (B, H, W, C) / (B, T, H, W, C) as NumPy:
    round((x + 1) * 127.5), clamped (``zigma.metrics.inception.to_uint8``, the value FID is computed on)."""
    from zigma.metrics.inception import to_uint8

    return to_uint8(samples.detach().cpu()).movedim(-3, -1).contiguous().numpy()


def check_manifest(directory: str | os.PathLike, settings: dict[str, Any], *, write: bool = True) -> None:
    """Refuse to mix runs: ``directory/manifest.json`` must hold ``settings`` (JSON values); a missing manifest is
    written (atomically) when ``write``.

    Raises:
        SampleStoreError: one line naming each setting that differs (``key: saved -> now``).
    """
    path = Path(directory) / MANIFEST_NAME
    now = json.loads(json.dumps(settings))  # tuples as lists, as they come back from the file
    if path.is_file():
        saved = json.loads(path.read_text()).get("settings", {})
        if saved != now:
            keys = sorted(set(saved) | set(now), key=str)
            diffs = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
            raise SampleStoreError(
                f"{directory} holds samples made with other settings ({'; '.join(diffs)}); use another output "
                "directory or the same settings"
            )
        return
    if write:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump({"format": 1, "settings": now}, f, indent=2, sort_keys=True)


class SampleStore:
    """Writes batches of uint8 samples as shards (and PNGs), then the grid and ``samples.npz``; see the module doc.

    Args:
        directory: the output directory (created).
        png: also write one PNG per sample (frame).
    """

    def __init__(self, directory: str | os.PathLike, *, png: bool = False):
        self.directory = Path(directory)
        self.png = png
        self.shard_dir = self.directory / "shards"
        self.shard_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------------------ writing
    def shard_path(self, first: int) -> Path:
        """The shard whose first sample index is ``first``."""
        return self.shard_dir / f"{first:09d}.npz"

    def has_shard(self, first: int) -> bool:
        return self.shard_path(first).is_file()

    def write(self, indices: np.ndarray | torch.Tensor, images: np.ndarray) -> Path:
        """Write one batch: ``images`` uint8 (n, H, W, C) or (n, T, H, W, C) of the samples ``indices`` (n,), in any
        order without repeats; the shard is named by ``indices[0]``. PNGs (if any) first, the shard last."""
        indices = np.asarray(indices, dtype=np.int64)
        if images.dtype != np.uint8 or len(images) != len(indices) or images.ndim not in (4, 5):
            raise ValueError(f"SampleStore.write: need uint8 (n, [T,] H, W, C) for {len(indices)} indices; got "
                             f"{images.dtype} {images.shape}")  # fmt: skip
        if self.png:
            for index, image in zip(indices.tolist(), images):
                self._write_pngs(index, image)
        path = self.shard_path(int(indices[0]))
        with atomic_write(path) as f:
            np.savez(f, arr_0=images, index=indices)
        return path

    def _write_pngs(self, index: int, image: np.ndarray) -> None:
        from PIL import Image

        frames = image if image.ndim == 4 else image[None]
        for t, frame in enumerate(frames):
            suffix = f"_{t:03d}" if image.ndim == 4 else ""
            with atomic_write(self.directory / f"{index:06d}{suffix}.png") as f:
                Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).save(f, format="PNG")

    def clear(self) -> None:
        """Remove the shards (a new ``predict`` run must not mix with an older one's)."""
        shutil.rmtree(self.shard_dir, ignore_errors=True)
        self.shard_dir.mkdir(parents=True, exist_ok=True)

    def remove_dead_temporaries(self) -> None:
        """Remove temporary files that killed writers left (their pid no longer runs)."""
        for folder in (self.directory, self.shard_dir):
            for path in folder.glob(".*.tmp"):
                pid = temporary_writer_pid(path)
                if pid is not None and pid != os.getpid() and not _running(pid):
                    path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------ reading
    def shards(self, below: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(index (n,), images) of each shard, one shard in memory at a time, in file-name order; ``below``: only
        the shards holding an index < ``below`` (the others' images are never read: an ``.npz`` member loads when
        asked for)."""
        for path in sorted(self.shard_dir.glob("*.npz")):
            with np.load(path) as data:
                index = data["index"]
                if below is None or (index < below).any():
                    yield index, data["arr_0"]

    def _indices(self) -> Iterator[np.ndarray]:
        for path in sorted(self.shard_dir.glob("*.npz")):
            with np.load(path) as data:
                yield data["index"]

    def write_grid(self, limit: int = GRID_SIZE) -> Path | None:
        """``grid.png`` of the samples with index < ``limit`` that exist (in index order); None when there are none."""
        from torchvision.utils import make_grid, save_image

        kept: dict[int, np.ndarray] = {}
        for index, images in self.shards(below=limit):  # 64 samples: a few shards read, not all N
            kept.update({int(i): image for i, image in zip(index, images) if i < limit})
        if not kept:
            return None
        images = torch.from_numpy(np.stack([kept[i] for i in sorted(kept)])).movedim(-1, -3).float() / 255
        if images.dim() == 5:  # clips: one row of frames per clip
            grid = make_grid(images.flatten(0, 1), nrow=images.shape[1], padding=1)
        else:
            grid = make_grid(images, nrow=max(1, round(len(images) ** 0.5)), padding=1)
        path = self.directory / GRID_NAME
        with atomic_write(path) as f:
            save_image(grid, f, format="png")
        return path

    def assemble(self, count: int | None = None) -> Path:
        """Write ``samples.npz`` of samples 0 .. count-1 from the shards, in constant memory (see the module doc);
        ``count`` None: as many as the shards hold.

        Raises:
            SampleStoreError: a sample is missing, repeated or has another shape than the others.
        """
        target = self.directory / SAMPLES_NAME
        if count is None:
            count = sum(len(index) for index in self._indices())
        npy = temporary_path(self.directory / "samples.npy")
        seen = np.zeros(count, dtype=bool)
        try:
            with open(npy, "xb") as f:
                offset, row_bytes, sample_shape = None, 0, None
                for index, images in self.shards():
                    if sample_shape is None:
                        sample_shape = images.shape[1:]
                        offset = _write_npy_header(f, (count, *sample_shape))
                        row_bytes = int(np.prod(sample_shape))
                        f.truncate(offset + count * row_bytes)
                    if images.shape[1:] != sample_shape:
                        raise SampleStoreError(f"{self.shard_dir}: samples of shape {images.shape[1:]} and "
                                               f"{sample_shape} in one directory")  # fmt: skip
                    _check_new_indices(index, seen, self.shard_dir)
                    for i, image in zip(index.tolist(), images):
                        os.pwrite(f.fileno(), image.tobytes(), offset + i * row_bytes)
                missing = np.flatnonzero(~seen)
                if len(missing):
                    raise SampleStoreError(f"{self.shard_dir} lacks {len(missing)} of {count} samples (first: index "
                                           f"{int(missing[0])}); run the same command again to make them")  # fmt: skip
            with atomic_write(target) as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                with z.open(_member("arr_0.npy"), "w", force_zip64=True) as member, open(npy, "rb") as src:
                    shutil.copyfileobj(src, member, _COPY_CHUNK)
                buffer = io.BytesIO()
                np.save(buffer, np.arange(count, dtype=np.int64))
                z.writestr(_member("index.npy"), buffer.getvalue())
        finally:
            npy.unlink(missing_ok=True)
        return target


def _member(name: str) -> zipfile.ZipInfo:
    """A zip entry with a fixed time stamp, so the same samples give the same ``samples.npz`` bytes."""
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))


def _write_npy_header(f, shape: tuple[int, ...]) -> int:
    """Write the ``.npy`` header of a C-ordered uint8 array of ``shape``; returns the data offset."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_2_0(f, header)
    return f.tell()


def _check_new_indices(index: np.ndarray, seen: np.ndarray, where: Path) -> None:
    count = len(seen)
    if len(index) and (index.min() < 0 or index.max() >= count):
        bad = int(index[(index < 0) | (index >= count)][0])
        raise SampleStoreError(f"{where} holds sample {bad}, outside 0 .. {count - 1}: another run's shards are here")
    repeated = index[seen[index]]
    if not len(repeated):
        values, counts = np.unique(index, return_counts=True)
        repeated = values[counts > 1]
    if len(repeated):
        raise SampleStoreError(f"{where} holds sample {int(repeated[0])} twice: another run's shards are here")
    seen[index] = True


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["SampleStore", "SampleStoreError", "check_manifest", "to_uint8_hwc"]
