"""The ``manifest.json`` that ``python -m datamodules.prepare`` writes next to its shards: write, read, validate, check.

One manifest describes one shard directory. Its top level holds the settings that define every sample (the same for
all splits in the directory); ``splits`` holds what each ``prepare`` run wrote::

    {
      "format": "zigma-shards", "version": 1,
      "kind": "images" | "videos",
      "resolution": 256,                    # pixels: shorter side resized (bicubic, antialiased), centre square crop
      "crop": "resize-shorter-side-bicubic+center-crop",
      "frames": 16, "frame_stride": 1,      # videos only (else null)
      "keys": {"jpg": {...}, "latent.npy": {"shape": [4, 32, 32], "dtype": "float32"}, "cls": {...}, ...},
      "latents": "sample" | "mean" | "moments" | "both-flips" | "none",
      "latent_key": "latent.npy",           # the key a WebDataModule's latent_key/video_key reads
      "latent_shape": [4, 32, 32],          # the model's sample shape (C, h, w) or (T, C, h, w); null without latents
      "latent_dtype": "float32",
      "latent_scaled": false,               # shards hold raw VAE latents: scale them with vae.scale when loading
      "vae": {FrozenVAE.config(): name_or_path, subfolder, scale, shift, mean, std, sample, dtype} | null,
      "vae_downsample_factor": 8,
      "num_classes": 101,                   # 0: no labels
      "label_names": ["ApplyEyeMakeup", ...], "label_source": "folders" | "list" (+ ", names file <name>") | null,
      "caption_feature_shape": [5, 77, 768],  # (N_cap, L, d) of the first sample (N_cap may vary: null); or null
      "seed": 0,
      "splits": {"train": {"complete": true, "count": 9537, "bad": 3, "bad_paths": ["..."],
                           "shard_size": 1000, "shards": [{"name": "train-000000.tar", "count": 1000}, ...],
                           "inputs": {"count": 9540, "sha256": "..."}, "created": "...", "command": "..."}}
    }

``prepared_settings`` builds the top level for a ``prepare`` run (``latent_keys`` names the latent keys of each mode).
``check_manifest`` compares a model's expectations with it (latent shape, VAE, classes, caption width) and raises one
``ValueError`` that names every mismatching key with both values. This module imports neither torch nor ``zigma``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datamodules.tars import (
    check_url,
    expand_pattern,
    failure_reason,
    is_url,
    local_path,
    open_shard,
    shard_file_name,
    spec_parts,
)
from zigma.files import atomic_write
from zigma.vae import same_setting

if TYPE_CHECKING:
    from datamodules.prepare.inputs import Inputs
    from datamodules.prepare.writing import Options
    from zigma.text_encoder import CLIPCaptionEncoder
    from zigma.vae import FrozenVAE

MANIFEST_NAME = "manifest.json"
FORMAT = "zigma-shards"
VERSION = 1
# Top-level keys every manifest holds; ``validate_manifest`` checks them.
REQUIRED_KEYS = ("format", "version", "kind", "resolution", "keys", "latents", "latent_shape", "vae", "num_classes",
                 "label_names", "caption_feature_shape", "splits")  # fmt: skip
# Split entries' keys (what one run wrote); everything else at the top level is a setting that must not change.
SPLIT_KEYS = ("complete", "count", "bad", "bad_paths", "shard_size", "shards", "inputs", "created", "command")
# FrozenVAE.config() keys that change the meaning of stored latents (the one list: FrozenVAE.check_matches is gone).
VAE_MATCH_KEYS = ("name_or_path", "subfolder", "scale", "shift", "mean", "std")
CROP = "resize-shorter-side-bicubic+center-crop"  # zigma.images.resize_center_crop
JPEG_QUALITY = 95  # stored jpg images (4:4:4 chroma)


def latent_keys(mode: str, latent_key: str) -> dict[str, str]:
    """Shard key -> what it holds, for a latent mode; ``{}`` for ``none``."""
    stem = latent_key.removesuffix(".npy")
    return {
        "sample": {latent_key: "posterior sample"},
        "mean": {latent_key: "posterior mean"},
        "moments": {f"{stem}_mean.npy": "posterior mean", f"{stem}_std.npy": "posterior std"},
        "both-flips": {latent_key: "posterior samples of the image [0] and of its mirror image [1]"},
        "none": {},
    }[mode]


def prepared_settings(opts: Options, inputs: Inputs, vae: FrozenVAE | None,
                      clip: CLIPCaptionEncoder | None = None) -> dict[str, Any]:  # fmt: skip
    """The manifest's top level (everything but ``splits``) for a ``datamodules.prepare`` run: what every sample of
    the directory is (see the module docstring)."""
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


def write_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest`` as ``directory/manifest.json`` atomically (``zigma.files.atomic_write``).

    Returns: the manifest's path.
    Raises:
        ValueError: ``manifest`` is not valid (see :func:`validate_manifest`).
    """
    validate_manifest(manifest)
    path = Path(directory) / MANIFEST_NAME
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return path


def validate_manifest(manifest: Mapping[str, Any], where: str = "manifest") -> None:
    """Check the structure of a manifest: required keys, format, version and consistent split counts.

    Raises:
        ValueError: names ``where`` and the first problem found.
    """
    if not isinstance(manifest, Mapping):
        raise ValueError(f"{where}: expected a JSON object; got {type(manifest).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}; was it written by `python -m datamodules.prepare`?")
    if manifest["format"] != FORMAT or manifest["version"] != VERSION:
        raise ValueError(
            f"{where}: format {manifest['format']!r} version {manifest['version']!r}; this code reads {FORMAT!r} "
            f"version {VERSION}"
        )
    if len(manifest["label_names"]) != manifest["num_classes"]:
        raise ValueError(
            f"{where}: num_classes={manifest['num_classes']} but {len(manifest['label_names'])} label_names"
        )
    for name, split in manifest["splits"].items():
        absent = [k for k in SPLIT_KEYS if k not in split]
        if absent:
            raise ValueError(f"{where}: split {name!r} lacks {absent}")
        total = sum(s["count"] for s in split["shards"])
        if split["complete"] and total != split["count"]:
            raise ValueError(f"{where}: split {name!r} has count {split['count']} but its shards hold {total}")


def settings_of(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest without ``splits``: the settings all splits of a directory share."""
    return {k: v for k, v in manifest.items() if k != "splits"}


def manifest_location(shard: str) -> str | None:
    """Where the manifest of ``shard`` is: ``manifest.json`` in place of the shard's file name, in the same directory,
    URL or command (``https://h/d/train-000003.tar`` -> ``https://h/d/manifest.json``, ``pipe:aws s3 cp
    s3://b/d/train-000003.tar -`` -> ``pipe:aws s3 cp s3://b/d/manifest.json -``). A URL's query is dropped (a
    signed URL is signed for the shard alone: name the manifest with ``data.manifest``). None: a ``pipe:`` command
    that names no ``.tar`` file, so no place can be derived."""
    name = shard_file_name(shard)
    if name is None:
        return None
    if shard.startswith("pipe:"):
        words = shard[5:].split()
        at = max(i for i, w in enumerate(words) if name in w)
        head, _, tail = words[at].rpartition(name)
        words[at] = head + MANIFEST_NAME + tail.split("?")[0].split("#")[0]
        return "pipe:" + " ".join(words)
    if is_url(shard):
        base = shard.split("?")[0].split("#")[0]
        return base[: base.rindex(name)] + MANIFEST_NAME
    return os.path.join(os.path.dirname(local_path(shard)), MANIFEST_NAME)


def _names_json(url: str) -> bool:
    """Whether the URL names a ``.json`` file (a manifest itself) rather than a shard: its file name, or for a
    ``pipe:`` command that names no ``.tar`` file, one of its words."""
    if url.startswith("pipe:") and shard_file_name(url) is None:
        return any(re.search(r"\.json($|[?#])", w.strip("'\"")) for w in url[5:].split())
    return (shard_file_name(url) or "").endswith(".json")


def _manifest_locations(dir_or_shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The manifests of the shards (or directories, or manifests) named by ``dir_or_shards``, in first-seen order:
    local ``manifest.json`` paths or URLs."""
    found: list[str] = []
    for spec in spec_parts(dir_or_shards):
        if is_url(spec):
            check_url(spec, "manifest")
            names = expand_pattern(spec)
            places = [n if _names_json(n) else manifest_location(n) for n in names]
            if None in places:
                raise FileNotFoundError(f"read_manifest: cannot tell where the manifest of {names[places.index(None)]}"
                                        " is (its command names no .tar file); set data.manifest")  # fmt: skip
        else:
            path = Path(local_path(spec)).expanduser()
            if path.is_dir():
                places = [str(path / MANIFEST_NAME)]
            elif path.name.endswith(".json"):  # the manifest itself (any name)
                places = [str(path)]
            else:  # a shard, a brace pattern or a glob: the directories of what it names
                places = [str(Path(name).parent / MANIFEST_NAME) for name in expand_pattern(str(path))]
        found.extend(p for p in places if p not in found)
    if not found:
        raise ValueError(f"read_manifest: {dir_or_shards!r} names no directory or shard")
    return found


def load_manifest(location: str | os.PathLike, source: object = None) -> dict[str, Any]:
    """The validated manifest at ``location``: a local ``manifest.json`` path or a URL (read with
    ``webdataset.gopen``: ``pipe:``, ``http(s)://``, ...).

    Raises:
        FileNotFoundError: there is no manifest there (or the URL cannot be read): one line naming it.
        ValueError: it is not valid JSON or not a valid manifest.
    """
    location = str(location)
    source = f" (from {source!r})" if source is not None and str(source) != location else ""
    if is_url(location):
        raw, failure = None, None
        try:
            raw = open_shard(location)
            with raw:
                text = raw.read()
        except OSError as err:
            failure = f"read_manifest: cannot read {location}{source}: {failure_reason(location, raw, err)}"
        if failure is not None:  # raised outside the handler: the message is the whole story (no chained curl error)
            raise FileNotFoundError(failure)
    else:
        if not os.path.isfile(location):
            raise FileNotFoundError(
                f"read_manifest: no {MANIFEST_NAME} in {os.path.dirname(location) or '.'}{source}; shards written by "
                "`python -m datamodules.prepare` have one next to them; other shards cannot be checked this way"
            )
        with open(location, "rb") as f:
            text = f.read()
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"read_manifest: {location} is not valid JSON: {err}") from err
    validate_manifest(manifest, location)
    return manifest


def read_manifest(dir_or_shards: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The validated manifest of a shard directory, found from the directory, the shards or ``manifest.json``.

    Args:
        dir_or_shards: a directory, a ``manifest.json`` path or URL, a shard path or URL, a brace pattern or glob of
            shards, a comma/space-separated string or a list of these (anything ``WebDataModule(shards=...)``
            takes). A shard's manifest is ``manifest.json`` next to it (:func:`manifest_location`). Shards in
            several directories need a manifest in each, with the same settings; the first is returned.

    Raises:
        FileNotFoundError: a directory holds no ``manifest.json`` (shards not written by ``datamodules.prepare``), or
            a manifest URL cannot be read.
        ValueError: a manifest is invalid, or the directories' manifests disagree on a setting.
    """
    manifests = [(place, load_manifest(place, dir_or_shards)) for place in _manifest_locations(dir_or_shards)]
    first_path, first = manifests[0]
    for path, other in manifests[1:]:
        diffs = diff_settings(settings_of(first), settings_of(other))
        if diffs:
            raise ValueError(f"read_manifest: {first_path} and {path} describe different data: {'; '.join(diffs)}")
    return first


def check_manifest(
    manifest: Mapping[str, Any],
    *,
    sample_shape: Sequence[int] | None = None,
    vae_config: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    context_dim: int | None = None,
    ignore_vae_keys: Iterable[str] = (),
) -> None:
    """Raise if a model's expectations do not match the data a manifest describes; arguments left None are not checked.

    Args:
        manifest: as :func:`read_manifest` returns.
        sample_shape: the model's sample shape, (C, h, w) or (T, C, h, w); compared with ``latent_shape`` (videos:
            T may be smaller than the stored frames, as clips are cropped in time; not checked for pixel-only
            shards, whose latent shape depends on the model's VAE).
        vae_config: the model's ``FrozenVAE.config()``; its :data:`VAE_MATCH_KEYS` are compared with ``vae``
            (floats to a relative 1e-6; a local directory as its resolved path).
        num_classes: the model's classes (0: unconditional on labels); compared with ``num_classes``.
        context_dim: the model's caption width d (0: no captions); compared with ``caption_feature_shape[-1]``.
        ignore_vae_keys: VAE keys not to compare, e.g. ``("name_or_path",)`` for a local copy of the hub VAE.

    Raises:
        ValueError: one message naming every mismatching key, the model's value and the data's value.
    """
    diffs: list[str] = []
    if sample_shape is not None and manifest.get("latent_shape") is not None:
        model, data = [int(n) for n in sample_shape], [int(n) for n in manifest["latent_shape"]]
        if manifest.get("kind") == "videos" and len(model) == len(data) == 4:
            if model[1:] != data[1:] or model[0] > data[0]:  # a model may train on shorter clips than stored
                diffs.append(f"latent_shape: model {model}, data {data} (video clips: model frames <= data frames)")
        elif model != data:
            diffs.append(f"latent_shape: model {model}, data {data}")
    if vae_config is not None:
        data_vae = manifest.get("vae")
        if data_vae is None:
            if manifest.get("latent_shape") is not None:
                diffs.append("vae: the manifest records no VAE for its latents")
        else:
            skip = set(ignore_vae_keys)
            unknown = skip - set(VAE_MATCH_KEYS)
            if unknown:
                raise ValueError(f"check_manifest: ignore_vae_keys={sorted(unknown)} not in {list(VAE_MATCH_KEYS)}")
            for key in VAE_MATCH_KEYS:
                if key in skip or key not in vae_config or key not in data_vae:
                    continue
                if not same_setting(key, vae_config[key], data_vae[key]):
                    diffs.append(f"vae.{key}: model {vae_config[key]!r}, data {data_vae[key]!r}")
    if num_classes is not None and int(num_classes) != int(manifest.get("num_classes") or 0):
        diffs.append(f"num_classes: model {num_classes}, data {manifest.get('num_classes') or 0}")
    if context_dim is not None:
        shape = manifest.get("caption_feature_shape")
        data_dim = int(shape[-1]) if shape else 0
        if int(context_dim) != data_dim:
            diffs.append(f"context_dim: model {context_dim}, data {data_dim} (caption_feature_shape {shape})")
    if diffs:
        raise ValueError(
            "the model does not match the data's manifest: " + "; ".join(diffs) + ". Change the model settings, "
            "or point the data at shards prepared for this model (`python -m datamodules.prepare`)"
        )


def diff_settings(ours: Mapping[str, Any], theirs: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: a != b`` for every key whose values differ (recursing into dicts; floats to a relative 1e-6)."""
    out = []
    for key in sorted(set(ours) | set(theirs), key=str):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(diff_settings(a, b, f"{prefix}{key}."))
        elif not same_setting(key, a, b):
            out.append(f"{prefix}{key}: {a!r} != {b!r}")
    return out


__all__ = [
    "MANIFEST_NAME",
    "VAE_MATCH_KEYS",
    "check_manifest",
    "diff_settings",
    "latent_keys",
    "load_manifest",
    "manifest_location",
    "prepared_settings",
    "read_manifest",
    "settings_of",
    "validate_manifest",
    "write_manifest",
]
