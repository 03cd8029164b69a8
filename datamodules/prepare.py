"""Write webdataset shards of images (or frame folders) with their raw VAE latents, labels and caption features.

Usage::

    python -m datamodules.prepare images SRC --out DIR [--vae PATH_OR_ID] [--resolution 256] [--shard-size 1000]
        [--workers N] [--device cpu] [--latents sample|mean|moments|both-flips|none] [--dtype float32|float16]
        [--labels none|folders|list|NAMES_FILE] [--captions FILE] [--clip PATH_OR_ID] [--split train] [--seed 0]
        [--max-bad 100]
    python -m datamodules.prepare videos SRC --out DIR --frames 16 [--frame-stride 1] ... (same options)

Inputs (the sorted input list fixes every sample's key and shard, so reruns and worker counts give the same shards):

- ``SRC`` a folder: images (``.jpg .jpeg .png .webp``, recursive) or, for ``videos``, every folder that directly
  holds frame images (one video; frames in natural order: ``f2`` before ``f10``). With ``--labels folders`` the class
  is the first folder under ``SRC`` (``SRC/<class>/.../x.jpg``; for videos ``SRC/<class>/<video>/``); for a list
  file, the first folder of each ``path``.
- ``SRC`` a list file (``.csv``, ``.tsv`` or ``.jsonl``) with a ``path`` column (relative to the list file) and
  optionally ``label`` (a class name or an integer id; ``--labels list``) and either ``caption_feature`` (a ``.npy``
  of precomputed text features (N_cap, L, d), e.g. CLIP ViT-L/14 (N_cap, 77, 768) as upstream ZigMa uses) or
  ``caption`` text (one string, or a JSON list of strings: the image's N_cap captions), which needs ``--clip``.
- ``--labels NAMES_FILE``: class names, one per line (``<id> <name>`` lines as in UCF101's ``classInd.txt`` are read
  as the name), whose order fixes the ids; the names come from the folders (folder input) or the ``label`` column.
- ``--captions FILE``: a list file with ``path`` and ``caption_feature`` or ``caption`` columns joined to the inputs
  by path.
- ``--clip PATH_OR_ID``: encode the ``caption`` text with a CLIP text model (``zigma.text_encoder``; a local
  directory, or a hub id in the local cache unless ``--allow-download``; upstream's is openai/clip-vit-large-patch14):
  the last hidden states, 77 tokens (padded and truncated), (N_cap, 77, d) per image, computed by the worker that
  writes the image's shard. A ``caption`` column without ``--clip`` is an error; with ``--clip`` every input needs
  caption text and no ``caption_feature``.

Each sample, with key ``f"{index:08d}"`` (its position in the sorted input list):

- ``jpg`` (or ``png``): the shorter side resized to ``--resolution`` (PIL bicubic, antialiased), the centre square
  cropped (the same preprocessing as ``WebDataModule(kind="image")``), JPEG quality 95 with 4:4:4 chroma: FID reals.
  Not written for videos.
- raw, unscaled VAE latents (the model multiplies them by ``vae.scale``), float32 or float16 ``.npy``, under
  ``--latent-key`` (``latent.npy`` for images; upstream's ``frame_feature256.npy`` for videos, whatever the
  resolution, for compatibility with UCF101 shards and ``VideoWebDataModule``'s default):
  ``sample``: a posterior sample (C, h, w) as upstream stores, drawn from ``(seed, index)``;
  ``mean``: the posterior mean (C, h, w); ``moments``: ``<stem>_mean.npy`` and ``<stem>_std.npy`` (C, h, w) each
  (EDM2's practice: draw a fresh sample each epoch); ``both-flips``: posterior samples of the image and of its
  mirror image stacked (2, C, h, w) (images only); ``none``: pixels only. Videos: (T, C, h, w), frame-wise.
- ``cls``: the class id as decimal text; ``caption_feature.npy``: the caption features (N_cap, L, d) in ``--dtype``;
  ``src.txt``: the input's path relative to ``SRC`` (or to the list file).

Shards are ``DIR/{split}-{000000..}.tar``, ``--shard-size`` inputs each; each is written under a temporary name unique
to the writing process (``.<name>.<pid>-<random>.tmp``) and renamed when complete. A rerun skips shards whose final
file is whole (its end-of-archive marker is there, and it holds the samples the manifest recorded for it) and rewrites
the others, so an interrupted run resumes and a damaged or cut shard is rewritten, its inputs not blamed; it removes
the temporary files of processes that no longer run. Settings or inputs that differ from the directory's manifest are
refused. Worker processes (``--workers N``) end with the process that started them, however it ends (SIGKILL too).
Unreadable inputs are logged with their path and skipped, up to ``--max-bad`` in all; one more stops the run with an
error. ``DIR/manifest.json`` (``datamodules.manifest``) records the settings, the VAE's ``config()``, the caption
encoder's ``config()`` (``caption_encoder``, with ``--clip``), the classes, shapes and per-shard sample counts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import hashlib
import io
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import secrets
import shlex
import sys
import tarfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from datamodules.manifest import (
    FORMAT,
    MANIFEST_NAME,
    VERSION,
    diff_settings,
    read_manifest,
    settings_of,
    write_manifest,
)
from datamodules.shards import complete_shard_keys
from zigma.images import resize_center_crop
from zigma.text_encoder import CLIPCaptionEncoder
from zigma.vae import DEFAULT_VAE, FrozenVAE

log = logging.getLogger("zigma.data.prepare")

Kind = Literal["images", "videos"]
LatentMode = Literal["sample", "mean", "moments", "both-flips", "none"]
StoreDtype = Literal["float32", "float16"]
ImageFormat = Literal["jpg", "png"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
LIST_EXTENSIONS = (".csv", ".tsv", ".jsonl")
LABEL_MODES = ("none", "folders", "list")  # or a names file
DEFAULT_LATENT_KEY: dict[str, str] = {"images": "latent.npy", "videos": "frame_feature256.npy"}
CROP = "resize-shorter-side-bicubic+center-crop"
JPEG_QUALITY = 95
MAX_BAD_PATHS = 100  # bad inputs listed in the manifest (all are counted)
_SAMPLE_STREAM = 0  # SeedSequence stream of posterior samples


# ------------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Item:
    """One input: an image file or a folder of video frames.

    Attributes:
        index: position in the sorted input list; the sample key is ``f"{index:08d}"`` and its shard
            ``index // shard_size``.
        path: absolute path of the image file or frame folder.
        rel: path relative to the source folder or list file (stored as ``src.txt``).
        label: class id, or None.
        caption_feature: absolute path of a (N_cap, L, d) ``.npy``, or None.
        captions: the N_cap caption texts to encode (``--clip``), or None.
    """

    index: int
    path: str
    rel: str
    label: int | None = None
    caption_feature: str | None = None
    captions: tuple[str, ...] | None = None


@dataclass
class Inputs:
    """The sorted input list and what it implies for the manifest."""

    items: list[Item]
    label_names: list[str] = field(default_factory=list)
    label_source: str | None = None
    caption_feature_shape: list[int | None] | None = None

    def fingerprint(self) -> dict[str, Any]:
        """``{"count", "sha256"}`` of the list (paths, labels, caption files or texts): reruns must see the same
        list."""
        digest = hashlib.sha256()
        for item in self.items:
            caption = Path(item.caption_feature).name if item.caption_feature else None  # movable data: no abs paths
            texts = "" if item.captions is None else "\t" + json.dumps(item.captions, ensure_ascii=False)
            digest.update(f"{item.rel}\t{item.label}\t{caption}{texts}\n".encode())
        return {"count": len(self.items), "sha256": digest.hexdigest()}


def _natural_key(name: str) -> list[Any]:
    """Sort key putting ``f2`` before ``f10`` (digit runs compare as numbers)."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def frame_files(folder: str | os.PathLike) -> list[Path]:
    """The frame images directly inside ``folder``, in natural order."""
    return sorted((p for p in Path(folder).iterdir() if _is_image(p)), key=lambda p: _natural_key(p.name))


def _scan_folder(src: Path, kind: Kind) -> list[Path]:
    """Image files (recursive) or, for videos, folders that directly hold frame images; hidden entries skipped."""
    found = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if kind == "images":
            found.extend(Path(root) / f for f in files if _is_image(Path(root) / f))
        elif any(_is_image(Path(root) / f) for f in files) and Path(root) != src:
            found.append(Path(root))
    return found


def _read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV, TSV or JSONL list file, each with a ``path``.

    Raises:
        ValueError: an unknown extension, a malformed line, or a row without ``path``.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not a JSON object: {err}") from err
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object; got {type(row).__name__}")
                rows.append(row)
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise ValueError(f"list file {path}: extension {suffix!r} not one of {list(LIST_EXTENSIONS)}")
    for number, row in enumerate(rows, 1):
        if not row.get("path"):
            raise ValueError(f"list file {path}: row {number} has no 'path' (columns: {sorted(row)})")
    return rows


def _read_names(path: Path) -> list[str]:
    """Class names, one per line; an ``<id> <name>`` line (UCF101's ``classInd.txt``) gives ``<name>``."""
    names = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            names.append(parts[-1] if len(parts) == 2 and parts[0].isdigit() else line.strip())
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--labels {path}: needs distinct class names, one per line; got {len(names)} lines")
    return names


def _label_ids(raw: list[str], names: list[str] | None, where: str) -> tuple[list[int], list[str]]:
    """Class ids for raw labels: by ``names`` order; else integers as ids, or sorted distinct names."""
    if names is not None:
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted({r for r in raw if r not in index})
        if unknown:
            raise ValueError(f"{where}: labels {unknown[:5]} are not in the names file ({len(names)} names)")
        return [index[r] for r in raw], list(names)
    if all(re.fullmatch(r"\d+", r) for r in raw):
        ids = [int(r) for r in raw]
        return ids, [str(i) for i in range(max(ids) + 1)]
    names = sorted(set(raw))
    index = {name: i for i, name in enumerate(names)}
    return [index[r] for r in raw], names


def _caption_shape(paths: Sequence[str | None]) -> list[int | None] | None:
    """(N_cap, L, d) of the readable caption files (N_cap None when it varies); None without captions."""
    shapes = set()
    for path in paths:
        if path is None:
            continue
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError):
            continue  # counted as a bad sample when its shard is written
        shapes.add((1, *shape) if len(shape) == 2 else tuple(shape))
    if not shapes:
        return None
    tails = {s[1:] for s in shapes if len(s) == 3}
    if len(tails) != 1:
        raise ValueError(f"caption features must be (N_cap, L, d) with one (L, d) for all inputs; got {sorted(shapes)}")
    counts = {s[0] for s in shapes}
    return [counts.pop() if len(counts) == 1 else None, *tails.pop()]


def _caption_texts(value: Any, where: str) -> tuple[str, ...]:
    """The captions of one ``caption`` cell: a string, or a JSON list of strings (a list in JSONL, or its text)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError):  # else a caption that happens to start with '['
            value = json.loads(value)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c.strip() for c in value):
        raise ValueError(f"{where}: 'caption' must be a string or a non-empty JSON list of non-empty strings; got "
                         f"{str(value)[:80]!r}")  # fmt: skip
    return tuple(value)


def _has_text(row: Mapping[str, Any]) -> bool:
    return row.get("caption") not in (None, "")


def list_inputs(src: str | os.PathLike, kind: Kind, *, labels: str = "none", captions: str | None = None,
                caption_text: bool = False) -> Inputs:  # fmt: skip
    """The sorted input list of a folder or list file, with class ids and caption feature files or texts.

    Args:
        src: a folder of images / frame folders, or a ``.csv``/``.tsv``/``.jsonl`` list file.
        kind: ``"images"`` or ``"videos"``.
        labels: ``"none"``, ``"folders"``, ``"list"`` or a names file (see the module docstring).
        captions: a list file with ``path`` and ``caption_feature`` or ``caption`` columns joined by path.
        caption_text: the ``caption`` texts will be encoded (``--clip``): every input needs one, and no
            ``caption_feature`` may be given. When False, a ``caption`` without a ``caption_feature`` is an error.

    Raises:
        ValueError: no input, a label or caption setting that does not fit the input (named in the message).
    """
    source = Path(src).expanduser().resolve()
    if not source.exists():
        raise ValueError(f"SRC={str(src)!r} does not exist")
    names = None
    if labels not in LABEL_MODES:
        if not Path(labels).is_file():
            raise ValueError(f"--labels {labels!r}: must be one of {list(LABEL_MODES)} or an existing names file")
        names = _read_names(Path(labels))
    rows: list[dict[str, Any]]
    if source.is_dir():
        if labels == "list":
            raise ValueError("--labels list needs a list file as SRC; for a folder use --labels folders")
        base = source
        rows = [{"path": str(p)} for p in _scan_folder(source, kind)]
    elif source.suffix.lower() in LIST_EXTENSIONS:
        base = source.parent
        rows = _read_table(source)
    else:
        raise ValueError(f"SRC={str(src)!r}: neither a folder nor a list file ({', '.join(LIST_EXTENSIONS)})")
    for row in rows:
        row["abs"] = str((base / row["path"]).resolve())
        row["rel"] = Path(os.path.relpath(row["abs"], base)).as_posix()
    rows.sort(key=lambda r: r["rel"])
    if not rows:
        what = "image files" if kind == "images" else "folders of frame images"
        raise ValueError(f"SRC={str(src)!r}: no inputs found ({what} with extensions {list(IMAGE_EXTENSIONS)})")

    if captions is not None:
        table = {str((Path(captions).parent / r["path"]).resolve()): r for r in _read_table(Path(captions))}
        for row in rows:
            if row["abs"] in table and table[row["abs"]].get("caption_feature"):
                row["caption_feature"] = table[row["abs"]]["caption_feature"]
                row["caption_base"] = str(Path(captions).resolve().parent)
            if row["abs"] in table and _has_text(table[row["abs"]]):
                row["caption"] = table[row["abs"]]["caption"]
    where = f"--captions {captions}" if captions is not None else str(source)
    texts = [r for r in rows if _has_text(r)]
    if caption_text:
        if not texts:
            raise ValueError("--clip: no input has 'caption' text to encode (a 'caption' column in SRC or --captions)")
        with_features = [r["rel"] for r in rows if r.get("caption_feature")]
        if with_features:
            raise ValueError(
                f"--clip encodes the 'caption' texts, but {where} also gives caption_feature files (first for "
                f"{with_features[0]!r}): drop --clip to store the precomputed features, or the caption_feature column"
            )
        missing = [r["rel"] for r in rows if not _has_text(r)]
        if missing:
            raise ValueError(f"--clip: caption text is given for some inputs but not for {missing[0]!r}; give it "
                             "for all")  # fmt: skip
        for row in rows:
            row["captions"] = _caption_texts(row["caption"], f"{where}: {row['rel']}")
    else:
        text_only = [r["rel"] for r in texts if not r.get("caption_feature")]
        if text_only:
            raise ValueError(
                f"{where}: {len(text_only)} inputs have 'caption' text but no 'caption_feature' (first "
                f"{text_only[0]!r}): pass --clip PATH_OR_ID to encode them with a CLIP text model (upstream: "
                "openai/clip-vit-large-patch14, (N_cap, 77, 768) features), or list precomputed .npy files in a "
                "caption_feature column"
            )
    for row in rows:
        if row.get("caption_feature"):
            row["caption_abs"] = str((Path(row.get("caption_base", base)) / row["caption_feature"]).resolve())

    label_source = None
    ids: list[int | None] = [None] * len(rows)
    label_names: list[str] = []
    if labels != "none":
        if labels == "list" or (names is not None and not source.is_dir() and all("label" in r for r in rows)):
            missing = [r["rel"] for r in rows if str(r.get("label", "")).strip() == ""]
            if missing:
                raise ValueError(
                    f"--labels {labels}: {len(missing)} rows of {source} have no label (first {missing[0]})"
                )
            raw = [str(r["label"]).strip() for r in rows]
            label_source = "list" if names is None else f"list, names file {Path(labels).name}"
        else:
            parts = [Path(os.path.relpath(r["abs"], base)).parts for r in rows]
            flat = [r["rel"] for r, p in zip(rows, parts) if len(p) < 2 or p[0] == ".."]
            if flat:
                raise ValueError(
                    f"--labels {labels}: the class is the first folder under SRC, but {flat[0]!r} is not in a "
                    "class folder; use --labels none or move it"
                )
            raw = [p[0] for p in parts]
            label_source = "folders" if names is None else f"folders, names file {Path(labels).name}"
        ids, label_names = _label_ids(raw, names, f"--labels {labels}")  # type: ignore[assignment]

    items = [
        Item(
            index=i,
            path=r["abs"],
            rel=r["rel"],
            label=ids[i],
            caption_feature=r.get("caption_abs"),
            captions=r.get("captions"),
        )
        for i, r in enumerate(rows)
    ]
    cap_shape = _caption_shape([it.caption_feature for it in items])
    if cap_shape is not None and any(it.caption_feature is None for it in items):
        first = next(it.rel for it in items if it.caption_feature is None)
        raise ValueError(f"caption features are given for some inputs but not for {first!r}; give them for all")
    return Inputs(items, label_names, label_source, cap_shape)


# ------------------------------------------------------------------------------------------- pixels and latents
def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """RGB ``resolution`` x ``resolution``: shorter side resized to it (bicubic, antialiased), centre square cropped.

    ``zigma.images.resize_center_crop``, shared with the loaders and the FID reference statistics, so stored images,
    on-the-fly image batches and FID reals agree.
    """
    return resize_center_crop(image, resolution)


def load_image(path: str | os.PathLike, resolution: int) -> Image.Image:
    """The centre crop of an image file; raises (OSError, ValueError, ...) if it cannot be decoded."""
    with Image.open(path) as image:
        image.load()  # decode now: a truncated file raises here, not later
        return center_crop(image, resolution)


def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 3, S, S) float32 in [-1, 1] from RGB images: x / 127.5 - 1 (the VAE's input convention)."""
    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # (B, S, S, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample ``index``'s posterior draws: a function of (seed, index) only."""
    state = np.random.SeedSequence([seed, _SAMPLE_STREAM, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def latent_keys(mode: LatentMode, latent_key: str) -> dict[str, str]:
    """Shard key -> what it holds, for a latent mode; ``{}`` for ``none``."""
    stem = latent_key.removesuffix(".npy")
    return {
        "sample": {latent_key: "posterior sample"},
        "mean": {latent_key: "posterior mean"},
        "moments": {f"{stem}_mean.npy": "posterior mean", f"{stem}_std.npy": "posterior std"},
        "both-flips": {latent_key: "posterior samples of the image [0] and of its mirror image [1]"},
        "none": {},
    }[mode]


def encode_latents(vae: FrozenVAE, pixels: torch.Tensor, indices: Sequence[int], *, mode: LatentMode,
                   latent_key: str, seed: int, dtype: StoreDtype) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """The latent arrays to store for each sample of a batch.

    Args:
        pixels: (B, 3, S, S) or (B, T, 3, S, S) float32 in [-1, 1].
        indices: (B,) sample indices (seed the posterior draws).
    Returns: B dicts {shard key: raw latent array}: (C, h, w), (T, C, h, w), or (2, C, h, w) for ``both-flips``,
        in ``dtype``.
    """
    keys = list(latent_keys(mode, latent_key))
    if mode == "none":
        return [{} for _ in indices]
    batch = len(indices)
    if mode == "both-flips":
        pixels = torch.cat([pixels, pixels.flip(-1)])  # (2B, 3, S, S): originals, then mirror images
    mean, std = vae.encode_moments(pixels)  # each (B or 2B, [T,] C, h, w), raw
    out = []
    for b, index in enumerate(indices):
        if mode == "mean":
            arrays = [mean[b]]
        elif mode == "moments":
            arrays = [mean[b], std[b]]
        else:
            gen = sample_generator(seed, index)
            z = vae.sample_from_moments(mean[b], std[b], gen)  # ([T,] C, h, w)
            if mode == "both-flips":
                z = torch.stack([z, vae.sample_from_moments(mean[batch + b], std[batch + b], gen)])  # (2, C, h, w)
            arrays = [z]
        out.append({k: a.cpu().numpy().astype(dtype) for k, a in zip(keys, arrays)})
    return out


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


# ------------------------------------------------------------------------------------------------------- shards
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
    """Decoded input: ``{"images": [PIL, ...] (1 or T), "caption": array or None}``; raises if unreadable."""
    if opts.kind == "images":
        images = [load_image(item.path, opts.resolution)]
    else:
        frames = frame_files(item.path)
        need = (opts.frames - 1) * opts.frame_stride + 1
        if len(frames) < need:
            raise ValueError(f"{len(frames)} frames; --frames {opts.frames} --frame-stride {opts.frame_stride} "
                             f"need {need}")  # fmt: skip
        images = [load_image(p, opts.resolution) for p in frames[: need : opts.frame_stride]]
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
    """Write one shard under ``<name>.tmp`` and rename it to ``<name>`` when complete.

    ``clip`` encodes the caption texts of inputs that have them (``Item.captions``), one batch of inputs at a time.

    Raises:
        RuntimeError: more than ``max_bad`` of the shard's inputs are unreadable (no shard is left behind).
    """
    opts = task.options
    final = Path(opts.out) / task.name
    tmp = temp_path(final)
    bad: list[tuple[str, str]] = []
    count = 0
    per_call = opts.batch_size if opts.kind == "images" else 1
    _OPEN_TEMPS.add(tmp)
    try:
        with open(tmp, "xb") as stream:
            with wds.TarWriter(stream, encoder=False, mtime=0) as sink:  # fixed mtime: reproducible bytes
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
                    _encode_captions(loaded, clip, opts.dtype)
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
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _OPEN_TEMPS.discard(tmp)
    return ShardResult(task.name, count, bad, written=True)


# Temporary files this process is writing: a worker whose parent died removes them before it exits.
_OPEN_TEMPS: set[Path] = set()
_TEMP_NAME = re.compile(r"\.(?P<final>.+)\.(?P<pid>\d+)-[0-9a-f]+\.tmp")


def temp_path(final: Path) -> Path:
    """A hidden temporary name beside ``final``, unique to this process and call: ``.<name>.<pid>-<random>.tmp``.

    Unique so that two processes never write one file (a rerun and a straggler of a killed run); the pid lets a
    later run tell a dead process's leftovers (``remove_stale_temps``) from a live one's.
    """
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


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
        match = _TEMP_NAME.fullmatch(path.name)
        if match is not None and _pid_alive(int(match["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d temporary files of interrupted runs (%s, ...)", len(removed), removed[0].name)
    return removed


def _encode_captions(loaded: list[tuple[Item, dict[str, Any]]], clip: CLIPCaptionEncoder | None,
                     dtype: StoreDtype) -> None:  # fmt: skip
    """Set ``x["caption"]`` to the (N_cap, L, d) features of each loaded input with caption texts."""
    texts = [c for item, _ in loaded if item.captions is not None for c in item.captions]
    if not texts:
        return
    if clip is None:
        raise RuntimeError("inputs with caption texts need a caption encoder (--clip)")
    features = clip.encode(texts).astype(dtype)  # (sum N_cap, L, d)
    start = 0
    for item, x in loaded:
        if item.captions is not None:
            x["caption"] = features[start : start + len(item.captions)]
            start += len(item.captions)


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


def _init_worker(vae_kwargs: dict[str, Any] | None, caption_tail: tuple[int, ...] | None, threads: int,
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
        for tmp in list(_OPEN_TEMPS):
            tmp.unlink(missing_ok=True)
        os._exit(1)

    threading.Thread(target=wait_then_exit, name="exit-with-parent", daemon=True).start()


def _run_task(task: ShardTask) -> ShardResult:
    return write_shard(task, _WORKER_STATE["vae"], _WORKER_STATE["caption_tail"], _WORKER_STATE["clip"])


def _worker_context(captions: bool = False, vae: bool = True) -> multiprocessing.context.BaseContext:
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


# ------------------------------------------------------------------------------------------------------- driver
def prepare(
    src: str | os.PathLike,
    options: Options,
    *,
    vae_kwargs: dict[str, Any] | None,
    labels: str = "none",
    captions: str | None = None,
    clip_kwargs: dict[str, Any] | None = None,
    workers: int = 1,
    command: str | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """List the inputs, write the missing shards (in ``workers`` processes when > 1) and the manifest.

    Args:
        src, labels, captions: as :func:`list_inputs`.
        options: what to write where.
        vae_kwargs: ``FrozenVAE`` arguments (the VAE is loaded once here and once per worker); None with
            ``latents="none"``.
        clip_kwargs: ``CLIPCaptionEncoder`` arguments to encode ``caption`` texts (loaded once here and once per
            worker, which encodes the captions of its shard); None: captions only as feature files.
        workers: worker processes, one shard per task (0 or 1: write in this process).
        command: recorded in the manifest (default: this process's command line).
        progress: show a tqdm bar (None: only on a terminal).

    Returns: the manifest written to ``options.out``.
    Raises:
        ValueError: a bad setting, or an output directory prepared with other settings or inputs.
        RuntimeError: more than ``max_bad`` unreadable inputs.
    """
    from tqdm.auto import tqdm

    opts = options
    _check_options(opts, vae_kwargs, workers)
    vae = FrozenVAE(**vae_kwargs) if vae_kwargs is not None else None
    if vae is not None and opts.resolution % vae.downsample_factor:
        raise ValueError(
            f"--resolution {opts.resolution} is not divisible by the VAE's downsample factor {vae.downsample_factor}"
        )
    inputs = list_inputs(src, opts.kind, labels=labels, captions=captions, caption_text=clip_kwargs is not None)
    clip = CLIPCaptionEncoder(**clip_kwargs) if clip_kwargs is not None else None
    if clip is not None:
        counts = {len(it.captions or ()) for it in inputs.items}
        inputs.caption_feature_shape = [counts.pop() if len(counts) == 1 else None, *clip.shape]
    settings = _settings(opts, inputs, vae, clip)
    caption_tail = tuple(inputs.caption_feature_shape[1:]) if inputs.caption_feature_shape else None
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _start_manifest(out, settings, opts, inputs, command)
    recorded = {entry["name"]: entry for entry in manifest["splits"][opts.split]["shards"]}
    remove_stale_temps(out, opts.split)

    tasks = [ShardTask(s, tuple(inputs.items[i : i + opts.shard_size]), opts)
             for s, i in enumerate(range(0, len(inputs.items), opts.shard_size))]  # fmt: skip
    results: dict[str, ShardResult] = {}
    todo = []
    for task in tasks:
        done = read_done_shard(task, recorded.get(task.name)) if (out / task.name).is_file() else None
        if done is not None:
            results[task.name] = done
        else:
            todo.append(task)
    skipped = len(tasks) - len(todo)
    log.info("%s: %d inputs in %d shards; %d already written, %d to write", opts.split, len(inputs.items),
             len(tasks), skipped, len(todo))  # fmt: skip
    bad_before = sum(len(r.bad) for r in results.values())
    _check_budget(bad_before, opts.max_bad, next((r.bad[-1] for r in results.values() if r.bad), None))

    unit = "image" if opts.kind == "images" else "video"
    bar = tqdm(total=sum(len(t.items) for t in todo), unit=unit, desc=f"{opts.split} shards",
               disable=None if progress is None else not progress)  # fmt: skip
    total_bad = bad_before

    def collect(result: ShardResult) -> None:
        nonlocal total_bad
        results[result.name] = result
        for rel, error in result.bad:
            log.warning("skipped unreadable input %s: %s", rel, error)
        total_bad += len(result.bad)
        bar.update(result.count + len(result.bad))
        _check_budget(total_bad, opts.max_bad, result.bad[-1] if result.bad else None)

    try:
        if workers <= 1:
            for task in todo:
                collect(write_shard(task, vae, caption_tail, clip))
        elif todo:
            threads = max(1, (os.cpu_count() or 1) // workers)
            context = _worker_context(captions=clip_kwargs is not None, vae=vae_kwargs is not None)
            init_args = (vae_kwargs, caption_tail, threads, clip_kwargs)
            pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=init_args
            )
            with pool:
                futures = [pool.submit(_run_task, task) for task in todo]
                try:
                    for future in concurrent.futures.as_completed(futures):
                        collect(future.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()

    ordered = [results[t.name] for t in tasks]
    bad_paths = [rel for r in ordered for rel, _ in r.bad]
    manifest["splits"][opts.split].update(
        complete=True,
        count=sum(r.count for r in ordered),
        bad=len(bad_paths),
        bad_paths=bad_paths[:MAX_BAD_PATHS],
        shards=[{"name": r.name, "count": r.count, "bad": len(r.bad)} for r in ordered],
    )
    write_manifest(out, manifest)
    count = manifest["splits"][opts.split]["count"]
    log.info("%s: wrote %d shards (%d skipped), %d samples, %d unreadable inputs skipped; %s", opts.split,
             len(todo), skipped, count, len(bad_paths), out / MANIFEST_NAME)  # fmt: skip
    return manifest


def _check_budget(bad: int, max_bad: int, last: tuple[str, str] | None) -> None:
    if bad > max_bad:
        detail = f" (last: {last[0]}: {last[1]})" if last else ""
        raise RuntimeError(
            f"{bad} unreadable inputs, more than --max-bad {max_bad}{detail}; the shards written so far are kept: "
            "fix or remove the inputs (or raise --max-bad) and rerun to resume"
        )


def _check_options(opts: Options, vae_kwargs: dict[str, Any] | None, workers: int) -> None:
    """Raise ValueError for a bad setting, before any input is read."""
    if opts.kind not in get_args(Kind):
        raise ValueError(f"kind={opts.kind!r}: must be one of {list(get_args(Kind))}")
    if opts.latents not in get_args(LatentMode):
        raise ValueError(f"--latents {opts.latents!r}: must be one of {list(get_args(LatentMode))}")
    if opts.dtype not in get_args(StoreDtype):
        raise ValueError(f"--dtype {opts.dtype!r}: must be one of {list(get_args(StoreDtype))}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", opts.split):
        raise ValueError(f"--split {opts.split!r}: use letters, digits and '_' (it starts every shard name)")
    for name, value, low in (("resolution", opts.resolution, 1), ("shard-size", opts.shard_size, 1),
                             ("frames", opts.frames, 1), ("frame-stride", opts.frame_stride, 1),
                             ("batch-size", opts.batch_size, 1), ("max-bad", opts.max_bad, 0),
                             ("workers", workers, 0), ("seed", opts.seed, 0)):  # fmt: skip
        if value < low:
            raise ValueError(f"--{name} must be >= {low}; got {value}")
    if not opts.latent_key.endswith(".npy") or "/" in opts.latent_key:
        raise ValueError(f"--latent-key {opts.latent_key!r}: must be a file suffix ending in .npy")
    if (opts.latents == "none") != (vae_kwargs is None):
        raise ValueError(f"--latents {opts.latents}: a VAE is needed exactly when latents are written")
    if opts.kind == "videos" and opts.latents in ("both-flips", "none"):
        raise ValueError(f"--latents {opts.latents} is for images; videos store sample, mean or moments")
    if opts.latents == "none" and opts.image_format is None:
        raise ValueError("--latents none with --no-images would write empty samples")


def _settings(opts: Options, inputs: Inputs, vae: FrozenVAE | None,
              clip: CLIPCaptionEncoder | None = None) -> dict[str, Any]:  # fmt: skip
    """The manifest's top level (everything but ``splits``): what every sample of the directory is."""
    S = opts.resolution
    keys: dict[str, Any] = {"src.txt": {"content": "input path relative to SRC or the list file"}}
    latent_shape = None
    if vae is not None:
        f = vae.downsample_factor
        latent_shape = [vae.latent_channels, S // f, S // f]
        if opts.kind == "videos":
            latent_shape = [opts.frames, *latent_shape]
        stored = [2, *latent_shape] if opts.latents == "both-flips" else latent_shape
        for key, content in latent_keys(opts.latents, opts.latent_key).items():
            keys[key] = {"shape": stored, "dtype": opts.dtype, "content": f"raw (unscaled) VAE {content}"}
    if opts.image_format is not None and opts.kind == "images":
        keys[opts.image_format] = {"shape": [S, S, 3], "dtype": "uint8", "crop": CROP,
                                   "quality": JPEG_QUALITY if opts.image_format == "jpg" else None}  # fmt: skip
    if inputs.label_names:
        keys["cls"] = {"content": "class id as decimal text", "num_classes": len(inputs.label_names)}
    if inputs.caption_feature_shape is not None:
        keys["caption_feature.npy"] = {"shape": inputs.caption_feature_shape, "dtype": opts.dtype}
        if clip is not None:
            keys["caption_feature.npy"]["content"] = "CLIP text model last hidden states of the caption texts"
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": opts.kind,
        "resolution": S,
        "crop": CROP,
        "frames": opts.frames if opts.kind == "videos" else None,
        "frame_stride": opts.frame_stride if opts.kind == "videos" else None,
        "keys": keys,
        "latents": opts.latents,
        "latent_key": opts.latent_key if vae is not None else None,
        "latent_shape": latent_shape,
        "latent_dtype": opts.dtype if vae is not None else None,
        "latent_scaled": False,
        "vae": vae.config() if vae is not None else None,
        "vae_downsample_factor": vae.downsample_factor if vae is not None else None,
        "num_classes": len(inputs.label_names),
        "label_names": inputs.label_names,
        "label_source": inputs.label_source,
        "caption_feature_shape": inputs.caption_feature_shape,
        "caption_encoder": clip.config() if clip is not None else None,
        "seed": opts.seed,
    }


def _start_manifest(out: Path, settings: dict[str, Any], opts: Options, inputs: Inputs,
                    command: str | None) -> dict[str, Any]:  # fmt: skip
    """The manifest with this split marked incomplete, written before any shard; refuses a directory whose manifest
    has other settings, or this split with other inputs or shard size.

    The split's ``shards`` keep what earlier runs recorded (name and sample count of each shard they wrote), so that
    this run, and a rerun after it is interrupted, can check the shards on disk against them; a completed run
    replaces them. Readers use the counts of complete splits only (``datamodules.shards.manifest_counts``).
    """
    fingerprint = inputs.fingerprint()
    earlier: list[dict[str, Any]] = []
    if (out / MANIFEST_NAME).is_file():
        manifest = read_manifest(out)
        old = settings_of(manifest)
        # the keys' shapes follow from the other settings: name those first
        diffs = diff_settings(
            {k: v for k, v in old.items() if k != "keys"}, {k: v for k, v in settings.items() if k != "keys"}
        )
        diffs = diffs or diff_settings(old["keys"], settings["keys"], "keys.")
        if diffs:
            raise ValueError(
                f"--out {out} holds shards prepared with other settings (manifest != this run: "
                f"{'; '.join(diffs)}); use another --out, or delete the directory to start again"
            )
        previous = manifest["splits"].get(opts.split)
        if previous is not None and (previous["inputs"] != fingerprint or previous["shard_size"] != opts.shard_size):
            raise ValueError(
                f"--out {out}: split {opts.split!r} was prepared from other inputs or another --shard-size "
                f"({previous['inputs']['count']} inputs, shard size {previous['shard_size']}; now "
                f"{fingerprint['count']}, {opts.shard_size}); the sample -> shard assignment would change. Use "
                f"another --split or --out, or delete {opts.split}-*.tar"
            )
        earlier = previous["shards"] if previous is not None else []
    else:
        strays = sorted(out.glob(f"{opts.split}-*.tar"))
        if strays:
            raise ValueError(
                f"--out {out} holds {strays[0].name} ... but no {MANIFEST_NAME}: they were not written by this tool; "
                "use an empty --out"
            )
        manifest = {**settings, "splits": {}}
    manifest["splits"][opts.split] = {
        "complete": False,
        "count": 0,
        "bad": 0,
        "bad_paths": [],
        "shard_size": opts.shard_size,
        "shards": earlier,
        "inputs": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join([sys.executable, *sys.argv]),
    }
    write_manifest(out, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("src", help="a folder, or a .csv/.tsv/.jsonl list file with a 'path' column")
    common.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    common.add_argument("--split", default="train", help="shard name prefix and manifest split")
    common.add_argument("--resolution", type=int, default=256, help="pixels: shorter side resized, centre cropped")
    common.add_argument("--shard-size", type=int, default=1000, help="inputs per shard")
    common.add_argument("--workers", type=int, default=1, help="worker processes, one shard each at a time")
    common.add_argument("--device", default="cpu", help="where each worker runs the VAE (cpu, cuda, cuda:1, ...)")
    common.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL directory or hub id")
    common.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' for a whole Stable Diffusion repo")
    common.add_argument("--vae-scale", type=float, default=None,
                        help="recorded latent scale (default: the VAE's config.scaling_factor)")  # fmt: skip
    common.add_argument("--vae-dtype", default="float32", help="the VAE's compute dtype")
    common.add_argument("--allow-download", action="store_true", help="let diffusers/transformers fetch hub models")
    common.add_argument("--latents", default="sample", choices=get_args(LatentMode))
    common.add_argument("--latent-key", default=None, help="latent suffix (default: latent.npy / frame_feature256.npy)")
    common.add_argument("--dtype", default="float32", choices=get_args(StoreDtype), help="stored latent dtype")
    common.add_argument("--image-format", default="jpg", choices=get_args(ImageFormat))
    common.add_argument("--no-images", action="store_true", help="store latents only (no jpg/png)")
    common.add_argument("--labels", default="none", help="none | folders | list | a class names file")
    common.add_argument("--captions", default=None, help="list file with path and caption_feature or caption columns")
    common.add_argument("--clip", default=None, help="CLIP text model directory or hub id: encode 'caption' texts")
    common.add_argument("--seed", type=int, default=0, help="seeds the posterior samples (per sample index)")
    common.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    common.add_argument("--max-bad", type=int, default=100, help="unreadable inputs skipped before an error")
    common.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    parser = argparse.ArgumentParser(prog="python -m datamodules.prepare", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    sub.add_parser("images", parents=[common], help="image folder or list -> image + latent shards")
    videos = sub.add_parser("videos", parents=[common], help="folder of frame folders -> (T, C, h, w) latent shards")
    videos.add_argument("--frames", type=int, default=16, help="frames per video (T)")
    videos.add_argument("--frame-stride", type=int, default=1, help="take every k-th frame from the first")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the CLI; returns the manifest."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    vae_path = Path(args.vae).expanduser()
    vae_kwargs = None
    if args.latents != "none":
        vae_kwargs = dict(name_or_path=str(vae_path.resolve()) if vae_path.is_dir() else args.vae,
                          subfolder=args.vae_subfolder, local_files_only=not args.allow_download, scale=args.vae_scale,
                          sample=args.latents in ("sample", "both-flips"), dtype=args.vae_dtype,
                          chunk_size=args.batch_size, device=args.device)  # fmt: skip
    clip_kwargs = None
    if args.clip is not None:
        clip_path = Path(args.clip).expanduser()
        clip_kwargs = dict(name_or_path=str(clip_path.resolve()) if clip_path.is_dir() else args.clip,
                           local_files_only=not args.allow_download, batch_size=args.batch_size,
                           device=args.device)  # fmt: skip
    options = Options(
        kind=args.kind,
        out=str(Path(args.out).expanduser().resolve()),
        split=args.split,
        resolution=args.resolution,
        shard_size=args.shard_size,
        latents=args.latents,
        latent_key=args.latent_key or DEFAULT_LATENT_KEY[args.kind],
        dtype=args.dtype,
        image_format=None if args.no_images or args.kind == "videos" else args.image_format,
        frames=getattr(args, "frames", 16),
        frame_stride=getattr(args, "frame_stride", 1),
        seed=args.seed,
        batch_size=args.batch_size,
        max_bad=args.max_bad,
    )
    command = shlex.join(["python", "-m", "datamodules.prepare", *argv])
    return prepare(args.src, options, vae_kwargs=vae_kwargs, labels=args.labels, captions=args.captions,
                   clip_kwargs=clip_kwargs, workers=args.workers, command=command,
                   progress=False if args.quiet else None)  # fmt: skip


__all__ = [
    "Item",
    "Options",
    "center_crop",
    "encode_latents",
    "frame_files",
    "list_inputs",
    "load_image",
    "main",
    "prepare",
    "sample_generator",
    "to_pixels",
    "write_shard",
]


if __name__ == "__main__":
    # Run through the importable module, so worker processes unpickle `datamodules.prepare.*`, not `__main__.*`.
    from datamodules.prepare import main as _main

    try:
        _main()
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
