"""Decoding: one raw shard sample (bytes per suffix) -> one training sample of tensors (``SampleDecoder``).

Shard keys (suffixes after the sample key; ``a;b`` means "a, else b"): latents ``img_feature256.npy`` (upstream) or
``latent.npy`` (upstream FacesHQ and ``datamodules.prepare``): raw, unscaled VAE latents (C, h, w), multiplied by
``latent_scale`` on load as upstream does; also the other layouts ``prepare`` writes: (2, C, h, w) latents of the image
and its mirror image (``hflip`` then picks one instead of mirroring a latent), and ``<stem>_mean.npy`` +
``<stem>_std.npy`` posterior moments (a fresh sample is drawn per sample and epoch). Images ``jpg``/``png``, labels
``cls`` (a text integer), caption features ``npy`` (N_cap, L, d), video latents ``frame_feature256.npy`` (T, C, h, w),
video frames: a uint8 (T, H, W, 3) array such as ``frames.npy``, or one image member per frame ``<t>.jpg`` /
``<t>.png`` (t an integer; frames in the order of t).

Per-sample draws (horizontal flip, caption index, video start frame, posterior noise) are functions of (seed, epoch,
pass, sample key) (``datamodules.shards.sample_rng``): one caption per sample, not per batch, and the same whatever the
worker or rank that reads it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from datamodules.shards import sample_rng
from zigma.images import resize_center_crop

_FLIP, _CAPTION, _CROP, _NOISE = 0, 1, 2, 3  # per-sample draw streams


def _pick(sample: dict[str, Any], spec: str) -> bytes:
    """The bytes of the first of the ``;``-separated suffixes in ``spec`` that ``sample`` holds."""
    for name in spec.split(";"):
        if name in sample:
            return sample[name]
    have = sorted(k for k in sample if not k.startswith("__"))
    raise KeyError(f"no {spec!r} in sample {sample.get('__key__')!r} (it has {have})")


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class SampleDecoder:
    """Raw shard sample (bytes per suffix) -> one training sample ``{"x" or "pixels": tensor, "y": ...}``.

    ``kind``: ``"latent"`` (C, h, w), ``"image"`` (3, resolution, resolution), ``"video"`` (video_frames, C, h, w)
    latents or ``"frames"`` (video_frames, 3, resolution, resolution) pixels of video frames.
    Call as ``decoder(sample, epoch, repeat)``; the per-sample draws are functions of (seed, epoch, repeat, key).
    After ``expect(shapes)`` a sample whose shapes differ raises (so it is counted as bad, not stacked).
    """

    def __init__(self, *, kind: str, data_key: str, label_key: str | None = None, num_classes: int = 0,
                 caption_key: str | None = None, latent_scale: float = 1.0, resolution: int = 256,
                 hflip: bool = False, video_frames: int = 0, seed: int = 0):  # fmt: skip
        self.kind = kind
        self.data_key = data_key
        self.label_key = label_key
        self.num_classes = num_classes
        self.caption_key = caption_key
        self.latent_scale = latent_scale
        self.resolution = resolution
        self.hflip = hflip
        self.video_frames = video_frames
        self.seed = seed
        self.shapes: dict[str, tuple[int, ...]] = {}

    def expect(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = dict(shapes)

    def __call__(self, sample: dict[str, Any], epoch: int = 0, repeat: int = 0) -> dict[str, Any]:
        key = sample["__key__"]
        draw = partial(sample_rng, self.seed, key, epoch, repeat)
        flip = self.hflip and draw(_FLIP).random() < 0.5
        out: dict[str, Any] = {}
        if self.kind == "image":
            out["pixels"] = self._image(_pick(sample, self.data_key), flip)
        elif self.kind == "frames":
            out["pixels"] = self._frames(sample, draw)
        else:
            x, mirrored = self._raw_latent(sample, flip, draw)
            flip = flip and not mirrored
            want_ndim = 4 if self.kind == "video" else 3
            if x.ndim != want_ndim:
                raise ValueError(f"{self.kind} {self.data_key!r} has shape {x.shape}; expected {want_ndim} dims")
            if self.kind == "video":
                if x.shape[0] < self.video_frames:
                    raise ValueError(f"clip of {x.shape[0]} frames, fewer than video_frames={self.video_frames}")
                start = int(draw(_CROP).integers(x.shape[0] - self.video_frames + 1))
                x = x[start : start + self.video_frames]  # (T, C, h, w)
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) * self.latent_scale
            out["x"] = x.flip(-1) if flip else x
        if self.label_key is not None:
            label = int(_pick(sample, self.label_key).decode().strip())
            if not 0 <= label < self.num_classes:
                raise ValueError(f"label {label} outside [0, num_classes={self.num_classes})")
            out["y"] = label
        elif self.caption_key is not None:
            captions = _npy(_pick(sample, self.caption_key))
            if captions.ndim == 2:
                captions = captions[None]  # one caption (L, d)
            if captions.ndim != 3 or len(captions) == 0:
                raise ValueError(f"caption features {self.caption_key!r} of shape {captions.shape}; expected (N, L, d)")
            index = int(draw(_CAPTION).integers(len(captions)))  # one caption per sample
            out["y"] = torch.from_numpy(np.ascontiguousarray(captions[index], dtype=np.float32))  # (L, d)
        for name, shape in self.shapes.items():
            have = tuple(out[name].shape) if isinstance(out[name], torch.Tensor) else ()
            if have != shape:
                raise ValueError(f"{name} of shape {have}; the data's first sample has {shape}")
        return out

    def _raw_latent(self, sample: dict[str, Any], flip: bool, draw: partial) -> tuple[np.ndarray, bool]:
        """(raw latent, whether it is already the mirrored image's) from the first alternative of ``data_key`` the
        sample holds, in any layout ``datamodules.prepare`` writes: a latent ([T,] C, h, w) or (1, C, h, w);
        ``both-flips`` (2, C, h, w) = (image, mirror image); ``moments`` ``<stem>_mean.npy`` + ``<stem>_std.npy``,
        from which a fresh posterior sample is drawn per sample and epoch."""
        for name in self.data_key.split(";"):
            if name in sample:
                x = _npy(sample[name])
                if self.kind == "latent" and x.ndim == 4 and x.shape[0] in (1, 2):
                    return (x[1], True) if flip and x.shape[0] == 2 else (x[0], False)
                return x, False
            stem = name.removesuffix(".npy")
            if f"{stem}_mean.npy" in sample and f"{stem}_std.npy" in sample:
                mean, std = _npy(sample[f"{stem}_mean.npy"]), _npy(sample[f"{stem}_std.npy"])
                noise = draw(_NOISE).standard_normal(mean.shape, dtype=np.float32)
                return mean.astype(np.float32) + std.astype(np.float32) * noise, False
        return _npy(_pick(sample, self.data_key)), False  # raises, naming the keys the sample has

    def _image(self, data: bytes, flip: bool) -> torch.Tensor:
        """Encoded image -> (3, S, S) float32 in [-1, 1]: shorter side resized to S (bicubic), centre crop."""
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
        pixels = self._resize_crop(image)
        return pixels.flip(-1) if flip else pixels

    def _frames(self, sample: dict[str, Any], draw: partial) -> torch.Tensor:
        """Video frames -> (video_frames, 3, S, S) float32 in [-1, 1]: cropped in time at a drawn start frame (as
        latent clips), then each frame resized and centre-cropped as an image (``_resize_crop``)."""
        from PIL import Image

        frames = self._frame_list(sample)
        if len(frames) < self.video_frames:
            raise ValueError(f"clip of {len(frames)} frames, fewer than video_frames={self.video_frames}")
        start = int(draw(_CROP).integers(len(frames) - self.video_frames + 1))
        out = []
        for frame in frames[start : start + self.video_frames]:
            if isinstance(frame, bytes):
                with Image.open(io.BytesIO(frame)) as image:
                    image = image.convert("RGB")
            else:
                image = Image.fromarray(np.ascontiguousarray(frame))  # (H, W, 3) uint8: RGB
            out.append(self._resize_crop(image))
        return torch.stack(out)  # (T, 3, S, S)

    def _frame_list(self, sample: dict[str, Any]) -> Sequence[np.ndarray] | list[bytes]:
        """The sample's frames in temporal order: the (T, H, W, 3) uint8 array of the first ``.npy`` alternative of
        ``data_key`` it holds, else its ``<t>.<ext>`` image members for an image extension ``ext`` of ``data_key``."""
        for name in self.data_key.split(";"):
            if name.endswith(".npy") and name in sample:
                x = _npy(sample[name])
                if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
                    raise ValueError(f"frames {name!r} of dtype {x.dtype} and shape {x.shape}; expected uint8 "
                                     "(T, H, W, 3)")  # fmt: skip
                return x
            if not name.endswith(".npy"):
                members = {}
                for k in sample:
                    index, dot, ext = k.partition(".")
                    if dot and ext == name and index.isdigit():
                        members[int(index)] = sample[k]
                if members:
                    return [members[t] for t in sorted(members)]
        have = sorted(k for k in sample if not k.startswith("__"))
        raise KeyError(f"no frames {self.data_key!r} in sample {sample.get('__key__')!r} (it has {have})")

    def _resize_crop(self, image: Any) -> torch.Tensor:
        """RGB PIL image -> (3, S, S) float32 in [-1, 1] (``zigma.images.resize_center_crop``)."""
        image = resize_center_crop(image, self.resolution)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)
        return pixels.float() / 127.5 - 1
