"""The data tool's inputs: the sorted list of images, or of video files and frame folders (a folder, a CSV/TSV/JSONL
list file, or a UCF101-style split list of a folder), with class ids and caption feature files or texts. The sorted
list fixes every sample's key and shard."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from datamodules.images import IMAGE_EXTENSIONS, frame_folders, list_images
from datamodules.prepare.videos import (
    VIDEO_EXTENSIONS,
    import_av,
    read_class_index,
    read_split_file,
    video_files,
)

Kind = Literal["images", "videos"]
LIST_EXTENSIONS = (".csv", ".tsv", ".jsonl")
LABEL_MODES = ("none", "folders", "list")  # or a names file


@dataclass(frozen=True)
class Item:
    """One input: an image file, a video file or a folder of video frames.

    Attributes:
        index: position in the sorted input list; the sample key is ``f"{index:08d}"`` and its shard
            ``index // shard_size``.
        path: absolute path of the image file, video file or frame folder.
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
                caption_text: bool = False, split_file: str | None = None,
                class_index: str | None = None) -> Inputs:  # fmt: skip
    """The sorted input list of a folder or list file, with class ids and caption feature files or texts.

    Args:
        src: a folder of images / of video files and frame folders, or a ``.csv``/``.tsv``/``.jsonl`` list file.
        kind: ``"images"`` or ``"videos"``.
        labels: ``"none"``, ``"folders"``, ``"list"`` or a names file (see the module docstring).
        split_file: videos only: a UCF101 split list (``trainlist01.txt``, ``testlist01.txt``): the inputs are the
            videos it names, relative to the folder ``src``, instead of all of them.
        class_index: videos only: UCF101's ``classInd.txt``; the class of each video is its first folder under
            ``src``, its id the file's id minus one, and a split file's labels must agree (``labels`` stays
            ``"none"``).
        captions: a list file with ``path`` and ``caption_feature`` or ``caption`` columns joined by path.
        caption_text: the ``caption`` texts will be encoded (``--clip``): every input needs one, and no
            ``caption_feature`` may be given. When False, a ``caption`` without a ``caption_feature`` is an error.

    Raises:
        ValueError: no input, a label, split or caption setting that does not fit the input (named in the message).
        RuntimeError: video files without the decoder installed (the ``video`` extra).
    """
    source = Path(src).expanduser().resolve()
    if not source.exists():
        raise ValueError(f"SRC={str(src)!r} does not exist")
    names = None
    if (split_file is not None or class_index is not None) and kind != "videos":
        raise ValueError("--split-file and --class-index are for videos (UCF101's split lists)")
    if class_index is not None:
        if labels != "none":
            raise ValueError(f"--class-index gives the labels (each video's class folder); drop --labels {labels}")
        names = read_class_index(class_index)
        labels = "folders"
    elif labels not in LABEL_MODES:
        if not Path(labels).is_file():
            raise ValueError(f"--labels {labels!r}: must be one of {list(LABEL_MODES)} or an existing names file")
        names = _read_names(Path(labels))
    rows: list[dict[str, Any]]
    if split_file is not None and not source.is_dir():
        raise ValueError(f"--split-file: SRC={str(src)!r} must be the folder its paths are relative to (UCF-101/)")
    if source.is_dir():
        if labels == "list":
            raise ValueError("--labels list needs a list file as SRC; for a folder use --labels folders")
        base = source
        if split_file is not None:
            found = [source / rel for rel in read_split_file(split_file, names)]
            if not any(p.exists() for p in found):
                raise ValueError(f"--split-file {split_file}: none of its {len(found)} videos is under "
                                 f"SRC={str(src)!r} (first: {found[0].relative_to(source)}); SRC must be the folder "
                                 "that holds the class folders (UCF-101/)")  # fmt: skip
        elif kind == "images":
            found = list_images(source)
        else:
            found = video_files(source) + frame_folders(source)
        rows = [{"path": str(p)} for p in found]
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
        what = f"image files {list(IMAGE_EXTENSIONS)}"
        if kind == "videos":
            what = f"video files {list(VIDEO_EXTENSIONS)} or folders of {what}"
        raise ValueError(f"SRC={str(src)!r}: no inputs found ({what})")
    if kind == "videos" and not all(Path(r["abs"]).is_dir() for r in rows):
        import_av()  # video files are decoded with it: fail now, in one line, not once per input

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
            if class_index is not None:
                label_source = f"folders, class index {Path(class_index).name} (ids minus one)"
        option = f"--labels {labels}" if class_index is None else f"--class-index {class_index}"
        ids, label_names = _label_ids(raw, names, option)  # type: ignore[assignment]

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


__all__ = ["Inputs", "Item", "Kind", "list_inputs"]
