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
full decode for image shards). Under DDP the checkpoint holds rank 0's state and every rank loads it: the position
holds nothing rank-specific (every rank hands out the same number of batches), and each rank fast-forwards its own
stream. With another seed, mode or shard count the epoch's stream is another one: a warning, and the epoch restarts.

Elastic resume (another world size W, worker count K or per-device batch B; counted epochs). What "the same global
sample position" means: an epoch's position is the SET of samples its batches have handed out so far, over all
ranks. Ranks read disjoint shards through their own shuffle buffers, so that set is no prefix of one global order;
it is a function of the configuration (W, K, B) and the batches per rank handed out under it, since every (rank,
worker) stream is seeded by (seed, epoch, rank, worker) and the DataLoader interleaves workers round-robin. The state
therefore records the epoch's earlier configurations as ``segments``: ``[W, K, B, batches per rank]`` (plain ints,
nothing rank-specific). On a change, every new process re-derives the consumed samples by replaying each segment's
streams for every old rank (raw samples only: nothing is decoded), and reads the rest of the epoch: the remaining
samples in shard order (shard, then position in the shard), dealt to the new ranks in contiguous runs of whole
batches, equal per rank (``deal_remaining``), each worker reading its run through its seeded shuffle buffer. No
sample is read twice and none is skipped, except the fewer than W'·B' remaining samples that do not fill a global
batch, which stay unread as a normal epoch's batch tails do. Conditions of exactness: counted epochs (no
``epoch_length``, not ``resampled``), the same shards and seed, and no bad sample among those already read (the
replay does not decode, so a skipped bad sample moves the replayed boundary of its worker by one sample: one sample
read twice). In ``epoch_length`` and ``resampled`` modes samples are not tracked (those epochs repeat samples by
design): the epoch continues after the same number of global samples, rounded up to a whole batch of the new
configuration, in the new configuration's stream. The loader's position after a change is counted in batches of the
new configuration (``offset``, ``_position``: the samples read / (W'·B'), rounded up, and up to a multiple of the
gradient accumulation when the checkpoint was written at an optimizer step); the resumed epoch is then never shorter
than a normal one, which matters because Lightning reads an epoch's length once.
``datamodules.webdataset`` moves Lightning's batch counters to it, so accumulation windows stay whole, and, with
``data.keep_global_batch``, adjusts ``trainer.accumulate_grad_batches``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    spread_batches,
    stream_rng,
)

log = logging.getLogger("zigma.data")

_SHUFFLE, _RESAMPLE, _REMAINDER = 10, 11, 12  # per-worker streams

SampleId = tuple[str, int]  # (shard, position of the sample in the shard)


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
        keep: (num_workers,) {shard: positions of the samples to read}: the rest of an epoch after an elastic resume
            (``deal_remaining``); None: every sample of the worker's shards.
        segment: index of the epoch's configuration this stream belongs to (0: the epoch's first; > 0: the rest of
            an epoch after an elastic resume, with its own shard-order and shuffle-buffer streams).
    """

    def __init__(self, *, worker_shards: Sequence[Sequence[str]], quotas: Sequence[int], decoder: SampleDecoder,
                 batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 1000, resampled: bool = False, all_shards: Sequence[str] = (),
                 expect_wrap: bool = True, max_bad_samples: int = 100,
                 keep: Sequence[Mapping[str, frozenset[int]]] | None = None, segment: int = 0):  # fmt: skip
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
        self.keep = None if keep is None else [dict(k) for k in keep]
        self.segment = segment
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
        if not self.shuffle:
            return shards
        if self.segment == 0:
            return shuffle_shards(shards, self.seed, epoch, repeat)
        rng = stream_rng(self.seed, epoch, _REMAINDER, self.segment, self.rank, worker, repeat)
        return [shards[i] for i in rng.permutation(len(shards))]

    def _read(self, shards: Iterator[str] | list[str], budget: BadSampleBudget, worker: int
              ) -> Iterator[dict[str, Any]]:  # fmt: skip
        """Raw samples of ``shards``, each with ``"__index__"``: its position in its shard; with ``keep``, only the
        positions kept for ``worker``."""
        keep = None if self.keep is None else self.keep[worker]
        for url in shards:
            wanted = None if keep is None else keep.get(url, frozenset())
            for index, sample in enumerate(read_shards([url], budget)):
                if wanted is None or index in wanted:
                    sample["__index__"] = index
                    yield sample

    def worker_batches(self, worker: int, epoch: int, *, raw: bool = False) -> Iterator[Any]:
        """The ``quotas[worker]`` batches worker ``worker`` yields in ``epoch`` (callable without worker processes).

        Args:
            raw: yield each batch as its samples' ``SampleId`` list, undecoded (the replay of an elastic resume):
                equal to the decoded batches' samples when none of them is bad.

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
            raw_samples = self._read(self._pass_shards(worker, epoch, repeat), budget, worker)
            shuffle_key = (_SHUFFLE, self.rank, worker, repeat) + ((self.segment,) if self.segment else ())
            raw_samples = shuffle_buffer(raw_samples, self.shuffle_buffer, stream_rng(self.seed, epoch, *shuffle_key))
            if raw:
                samples, collate = ((s["__url__"], s["__index__"]) for s in raw_samples), list
            else:
                decode = partial(self.decoder, epoch=epoch, repeat=repeat)
                samples, collate = skip_bad_samples(raw_samples, decode, budget), collate_samples
            before = done
            for batch in batched(samples, self.batch_size, collate):
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

    def consumed(self, epoch: int, batches: int) -> set[SampleId]:
        """The samples of this rank's first ``batches`` batches of ``epoch``, in the DataLoader's order: worker by
        worker round-robin, a worker dropping out once it has yielded its quota (``round_robin_takes``). Read
        undecoded (``worker_batches(raw=True)``)."""
        out: set[SampleId] = set()
        for worker, take in enumerate(round_robin_takes(self.quotas, batches)):
            for batch in itertools.islice(self.worker_batches(worker, epoch, raw=True), take):
                out.update(batch)
        return out


def round_robin_takes(quotas: Sequence[int], batches: int) -> list[int]:
    """How many of the first ``batches`` batches each worker yields, when a DataLoader interleaves its workers
    round-robin (worker 0, 1, ..., K-1, 0, ...) and a worker that yielded its ``quotas[w]`` batches drops out (its
    slot is skipped: torch's ``_MultiProcessingDataLoaderIter`` for an IterableDataset)."""
    takes = [0] * len(quotas)
    left = min(batches, sum(quotas))
    while left:
        for w, quota in enumerate(quotas):
            if left and takes[w] < quota:
                takes[w] += 1
                left -= 1
    return takes


def deal_remaining(shards: Sequence[str], counts: Sequence[int], consumed: set[SampleId] | frozenset[SampleId],
                   world_size: int, num_workers: int, batch_size: int
                   ) -> tuple[list[list[dict[str, frozenset[int]]]], list[list[int]]]:  # fmt: skip
    """The rest of an epoch for a new configuration: the samples of ``shards`` not in ``consumed``, in shard order
    (shard, then position), dealt to ``world_size`` ranks as contiguous runs of n·B samples, n = remaining //
    (W·B) batches per rank; within a rank to its workers as contiguous runs of whole batches (``spread_batches``).
    The last remaining % (W·B) samples are read by no rank (fewer than a global batch).

    Returns:
        (keep, quotas): keep[r][w] = {shard: positions worker w of rank r reads} (shards in shard order), quotas[r][w]
        its batches; every quotas row sums to n.
    """
    remaining = [(url, i) for url, count in zip(shards, counts) for i in range(count) if (url, i) not in consumed]
    per_rank = len(remaining) // (world_size * batch_size)
    worker_quotas = spread_batches(per_rank, [True] * num_workers)
    keep: list[list[dict[str, frozenset[int]]]] = []
    start = 0
    for _ in range(world_size):
        row = []
        for quota in worker_quotas:
            run = remaining[start : start + quota * batch_size]
            start += quota * batch_size
            by_shard: dict[str, set[int]] = {}
            for url, i in run:
                by_shard.setdefault(url, set()).add(i)
            row.append({url: frozenset(ids) for url, ids in by_shard.items()})
        keep.append(row)
    return keep, [list(worker_quotas) for _ in range(world_size)]


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


Replan = Callable[[list[list[int]], int], ShardStream]  # (segments, epoch) -> this rank's stream of the epoch's rest


class ShardLoader:
    """The per-rank loader: a ``DataLoader(batch_size=None)`` over a ``ShardStream``, ``len()`` batches per epoch.

    Not a ``torch.utils.data.DataLoader`` itself, so that ``sampler`` can be the stream: Lightning calls
    ``loader.sampler.set_epoch(epoch)`` at every epoch start (and never re-wraps the loader). Without ``set_epoch``,
    each new iterator starts the next epoch (``advance=True``) or re-reads the same one (validation).

    Stateful (see the module docstring): ``state_dict()`` is the data position (``epoch``, ``batches_done``: batches
    the latest iterator handed out, counted here in the main process; ``segments`` and ``offset`` after an elastic
    resume) and what the stream depends on; after ``load_state_dict()`` the next iterator of that epoch continues
    after ``batches_done`` batches. It does so by fast-forwarding: the epoch's stream is a function of (seed, epoch,
    rank, worker plan) and the DataLoader interleaves its workers' batches round-robin in a fixed order, so the
    first batches are read, decoded and dropped in the main process, which is exact for any ``num_workers``. That
    costs reading those batches again: cheap for latent shards, a full image decode for image shards.

    Args:
        replan: ``(segments, epoch)`` -> this rank's stream of the rest of ``epoch`` after ``segments`` (the
            DataModule's plan, ``deal_remaining``); None: an elastic resume restarts the epoch, with a warning.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int = 0, advance: bool = True,
                 replan: Replan | None = None):  # fmt: skip
        if max(1, num_workers) != stream.num_workers:
            raise ValueError(f"a stream planned for {stream.num_workers} worker(s) cannot run on {num_workers}")
        self.stream = stream  # the epoch plan of this configuration; ``current`` may be the rest of a resumed epoch
        self.sampler = stream  # not ``dataset``: Lightning would warn that an IterableDataset's len may be inexact
        self.batch_sampler = None  # Lightning's shuffle check of evaluation loaders reads it (batches come whole)
        self.num_workers = num_workers
        self.advance = advance
        self.replan = replan
        self.accumulation = 1  # trainer.accumulate_grad_batches, recorded for data.keep_global_batch
        self.batches_done = 0  # batches of stream.epoch the latest iterator handed out (offset included)
        self.current = stream  # the stream of the current epoch's segment
        self.segments: list[list[int]] = []  # the current epoch's earlier configurations [W, K, B, batches]
        self.offset = 0  # batches_done when the current segment began (in batches of this configuration)
        self._started = False
        self._resume: tuple[int, int] | None = None  # restored (epoch, batches_done) for the next iterator
        self._loaded: dict[str, Any] | None = None  # the state restored last, while no iterator has run

    def epoch_length(self) -> int:
        """Batches of the current epoch: ``len(stream)``, or ``offset`` + the rest after an elastic resume."""
        return self.offset + len(self.current)

    def __len__(self) -> int:
        # Lightning reads it once, before a resumed epoch: after a change that one is never shorter than a normal
        # epoch (``_position``), so no later epoch is cut short, and a shorter normal epoch ends the usual way
        return self.epoch_length()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # a generator: nothing happens before the first next() (Lightning calls iter() once to check the loader is
        # iterable, which must not use up a restored position)
        return self._epoch()

    def _epoch(self) -> Iterator[dict[str, Any]]:
        base = self.stream
        if self.advance and self._started and not base.epoch_set:
            base.epoch += 1
        resume, self._resume, self._loaded = self._resume, None, None
        skip = 0
        if resume is not None and resume[0] == base.epoch:  # else set_epoch moved to another epoch: start it
            skip = min(resume[1], self.epoch_length())
            if skip == self.epoch_length() and self.advance:  # the restored epoch was complete: the next one
                base.epoch, skip = base.epoch + 1, 0
        if skip == 0:
            self.current, self.segments, self.offset = base, [], 0
        stream = self.current
        stream.epoch = base.epoch
        base.epoch_set, self._started = False, True
        self.batches_done = skip
        # a private generator: the DataLoader draws its workers' base seed from it, not from the global RNG
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(stream.seed))  # fmt: skip
        yield from self._batches(loader, len(stream), skip - self.offset)

    def _batches(self, loader: DataLoader, expected: int, skip: int) -> Iterator[dict[str, Any]]:
        count = 0
        for batch in loader:
            if isinstance(batch, DataError):  # a worker's data fault (``_data_errors_as_items``)
                raise batch
            count += 1
            if count <= skip:  # fast-forward to the restored position: read, decoded, dropped
                continue
            self.batches_done = self.offset + count  # counted when handed out, in this (the main) process
            if count == expected and self.current is not self.stream:
                # the rest of a resumed epoch is read: len() is a normal epoch's again before Lightning's next epoch
                # reads it (the position stays past its end: a checkpoint now resumes at the next epoch)
                self.current, self.segments, self.offset = self.stream, [], 0
            yield batch
        if count != expected:  # a bug, not a data problem: workers wrap around to meet their quotas
            raise RuntimeError(f"the shard loader yielded {count} batches, planned {expected}")

    def configuration(self) -> list[int]:
        """[world size, workers, batch size] of this loader's stream."""
        s = self.stream
        return [s.world_size, s.num_workers, s.batch_size]

    def state_dict(self) -> dict[str, Any]:
        """The data position (plain ints, strings and lists of ints) and what the stream depends on."""
        s = self.stream
        return {"epoch": s.epoch, "batches_done": self.batches_done, "batch_size": s.batch_size,
                "world_size": s.world_size, "seed": s.seed, "mode": s.mode, "num_workers": s.num_workers,
                "num_batches": self.epoch_length(), "num_shards": len(s.all_shards),
                "accumulate_grad_batches": self.accumulation, "segments": [list(x) for x in self.segments],
                "offset": self.offset}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position: the next iterator of epoch ``epoch`` starts after ``batches_done``
        batches (a complete epoch: the next iterator starts the next one, as without a restore). Another
        ``set_epoch`` before it drops the position.

        Another world size, worker count or batch size: an elastic resume (see the module docstring), logged in
        one line on rank 0. Another seed, mode or shard count (or batches per epoch, the configuration unchanged):
        that epoch's stream is another one: warns and restarts the epoch from its beginning. Keys missing from
        ``state`` are taken as unchanged.
        """
        note = self.restore(state)
        if note and self.stream.rank == 0:
            log.info("%s", note)

    def restore(self, state: dict[str, Any]) -> str | None:
        """``load_state_dict`` without the log: returns the one-line note of an elastic resume (None if none).
        Restoring the same state again before an iterator ran changes nothing (the DataModule restores the pending
        state early, to give Lightning the resumed epoch's length; Lightning then restores it once more)."""
        if self._loaded == state:
            return None
        s = self.stream
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        saved = [int(state.get(k, v)) for k, v in zip(("world_size", "num_workers", "batch_size"),
                                                       self.configuration())]  # fmt: skip
        segments = [[int(v) for v in seg] for seg in state.get("segments", [])]
        offset = int(state.get("offset", 0))
        now = {"seed": s.seed, "mode": s.mode, "num_shards": len(s.all_shards)}
        changed = {k: (state[k], v) for k, v in now.items() if k in state and state[k] != v}
        same = saved == self.configuration()
        saved_accumulation = int(state.get("accumulate_grad_batches", self.accumulation))
        self.current, self.segments, self.offset, note = s, [], 0, None
        if done >= int(state.get("num_batches", self.epoch_length())):
            done = self.epoch_length()  # the epoch was complete: the next iterator starts the next one
        elif done == 0:
            pass
        elif changed:
            done = self._restart(epoch, done, changed)
        elif same and not segments:  # the usual resume: the same stream, fast-forwarded
            if int(state.get("num_batches", len(s))) != len(s):
                done = self._restart(epoch, done, {"num_batches": (state["num_batches"], len(s))})
        elif s.mode != "counted":  # samples are not tracked: carry the global sample count over
            samples = done * saved[0] * saved[2]
            done = min(self._position(samples, stepped=done % saved_accumulation == 0), len(s))
            note = (f"train data: epoch {epoch} continues after {samples} samples at batch {done} of {len(s)} "
                    f"({s.mode} mode: which samples were read is not tracked); {self._change(saved)}")  # fmt: skip
        elif self.replan is None:
            done = self._restart(epoch, done, {"world/workers/batch": (saved, self.configuration())})
        elif same:  # resumed again in an epoch that changed configuration before: its rest, fast-forwarded
            self.current, self.segments, self.offset = self.replan(segments, epoch), segments, offset
            if self.epoch_length() != int(state.get("num_batches", self.epoch_length())):
                self.current, self.segments, self.offset = s, [], 0
                done = self._restart(epoch, done, {"num_batches": (state["num_batches"], "another plan")})
        else:  # elastic: the rest of the epoch, dealt to this configuration
            stepped = done % saved_accumulation == 0
            segments = [*segments, [*saved, done - offset]]
            samples = sum(w * b * n for w, _, b, n in segments)
            self.current, self.segments = self.replan(segments, epoch), segments
            rest = len(self.current)
            done = self.offset = self._position(samples, stepped=stepped)
            unread = rest * s.world_size * s.batch_size
            note = (f"train data: epoch {epoch} continues after {samples} samples with {unread} unread ones in "
                    f"{rest} batches per process, from batch {done} of {self.epoch_length()}; "
                    f"{self._change(saved)}")  # fmt: skip
        s.epoch, s.epoch_set = epoch, False
        self.current.epoch = epoch
        self._started = False  # the next iterator reads the restored epoch, not the next one
        self.batches_done = done
        self._resume = (epoch, done)
        self._loaded = dict(state)
        return note

    def _position(self, samples: int, *, stepped: bool) -> int:
        """The batch index (Lightning's batch counter) at which an epoch continues after a change, ``samples`` read:
        ``samples`` in batches of this configuration (x = W'·B'), rounded up, and, when the checkpoint was written at
        an optimizer step (``stepped``), rounded up to a multiple of ``accumulation``, so that the next step
        accumulates a whole window again. A counted epoch then has at least as many batches as a normal one:
        ceil(C/x) + floor((N-C)/x) >= floor(N/x) >= a normal epoch's (its smallest rank's) batches; Lightning reads
        an epoch's length once, so a shorter resumed epoch would cut every later one."""
        position = math.ceil(samples / (self.stream.world_size * self.stream.batch_size))
        return -(-position // self.accumulation) * self.accumulation if stepped else position

    def _change(self, saved: list[int]) -> str:
        (w, k, b), (w2, k2, b2) = saved, self.configuration()
        return f"checkpoint {w} processes x {k} workers x batch {b}, now {w2} x {k2} x {b2}"

    def _restart(self, epoch: int, done: int, changed: dict[str, tuple[Any, Any]]) -> int:
        detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        rank_zero_warn(
            f"train data: cannot continue epoch {epoch} after batch {done}: the checkpoint's data stream differs "
            f"({detail}); epoch {epoch} restarts from its beginning"
        )
        return 0
