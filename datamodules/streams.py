"""Streams and resume: one rank's batches of an epoch (``ShardStream``) and the stateful per-rank loader
(``ShardLoader``) that hands them out, counts them and continues mid-epoch after a restore.

Each DataLoader worker reads its shards (a plan made by the DataModule, ``datamodules.webdataset``), in a new order
every epoch (``shuffle_shards``), through a seeded sample shuffle buffer, decodes them (``skip_bad_samples`` with a
``datamodules.decoding.SampleDecoder``) and batches them itself; the DataLoader runs with ``batch_size=None``. A worker
that reads fewer samples than its quota wraps around (a new shard order) so its rank still yields its quota.
``max_bad_samples`` bounds the unreadable samples (and tar files) per worker and epoch; one more raises
``datamodules.errors.BadSampleBudgetExceeded``, which a DataLoader worker hands to the main process as an item and
``ShardLoader`` raises there unchanged (torch would wrap it in the worker's traceback).

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

import itertools
import logging
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.decoding import SampleDecoder
from datamodules.errors import DataError
from datamodules.shards import (
    BadSampleBudget,
    batched,
    collate_samples,
    read_shards,
    resample_shards,
    shuffle_buffer,
    shuffle_shards,
    skip_bad_samples,
    stream_rng,
)

log = logging.getLogger("zigma.data")

_SHUFFLE, _RESAMPLE = 10, 11  # per-worker streams


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
