"""The data tool's video inputs: container files (``.avi .mp4 .webm .mkv``, decoded with PyAV, the ``video`` extra)
and folders of frame images, cut to ``T`` frames (every ``stride``-th from the first) that are resized and centre
cropped exactly as images are; and UCF101's split lists (``classInd.txt``, ``trainlist0k.txt``, ``testlist0k.txt``).

PyAV, not torchcodec: PyAV's wheel carries its own FFmpeg, so ``pip install av`` decodes every container here;
torchcodec needs the system's FFmpeg shared libraries (none on this machine) and a build matching the installed torch
(see ``benchmarks/RESULTS.md``, "Videos from container files").
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from datamodules.images import files_under, frame_files, load_image
from zigma.images import resize_center_crop

VIDEO_EXTENSIONS = (".avi", ".mp4", ".webm", ".mkv")


def is_video(path: Path) -> bool:
    """A visible file with a video container extension (:data:`VIDEO_EXTENSIONS`, any case)."""
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".")


def video_files(folder: str | os.PathLike) -> list[Path]:
    """The video files under ``folder`` (recursive; hidden files and folders skipped)."""
    return files_under(folder, is_video)


def import_av() -> Any:
    """The ``av`` module (PyAV); a missing one raises RuntimeError in one line naming the extra that installs it."""
    try:
        import av
    except ModuleNotFoundError as err:
        from zigma_lightning.extras import missing_extra_message  # the one table of optional packages -> extras

        raise RuntimeError(f"decoding video files: {missing_extra_message('av')}") from err
    return av


def frames_needed(frames: int, stride: int) -> int:
    """Frames a clip of ``frames`` frames, every ``stride``-th from the first, spans: ``(frames - 1) * stride + 1``."""
    return (frames - 1) * stride + 1


def _too_short(count: int, frames: int, stride: int) -> ValueError:
    return ValueError(f"{count} frames; --frames {frames} --frame-stride {stride} need {frames_needed(frames, stride)}")


def decode_video(path: str | os.PathLike, frames: int, stride: int, resolution: int) -> list[Image.Image]:
    """Frames ``0, stride, ..., (frames - 1) * stride`` of a video file's first video stream, in presentation order,
    each an RGB ``resolution`` x ``resolution`` centre crop (``zigma.images.resize_center_crop``, as images); decoding
    stops at the last frame needed.

    Raises:
        ValueError: fewer frames than that (the message says how many), or no video stream.
        av.FFmpegError (its subclasses are also OSError/ValueError), OSError: a file that cannot be read.
    """
    av = import_av()
    kept: list[Image.Image] = []
    count = 0
    with av.open(os.fspath(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        for frame in container.decode(container.streams.video[0]):
            if count % stride == 0:
                kept.append(resize_center_crop(frame.to_image(), resolution))
                if len(kept) == frames:
                    return kept
            count += 1
    raise _too_short(count, frames, stride)


def load_clip(path: str | os.PathLike, frames: int, stride: int, resolution: int) -> list[Image.Image]:
    """The clip of one video input: a video file (:func:`decode_video`) or a folder of frame images (natural
    order, ``load_image``); ``frames`` RGB ``resolution`` x ``resolution`` images.

    Raises:
        ValueError: too few frames; OSError, av.FFmpegError, ...: an unreadable file.
    """
    if not Path(path).is_dir():
        return decode_video(path, frames, stride, resolution)
    files = frame_files(path)
    if len(files) < frames_needed(frames, stride):
        raise _too_short(len(files), frames, stride)
    return [load_image(p, resolution) for p in files[: frames_needed(frames, stride) : stride]]


# UCF101's split lists: classInd.txt "1 ApplyEyeMakeup"; trainlist01.txt "ApplyEyeMakeup/v_..._g08_c01.avi 1";
# testlist01.txt "ApplyEyeMakeup/v_..._g01_c01.avi" (no label: the class is the path's folder).

_CLASS_LINE = re.compile(r"(\d+)\s+(\S+)")


def _lines(path: str | os.PathLike, option: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a text file; a missing file is one ValueError line."""
    if not Path(path).is_file():
        raise ValueError(f"{option} {path}: no such file")
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        return [(number, line.strip()) for number, line in enumerate(f, 1) if line.strip()]


def read_class_index(path: str | os.PathLike) -> list[str]:
    """Class names by id from a ``classInd.txt`` (``<id> <name>`` lines, ids 1..N in any order): the name of id
    ``k`` at position ``k - 1``, so stored class ids are UCF101's ids minus one.

    Raises:
        ValueError: a missing file, a malformed line, or ids that are not 1..N once each, or repeated names.
    """
    by_id: dict[int, str] = {}
    for number, line in _lines(path, "--class-index"):
        match = _CLASS_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"--class-index {path}:{number}: expected '<id> <ClassName>' (as UCF101's classInd.txt); "
                             f"got {line!r}")  # fmt: skip
        class_id, name = int(match[1]), match[2]
        if class_id in by_id:
            raise ValueError(f"--class-index {path}:{number}: id {class_id} appears twice")
        by_id[class_id] = name
    if sorted(by_id) != list(range(1, len(by_id) + 1)):
        raise ValueError(f"--class-index {path}: ids must be 1..N once each; got {len(by_id)} ids from "
                         f"{min(by_id, default=None)} to {max(by_id, default=None)}")  # fmt: skip
    names = [by_id[k] for k in range(1, len(by_id) + 1)]
    if len(set(names)) != len(names):
        raise ValueError(f"--class-index {path}: class names must be distinct")
    return names


def read_split_file(path: str | os.PathLike, names: Sequence[str] | None) -> list[str]:
    """The videos a split list names (``<Class>/<file>`` paths relative to SRC, as written), in file order.

    A line is ``<Class>/<file>`` or ``<Class>/<file> <id>``; with ``names`` (from :func:`read_class_index`) the
    folder must be a known class and an ``<id>`` must be that class's id, so the labels that the folders give (see
    ``list_inputs``) are the split file's own.

    Raises:
        ValueError: a missing or empty file, a malformed line, a repeated video, or a label that disagrees with
            ``names`` (file and line named).
    """
    index = {name: k for k, name in enumerate(names or (), 1)}
    paths: list[str] = []
    seen: set[str] = set()
    for number, line in _lines(path, "--split-file"):
        parts = line.split()
        where = f"--split-file {path}:{number}"
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ValueError(f"{where}: expected '<Class>/<video file>' optionally followed by a class id; "
                             f"got {line!r}")  # fmt: skip
        rel = parts[0].replace("\\", "/")
        if rel in seen:
            raise ValueError(f"{where}: {rel} is listed twice")
        seen.add(rel)
        if names is not None:
            folder = rel.split("/")[0] if "/" in rel else None
            if folder not in index:
                raise ValueError(f"{where}: {rel!r} is not in a class folder of --class-index ({len(index)} "
                                 f"classes, e.g. {next(iter(index), '')!r})")  # fmt: skip
            if len(parts) == 2 and int(parts[1]) != index[folder]:
                raise ValueError(f"{where}: label {parts[1]} but the video is in class {folder!r} (id "
                                 f"{index[folder]} in --class-index)")  # fmt: skip
        paths.append(rel)
    if not paths:
        raise ValueError(f"--split-file {path}: lists no videos")
    return paths


__all__ = [
    "VIDEO_EXTENSIONS",
    "decode_video",
    "frames_needed",
    "import_av",
    "is_video",
    "load_clip",
    "read_class_index",
    "read_split_file",
    "video_files",
]
