"""The data tool's encoders: pixels -> raw VAE latents (posterior samples seeded per sample index, means, moments,
both flips) and caption texts -> text-encoder features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from datamodules.manifest import latent_keys
from zigma.vae import FrozenVAE

if TYPE_CHECKING:
    from datamodules.prepare.inputs import Item
    from zigma.text_encoder import CLIPCaptionEncoder

LatentMode = Literal["sample", "mean", "moments", "both-flips", "none"]
StoreDtype = Literal["float32", "float16"]
_SAMPLE_STREAM = 0  # SeedSequence stream of posterior samples


def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 3, S, S) float32 in [-1, 1] from RGB images: x / 127.5 - 1 (the VAE's input convention)."""
    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # (B, S, S, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample ``index``'s posterior draws: a function of (seed, index) only."""
    state = np.random.SeedSequence([seed, _SAMPLE_STREAM, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


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


def encode_captions(loaded: list[tuple[Item, dict[str, Any]]], clip: CLIPCaptionEncoder | None,
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


__all__ = ["LatentMode", "StoreDtype", "encode_captions", "encode_latents", "sample_generator", "to_pixels"]
