"""The data tool's shard writing: one shard per task (written atomically, in this process or a worker process that
ends with its parent), and the check that a shard an earlier run wrote is whole (resume)."""

from __future__ import annotations

import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import tarfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from datamodules.images import load_image
from datamodules.manifest import JPEG_QUALITY
from datamodules.prepare.encoding import LatentMode, StoreDtype, encode_captions, encode_latents, to_pixels
from datamodules.prepare.inputs import Item, Kind
from datamodules.prepare.videos import load_clip
from datamodules.shards import complete_shard_keys
from zigma.files import atomic_write, open_temporaries, temporary_writer_pid
from zigma.text_encoder import CLIPCaptionEncoder
from zigma.vae import FrozenVAE

log = logging.getLogger("zigma.data.prepare")

ImageFormat = Literal["jpg", "png"]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _image_bytes(image: Image.Image, fmt: ImageFormat) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Options:
    """Settings of one ``prepare`` run that the shard writers need (plain types: sent to worker processes)."""

    kind: Kind
    out: str
    split: str = "train"
    resolution: int = 256
    shard_size: int = 1000
    latents: LatentMode = "sample"
    latent_key: str = "latent.npy"
    dtype: StoreDtype = "float32"
    image_format: ImageFormat | None = "jpg"  # None: no pixels stored
    frames: int = 16
    frame_stride: int = 1
    seed: int = 0
    batch_size: int = 32
    max_bad: int = 100


@dataclass(frozen=True)
class ShardTask:
    shard: int
    items: tuple[Item, ...]
    options: Options

    @property
    def name(self) -> str:
        return shard_name(self.options.split, self.shard)


@dataclass
class ShardResult:
    name: str
    count: int
    bad: list[tuple[str, str]]  # (input rel path, error)
    written: bool


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:08d}"


def _load_item(item: Item, opts: Options, caption_tail: tuple[int, ...] | None) -> dict[str, Any]:
    """Decoded input: ``{"images": [PIL, ...] (1, or T frames of a video file or frame folder), "caption": array or
    None}``; raises if unreadable or too short."""
    if opts.kind == "images":
        images = [load_image(item.path, opts.resolution)]
    else:
        images = load_clip(item.path, opts.frames, opts.frame_stride, opts.resolution)
    caption = None
    if item.caption_feature is not None:
        caption = np.load(item.caption_feature, allow_pickle=False)
        if caption.ndim == 2:
            caption = caption[None]  # one caption (L, d) -> (1, L, d)
        if caption.ndim != 3 or caption.shape[1:] != caption_tail or not np.issubdtype(caption.dtype, np.floating):
            raise ValueError(f"caption features {item.caption_feature}: {caption.dtype} {caption.shape}; expected "
                             f"float (N_cap, *{caption_tail})")  # fmt: skip
        caption = caption.astype(opts.dtype)
    return {"images": images, "caption": caption}


def _chunks(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def write_shard(task: ShardTask, vae: FrozenVAE | None, caption_tail: tuple[int, ...] | None = None,
                clip: CLIPCaptionEncoder | None = None) -> ShardResult:  # fmt: skip
    """Write one shard through ``zigma.files.atomic_write`` (a temporary name, renamed to ``<name>`` when complete).

    ``clip`` encodes the caption texts of inputs that have them (``Item.captions``), one batch of inputs at a time.

    Raises:
        RuntimeError: more than ``max_bad`` of the shard's inputs are unreadable (no shard is left behind).
    """
    opts = task.options
    bad: list[tuple[str, str]] = []
    count = 0
    per_call = opts.batch_size if opts.kind == "images" else 1
    # fixed mtime: reproducible bytes
    with atomic_write(Path(opts.out) / task.name) as stream, wds.TarWriter(stream, encoder=False, mtime=0) as sink:
        for chunk in _chunks(task.items, per_call):
            loaded = []
            for item in chunk:
                try:
                    loaded.append((item, _load_item(item, opts, caption_tail)))
                except Exception as err:  # an unreadable input: counted and skipped
                    bad.append((item.rel, f"{type(err).__name__}: {err}"))
            if len(bad) > opts.max_bad:
                raise RuntimeError(
                    f"{task.name}: {len(bad)} unreadable inputs, more than --max-bad {opts.max_bad} (last: "
                    f"{bad[-1][0]}: {bad[-1][1]}); fix or remove them, or raise --max-bad"
                )
            if not loaded:
                continue
            encode_captions(loaded, clip, opts.dtype)
            pixels = to_pixels([im for _, x in loaded for im in x["images"]])  # (N, 3, S, S)
            if opts.kind == "videos":
                pixels = pixels.view(len(loaded), -1, *pixels.shape[1:])  # (B, T, 3, S, S)
            latents = encode_latents(vae, pixels, [it.index for it, _ in loaded], mode=opts.latents,
                                     latent_key=opts.latent_key, seed=opts.seed, dtype=opts.dtype)  # fmt: skip
            for (item, x), arrays in zip(loaded, latents):
                sample: dict[str, Any] = {"__key__": sample_key(item.index), "src.txt": item.rel.encode()}
                if opts.image_format is not None and opts.kind == "images":
                    sample[opts.image_format] = _image_bytes(x["images"][0], opts.image_format)
                sample.update({k: _npy_bytes(a) for k, a in arrays.items()})
                if item.label is not None:
                    sample["cls"] = str(item.label).encode()
                if x["caption"] is not None:
                    sample["caption_feature.npy"] = _npy_bytes(x["caption"])
                sink.write(sample)
                count += 1
    return ShardResult(task.name, count, bad, written=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(out: Path, split: str) -> list[Path]:
    """Delete the temporary shard files of ``split`` in ``out`` whose writing process no longer runs (and the fixed
    ``<name>.tmp`` names of earlier versions of this tool); returns them."""
    removed = []
    for path in sorted(out.glob(f".{split}-*.tar.*.tmp")) + sorted(out.glob(f"{split}-*.tar.tmp")):
        pid = temporary_writer_pid(path)
        if pid is not None and _pid_alive(pid):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d temporary files of interrupted runs (%s, ...)", len(removed), removed[0].name)
    return removed


def read_done_shard(task: ShardTask, recorded: Mapping[str, Any] | None = None) -> ShardResult | None:
    """The result of a shard an earlier run completed (its bad inputs are those whose key it lacks), or None if the
    file is not whole and must be rewritten (its inputs are then read again, not blamed).

    Whole: ``complete_shard_keys`` reads it to its end-of-archive marker, it holds only keys of ``task``'s inputs,
    and as many samples as ``recorded`` (the manifest's entry for it, ``{"name", "count", ...}``) says, if given.
    A file cut exactly between two members passes tar's own reading; the marker and the count catch it.
    """
    path = Path(task.options.out) / task.name
    try:
        keys = set(complete_shard_keys(path))
    except (OSError, tarfile.TarError) as err:
        log.warning("%s is damaged (%s); rewriting it", path, err)
        return None
    expected = {sample_key(it.index) for it in task.items}
    if keys - expected:
        log.warning("%s holds samples of other inputs (%s, ...); rewriting it", path, sorted(keys - expected)[0])
        return None
    if recorded is not None and len(keys) != int(recorded["count"]):
        log.warning("%s holds %d samples, the manifest recorded %d (damaged or cut short); rewriting it", path,
                    len(keys), recorded["count"])  # fmt: skip
        return None
    bad = [(it.rel, "unreadable (in an earlier run)") for it in task.items if sample_key(it.index) not in keys]
    return ShardResult(task.name, len(task.items) - len(bad), bad, written=False)


# Per worker process: the VAE and caption encoder, loaded once by the pool's initializer (not shared between processes).


_WORKER_STATE: dict[str, Any] = {}


def init_worker(vae_kwargs: dict[str, Any] | None, caption_tail: tuple[int, ...] | None, threads: int,
                 clip_kwargs: dict[str, Any] | None = None) -> None:  # fmt: skip
    exit_with_parent()
    torch.set_num_threads(threads)
    _WORKER_STATE["vae"] = FrozenVAE(**vae_kwargs) if vae_kwargs is not None else None
    _WORKER_STATE["caption_tail"] = caption_tail
    _WORKER_STATE["clip"] = CLIPCaptionEncoder(**clip_kwargs) if clip_kwargs is not None else None


def exit_with_parent() -> None:
    """In a worker process: end this process as soon as the process that started it ends, however it ends
    (SIGKILL included), removing the temporary file it was writing.

    A daemon thread waits on ``multiprocessing.parent_process().sentinel``, a file descriptor that turns readable
    when the parent's end of it closes, which the kernel does when the parent dies; the thread then exits the
    process. It runs while the main thread decodes or encodes (those release the GIL) and costs nothing while it
    waits. Not ``prctl(PR_SET_PDEATHSIG)``: under the ``forkserver`` start method the worker's parent is the fork
    server, not the ``prepare`` process, and the fork server lives on as long as any worker holds its "alive" pipe,
    so the signal would never come; under ``spawn`` it would fire when the thread that started the worker ends,
    which is not the process. Nor polling ``os.getppid()``: under ``forkserver`` it is the fork server's pid.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def wait_then_exit() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        for tmp in open_temporaries():
            tmp.unlink(missing_ok=True)
        os._exit(1)

    threading.Thread(target=wait_then_exit, name="exit-with-parent", daemon=True).start()


def run_task(task: ShardTask) -> ShardResult:
    return write_shard(task, _WORKER_STATE["vae"], _WORKER_STATE["caption_tail"], _WORKER_STATE["clip"])


def worker_context(captions: bool = False, vae: bool = True) -> multiprocessing.context.BaseContext:
    """Fresh worker processes, never forks of this one (which may hold a CUDA context or OpenMP threads).

    ``forkserver`` where available: one clean server process imports the heavy dependencies once, and every worker
    is forked from it; else ``spawn`` (each worker imports them itself). Not this module itself: under ``python -m``
    the workers run it as ``__mp_main__``, and runpy warns when it is imported already. diffusers only with a VAE
    (``vae``), transformers only with a caption encoder (``captions``).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    preload = ["datamodules", "datamodules.manifest", "zigma.vae", "webdataset"]
    context.set_forkserver_preload(preload + (["diffusers"] if vae else []) + (["transformers"] if captions else []))
    return context


__all__ = [
    "ImageFormat",
    "Options",
    "ShardResult",
    "ShardTask",
    "exit_with_parent",
    "read_done_shard",
    "remove_stale_temps",
    "write_shard",
]
