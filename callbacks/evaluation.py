"""FID and FVD of EMA samples, at the end of every validation (``fit``, ``validate``) and ``test``.

Protocol (reference ecosystem §2-3), and what it fixes in upstream ZigMa (reference zigma-upstream §8):

- **Fakes**: ``num_samples`` EMA samples from the fixed noise ``pl_module.noise(i, seed)`` of global indices
  ``i = 0 .. num_samples-1`` (labels from ``seed`` too), with a configurable sampler (default Euler, 25 steps; dopri5
  works too), decoded by the module's VAE. Rank r generates indices r, r + W, r + 2W, ...: every sample is generated
  and counted exactly once whatever the world size W, so a 1-GPU and an 8-GPU evaluation see the same set (upstream
  counted every gathered fake once per GPU). The total is checked after the all-reduce.
- **Metric**: torchmetrics' ``FrechetInceptionDistance`` (float64 sums, summed over ranks; ``compute`` runs on every
  rank), with torch-fidelity's TF-FID Inception loaded from a local file and the TF1-compatible resize by default
  (``antialias=False``, comparable with published FIDs). FVD uses the same metric class around StyleGAN-V's I3D
  (uint8 clips (B, C, T, H, W), ``rescale=True, resize=True``, 400-d features); per-frame FID comes with it.
- **Reals**: reference statistics computed once from real pixels (the DataModule's ``reference_pixels``, an image
  folder or image shards) and cached under ``reference_cache_dir`` keyed by (dataset, resolution, count, extractor,
  resize); later runs load them, a changed key recomputes, and a reference ``.npz`` for another resolution or
  extractor is refused. Upstream recomputed reals from its unshuffled training stream at every evaluation. Under DDP
  every rank extracts the features of a disjoint share of the reals (real i goes to rank i mod W; an image folder is
  split before decoding, a DataModule's pixels or image shards are read by every rank) and the float64 sums are added
  over the ranks (``zigma.metrics.reference``): the single-process statistics, without ranks idling at a barrier for
  the whole computation (a 50k reference on one rank could pass the 30-minute NCCL timeout). Rank 0 writes the cache.
- **Progress**: rank 0 shows tqdm bars for the reference statistics and the fakes, on a terminal only (``progress``),
  and none when the Trainer's progress bar is off.
- **Failures raise**: a non-finite sample stops the evaluation with an error (upstream replaced failed samples with
  ``torch.rand_like`` images and reported the resulting FID).

Tags carry the count: ``val/fid_5k`` (``test/fid_5k`` under ``test``), ``val/fvd_2048``, ``val/frame_fid_2048``;
``ModelCheckpoint(monitor="val/fid_5k", mode="min")`` can select on them. The evaluation runs at every validation, so
``trainer.val_check_interval`` sets how often; the sanity check is skipped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from datamodules.images import batches_of, folder_batches, list_images, shard_images
from datamodules.shards import expand_shards
from zigma.conditions import class_labels
from zigma.metrics.frechet import GaussianStats
from zigma.metrics.i3d import i3d_file, load_i3d, to_i3d_layout
from zigma.metrics.inception import inception_weights, load_inception, to_uint8
from zigma.metrics.progress import progress_bar
from zigma.metrics.reference import Images, load_reference, reference_stats

log = logging.getLogger(__name__)

DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "zigma", "reference")


def count_tag(n: int) -> str:
    """5000 -> "5k", 50000 -> "50k", 2048 -> "2048"."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def frechet_metric(extractor: nn.Module):
    """torchmetrics' FrechetInceptionDistance around ``extractor`` (uint8 in, (N, d) out): float64 sums of both sides,
    summed over ranks on ``compute``; real statistics survive ``reset`` (they are loaded once)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=extractor, reset_real_features=False, normalize=False)


def load_real_statistics(metric, stats: GaussianStats) -> None:
    """Puts reference statistics into the metric's real-side sums (Σx, Σxxᵀ, n), as if it had seen those images."""
    dim = metric.real_features_sum.shape[0]
    if stats.dim != dim:
        raise ValueError(f"reference statistics have {stats.dim}-d features, the extractor gives {dim}-d")
    device = metric.real_features_sum.device
    metric.real_features_sum = stats.sum.to(device, torch.float64)
    metric.real_features_cov_sum = stats.outer.to(device, torch.float64)
    metric.real_features_num_samples = torch.tensor(stats.count, dtype=torch.long, device=device)


class _Frechet:
    """One Fréchet metric of an evaluation: its extractor, torchmetrics metric, tag name and reference key."""

    def __init__(self, name: str, extractor: nn.Module, key: dict[str, Any], to_input, per_sample: int = 1):
        self.name = name  # "fid", "fvd", "frame_fid"
        self.per_sample = per_sample  # extractor inputs per generated sample (frames per clip for frame FID)
        self.extractor = extractor
        self.metric = frechet_metric(extractor)
        self.key = key  # {dataset, resolution, count, extractor, antialias, dim}
        self.to_input = to_input  # pixels in [-1, 1] -> the extractor's uint8 input


@dataclass(eq=False)
class FrechetSettings:
    """The settings every Fréchet evaluation shares (``--fid.*`` and ``--fvd.*``), checked when constructed.

    Args:
        num_samples: generated samples per evaluation, over all ranks; 0 switches the evaluation off. At least 2.
        batch_size: samples generated at once per rank.
        sample_mode, sample_method, sample_steps: the sampler (``ode``/``sde``; e.g. ``euler``/``heun`` on
            ``sample_steps`` time points, i.e. ``sample_steps - 1`` steps: the default 26 is Euler-25, 25 NFE; or
            ``dopri5``, adaptive); None takes the module's ``sample_*`` hyper-parameter.
        guidance_scale: classifier-free guidance scale; None takes the module's.
        seed: seed of the noise and class labels of the fakes (the same fakes at every evaluation).
        reference: where the real statistics come from: None (the DataModule's ``reference_pixels``), a statistics
            ``.npz`` (``zigma reference-stats``), an image folder, or tar shards (a path or brace pattern
            containing ``.tar``) with images under suffix ``reference_key``.
        reference_key: the image suffix in reference shards (e.g. ``jpg``, ``png``).
        reference_count: real samples in the statistics; None = ``num_samples``.
        reference_cache_dir: where computed reference statistics are cached (reused by later runs).
        reference_batch_size: images per Inception/I3D batch and rank while computing reference statistics.
        progress: rank 0's progress bars (reference statistics, fakes): None: on a terminal, when the Trainer shows
            its progress bar; True: always (also into a log file); False: never.
    """

    kind: ClassVar[str] = "frechet"  # the config group (``fid``, ``fvd``) named in errors and tags

    num_samples: int = 0
    batch_size: int = 16
    sample_mode: str | None = None
    sample_method: str | None = "euler"
    sample_steps: int | None = 26
    guidance_scale: float | None = None
    seed: int = 0
    reference: str | None = None
    reference_key: str = "jpg"
    reference_count: int | None = None
    reference_cache_dir: str = DEFAULT_CACHE
    reference_batch_size: int = 50
    progress: bool | None = None

    def __post_init__(self) -> None:
        field = self.kind
        if self.num_samples < 0 or self.num_samples == 1:
            raise ValueError(f"{field}.num_samples={self.num_samples}: a covariance needs at least 2 samples (0 = off)")
        if self.batch_size < 1 or self.reference_batch_size < 1:
            raise ValueError(f"{field}.batch_size and {field}.reference_batch_size must be >= 1")
        if self.reference_count is not None and self.reference_count < 2:
            raise ValueError(f"{field}.reference_count={self.reference_count}: needs at least 2 real samples")
        if self.sample_steps is not None and self.sample_steps < 1:
            raise ValueError(f"{field}.sample_steps must be >= 1; got {self.sample_steps}")
        if self.reference_count is None:
            self.reference_count = self.num_samples


@dataclass(eq=False)
class InceptionSettings:
    """The Inception network of an FID (also the per-frame FID of an FVD evaluation).

    Args:
        weights_path: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``; None: torch hub's cache
            (``$TORCH_HOME/hub/checkpoints``). Never downloaded.
        antialias: resize to 299 px with antialiasing (torchmetrics' default) instead of the TF1-compatible resize of
            published FIDs (default False).
        feature: Inception pool layer; 2048 is FID, 64/192/768 are cheaper and only comparable with themselves.
    """

    weights_path: str | None = None
    antialias: bool = False
    feature: int = 2048


@dataclass(eq=False)
class FrechetEvaluation(FrechetSettings, L.Callback):
    """Shared machinery of :class:`FIDEvaluation` and :class:`FVDEvaluation` (see the module docstring).

    Settings: those of :class:`FrechetSettings`.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.metrics: list[_Frechet] = []
        self._captions: list[Tensor] = []

    @property
    def enabled(self) -> bool:
        return self.num_samples > 0

    # ------------------------------------------------------------------------------------------------------ setup
    def _build_metrics(self, pl_module, dataset: str) -> list[_Frechet]:
        raise NotImplementedError

    def _check_model(self, pl_module) -> None:
        raise NotImplementedError

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if not self.enabled or stage == "predict" or self.metrics:
            return
        self._check_model(pl_module)
        if getattr(trainer.datamodule, "val_shards", "n/a") is None:
            rank_zero_warn(f"{self.kind}: the evaluation runs at the end of validation and test, but the data has no "
                           "val_shards, so neither runs; set data.val_shards")  # fmt: skip
        if pl_module.model.has_text:
            rank_zero_warn(f"{self.kind}: a text-conditioned model is evaluated with the captions of the validation "
                           "batches, cycled; the caption set depends on the world size")  # fmt: skip
        self.metrics = self._build_metrics(pl_module, self._dataset_name(trainer))
        self._prepare_references(trainer)

    def _dataset_name(self, trainer: L.Trainer) -> str:
        if self.reference is None:
            if trainer.datamodule is None:
                raise ValueError(f"{self.kind}.reference is needed: there is no DataModule to take real pixels from")
            return trainer.datamodule.reference_name
        if ".tar" in self.reference:
            shards = expand_shards(self.reference)
            return f"shards:{shards[0]}..{shards[-1]}({len(shards)}):{self.reference_key}"
        return str(Path(self.reference).expanduser().resolve())

    def _pixel_shape(self, pl_module) -> tuple[int, ...]:
        """(C, H, W) of one decoded frame."""
        vae = pl_module.vae
        m = pl_module.model
        if vae is None:
            return (m.in_channels, m.img_dim, m.img_dim)
        return (vae.in_channels, m.img_dim * vae.downsample_factor, m.img_dim * vae.downsample_factor)

    def _prepare_references(self, trainer: L.Trainer) -> None:
        """Loads or computes (all ranks together, see the module docstring) and caches the real statistics; rank 0
        puts them into its metrics, the others hold zero real sums, so the sums over ranks are exactly the
        reference's."""
        for item in self.metrics:
            item.metric.to(trainer.strategy.root_device)  # a cache miss runs the extractor on the GPU
            stats = self._reference_stats(trainer, item)
            if trainer.global_rank == 0:
                load_real_statistics(item.metric, stats)
        trainer.strategy.barrier("zigma_reference_statistics")

    def _show_progress(self, trainer: L.Trainer) -> bool | None:
        """``progress`` for ``zigma.metrics.progress.progress_bar``: unset, no bar when the Trainer shows none."""
        if self.progress is None and trainer.progress_bar_callback is None:
            return False
        return self.progress

    def _reference_stats(self, trainer: L.Trainer, item: _Frechet) -> GaussianStats | None:
        """The real statistics on rank 0 (None on the others); every rank must call it (a collective under DDP)."""
        source = self.reference
        if source is not None and source.endswith(".npz"):
            return self._reference_file(item) if trainer.global_rank == 0 else None
        cache_dir = Path(self.reference_cache_dir).expanduser()
        return reference_stats(self._real_inputs(trainer, item), extractor=item.extractor, key=item.key,
                               cache_dir=cache_dir, progress=self._show_progress(trainer),
                               desc=f"{item.name} reference")  # fmt: skip

    def _reference_file(self, item: _Frechet) -> GaussianStats:
        expect = {k: item.key[k] for k in ("resolution", "extractor", "antialias")}
        return load_reference(self.reference, expect=expect)

    def _real_inputs(self, trainer: L.Trainer, item: _Frechet) -> Images:
        """The extractor's uint8 inputs of the real set, for ``reference_stats`` (only read when the cache misses):
        a stream every rank reads (batches of ``reference_batch_size`` per rank, so each rank's share of one is
        about that size), or for an image folder a function of (rank, world size) that decodes that rank's files
        only."""
        size, source = item.key["resolution"], self.reference
        batch, world = self.reference_batch_size, trainer.world_size
        if source is None:
            return self._datamodule_inputs(trainer, item, batch * world)
        if ".tar" in source:
            return self._shard_inputs(size, batch * world)
        count = item.key["count"]
        return lambda rank, world_size: folder_batches(list_images(source)[:count][rank::world_size], size, batch)

    def _shard_inputs(self, size: int, batch: int) -> Iterator[Tensor]:
        yield from batches_of(shard_images(expand_shards(self.reference), self.reference_key, size), batch)

    def _datamodule_inputs(self, trainer: L.Trainer, item: _Frechet, batch: int) -> Iterator[Tensor]:
        size = item.key["resolution"]
        for pixels in trainer.datamodule.reference_pixels(batch):
            if tuple(pixels.shape[-2:]) != (size, size):
                raise ValueError(
                    f"{self.kind}: the data's real pixels are {tuple(pixels.shape[-2:])}, the samples "
                    f"{size}x{size}; give {self.kind}.reference (folders and shards are resized to the samples)"
                )
            yield item.to_input(pixels)

    # ------------------------------------------------------------------------------------------------- evaluation
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep_captions(pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep_captions(pl_module, batch)

    def _keep_captions(self, pl_module, batch: dict) -> None:
        if self.enabled and pl_module.model.has_text and batch.get("y") is not None:
            kept = sum(len(c) for c in self._captions)
            if kept < 256:  # caption features are large (77 x 768 floats each): keep a few batches, cycled
                self._captions.append(batch["y"][: 256 - kept].detach())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.enabled and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.enabled:
            self.evaluate(trainer, pl_module, "test")

    def _conditions(self, pl_module, indices: Tensor) -> Tensor | None:
        """Class labels of global sample ``indices`` (drawn once from ``seed`` for all samples, so sample i has the
        same label whatever the batch and world size), captions of the validation batches, or None."""
        net = pl_module.model
        if net.num_classes > 0:
            return class_labels(net.num_classes, self.num_samples, self.seed)[indices].to(pl_module.device)
        if net.has_text:
            if not self._captions:
                raise RuntimeError(f"{self.kind}: a text-conditioned model needs captions, but no validation batch "
                                   "carried any")  # fmt: skip
            captions = torch.cat(self._captions)
            return captions[indices % len(captions)].to(pl_module.device)
        return None

    def generate(self, trainer: L.Trainer, pl_module, indices: Tensor) -> tuple[Tensor, int]:
        """Decoded EMA samples (B, C, H, W) or (B, T, C, H, W) in [-1, 1] of global ``indices``, and the NFE."""
        x0 = pl_module.noise(indices, seed=self.seed)
        with trainer.precision_plugin.forward_context():
            result = pl_module.generate(x0, self._conditions(pl_module, indices), mode=self.sample_mode,
                                        method=self.sample_method, num_steps=self.sample_steps,
                                        guidance_scale=self.guidance_scale)  # fmt: skip
            bad = (~torch.isfinite(result.x)).sum().item()
            if bad:
                raise FloatingPointError(
                    f"{self.kind}: {bad} of {result.x.numel()} sampled values are NaN/Inf at global step "
                    f"{trainer.global_step} (samples {indices[0].item()}..{indices[-1].item()}); the evaluation stops "
                    "rather than score broken samples"
                )
            pixels = pl_module.decode(result.x)
        return pixels.float(), int(result.nfe)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module, stage: str) -> dict[str, float]:
        """Generates this rank's share of the fakes, updates the metrics and logs ``<stage>/<name>_<count>`` (every
        rank computes; the values agree). Returns the logged values."""
        if not self.metrics:
            self.setup(trainer, pl_module, "validate")
        start = time.perf_counter()
        for item in self.metrics:
            item.metric.to(pl_module.device)
            item.metric.reset()  # fakes only: the real sums are kept
        rank, world = trainer.global_rank, trainer.world_size
        mine = torch.arange(rank, self.num_samples, world)
        nfe = 0
        with progress_bar(len(mine), f"{stage} {self.kind} samples", unit="sample", rank=rank,
                          enabled=self._show_progress(trainer)) as bar:  # fmt: skip
            for chunk in mine.split(self.batch_size):
                pixels, chunk_nfe = self.generate(trainer, pl_module, chunk)
                nfe = max(nfe, chunk_nfe)
                for item in self.metrics:
                    item.metric.update(item.to_input(pixels).to(pl_module.device), real=False)
                bar.update(len(chunk))
        counted = {item.name: int(item.metric.fake_features_num_samples.item()) for item in self.metrics}
        values = {item.name: float(item.metric.compute()) for item in self.metrics}  # a collective: every rank
        prefix = f"{stage}/"
        logged: dict[str, float] = {}
        for item in self.metrics:
            total = int(trainer.strategy.reduce(torch.tensor(float(counted[item.name]), device=pl_module.device),
                                                reduce_op="sum").item())  # fmt: skip
            expected = self.num_samples * item.per_sample
            if total != expected:
                raise RuntimeError(f"{item.name}: {total} fake samples were counted over {world} rank(s), expected "
                                   f"{expected}")  # fmt: skip
            tag = f"{prefix}{item.name}_{count_tag(self.num_samples)}"
            logged[tag] = values[item.name]
        seconds = time.perf_counter() - start
        logged[f"{prefix}{self.kind}_samples"] = float(self.num_samples)  # = the all-reduced counts, checked above
        logged[f"{prefix}{self.kind}_nfe"] = float(nfe)
        logged[f"{prefix}{self.kind}_seconds"] = seconds
        for tag, value in logged.items():
            pl_module.log(tag, value, sync_dist=False, rank_zero_only=False)
        main = next(iter(logged.items()))
        log.info("%s = %.6g (%d samples, %d NFE, %.1f s)", main[0], main[1], self.num_samples, nfe, seconds)
        return logged


@dataclass(eq=False)
class FIDEvaluation(InceptionSettings, FrechetEvaluation):
    """FID of EMA image samples (``val/fid_<count>``), see the module docstring.

    Settings: those of :class:`FrechetSettings` and :class:`InceptionSettings`.
    """

    kind: ClassVar[str] = "fid"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.enabled:
            inception_weights(self.weights_path)  # a missing file fails now, with where to put it

    def _check_model(self, pl_module) -> None:
        if pl_module.model.video_frames > 0:
            raise ValueError("fid evaluates image models; this model makes videos: use fvd (FVDEvaluation)")

    def _build_metrics(self, pl_module, dataset: str) -> list[_Frechet]:
        extractor = load_inception(self.weights_path, antialias=self.antialias, feature=self.feature)
        _, size, _ = self._pixel_shape(pl_module)
        key = {"dataset": dataset, "resolution": size, "count": self.reference_count, "extractor": extractor.name,
               "antialias": self.antialias, "dim": extractor.num_features}  # fmt: skip
        return [_Frechet("fid", extractor, key, to_uint8)]


def frames_of(pixels: Tensor) -> Tensor:
    """Clips (B, T, C, H, W) -> uint8 frames (B·T, C, H, W), clip-major (clip b's frames stay together)."""
    return to_uint8(pixels.flatten(0, 1))


def clips_of(pixels: Tensor) -> Tensor:
    """Clips (B, T, C, H, W) in [-1, 1] -> uint8 (B, C, T, H, W) for I3D."""
    return to_i3d_layout(to_uint8(pixels))


@dataclass(eq=False)
class FVDEvaluation(InceptionSettings, FrechetEvaluation):
    """FVD of EMA video samples (``val/fvd_<count>``) and their per-frame FID (``val/frame_fid_<count>``).

    Settings: those of :class:`FrechetSettings` (for clips: ``batch_size`` 4, ``reference_batch_size`` 8), of
    :class:`InceptionSettings` (the per-frame FID's Inception), and

    Args:
        i3d_path: StyleGAN-V's ``i3d_torchscript.pt`` (a local file; required when enabled).
        frame_fid: also compute the FID of all frames (needs the Inception weights).
        frame_reference: with a statistics ``.npz`` as ``reference`` (for FVD), the ``.npz`` of the frames.
    """

    kind: ClassVar[str] = "fvd"

    batch_size: int = 4
    reference_batch_size: int = 8
    i3d_path: str | None = None
    frame_fid: bool = True
    frame_reference: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        reference = self.reference
        if reference is not None and not reference.endswith(".npz"):
            raise ValueError(f"fvd.reference={reference!r}: give a statistics .npz, or leave it unset to use the "
                             "DataModule's clips")  # fmt: skip
        if reference is not None and self.frame_fid and self.frame_reference is None:
            raise ValueError("fvd.reference is a statistics file: give fvd.frame_reference (the frames' .npz) too, "
                             "or set fvd.frame_fid=false")  # fmt: skip
        if self.enabled:
            i3d_file(self.i3d_path)
            if self.frame_fid:
                inception_weights(self.weights_path)

    def _check_model(self, pl_module) -> None:
        if pl_module.model.video_frames <= 0:
            raise ValueError("fvd evaluates video models (model.net.video_frames > 0); use fid for images")

    def _build_metrics(self, pl_module, dataset: str) -> list[_Frechet]:
        frames = pl_module.model.video_frames
        _, size, _ = self._pixel_shape(pl_module)
        i3d = load_i3d(self.i3d_path)
        metrics = [_Frechet("fvd", i3d, {"dataset": dataset, "resolution": size, "count": self.reference_count,
                                         "frames": frames, "extractor": i3d.name, "antialias": False,
                                         "dim": i3d.num_features}, clips_of)]  # fmt: skip
        if self.frame_fid:
            inception = load_inception(self.weights_path, antialias=self.antialias, feature=self.feature)
            key = {"dataset": dataset, "resolution": size, "count": self.reference_count * frames, "frames": frames,
                   "extractor": inception.name, "antialias": self.antialias, "dim": inception.num_features}  # fmt: skip
            metrics.append(_Frechet("frame_fid", inception, key, frames_of, per_sample=frames))
        return metrics

    def _reference_file(self, item: _Frechet) -> GaussianStats:
        path = self.reference if item.name == "fvd" else self.frame_reference
        expect = {k: item.key[k] for k in ("resolution", "extractor", "antialias", "frames")}
        return load_reference(path, expect=expect)
