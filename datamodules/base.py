"""What every ZigMa DataModule shares: the batch contract, the facts the model is checked against, and the
``predict`` requests (which samples to generate).

Batch contract: a dict with ``"x"`` (B, C, H, W) or (B, T, C, H, W) in the model's space (pixels in [-1, 1] or
scaled latents) and, for conditional data, ``"y"``: class ids (B,) or caption features (B, N, d_context).
Predict batches: ``{"index": (B,) global sample indices, "y": labels or None}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from zigma.conditions import class_labels, load_caption_features


class SampleRequests(Dataset):
    """``count`` sample requests; class-conditional data draws a label per sample from ``seed``; text data gives
    sample i the caption features ``captions[i % K]`` of ``captions`` (K, N, d)."""

    def __init__(self, count: int, num_classes: int = 0, seed: int = 0, captions: torch.Tensor | None = None):
        if count < 1:
            raise ValueError(f"num_predict_samples must be >= 1; got {count}")
        self.count = count
        self.labels = None
        if num_classes > 0:
            self.labels = class_labels(num_classes, count, seed)
        elif captions is not None:
            self.labels = captions[torch.arange(count) % len(captions)]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        item = {"index": torch.tensor(index)}
        if self.labels is not None:
            item["y"] = self.labels[index]
        return item


@dataclass(frozen=True)
class DataYields:
    """What a DataModule's training batches hold, stated before any is read
    (``FlowMatchingModule.check_data`` checks the model against it).

    source: the DataModule's class name, for messages. sample_shape: one ``"x"`` in the model's space, (C, H, W)
    or (T, C, H, W); () when the module encodes pixels itself. pixel_shape: those pixels, (3, S, S) or
    (T, 3, S, S), or None. num_classes: > 0 when ``"y"`` holds class ids. context_dim: > 0 when ``"y"`` holds
    caption features (N, context_dim). vae_scale: the VAE scale of yielded latents where known (the model must
    decode with the same), else None."""

    source: str
    sample_shape: tuple[int, ...]
    pixel_shape: tuple[int, ...] | None
    num_classes: int
    context_dim: int
    vae_scale: float | None = None


class ZigMaDataModule(L.LightningDataModule):
    """Base class: subclasses set ``sample_shape`` and, if conditional, ``num_classes`` / ``context_dim``."""

    sample_shape: tuple[int, ...] = ()
    num_classes: int = 0
    context_dim: int = 0  # > 0: captions (B, N, context_dim)
    vae_scale: float | None = None  # the VAE scale of yielded latents, where known

    def __init__(self, num_predict_samples: int = 16, predict_batch_size: int = 16, predict_seed: int = 0,
                 predict_captions: str | None = None):  # fmt: skip
        super().__init__()
        for name, value in (("num_predict_samples", num_predict_samples), ("predict_batch_size", predict_batch_size)):
            if value < 1:  # checked here, before any checkpoint or data is loaded
                raise ValueError(f"data.{name} must be >= 1; got {value}")
        self.num_predict_samples = num_predict_samples
        self.predict_batch_size = predict_batch_size
        self.predict_seed = predict_seed
        self.predict_captions = predict_captions  # caption features (K, N, d) of a text model's predict requests

    def yields(self, stage: str | None = None) -> DataYields:
        """What the training batches hold (see :class:`DataYields`); ``stage`` (``"predict"``, ...): what the run
        uses the data for (a DataModule without its files can still state what predict needs)."""
        pixel_shape = getattr(self, "pixel_shape", None)
        return DataYields(type(self).__name__, tuple(self.sample_shape or ()),
                          tuple(pixel_shape) if pixel_shape is not None else None, self.num_classes,
                          self.context_dim, self.vae_scale)  # fmt: skip

    def shards_manifest(self) -> dict | None:
        """The validated manifest of the data's shards: ``data.manifest`` if named, else the one beside the shards
        (``datamodules.manifest.read_manifest``); read once per DataModule (a URL is fetched once). None without
        shards or a named manifest, or for shards that carry none (e.g. upstream's).

        Raises:
            FileNotFoundError: a named ``data.manifest`` is missing.   ValueError: a manifest is invalid.
        """
        if not hasattr(self, "_shards_manifest"):
            from datamodules.manifest import read_manifest

            named, shards = getattr(self, "manifest", None), getattr(self, "shards", None)
            try:
                self._shards_manifest = read_manifest(named or shards) if (named or shards) else None
            except FileNotFoundError:
                if named is not None:
                    raise
                self._shards_manifest = None
        return self._shards_manifest

    def check_manifest(self, **model_facts) -> None:
        """Shards made by ``datamodules.prepare`` carry a manifest: raise ValueError when the model's facts
        (``FlowMatchingModule.manifest_facts``: sample shape, VAE config, classes, caption width) differ from it.
        Data without shards or without a manifest (e.g. upstream's shards) is not checked."""
        manifest = self.shards_manifest() if getattr(self, "shards", None) else None
        if manifest is None:
            return
        from datamodules.manifest import check_manifest

        # the same VAE may live elsewhere on this machine; check_manifest's message names the manifest already
        check_manifest(manifest, **model_facts, ignore_vae_keys=("name_or_path", "subfolder"))

    def predict_captions_features(self) -> torch.Tensor | None:
        """Text data: the caption features of ``predict_captions`` (``zigma.conditions.load_caption_features``)."""
        if self.context_dim <= 0:
            if self.predict_captions is not None:
                raise ValueError(f"data.predict_captions is set but {type(self).__name__} has no captions")
            return None
        if self.predict_captions is None:
            raise ValueError(f"a text model predicts from caption features: set data.predict_captions to a .npy/.npz/"
                             f".pt file of shape (K, N, {self.context_dim}); sample i uses caption i % K")  # fmt: skip
        try:
            return load_caption_features(self.predict_captions, self.context_dim)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"data.predict_captions: {err}") from err

    def predict_dataloader(self) -> DataLoader:
        requests = SampleRequests(self.num_predict_samples, self.num_classes, self.predict_seed,
                                  self.predict_captions_features())  # fmt: skip
        return DataLoader(requests, batch_size=self.predict_batch_size, shuffle=False)

    def test_dataloader(self):
        """``test`` evaluates the validation split (the datasets here have no separate test split)."""
        return self.val_dataloader()

    @property
    def reference_name(self) -> str:
        """Names the real set of :meth:`reference_pixels` in cached FID/FVD reference statistics (part of their key)."""
        return type(self).__name__

    def reference_pixels(self, batch_size: int = 50) -> Iterator[torch.Tensor]:
        """The real set for FID/FVD reference statistics: batches of real pixels in [-1, 1], (N, C, H, W) images or
        (N, T, C, H, W) clips, in a fixed order that does not depend on the rank, without augmentation."""
        raise NotImplementedError(
            f"{type(self).__name__} has no real pixels to compute FID/FVD reference statistics from; pass the "
            "callback's reference: an .npz from `zigma reference-stats`, an image folder or image shards"
        )


def batch_size(batch: dict) -> int:
    """Samples in a batch (``x``, ``pixels`` or predict ``index``), for Lightning's ThroughputMonitor."""
    return int(next(batch[k] for k in ("x", "pixels", "index") if k in batch).shape[0])
