"""Local-first loading of frozen pretrained networks (the VAE, the caption text encoder), with one clear error.

Order: ``name_or_path`` as a local directory (never the network); else, if it looks like a path, an error; else a
Hugging Face hub id, read from the local cache only (``local_files_only=True``, the default everywhere) or, when
allowed, downloaded. Every failure is one ``FileNotFoundError`` naming the option and the path and saying how to get
the weights onto a machine without internet. Nothing here imports diffusers or transformers: the caller's ``load``
does, so ``import zigma`` never needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# diffusers/transformers raise these for a missing or unreadable directory or hub entry
LOAD_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError)


def looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything with a path prefix or deeper nesting is meant as a directory."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def cache_hint() -> str:
    """The sentence on the Hugging Face cache that every download hint ends with."""
    return ("Alternatively fill this machine's Hugging Face cache ($HF_HOME or $HF_HUB_CACHE) and keep "
            "local_files_only=True.")  # fmt: skip


def load_local_first(
    name_or_path: str,
    load: Callable[[str | Path, bool], T],
    *,
    owner: str,
    local_files_only: bool,
    directory_holds: str,
    default_id: str,
    hint: Callable[[str], str],
    subfolder: str | None = None,
) -> T:
    """``load(source, local_files_only)`` from a local directory first, else from the hub cache (or the hub).

    Args:
        name_or_path: a directory or a hub id, as the user gave it.
        load: loads from a directory path or hub id; ``local_files_only`` is True for a directory.
        owner: the class named in errors (``"FrozenVAE"``).
        local_files_only: for a hub id: only the local cache (True) or also the network.
        directory_holds: what a good directory holds, for the error (``"a diffusers AutoencoderKL directory ..."``).
        default_id: the usual hub id, suggested in errors.
        hint: hub id -> how to download it (ends with :func:`cache_hint`).
        subfolder: shown in errors (the caller's ``load`` applies it).

    Raises:
        FileNotFoundError: one line naming ``name_or_path`` and what to do.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        try:
            return load(path, True)
        except LOAD_ERRORS as err:
            where = path / subfolder if subfolder else path
            raise FileNotFoundError(
                f"{owner}: name_or_path={name_or_path!r}: {where} is not {directory_holds}. {hint(default_id)} "
                f"({type(err).__name__}: {err})"
            ) from err
    if looks_like_path(name_or_path) or path.exists():
        raise FileNotFoundError(
            f"{owner}: name_or_path={name_or_path!r} is not a directory. Pass {directory_holds} or a Hugging Face hub "
            f"id such as {default_id!r}. {hint(default_id)}"
        )
    try:
        return load(name_or_path, local_files_only)
    except LOAD_ERRORS as err:
        status = (
            "is not in the local Hugging Face cache (local_files_only=True: the hub is never contacted)"
            if local_files_only
            else "could not be loaded from the Hugging Face hub or its cache (local_files_only=False)"
        )
        sub = f" (subfolder={subfolder!r})" if subfolder else ""
        raise FileNotFoundError(
            f"{owner}: name_or_path={name_or_path!r}{sub} is not a local directory and {status}. "
            f"{hint(name_or_path)} ({type(err).__name__}: {err})"
        ) from err


__all__ = ["cache_hint", "load_local_first", "looks_like_path"]
