"""DataModules over webdataset shards: latents, images, captions and class labels (``WebDataModule``) and video latents
(``VideoWebDataModule``).

Shard keys (suffixes after the sample key; ``a;b`` means "a, else b"): latents ``img_feature256.npy`` (upstream) or
``latent.npy`` (upstream FacesHQ and ``datamodules.prepare``): raw, unscaled VAE latents (C, h, w), multiplied by
``latent_scale`` on load as upstream does; also the other layouts ``prepare`` writes: (2, C, h, w) latents of the image
and its mirror image (``hflip`` then picks one instead of mirroring a latent), and ``<stem>_mean.npy`` +
``<stem>_std.npy`` posterior moments (a fresh sample is drawn per sample and epoch). Images ``jpg``/``png``, labels
``cls`` (a text integer), caption features ``npy`` (N_cap, L, d), video latents ``frame_feature256.npy`` (T, C, h, w),
video frames (``VideoWebDataModule(frames_key=...)``): a uint8 (T, H, W, 3) array such as ``frames.npy``, or one
image member per frame ``<t>.jpg`` / ``<t>.png`` (t an integer; frames in the order of t).
When the shards have a ``manifest.json`` (``datamodules.manifest``), its per-shard counts are used and a
``latent_scale`` that disagrees with it is warned about.

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
- At construction the data's shapes are read from the first decodable sample, in shard order, under the same budget:
  damage at the start of the first shard is skipped (and logged) as anywhere else.

Epochs: Lightning calls ``loader.sampler.set_epoch(epoch)`` at each epoch start; used on its own, every new iterator
starts the next epoch. Workers are not persistent: they are started for each epoch and receive its number.
Rank and world size come from ``torch.distributed`` when it is initialised, else from the attached trainer.

Resuming (all modes): the training ``ShardLoader`` is stateful. ``state_dict()`` is the data position
``{"epoch", "batches_done", ...}``, counted in the main process as batches are handed out (right with
``num_workers > 0``, whatever the workers prefetched); Lightning saves it in every checkpoint at
``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]`` and restores it before the first iterator
of a resumed fit, whose epoch then continues after ``batches_done`` batches. Since an epoch's batches are a function
of (seed, epoch, rank, worker plan) and the DataLoader interleaves its workers' batches in a fixed order, the
loader fast-forwards: the first ``batches_done`` batches are read, decoded and dropped (cheap for latent shards, a
full decode for image shards). With another world size, batch size, worker count, seed, mode or epoch size the
position cannot be carried over: a warning, and the epoch restarts from its beginning. Under DDP the checkpoint holds
rank 0's state and every rank loads it: the position holds nothing rank-specific (every rank hands out the same
number of batches), and each rank fast-forwards its own stream.
"""

from __future__ import annotations

import copy
import io
import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.base import ZigMaDataModule
from datamodules.errors import DataError
from datamodules.images import batches_of
from datamodules.manifest import read_manifest
from datamodules.shards import (
    BadSampleBudget,
    batched,
    collate_samples,
    count_shard_samples,
    equal_batch_quotas,
    expand_shards,
    manifest_counts,
    read_shards,
    resample_shards,
    sample_rng,
    shuffle_buffer,
    shuffle_shards,
    skip_bad_samples,
    split_shards,
    spread_batches,
    stream_rng,
)
from zigma.images import resize_center_crop

log = logging.getLogger("zigma.data")

Kind = Literal["latent", "image"]
_FLIP, _CAPTION, _CROP, _NOISE = 0, 1, 2, 3  # per-sample draw streams
_SHUFFLE, _RESAMPLE = 10, 11  # per-worker streams


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


class ShardStream(IterableDataset):
    """One rank's batches of one epoch: each DataLoader worker reads its shards and yields ``quotas[worker]`` batches.

    Args:
        worker_shards: (num_workers,) shard lists, one per worker (finite mode); in resampled mode every worker draws
            from ``all_shards`` instead.
        quotas: (num_workers,) batches each worker yields per epoch; ``len()`` is their sum.
        decoder: raw sample -> training sample.
        rank: this process's rank (keys the per-worker random streams).
        world_size: number of processes the shards were split over (recorded in the loader state).
        shuffle: shuffle shard order and samples (False: fixed order, for validation).
        shuffle_buffer: raw samples in each worker's shuffle buffer.
        resampled: draw shards with replacement from ``all_shards``, endlessly.
        expect_wrap: a worker running out of data before its quota is expected (``epoch_length`` mode); else it
            means bad samples and is warned about. Either way the worker wraps around to meet its quota.
        max_bad_samples: per worker and epoch (``BadSampleBudget``).
    """

    def __init__(self, *, worker_shards: Sequence[Sequence[str]], quotas: Sequence[int], decoder: SampleDecoder,
                 batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 1000, resampled: bool = False, all_shards: Sequence[str] = (),
                 expect_wrap: bool = True, max_bad_samples: int = 100):  # fmt: skip
        if len(worker_shards) != len(quotas):
            raise ValueError(f"{len(worker_shards)} shard lists for {len(quotas)} worker quotas")
        self.worker_shards = [list(s) for s in worker_shards]
        self.quotas = list(quotas)
        self.decoder = decoder
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.resampled = resampled
        self.all_shards = list(all_shards)
        self.expect_wrap = expect_wrap  # False (counted epochs): a wrap-around means bad samples (warn)
        self.max_bad_samples = max_bad_samples
        self.epoch = 0
        self.epoch_set = False  # set_epoch called since the last iterator

    @property
    def num_workers(self) -> int:
        return len(self.quotas)

    def __len__(self) -> int:
        return sum(self.quotas)

    @property
    def mode(self) -> str:
        """``"resampled"``, ``"epoch_length"`` (finite, fixed batches per epoch) or ``"counted"`` (finite, from the
        sample counts)."""
        return "resampled" if self.resampled else "epoch_length" if self.expect_wrap else "counted"

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iterator reads (Lightning calls this through ``loader.sampler``)."""
        self.epoch, self.epoch_set = epoch, True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.num_workers:
            raise RuntimeError(
                f"ShardStream planned for {self.num_workers} worker(s) runs in a DataLoader with {num_workers}; "
                "build it through WebDataModule.train_dataloader()"
            )
        batches = self.worker_batches(worker, self.epoch)
        return batches if info is None else _data_errors_as_items(batches)

    def _pass_shards(self, worker: int, epoch: int, repeat: int) -> Iterator[str] | list[str]:
        if self.resampled:
            return resample_shards(self.all_shards, stream_rng(self.seed, epoch, _RESAMPLE, self.rank, worker))
        shards = self.worker_shards[worker]
        return shuffle_shards(shards, self.seed, epoch, repeat) if self.shuffle else shards

    def worker_batches(self, worker: int, epoch: int) -> Iterator[dict[str, Any]]:
        """The ``quotas[worker]`` batches worker ``worker`` yields in ``epoch`` (callable without worker processes).

        Raises:
            RuntimeError: a pass over the worker's shards made no full batch (too few readable samples), or the bad
                sample budget ran out.
        """
        quota = self.quotas[worker]
        if quota == 0:
            return
        where = f"rank {self.rank}, worker {worker}, epoch {epoch}"
        budget = BadSampleBudget(self.max_bad_samples, where)
        done = 0
        for repeat in itertools.count():  # passes over the worker's shards; resampled: one endless pass
            raw = read_shards(self._pass_shards(worker, epoch, repeat), budget)
            raw = shuffle_buffer(raw, self.shuffle_buffer, stream_rng(self.seed, epoch, _SHUFFLE, self.rank, worker,
                                                                      repeat))  # fmt: skip
            decoded = skip_bad_samples(raw, partial(self.decoder, epoch=epoch, repeat=repeat), budget)
            before = done
            for batch in batched(decoded, self.batch_size, collate_samples):
                yield batch
                done += 1
                if done == quota:
                    return
            if done == before:
                raise RuntimeError(
                    f"{where}: its shards {self.worker_shards[worker][:3]}... hold fewer than batch_size="
                    f"{self.batch_size} readable samples; lower the batch size, the number of workers or processes"
                )
            if not self.expect_wrap:
                log.warning("%s: %d of %d batches after reading all its shards (bad samples?); wrapping around",
                            where, done, quota)  # fmt: skip


def _data_errors_as_items(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any] | DataError]:
    """In a DataLoader worker: ``batches``, and a ``DataError`` they raise as a last item instead of raising it.

    torch re-raises a worker's exception in the main process as a new one whose message is the worker's whole
    traceback; as an item the error arrives pickled, type and one-line message intact, and ``ShardLoader`` raises it.
    """
    try:
        yield from batches
    except DataError as err:
        err.__cause__ = err.__context__ = None  # its message names the cause; the worker's frames stay there
        yield err


class ShardLoader:
    """The per-rank loader: a ``DataLoader(batch_size=None)`` over a ``ShardStream``, ``len()`` batches per epoch.

    Not a ``torch.utils.data.DataLoader`` itself, so that ``sampler`` can be the stream: Lightning calls
    ``loader.sampler.set_epoch(epoch)`` at every epoch start (and never re-wraps the loader). Without ``set_epoch``,
    each new iterator starts the next epoch (``advance=True``) or re-reads the same one (validation).

    Stateful (see the module docstring): ``state_dict()`` is the data position (``epoch``, ``batches_done``: batches
    the latest iterator handed out, counted here in the main process) and what the stream depends on;
    after ``load_state_dict()`` the next iterator of that epoch continues after ``batches_done`` batches. It does so
    by fast-forwarding: the epoch's stream is a function of (seed, epoch, rank, worker plan) and the DataLoader
    interleaves its workers' batches round-robin in a fixed order, so the first ``batches_done`` batches are read,
    decoded and dropped in the main process, which is exact for any ``num_workers``. That costs reading those
    batches again: cheap for latent shards, a full image decode for image shards.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int = 0, advance: bool = True):
        if max(1, num_workers) != stream.num_workers:
            raise ValueError(f"a stream planned for {stream.num_workers} worker(s) cannot run on {num_workers}")
        self.stream = stream
        self.sampler = stream  # not ``dataset``: Lightning would warn that an IterableDataset's len may be inexact
        self.batch_sampler = None  # Lightning's shuffle check of evaluation loaders reads it (batches come whole)
        self.num_workers = num_workers
        self.advance = advance
        self.batches_done = 0  # batches of stream.epoch the latest iterator handed out
        self._started = False
        self._resume: tuple[int, int] | None = None  # restored (epoch, batches_done) for the next iterator

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = self.stream
        if self.advance and self._started and not stream.epoch_set:
            stream.epoch += 1
        skip, resume, self._resume = 0, self._resume, None
        if resume is not None and resume[0] == stream.epoch:  # else set_epoch moved to another epoch: start it
            skip = min(resume[1], len(self))
            if skip == len(self) and self.advance:  # the restored epoch was complete: the next one, from its start
                stream.epoch, skip = stream.epoch + 1, 0
        stream.epoch_set, self._started = False, True
        self.batches_done = skip
        # a private generator: the DataLoader draws its workers' base seed from it, not from the global RNG
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(stream.seed))  # fmt: skip
        return self._batches(loader, len(self), skip)

    def _batches(self, loader: DataLoader, expected: int, skip: int) -> Iterator[dict[str, Any]]:
        count = 0
        for batch in loader:
            if isinstance(batch, DataError):  # a worker's data fault (``_data_errors_as_items``)
                raise batch
            count += 1
            if count <= skip:  # fast-forward to the restored position: read, decoded, dropped
                continue
            self.batches_done = count  # counted when handed out, in this (the main) process
            yield batch
        if count != expected:  # a bug, not a data problem: workers wrap around to meet their quotas
            raise RuntimeError(f"the shard loader yielded {count} batches, planned {expected}")

    def state_dict(self) -> dict[str, Any]:
        """The data position (plain ints and strings) and what the stream depends on."""
        s = self.stream
        return {"epoch": s.epoch, "batches_done": self.batches_done, "batch_size": s.batch_size,
                "world_size": s.world_size, "seed": s.seed, "mode": s.mode, "num_workers": s.num_workers,
                "num_batches": len(s)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position: the next iterator of epoch ``epoch`` starts after ``batches_done``
        batches (a complete epoch: the next iterator starts the next epoch, as without a restore). Another
        ``set_epoch`` before it drops the position.

        If the world size, batch size, worker count, seed, mode or batches per epoch differ from the checkpoint's, that
        epoch's stream is another one: warns and restarts the epoch from its beginning. Keys missing from ``state``
        are taken as unchanged.
        """
        s = self.stream
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        now = {k: v for k, v in self.state_dict().items() if k not in ("epoch", "batches_done")}
        changed = {k: (state[k], v) for k, v in now.items() if k in state and state[k] != v}
        if done >= int(state.get("num_batches", len(self))):
            done = len(self)  # the epoch was complete: the next iterator starts the next one, whatever changed
        elif changed and done > 0:
            detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            rank_zero_warn(
                f"train data: cannot continue epoch {epoch} after batch {done}: the checkpoint's data stream differs "
                f"({detail}); epoch {epoch} restarts from its beginning"
            )
            done = 0
        s.epoch, s.epoch_set = epoch, False
        self._started = False  # the next iterator reads the restored epoch, not the next one
        self.batches_done = done
        self._resume = (epoch, done)


class _ShardDataModule(ZigMaDataModule):
    """Shard lists, rank discovery and the epoch plan shared by the image/latent and video DataModules."""

    def __init__(self, *, shards: str | list[str], val_shards: str | list[str] | None, decoder: SampleDecoder,
                 batch_size: int, num_workers: int, shuffle_buffer: int, seed: int, resampled: bool,
                 epoch_length: int | None, max_bad_samples: int, num_predict_samples: int, predict_batch_size: int,
                 predict_seed: int):  # fmt: skip
        super().__init__(num_predict_samples, predict_batch_size, predict_seed)
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                 ("shuffle_buffer", shuffle_buffer, 0), ("seed", seed, 0),
                                 ("max_bad_samples", max_bad_samples, 0)):  # fmt: skip
            if value < low:
                raise ValueError(f"data.{name} must be >= {low}; got {value}")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"data.epoch_length must be >= 1 batches per process; got {epoch_length}")
        if resampled and epoch_length is None:
            raise ValueError("data.resampled=true is an endless stream: set data.epoch_length (batches per process)")
        self.shards = expand_shards(shards)
        self.val_shards = expand_shards(val_shards) if val_shards is not None else None
        self.decoder = decoder
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.max_bad_samples = max_bad_samples
        self._counts: dict[str, int] = {}
        shapes = self._probe(self.shards)
        decoder.expect(shapes)
        if decoder.kind in ("latent", "video"):
            _check_latent_scale(self.shards, decoder.latent_scale)

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
        """Samples per shard: from the shards' ``manifest.json`` where it lists them, else counted from the tar
        headers (cached)."""
        missing = [p for p in shards if p not in self._counts]
        if missing:
            self._counts.update(manifest_counts(missing))
        for path in shards:
            if path not in self._counts:
                self._counts[path] = count_shard_samples(path)
        return [self._counts[p] for p in shards]

    def make_stream(self, shards: Sequence[str], *, train: bool, rank: int, world_size: int) -> ShardStream:
        """This rank's stream over ``shards`` with the epoch plan of the module's mode (see the module docstring)."""
        workers = max(1, self.num_workers)
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
                all_quotas = equal_batch_quotas(samples, self.batch_size)
                quotas = all_quotas[rank]
                if sum(quotas) == 0:
                    smallest = min(range(world_size), key=lambda r: sum(samples[r]))
                    raise ValueError(
                        f"data.batch_size={self.batch_size}: process {smallest} of {world_size} has "
                        f"{sum(samples[smallest])} samples in {sum(len(s) for s in plan[smallest])} shard(s) split "
                        f"over {workers} worker(s), not one full batch per worker; lower the batch size or "
                        "data.num_workers"
                    )
                dropped = sum(samples[rank]) // self.batch_size - sum(quotas)
                if dropped > 0:
                    log.info("rank %d: %d batches per epoch (as every rank); %d more of its data stay unread",
                             rank, sum(quotas), dropped)  # fmt: skip
        return ShardStream(worker_shards=worker_shards, quotas=quotas, decoder=self.decoder,
                           batch_size=self.batch_size, rank=rank, world_size=world_size, seed=self.seed, shuffle=train,
                           shuffle_buffer=self.shuffle_buffer, resampled=resampled, all_shards=shards,
                           expect_wrap=epoch_length is not None, max_bad_samples=self.max_bad_samples)  # fmt: skip

    def train_dataloader(self) -> ShardLoader:
        rank, world = self.rank_and_world()
        stream = self.make_stream(self.shards, train=True, rank=rank, world_size=world)
        return ShardLoader(stream, num_workers=self.num_workers, advance=True)

    def val_dataloader(self) -> ShardLoader | list:
        """Validation shards in a fixed order (no shuffle, no flip, epoch 0), the same number of batches per rank;
        ``[]`` (no validation) without ``val_shards``."""
        if self.val_shards is None:
            return []
        rank, world = self.rank_and_world()
        stream = self.make_stream(self.val_shards, train=False, rank=rank, world_size=world)
        stream.decoder = copy.copy(self.decoder)
        stream.decoder.hflip = False
        return ShardLoader(stream, num_workers=self.num_workers, advance=False)

    @property
    def reference_name(self) -> str:
        shards = self.val_shards or self.shards
        return f"shards:{shards[0]}..{shards[-1]}({len(shards)})"

    def reference_pixels(self, batch_size: int = 50) -> Iterator[torch.Tensor]:
        """Pixels of the validation shards (else the training shards) in shard order, decoded as for validation (no
        flip; a clip's temporal crop is a fixed function of its key); undecodable samples are counted and skipped."""
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


class WebDataModule(_ShardDataModule):
    """Image or latent shards, optionally with class labels or caption features.

    ``kind="latent"``: batches ``{"x": (B, C, h, w)}`` scaled latents, ``sample_shape = (C, h, w)`` read from the
    first sample. ``kind="image"``: batches ``{"pixels": (B, 3, S, S)}`` in [-1, 1] with S = ``resolution``;
    ``pixel_shape = (3, S, S)`` and ``sample_shape`` is None, since the latent shape depends on the VAE of the
    LightningModule, which encodes the pixels. Labels: ``"y"`` (B,) int64 and ``num_classes``; captions: ``"y"``
    (B, L, d) float32, one of the sample's N_cap captions drawn per sample and epoch, and ``context_dim = d``.

    Args:
        shards: training shards (anything ``expand_shards`` takes).
        val_shards: validation shards; None: no validation data.
        latent_key: ``;``-separated alternatives; the first a sample holds is read.
        image_key: ``;``-separated alternatives (kind="image").
        label_key: suffix of the class label (a text integer in [0, num_classes)); needs ``num_classes > 0``.
        caption_key: suffix of caption features (N_cap, L, d) or (L, d); exclusive with ``label_key``.
        latent_scale: raw shard latents are multiplied by it (upstream's 0.18215; 1.0 for pre-scaled latents).
        resolution: images only: the shorter side is resized to it (bicubic) and the centre square cropped.
        hflip: mirror each sample left-right with probability 1/2 (latents: the latent is flipped, which
            approximates the latent of the flipped image).
        batch_size: samples per batch and process.
        num_workers: DataLoader worker processes per rank (0: read in the main process).
        shuffle_buffer: raw samples each worker shuffles through (0 or 1: no sample shuffle).
        seed: seed of shard orders, sample shuffles and per-sample draws; independent of ``seed_everything``.
        resampled: draw shards with replacement, endlessly (needs ``epoch_length``).
        epoch_length: batches per process per epoch; None (finite mode only): from the sample counts.
        max_bad_samples: unreadable samples or shards tolerated per worker and epoch before an error.
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
        latent_scale: float = 0.18215,
        resolution: int = 256,
        hflip: bool = False,
        batch_size: int = 32,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        resampled: bool = False,
        epoch_length: int | None = None,
        max_bad_samples: int = 100,
        num_predict_samples: int = 16,
        predict_batch_size: int = 16,
        predict_seed: int = 0,
    ):
        if kind not in ("latent", "image"):
            raise ValueError(f"data.kind={kind!r}: must be 'latent' or 'image'")
        _check_condition(label_key, num_classes, caption_key)
        if resolution < 1:
            raise ValueError(f"data.resolution must be >= 1; got {resolution}")
        decoder = SampleDecoder(kind=kind, data_key=latent_key if kind == "latent" else image_key,
                                label_key=label_key, num_classes=num_classes, caption_key=caption_key,
                                latent_scale=latent_scale, resolution=resolution, hflip=hflip, seed=seed)  # fmt: skip
        super().__init__(shards=shards, val_shards=val_shards, decoder=decoder, batch_size=batch_size,
                         num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed, resampled=resampled,
                         epoch_length=epoch_length, max_bad_samples=max_bad_samples,
                         num_predict_samples=num_predict_samples, predict_batch_size=predict_batch_size,
                         predict_seed=predict_seed)  # fmt: skip
        self.kind = kind
        self.num_classes = num_classes if label_key is not None else 0
        self.context_dim = decoder.shapes["y"][-1] if caption_key is not None else 0
        if kind == "latent":
            self.sample_shape = decoder.shapes["x"]
            self.pixel_shape = None
        else:
            self.sample_shape = None  # the VAE's latent shape: known to the LightningModule, not here
            self.pixel_shape = (3, resolution, resolution)


class VideoWebDataModule(_ShardDataModule):
    """Video latent shards (upstream UCF101: ``frame_feature256.npy`` (T, 4, 32, 32) raw latents + ``cls_id.cls``), or
    video frames that the LightningModule encodes with its VAE (``frames_key``).

    Latents: batches ``{"x": (B, video_frames, C, h, w)}`` scaled latents and ``"y"`` (B,) int64 class ids;
    ``sample_shape = (video_frames, C, h, w)``. Frames (``frames_key`` set): batches ``{"pixels": (B, video_frames,
    3, S, S)}`` in [-1, 1], S = ``resolution``, each frame resized and centre-cropped as ``WebDataModule``'s images;
    ``pixel_shape = (video_frames, 3, S, S)`` and ``sample_shape`` is None (the module's VAE gives the latent shape).
    Clips longer than ``video_frames`` are cropped in time at a start frame drawn per sample and epoch (seeded); clips
    of exactly ``video_frames`` are used whole; shorter ones are bad samples. Other arguments as in ``WebDataModule``.

    Args:
        video_key: ``;``-separated alternatives for the (T, C, h, w) latents; ignored when ``frames_key`` is set.
        frames_key: ``;``-separated alternatives for the frames: ``<name>.npy`` a uint8 (T, H, W, 3) array (another
            dtype or shape is a bad sample), or an image extension (``jpg``, ``png``) for one member ``<t>.<ext>``
            per frame, in the order of the integer t. None: the shards hold latents (``video_key``).
        resolution: frames only: the shorter side of each frame is resized to it (bicubic) and the centre square
            cropped.
        label_key: suffix of the class label; None: unconditional (``num_classes`` ignored).
    """

    def __init__(
        self,
        shards: str | list[str],
        val_shards: str | list[str] | None = None,
        video_key: str = "frame_feature256.npy",
        video_frames: int = 16,
        label_key: str | None = "cls_id.cls;cls",
        num_classes: int = 101,
        latent_scale: float = 0.18215,
        batch_size: int = 4,
        num_workers: int = 4,
        shuffle_buffer: int = 100,
        seed: int = 0,
        resampled: bool = False,
        epoch_length: int | None = None,
        max_bad_samples: int = 100,
        num_predict_samples: int = 16,
        predict_batch_size: int = 4,
        predict_seed: int = 0,
        frames_key: str | None = None,
        resolution: int = 256,
    ):
        if video_frames < 1:
            raise ValueError(f"data.video_frames must be >= 1; got {video_frames}")
        if frames_key is not None and resolution < 1:
            raise ValueError(f"data.resolution must be >= 1; got {resolution}")
        num_classes = num_classes if label_key is not None else 0
        _check_condition(label_key, num_classes, None)
        decoder = SampleDecoder(kind="video" if frames_key is None else "frames",
                                data_key=video_key if frames_key is None else frames_key, label_key=label_key,
                                num_classes=num_classes, latent_scale=latent_scale, resolution=resolution,
                                video_frames=video_frames, seed=seed)  # fmt: skip
        super().__init__(shards=shards, val_shards=val_shards, decoder=decoder, batch_size=batch_size,
                         num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed, resampled=resampled,
                         epoch_length=epoch_length, max_bad_samples=max_bad_samples,
                         num_predict_samples=num_predict_samples, predict_batch_size=predict_batch_size,
                         predict_seed=predict_seed)  # fmt: skip
        self.video_frames = video_frames
        self.num_classes = num_classes
        if frames_key is None:
            self.sample_shape = decoder.shapes["x"]
            self.pixel_shape = None
        else:
            self.sample_shape = None  # the VAE's latent shape: known to the LightningModule, not here
            self.pixel_shape = (video_frames, 3, resolution, resolution)


def _check_latent_scale(shards: Sequence[str], latent_scale: float) -> None:
    """Warn when the shards' manifest (if any) says the latents need another scale than ``latent_scale``."""
    try:
        manifest = read_manifest(shards)
    except (FileNotFoundError, ValueError):
        return
    vae_scale = (manifest.get("vae") or {}).get("scale")
    if manifest.get("latent_scaled") and latent_scale != 1.0:
        rank_zero_warn(f"data.latent_scale={latent_scale}: the manifest says the shards hold scaled latents; set 1.0")
    elif not manifest.get("latent_scaled") and vae_scale is not None and not math.isclose(vae_scale, latent_scale):
        rank_zero_warn(f"data.latent_scale={latent_scale}: the shards' manifest records raw latents of a VAE with "
                       f"scale {vae_scale}; set data.latent_scale={vae_scale}")  # fmt: skip


def _check_condition(label_key: str | None, num_classes: int, caption_key: str | None) -> None:
    if label_key is not None and caption_key is not None:
        raise ValueError(f"data.label_key={label_key!r} and data.caption_key={caption_key!r}: choose one condition")
    if label_key is not None and num_classes < 1:
        raise ValueError(f"data.label_key={label_key!r} needs data.num_classes >= 1; got {num_classes}")
    if label_key is None and num_classes > 0:
        raise ValueError(f"data.num_classes={num_classes} needs data.label_key (e.g. 'cls') to read the labels")
