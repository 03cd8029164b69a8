"""DataModules over webdataset shards: latents, images, captions and class labels (``WebDataModule``) and video latents
or frames (``VideoWebDataModule``). Their shared loader settings (batch size, workers, shuffle buffer, seed, epoch
mode, bad-sample budget, predict requests, latent scale) live in ``ShardDataModule``, to which both forward them; the
command line lists them under ``data.init_args`` as before. Decoding a sample is ``datamodules.decoding``; the per-rank
stream, its epochs and mid-epoch resume are ``datamodules.streams``.

Latent scale: raw shard latents are multiplied by ``latent_scale``. Unset (None), it is the scale recorded in the
shards' ``manifest.json`` (``datamodules.manifest``: ``vae.scale`` for raw latents, 1.0 for ``latent_scaled`` ones),
else upstream's SD-VAE scale ``zigma.vae.SD_LATENT_SCALE`` (shards without a manifest, e.g. upstream's CelebA
latents, keep seeing the numbers they were trained on). A set value that disagrees with the manifest is refused in one
line. ``vae_scale`` states the VAE scale of the latents the module yields, for the model's check against
``model.vae_scale``. When the shards have a manifest, its per-shard counts are used as well.

Shards may be local files or URLs (``pipe:`` commands, ``http(s)://``; ``datamodules.tars``), read the same way. The
manifest is the one next to the shards (``datamodules.manifest.manifest_location``) or ``manifest``; shard URLs are
counted from it only (reading them to count would download them), so without one they need ``epoch_length``.

Batches (``datamodules.base``): latents ``{"x": (B, C, h, w) float32}``, video ``{"x": (B, T, C, h, w) float32}``,
images ``{"pixels": (B, 3, H, W) float32 in [-1, 1]}`` and video frames ``{"pixels": (B, T, 3, H, W)}`` (the
LightningModule encodes them with its frozen VAE, so the latent shape is unknown here: ``sample_shape`` is None and
``pixel_shape`` is set), plus ``"y"``: class ids (B,) int64
or one caption's features (B, L, d) float32 per sample.

Distribution (each step is a function in ``datamodules.shards``):

- Rank r of W and DataLoader worker w of K read ``split_shards(shards, r, W, w, K)``: a fixed partition, so all
  (rank, worker) pairs read disjoint shards and together every shard. Each worker reads its shards in a new order
  every epoch (``shuffle_shards``), through a seeded sample shuffle buffer, decodes them (``skip_bad_samples``) and
  batches them itself; the DataLoader runs with ``batch_size=None``.
- Every rank yields the same number of batches per epoch (DDP would hang otherwise), and it is ``len(loader)``:
  * finite epochs, no ``epoch_length``: the samples of every shard are read from the manifest or else counted once
    from the tar headers (``count_shard_samples``), and every rank yields N = the smallest rank's number of full batches
    (``equal_batch_quotas``); ranks with more data leave their extra samples unread that epoch. When shards divide
    evenly every sample is read exactly once per epoch.
  * finite epochs with ``epoch_length``: every rank yields ``epoch_length`` batches, spread over the workers that
    have shards; a worker that runs out wraps around (a new shard order) and one with more data stops early.
  * ``resampled=True``: every worker draws shards with replacement from all shards, seeded by (seed, epoch, rank,
    worker): an endless stream cut at ``epoch_length`` batches per rank (required).
  With fewer shards than W x K the workers without shards yield nothing; with fewer shards than W the finite modes
  raise (use ``resampled=True``). A worker that reads fewer samples than counted (bad samples) wraps around too, with
  a warning, so its rank still yields its quota.
- Per-sample draws (horizontal flip, caption index, video start frame) are functions of (seed, epoch, pass, sample key)
  (``sample_rng``): one caption per sample, not per batch, and the same whatever the worker or rank that reads it.
- ``max_bad_samples`` bounds the unreadable samples (and tar files) per worker and epoch; each is logged with its
  shard and key, and one more raises ``datamodules.errors.BadSampleBudgetExceeded``: one line naming the budget, the
  count, the last shard, key and error. A DataLoader worker hands it to the main process as an item, which
  ``ShardLoader`` raises there unchanged (torch would wrap it in the worker's traceback).
- Resume (``datamodules.streams``): a checkpoint's data position continues exactly with the same configuration,
  and, with another number of processes, workers or ``batch_size`` (elastic resume), from the same set of samples
  read: the rest of the epoch is dealt to the new ranks (``remainder_stream``). ``keep_global_batch`` then keeps the
  checkpoint's processes x batch_size x ``trainer.accumulate_grad_batches`` by setting the accumulation, or refuses
  in one line; ``train_dataloader`` restores the pending state itself and moves Lightning's batch counters.
- At construction the data's shapes are read from the first decodable sample, in shard order, under the same budget:
  damage at the start of the first shard is skipped (and logged) as anywhere else.
- ``predict`` needs no data: when the shards cannot be listed (e.g. a training config on a machine without the
  shards) the module is still built, with no shapes, and only predicts (the base class's sample requests: indices
  and class labels drawn from ``predict_seed``, as every DataModule). Every other use (``setup`` of fit, validate or
  test, ``yields`` outside predict, the loaders, reference pixels) raises the listing error, so the CLI still refuses
  missing shards for those in one line, before any step.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import torch

from datamodules.base import DataYields, ZigMaDataModule
from datamodules.decoding import SampleDecoder
from datamodules.errors import ResumeSettingsError
from datamodules.images import batches_of
from datamodules.shards import (
    BadSampleBudget,
    equal_batch_quotas,
    expand_shards,
    read_shards,
    sample_counts,
    skip_bad_samples,
    split_shards,
    spread_batches,
)
from datamodules.streams import SampleId, ShardLoader, ShardStream, deal_remaining
from zigma.vae import SD_LATENT_SCALE

log = logging.getLogger("zigma.data")

Kind = Literal["latent", "image"]


class ShardDataModule(ZigMaDataModule):
    """Shard lists, rank discovery, the epoch plan and the loader settings shared by ``WebDataModule`` and
    ``VideoWebDataModule``, which take their own arguments and forward these (``**loader_settings``).

    Args:
        shards: training shards (anything ``expand_shards`` takes: local paths, patterns and directories, ``pipe:``
            commands, ``http(s)://`` URLs).
        val_shards: validation shards; None: no validation data.
        manifest: the shards' ``manifest.json`` (a path, directory or URL); None: the one next to the shards
            (``datamodules.manifest.manifest_location``). It gives the sample counts (needed for shard URLs unless
            ``epoch_length`` is set), the latent scale and the model check.
        latent_scale: raw shard latents are multiplied by it; None: the shards' manifest's scale, else upstream's
            ``SD_LATENT_SCALE`` (see the module docstring). 1.0 for latents stored already scaled.
        batch_size: samples per batch and process.
        num_workers: DataLoader worker processes per rank (0: read in the main process).
        shuffle_buffer: raw samples each worker shuffles through (0 or 1: no sample shuffle).
        seed: seed of shard orders, sample shuffles and per-sample draws; independent of ``seed_everything``.
        resampled: draw shards with replacement, endlessly (needs ``epoch_length``).
        epoch_length: batches per process per epoch; None (finite mode only): from the sample counts.
        max_bad_samples: unreadable samples or shards tolerated per worker and epoch before an error.
        keep_global_batch: on a resume with another number of processes or ``batch_size``, set
            ``trainer.accumulate_grad_batches`` so that processes x batch_size x accumulation equals the
            checkpoint's (one line refuses the resume when no whole number does); False: the global batch follows
            the new configuration (the change is logged).
        num_predict_samples, predict_batch_size, predict_seed, predict_captions: ``predict`` requests
            (``ZigMaDataModule``; ``predict_captions``: caption features of a text model, (K, N, d)).
    """

    latent_scale: float | None = None  # the factor raw latents are multiplied by (None: the data yields pixels)

    def __init__(self, shards: str | list[str], val_shards: str | list[str] | None = None, *,
                 manifest: str | None = None, latent_scale: float | None = None, batch_size: int = 32,
                 num_workers: int = 4, shuffle_buffer: int = 1000, seed: int = 0, resampled: bool = False,
                 epoch_length: int | None = None, max_bad_samples: int = 100, keep_global_batch: bool = False,
                 num_predict_samples: int = 16, predict_batch_size: int = 16, predict_seed: int = 0,
                 predict_captions: str | None = None):  # fmt: skip
        super().__init__(num_predict_samples, predict_batch_size, predict_seed, predict_captions)
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                 ("shuffle_buffer", shuffle_buffer, 0), ("seed", seed, 0),
                                 ("max_bad_samples", max_bad_samples, 0)):  # fmt: skip
            if value < low:
                raise ValueError(f"data.{name} must be >= {low}; got {value}")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"data.epoch_length must be >= 1 batches per process; got {epoch_length}")
        if resampled and epoch_length is None:
            raise ValueError("data.resampled=true is an endless stream: set data.epoch_length (batches per process)")
        if latent_scale is not None and not (math.isfinite(latent_scale) and latent_scale > 0):
            raise ValueError(f"data.latent_scale must be a finite number > 0 or null; got {latent_scale}")
        self.unavailable: ValueError | None = None  # why the shards cannot be listed: the module only predicts
        try:
            self.shards = expand_shards(shards)
            self.val_shards = expand_shards(val_shards) if val_shards is not None else None
        except ValueError as err:
            self.shards, self.val_shards, self.unavailable = [], None, err
        self.manifest = manifest
        if manifest is not None:
            self.shards_manifest()  # a named manifest must be there: one line naming it now, not at the first epoch
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.max_bad_samples = max_bad_samples
        self.keep_global_batch = keep_global_batch
        self._counts: dict[str, int] = {}
        self.decoder = self.make_decoder(seed)
        if self.unavailable is not None:
            return  # no shapes (``decoder.shapes`` stays empty): predict only
        if self.decoder.kind in ("latent", "video"):
            self.latent_scale, self.vae_scale = resolve_latent_scale(self.shards_manifest(), latent_scale)
            self.decoder.latent_scale = self.latent_scale
        self.decoder.expect(self._probe(self.shards))

    def require_shards(self) -> None:
        """Raises the listing error (ValueError, one line) when the shards are missing: such a module only predicts."""
        if self.unavailable is not None:
            raise ValueError(str(self.unavailable))

    def setup(self, stage: str) -> None:
        """``predict`` reads no shard; fit, validate and test need them."""
        if stage != "predict":
            self.require_shards()

    def yields(self, stage: str | None = None) -> DataYields:
        """What the batches hold; without shards, for ``predict`` only: no shapes, the configured classes (caption
        features would need the shards)."""
        if self.unavailable is not None and stage == "predict" and not self.decoder.caption_key:
            return DataYields(type(self).__name__, (), None, self.num_classes, 0, None)
        self.require_shards()
        return super().yields(stage)

    def make_decoder(self, seed: int) -> SampleDecoder:
        """The subclass's ``SampleDecoder``; its ``latent_scale`` is set afterwards (:func:`resolve_latent_scale`)."""
        raise NotImplementedError

    def _probe(self, shards: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """Shapes of the first decodable sample of ``shards`` (validates the keys at construction).

        Reads in shard order as a worker does (``read_shards`` + ``skip_bad_samples``), under a budget of
        ``max_bad_samples``: unreadable shards and samples before the first good one are logged with shard and key
        and skipped, so damage at the start of the first shard is treated as anywhere else.

        Raises:
            BadSampleBudgetExceeded: more than ``max_bad_samples`` bad samples before a good one (one line).
            ValueError: every sample of every shard is bad, within the budget (names the first error).
        """
        budget = BadSampleBudget(self.max_bad_samples, "reading the data's shapes")
        for out in skip_bad_samples(read_shards(shards, budget), self.decoder, budget):
            return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else () for k, v in out.items()}
        first = "no samples" if not budget.errors else "first: shard {} key {}: {}".format(*budget.errors[0])
        raise ValueError(f"data.shards: cannot read a sample from {len(shards)} shard(s) ({first})")

    def rank_and_world(self) -> tuple[int, int]:
        """(rank, world size) from ``torch.distributed`` if initialised, else the attached trainer, else (0, 1)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def shard_counts(self, shards: Sequence[str]) -> list[int]:
        """Samples per shard: from the manifest where it lists them, else counted from the tar headers of local files
        (cached; ``datamodules.shards.sample_counts``: a shard URL without a count is an error)."""
        missing = [p for p in shards if p not in self._counts]
        if missing:
            self._counts.update(sample_counts(missing, self.manifest))
        return [self._counts[p] for p in shards]

    def make_stream(self, shards: Sequence[str], *, train: bool, rank: int, world_size: int,
                    num_workers: int | None = None, batch_size: int | None = None) -> ShardStream:  # fmt: skip
        """This rank's stream over ``shards`` with the epoch plan of the module's mode (see the module docstring);
        ``num_workers``/``batch_size`` other than the module's: an earlier configuration, replayed on resume."""
        workers = max(1, self.num_workers if num_workers is None else num_workers)
        batch = self.batch_size if batch_size is None else batch_size
        resampled = self.resampled and train
        epoch_length = self.epoch_length if train else None
        if resampled:
            worker_shards = [[] for _ in range(workers)]
            quotas = spread_batches(epoch_length, [True] * workers)
        else:
            plan = [[split_shards(shards, r, world_size, w, workers) for w in range(workers)]
                    for r in range(world_size)]  # fmt: skip
            worker_shards = plan[rank]
            if epoch_length is not None:
                quotas = spread_batches(epoch_length, [len(s) > 0 for s in worker_shards])
            else:
                counts = dict(zip(shards, self.shard_counts(shards)))
                samples = [[sum(counts[s] for s in ws) for ws in row] for row in plan]
                all_quotas = equal_batch_quotas(samples, batch)
                quotas = all_quotas[rank]
                if sum(quotas) == 0:
                    smallest = min(range(world_size), key=lambda r: sum(samples[r]))
                    raise ValueError(
                        f"data.batch_size={batch}: process {smallest} of {world_size} has "
                        f"{sum(samples[smallest])} samples in {sum(len(s) for s in plan[smallest])} shard(s) split "
                        f"over {workers} worker(s), not one full batch per worker; lower the batch size or "
                        "data.num_workers"
                    )
                dropped = sum(samples[rank]) // batch - sum(quotas)
                if dropped > 0:
                    log.info("rank %d: %d batches per epoch (as every rank); %d more of its data stay unread",
                             rank, sum(quotas), dropped)  # fmt: skip
        return ShardStream(worker_shards=worker_shards, quotas=quotas, decoder=self.decoder,
                           batch_size=batch, rank=rank, world_size=world_size, seed=self.seed, shuffle=train,
                           shuffle_buffer=self.shuffle_buffer, resampled=resampled, all_shards=shards,
                           expect_wrap=epoch_length is not None, max_bad_samples=self.max_bad_samples)  # fmt: skip

    def train_dataloader(self) -> ShardLoader:
        """This rank's training loader. When Lightning resumes a fit, the checkpoint's loader state is restored here
        already (Lightning reads ``len()`` before it restores the loader): after an elastic resume Lightning's batch
        counters move to the loader's position in batches of the new configuration, and ``keep_global_batch``
        adjusts ``trainer.accumulate_grad_batches`` (see ``datamodules.streams``)."""
        self.require_shards()
        rank, world = self.rank_and_world()
        stream = self.make_stream(self.shards, train=True, rank=rank, world_size=world)
        replan = partial(self.remainder_stream, rank=rank, world_size=world)
        loader = ShardLoader(stream, num_workers=self.num_workers, advance=True, replan=replan)
        trainer = self.trainer
        loader.accumulation = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        state = pending_loader_state(trainer)
        if state is None:
            return loader
        accumulation = self._keep_global_batch(state, loader)
        change = None
        if accumulation is not None and accumulation != loader.accumulation:
            change = (f"data.keep_global_batch: trainer.accumulate_grad_batches {loader.accumulation} -> "
                      f"{accumulation} (global batch {world * self.batch_size * accumulation})")  # fmt: skip
            trainer.accumulate_grad_batches = loader.accumulation = accumulation
        note = loader.restore(state)  # its position counts whole accumulation windows of the new setting
        if change:
            note = (note + "; " if note else "train data: ") + change
        shift_batch_progress(trainer, loader.batches_done - int(state["batches_done"]))
        if note and rank == 0:
            log.info("%s", note)
        return loader

    def _keep_global_batch(self, state: Mapping[str, Any], loader: ShardLoader) -> int | None:
        """The accumulation that keeps the checkpoint's global batch (``keep_global_batch``), else None.

        Raises:
            ResumeSettingsError: no whole number does (one line naming the fields; ``cli`` prints it, exit 1).
        """
        if not self.keep_global_batch:
            return None
        world, _, batch = loader.configuration()
        old_world, old_batch = int(state.get("world_size", world)), int(state.get("batch_size", batch))
        old_accumulation = int(state.get("accumulate_grad_batches", loader.accumulation))
        target = old_world * old_batch * old_accumulation
        if target % (world * batch):
            raise ResumeSettingsError(
                f"data.keep_global_batch=true: the checkpoint's global batch {old_world} processes x data.batch_size "
                f"{old_batch} x trainer.accumulate_grad_batches {old_accumulation} = {target} is not a multiple of "
                f"{world} processes x data.batch_size {batch} = {world * batch}; choose a data.batch_size (or process "
                "count) whose product divides it, or set data.keep_global_batch=false"
            )
        return target // (world * batch)

    def remainder_stream(self, segments: Sequence[Sequence[int]], epoch: int, *, rank: int,
                         world_size: int) -> ShardStream:  # fmt: skip
        """This rank's stream of the rest of ``epoch`` after its earlier ``segments`` ([world size, workers, batch
        size, batches per rank] each): the unread samples dealt to this configuration (``deal_remaining``)."""
        workers = max(1, self.num_workers)
        plan = deal_remaining(self.shards, self.shard_counts(self.shards), self.consumed_samples(segments, epoch),
                              world_size, workers, self.batch_size)  # fmt: skip
        return self._rest_stream(plan, len(segments), rank, world_size, self.batch_size)

    def consumed_samples(self, segments: Sequence[Sequence[int]], epoch: int) -> set[SampleId]:
        """The samples the ranks of ``segments`` read in ``epoch``: each segment's stream of every one of its ranks,
        replayed (undecoded) for its batches; a segment after the first reads the rest the earlier ones left."""
        consumed: set[SampleId] = set()
        for index, (world, workers, batch, batches) in enumerate(segments):
            if index > 0:
                plan = deal_remaining(self.shards, self.shard_counts(self.shards), consumed, world, workers, batch)
            read: set[SampleId] = set()
            for rank in range(world):
                stream = (self.make_stream(self.shards, train=True, rank=rank, world_size=world, num_workers=workers,
                                           batch_size=batch) if index == 0
                          else self._rest_stream(plan, index, rank, world, batch))  # fmt: skip
                read |= stream.consumed(epoch, batches)
            consumed |= read
        return consumed

    def _rest_stream(self, plan: tuple[list[list[dict[str, frozenset[int]]]], list[list[int]]], segment: int,
                     rank: int, world_size: int, batch_size: int) -> ShardStream:  # fmt: skip
        keep, quotas = plan
        return ShardStream(worker_shards=[list(k) for k in keep[rank]], quotas=quotas[rank], decoder=self.decoder,
                           batch_size=batch_size, rank=rank, world_size=world_size, seed=self.seed,
                           shuffle_buffer=self.shuffle_buffer, all_shards=self.shards, expect_wrap=False,
                           max_bad_samples=self.max_bad_samples, keep=keep[rank], segment=segment)  # fmt: skip

    def val_dataloader(self) -> ShardLoader | list:
        """Validation shards in a fixed order (no shuffle, no flip, epoch 0), the same number of batches per rank;
        ``[]`` (no validation) without ``val_shards``."""
        self.require_shards()
        if self.val_shards is None:
            return []
        rank, world = self.rank_and_world()
        stream = self.make_stream(self.val_shards, train=False, rank=rank, world_size=world)
        stream.decoder = copy.copy(self.decoder)
        stream.decoder.hflip = False
        return ShardLoader(stream, num_workers=self.num_workers, advance=False)

    @property
    def reference_name(self) -> str:
        self.require_shards()
        shards = self.val_shards or self.shards
        return f"shards:{shards[0]}..{shards[-1]}({len(shards)})"

    def reference_pixels(self, batch_size: int = 50) -> Iterator[torch.Tensor]:
        """Pixels of the validation shards (else the training shards) in shard order, decoded as for validation (no
        flip; a clip's temporal crop is a fixed function of its key); undecodable samples are counted and skipped."""
        self.require_shards()
        if getattr(self, "pixel_shape", None) is None:
            raise NotImplementedError(
                f"{type(self).__name__} reads latents, not pixels; pass the FID/FVD callback's reference: an .npz "
                "from `zigma reference-stats`, an image folder or image shards with reference_key"
            )
        decoder = copy.copy(self.decoder)
        decoder.hflip = False
        budget = BadSampleBudget(self.max_bad_samples, "reading reference pixels")
        samples = skip_bad_samples(read_shards(self.val_shards or self.shards, budget), decoder, budget)
        yield from batches_of((s["pixels"] for s in samples), batch_size)


class WebDataModule(ShardDataModule):
    """Image or latent shards, optionally with class labels or caption features.

    ``kind="latent"``: batches ``{"x": (B, C, h, w)}`` scaled latents, ``sample_shape = (C, h, w)`` read from the
    first sample. ``kind="image"``: batches ``{"pixels": (B, 3, S, S)}`` in [-1, 1] with S = ``resolution``;
    ``pixel_shape = (3, S, S)`` and ``sample_shape`` is None, since the latent shape depends on the VAE of the
    LightningModule, which encodes the pixels. Labels: ``"y"`` (B,) int64 and ``num_classes``; captions: ``"y"``
    (B, L, d) float32, one of the sample's N_cap captions drawn per sample and epoch, and ``context_dim = d``.

    Args:
        latent_key: ``;``-separated alternatives; the first a sample holds is read.
        image_key: ``;``-separated alternatives (kind="image").
        label_key: suffix of the class label (a text integer in [0, num_classes)); needs ``num_classes > 0``.
        caption_key: suffix of caption features (N_cap, L, d) or (L, d); exclusive with ``label_key``.
        resolution: images only: the shorter side is resized to it (bicubic) and the centre square cropped.
        hflip: mirror each sample left-right with probability 1/2 (latents: the latent is flipped, which
            approximates the latent of the flipped image).
        loader_settings: the shared settings of ``ShardDataModule`` (shards, val_shards, latent_scale, batch_size,
            num_workers, shuffle_buffer, seed, resampled, epoch_length, max_bad_samples, predict requests).
    """

    def __init__(
        self,
        shards: str | list[str],
        val_shards: str | list[str] | None = None,
        kind: Kind = "latent",
        latent_key: str = "img_feature256.npy;latent.npy",
        image_key: str = "jpg;png",
        label_key: str | None = None,
        num_classes: int = 0,
        caption_key: str | None = None,
        resolution: int = 256,
        hflip: bool = False,
        **loader_settings: Any,
    ):
        if kind not in ("latent", "image"):
            raise ValueError(f"data.kind={kind!r}: must be 'latent' or 'image'")
        _check_condition(label_key, num_classes, caption_key)
        if resolution < 1:
            raise ValueError(f"data.resolution must be >= 1; got {resolution}")
        self.kind = kind
        self._decoding = dict(
            kind=kind,
            data_key=latent_key if kind == "latent" else image_key,
            label_key=label_key,
            num_classes=num_classes,
            caption_key=caption_key,
            resolution=resolution,
            hflip=hflip,
        )
        super().__init__(shards, val_shards, **loader_settings)
        self.num_classes = num_classes if label_key is not None else 0
        self.context_dim = self.decoder.shapes["y"][-1] if caption_key is not None and self.decoder.shapes else 0
        if kind == "latent":
            self.sample_shape = self.decoder.shapes.get("x")  # None without shards (predict only)
            self.pixel_shape = None
        else:
            self.sample_shape = None  # the VAE's latent shape: known to the LightningModule, not here
            self.pixel_shape = (3, resolution, resolution)

    def make_decoder(self, seed: int) -> SampleDecoder:
        return SampleDecoder(**self._decoding, seed=seed)


class VideoWebDataModule(ShardDataModule):
    """Video latent shards (upstream UCF101: ``frame_feature256.npy`` (T, 4, 32, 32) raw latents + ``cls_id.cls``), or
    video frames that the LightningModule encodes with its VAE (``frames_key``).

    Latents: batches ``{"x": (B, video_frames, C, h, w)}`` scaled latents and ``"y"`` (B,) int64 class ids;
    ``sample_shape = (video_frames, C, h, w)``. Frames (``frames_key`` set): batches ``{"pixels": (B, video_frames,
    3, S, S)}`` in [-1, 1], S = ``resolution``, each frame resized and centre-cropped as ``WebDataModule``'s images;
    ``pixel_shape = (video_frames, 3, S, S)`` and ``sample_shape`` is None (the module's VAE gives the latent shape).
    Clips longer than ``video_frames`` are cropped in time at a start frame drawn per sample and epoch (seeded); clips
    of exactly ``video_frames`` are used whole; shorter ones are bad samples.

    Args:
        video_key: ``;``-separated alternatives for the (T, C, h, w) latents; ignored when ``frames_key`` is set.
        video_frames: frames per training clip (T of the batches).
        num_classes: classes of ``label_key`` (101 for UCF101).
        frames_key: ``;``-separated alternatives for the frames: ``<name>.npy`` a uint8 (T, H, W, 3) array (another
            dtype or shape is a bad sample), or an image extension (``jpg``, ``png``) for one member ``<t>.<ext>``
            per frame, in the order of the integer t. None: the shards hold latents (``video_key``).
        resolution: frames only: the shorter side of each frame is resized to it (bicubic) and the centre square
            cropped.
        label_key: suffix of the class label; None: unconditional (``num_classes`` ignored).
        batch_size: samples per batch and process (a video default: 4).
        shuffle_buffer: raw clips each worker shuffles through (0 or 1: no sample shuffle).
        predict_batch_size: samples per ``predict`` batch.
        loader_settings: the other shared settings of ``ShardDataModule``.
    """

    def __init__(
        self,
        shards: str | list[str],
        val_shards: str | list[str] | None = None,
        video_key: str = "frame_feature256.npy",
        video_frames: int = 16,
        label_key: str | None = "cls_id.cls;cls",
        num_classes: int = 101,
        frames_key: str | None = None,
        resolution: int = 256,
        batch_size: int = 4,
        shuffle_buffer: int = 100,
        predict_batch_size: int = 4,
        **loader_settings: Any,
    ):
        if video_frames < 1:
            raise ValueError(f"data.video_frames must be >= 1; got {video_frames}")
        if frames_key is not None and resolution < 1:
            raise ValueError(f"data.resolution must be >= 1; got {resolution}")
        num_classes = num_classes if label_key is not None else 0
        _check_condition(label_key, num_classes, None)
        self._decoding = dict(kind="video" if frames_key is None else "frames",
                              data_key=video_key if frames_key is None else frames_key, label_key=label_key,
                              num_classes=num_classes, resolution=resolution, video_frames=video_frames)  # fmt: skip
        super().__init__(shards, val_shards, batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                         predict_batch_size=predict_batch_size, **loader_settings)  # fmt: skip
        self.video_frames = video_frames
        self.num_classes = num_classes
        if frames_key is None:
            self.sample_shape = self.decoder.shapes.get("x")  # None without shards (predict only)
            self.pixel_shape = None
        else:
            self.sample_shape = None  # the VAE's latent shape: known to the LightningModule, not here
            self.pixel_shape = (video_frames, 3, resolution, resolution)

    def make_decoder(self, seed: int) -> SampleDecoder:
        return SampleDecoder(**self._decoding, seed=seed)


def pending_loader_state(trainer: Any) -> dict[str, Any] | None:
    """The training loader state Lightning is about to restore (a resumed fit; it restores it after reading the
    loader's ``len()``), else None. Lightning 2.x keeps it in ``fit_loop._combined_loader_states_to_load``."""
    fit_loop = getattr(trainer, "fit_loop", None)
    states = getattr(fit_loop, "_combined_loader_states_to_load", None)
    if not states or not getattr(fit_loop, "restarting", False) or not isinstance(states[0], dict):
        return None
    return states[0]


def shift_batch_progress(trainer: Any, delta: int) -> None:
    """Move Lightning's batch counters of the running epoch by ``delta`` batches (an elastic resume counts the
    epoch's position in batches of the new configuration): every counter (ready, started, processed, completed;
    current and total) alike, so their differences, which say where in a step the checkpoint was written, hold."""
    if delta == 0:
        return
    progress = trainer.fit_loop.epoch_loop.batch_progress
    for tracker in (progress.current, progress.total):
        for name in ("ready", "started", "processed", "completed"):
            setattr(tracker, name, getattr(tracker, name) + delta)


def recorded_latent_scale(manifest: Mapping[str, Any]) -> tuple[float, float] | None:
    """(factor for the stored latents, the VAE scale they end up in) as a manifest records them: raw latents
    (``latent_scaled`` false) need ``vae.scale``; scaled ones 1.0. None: the manifest records no VAE."""
    vae = manifest.get("vae")
    if not vae or vae.get("scale") is None:
        return None
    scale = float(vae["scale"])
    return (1.0, scale) if manifest.get("latent_scaled") else (scale, scale)


def resolve_latent_scale(manifest: Mapping[str, Any] | None, latent_scale: float | None) -> tuple[float, float | None]:
    """(factor the raw shard latents are multiplied by, VAE scale of the result or None where unknown), from the
    shards' manifest (``ZigMaDataModule.shards_manifest``; None: shards not written by ``datamodules.prepare``, e.g.
    upstream's).

    With a manifest that records a VAE, the factor is the manifest's (see :func:`recorded_latent_scale`); a set
    ``latent_scale`` must equal it. Without one, ``latent_scale`` or upstream's ``SD_LATENT_SCALE``; a factor of 1.0
    means latents stored already scaled, by a VAE scale not known here.

    Raises:
        ValueError: ``latent_scale`` disagrees with the manifest (one line naming both values).
    """
    recorded = recorded_latent_scale(manifest) if manifest is not None else None
    if recorded is None:
        factor = SD_LATENT_SCALE if latent_scale is None else float(latent_scale)
        return factor, (factor if factor != 1.0 else None)
    factor, vae_scale = recorded
    if latent_scale is not None and not math.isclose(latent_scale, factor, rel_tol=1e-6):
        held = "latents already scaled" if factor == 1.0 else "raw latents"
        raise ValueError(f"data.latent_scale={latent_scale}: the shards' manifest records {held} of a VAE with scale "
                         f"{vae_scale}, which need latent_scale={factor}; leave data.latent_scale unset (null) to "
                         "take it from the manifest")  # fmt: skip
    return factor, vae_scale


def _check_condition(label_key: str | None, num_classes: int, caption_key: str | None) -> None:
    if label_key is not None and caption_key is not None:
        raise ValueError(f"data.label_key={label_key!r} and data.caption_key={caption_key!r}: choose one condition")
    if label_key is not None and num_classes < 1:
        raise ValueError(f"data.label_key={label_key!r} needs data.num_classes >= 1; got {num_classes}")
    if label_key is None and num_classes > 0:
        raise ValueError(f"data.num_classes={num_classes} needs data.label_key (e.g. 'cls') to read the labels")
