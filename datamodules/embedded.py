"""The embedded data sets (no download): LFW face crops that ship inside scikit-image (the default quickstart) and
scikit-learn's handwritten digits with their labels (the class-conditional quickstart, ``EmbeddedDigitsDataModule``).

``skimage.data.lfw_subset()`` holds 200 grayscale 25x25 crops; the first 100 are faces. They are resized to
``image_size`` (bilinear), mapped to [-1, 1] as (1, S, S) pixels (no VAE), and flipped horizontally at random.
There is no held-out split (100 images): validation measures the loss on the same faces with fixed
(noise, t) draws, which tracks optimisation progress, not generalisation.

Training data are deterministic and resumable, and never touch the global RNG:

- An epoch holds N = 100 * ``repeats`` items. Epoch e reads them in the order ``epoch_order(N, seed, e)`` (a
  permutation), and the item at position p of that order is flipped iff ``epoch_flips(N, seed, e)[p]``; both are
  numpy ``SeedSequence`` streams keyed by (seed, e, stream), so an epoch is the same whatever the process, worker
  count or world size.
- Rank r of W reads the positions ``rank_positions(N, batch_size, r, W)``: global batch j is the positions
  [j·W·B, (j+1)·W·B) and rank r takes the r-th block of B of it. The last N mod (W·B) positions are dropped on every
  rank, so all ranks read disjoint items and the same number of full batches (DDP would hang otherwise). After j
  batches per rank the ranks together have read exactly the first j·W·B positions.
- The training loader (``ResumableLoader``) is *stateful*: ``state_dict()`` is ``{"epoch", "batches_done", ...}``,
  counted in the main process as batches are handed out (so it is right with ``num_workers > 0``, whatever the
  workers prefetched), and after ``load_state_dict()`` the next iterator continues the epoch at batch
  ``batches_done``: no item is read twice or skipped.

Lightning integration (2.6): a training loader with ``state_dict``/``load_state_dict`` is saved in every checkpoint
at ``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]`` (rank 0's state; all ranks hold the same
one) and restored before the first iterator of a resumed fit is created. Lightning calls ``loader.sampler.
set_epoch(epoch)`` at each epoch start, which keeps the data epoch equal to ``trainer.current_epoch``. Lightning
injects its ``DistributedSampler`` only into ``torch.utils.data.DataLoader`` instances
(``_DataConnector._prepare_dataloader``); ``ResumableLoader`` is not one, so ``trainer.use_distributed_sampler``
does not touch it, and rank and world size are read from ``self.trainer`` when ``train_dataloader()`` is called.
The validation loader stays a plain ``DataLoader`` (Lightning shards it across ranks as usual).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.base import ZigMaDataModule

NUM_FACES = 100
NUM_DIGIT_CLASSES = 10
_ORDER_STREAM, _FLIP_STREAM = 0, 1  # SeedSequence keys (seed, epoch, stream): independent draws per purpose


def load_lfw_faces(image_size: int = 32) -> torch.Tensor:
    """(100, 1, image_size, image_size) float32 faces in [-1, 1]."""
    from skimage.data import lfw_subset

    faces = torch.from_numpy(lfw_subset()[:NUM_FACES]).float().unsqueeze(1)  # (100, 1, 25, 25) in [0, 1]
    faces = F.interpolate(faces, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return (faces.clamp(0, 1) * 2 - 1).contiguous()


def load_digits(image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits: (1797, 1, image_size, image_size) float32 in [-1, 1] (the 8x8
    images, 0..16 -> v/8 - 1; exact at the native 8, else resized bilinearly) and their labels (1797,) int64 in
    0..9."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                               antialias=image_size < 8).clamp(0, 1)  # fmt: skip
    return (images * 2 - 1).contiguous(), torch.from_numpy(digits.target).long()


def epoch_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """(num_items,) int64 permutation: the item read at each position of epoch ``epoch``; depends on (seed, epoch)."""
    return np.random.default_rng([seed, epoch, _ORDER_STREAM]).permutation(num_items)


def epoch_flips(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """(num_items,) bool: whether the item at each position of epoch ``epoch`` is flipped; a function of
    (seed, epoch, position)."""
    return np.random.default_rng([seed, epoch, _FLIP_STREAM]).random(num_items) < 0.5


def rank_positions(num_items: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """(num_batches * batch_size,) int64 positions of the epoch order that ``rank`` reads, batch after batch.

    Global batch j covers positions [j*W*B, (j+1)*W*B) (W = world_size, B = batch_size) and rank r reads its r-th
    block of B; the last ``num_items % (W*B)`` positions are read by no rank. Every rank gets
    ``num_items // (W*B)`` batches.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    per_step = world_size * batch_size
    steps = num_items // per_step
    grid = np.arange(steps * per_step, dtype=np.int64).reshape(steps, world_size, batch_size)  # (steps, W, B)
    return grid[:, rank].reshape(-1)


class FaceDataset(Dataset):
    """``repeats`` passes over the images per epoch. Items are ``index`` or ``(index, flip)`` (from ``EpochSampler``);
    returns ``{"x": (1, S, S)}`` in [-1, 1], mirrored left-right if ``flip``, and ``"y"`` (a 0-d int64 class id)
    when ``labels`` (N,) are given."""

    def __init__(self, faces: torch.Tensor, repeats: int = 1, labels: torch.Tensor | None = None):
        self.faces = faces
        self.repeats = repeats
        self.labels = labels

    def __len__(self) -> int:
        return len(self.faces) * self.repeats

    def __getitem__(self, item: int | tuple[int, bool]) -> dict:
        index, flip = item if isinstance(item, tuple) else (item, False)
        x = self.faces[index % len(self.faces)]
        out = {"x": x.flip(-1) if flip else x}
        if self.labels is not None:
            out["y"] = self.labels[index % len(self.faces)]
        return out


class EpochSampler(Sampler):
    """This rank's ``(item index, flip)`` pairs of one epoch, from the data position onwards.

    The data position is (``epoch``, ``batches_done``): batches of the epoch this rank has already handed out.
    ``ResumableLoader`` advances it; ``set_epoch`` (called by Lightning at every epoch start) moves to the start of
    another epoch. ``__iter__`` reads the position once, when called, and yields the rest of the epoch.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int = 0, hflip: bool = True, rank: int = 0,
                 world_size: int = 1):  # fmt: skip
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.hflip = hflip
        self.rank = rank
        self.world_size = world_size
        self.positions = rank_positions(num_items, batch_size, rank, world_size)
        self.num_batches = len(self.positions) // batch_size
        self.epoch = 0
        self.batches_done = 0

    def __len__(self) -> int:
        return len(self.positions)

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of ``epoch`` (no-op if already in it, so a resumed mid-epoch position survives)."""
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def items(self, epoch: int, start_batch: int = 0) -> list[tuple[int, bool]]:
        """``(index, flip)`` of this rank's items of ``epoch`` from batch ``start_batch`` to the end of the epoch."""
        order = epoch_order(self.num_items, self.seed, epoch)
        flips = epoch_flips(self.num_items, self.seed, epoch) & self.hflip
        positions = self.positions[start_batch * self.batch_size :]
        return [(int(order[p]), bool(flips[p])) for p in positions]

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        return iter(self.items(self.epoch, self.batches_done))


class ResumableLoader:
    """The stateful training loader: a ``DataLoader`` over ``EpochSampler`` that counts the batches it hands out.

    ``len()`` is the number of batches per rank of a whole epoch (what Lightning's progress counts against); an
    iterator yields the rest of the current epoch, or the whole next epoch if the current one is used up. Not a
    ``torch.utils.data.DataLoader`` on purpose: Lightning then never replaces its sampler (see the module docstring).
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, num_workers: int = 0):
        self.sampler = sampler  # Lightning calls self.sampler.set_epoch(epoch)
        self.num_workers = num_workers
        # a private generator: DataLoader draws its workers' base seed from it, not from the global RNG
        self._loader = DataLoader(dataset, sampler=sampler, batch_size=sampler.batch_size, drop_last=True,
                                  num_workers=num_workers, persistent_workers=num_workers > 0,
                                  generator=torch.Generator().manual_seed(sampler.seed))  # fmt: skip

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __iter__(self) -> Iterator[dict]:
        return self._batches()  # a generator: nothing is read until the first next(), after Lightning's set_epoch

    def _batches(self) -> Iterator[dict]:
        sampler = self.sampler
        if sampler.batches_done >= sampler.num_batches:
            sampler.set_epoch(sampler.epoch + 1)
        for batch in self._loader:  # the sampler's __iter__ reads (epoch, batches_done) here, once
            sampler.batches_done += 1  # counted when handed out, in this (the main) process
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The data position (plain ints) and what it depends on."""
        s = self.sampler
        return {"epoch": s.epoch, "batches_done": s.batches_done, "batch_size": s.batch_size,
                "world_size": s.world_size, "num_items": s.num_items, "seed": s.seed}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position: the next iterator starts at batch ``batches_done`` of ``epoch``.

        With another world size or batch size the position is carried over as the number of items the ranks had
        read together (rounded up to a whole batch of every rank, so nothing is read twice); with another seed or
        data size the epoch's order differs from the checkpoint's. Both are reported.
        """
        s = self.sampler
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        world, batch = int(state.get("world_size", s.world_size)), int(state.get("batch_size", s.batch_size))
        if (state.get("seed", s.seed), state.get("num_items", s.num_items)) != (s.seed, s.num_items):
            rank_zero_warn(
                f"train data: the checkpoint's data order used seed={state.get('seed')} over "
                f"{state.get('num_items')} items, this run seed={s.seed} over {s.num_items}; resuming at epoch "
                f"{epoch}, batch {done} of a different order"
            )
        if (world, batch) != (s.world_size, s.batch_size):
            read = done * world * batch
            done = math.ceil(read / (s.world_size * s.batch_size))
            rank_zero_warn(
                f"train data: the checkpoint was written with {world} processes x batch {batch}, this run has "
                f"{s.world_size} x {s.batch_size}; {read} items of epoch {epoch} were read, resuming at batch {done} "
                f"(item {done * s.world_size * s.batch_size})"
            )
        s.epoch, s.batches_done = epoch, min(done, s.num_batches)


class EmbeddedFacesDataModule(ZigMaDataModule):
    """Unconditional 1-channel faces; batches ``{"x": (B, 1, S, S)}``.

    Args:
        seed: seed of the training order and flips (see the module docstring); independent of ``seed_everything``.
    """

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 32,
        val_batch_size: int = 50,
        repeats: int = 32,
        hflip: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        num_predict_samples: int = 16,
        predict_batch_size: int = 16,
        predict_seed: int = 0,
    ):
        super().__init__(num_predict_samples, predict_batch_size, predict_seed)
        for name, value in {"image_size": image_size, "batch_size": batch_size, "val_batch_size": val_batch_size,
                            "repeats": repeats}.items():  # fmt: skip
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1; got {value}")
        if seed < 0:
            raise ValueError(f"data.seed must be >= 0; got {seed}")
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.repeats = repeats
        self.hflip = hflip
        self.num_workers = num_workers
        self.seed = seed
        self.sample_shape = (1, image_size, image_size)
        self.faces: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.faces is None:
            self.faces = load_lfw_faces(self.image_size)

    def _dataset(self, repeats: int) -> FaceDataset:
        return FaceDataset(self.faces, repeats)

    def train_dataloader(self) -> ResumableLoader:
        dataset = self._dataset(self.repeats)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochSampler(len(dataset), self.batch_size, seed=self.seed, hflip=self.hflip, rank=rank,
                               world_size=world)  # fmt: skip
        if sampler.num_batches == 0:
            raise ValueError(
                f"data.batch_size={self.batch_size} x {world} processes is more than the {len(dataset)} training "
                "items of an epoch; lower data.batch_size or raise data.repeats"
            )
        return ResumableLoader(dataset, sampler, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(1), batch_size=self.val_batch_size, shuffle=False)

    @property
    def reference_name(self) -> str:
        return f"lfw-embedded-{NUM_FACES}"

    def reference_pixels(self, batch_size: int = 50) -> Iterator[torch.Tensor]:
        """The 100 faces (1, S, S) in [-1, 1], unflipped, in their stored order."""
        self.setup()
        yield from self.faces.split(batch_size)


class EmbeddedDigitsDataModule(EmbeddedFacesDataModule):
    """Class-conditional 1-channel digits (scikit-learn's ``load_digits``, see :func:`load_digits`); batches
    ``{"x": (B, 1, S, S), "y": (B,) int64 in 0..9}``. Order, resume and ranks work as for the faces (the module
    docstring), over 1,797 · ``repeats`` items per epoch; no flips (a mirrored digit is another shape). Validation
    reads the first ``num_val`` digits (the same images as training: progress of the fit, not generalisation)."""

    num_classes = NUM_DIGIT_CLASSES

    def __init__(
        self,
        image_size: int = 8,
        batch_size: int = 32,
        val_batch_size: int = 100,
        repeats: int = 1,
        num_val: int = 200,
        num_workers: int = 0,
        seed: int = 0,
        num_predict_samples: int = 100,
        predict_batch_size: int = 100,
        predict_seed: int = 0,
    ):
        super().__init__(image_size, batch_size, val_batch_size, repeats, False, num_workers, seed,
                         num_predict_samples, predict_batch_size, predict_seed)  # fmt: skip
        if num_val < 1:
            raise ValueError(f"data.num_val must be >= 1; got {num_val}")
        self.num_val = num_val
        self.labels: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.faces is None:
            self.faces, self.labels = load_digits(self.image_size)

    def _dataset(self, repeats: int) -> FaceDataset:
        return FaceDataset(self.faces, repeats, self.labels)

    def val_dataloader(self) -> DataLoader:
        dataset = torch.utils.data.Subset(self._dataset(1), range(min(self.num_val, len(self.faces))))
        return DataLoader(dataset, batch_size=self.val_batch_size, shuffle=False)

    @property
    def reference_name(self) -> str:
        return f"sklearn-digits-{len(self.faces) if self.faces is not None else 1797}"
