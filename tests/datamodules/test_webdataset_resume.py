"""Mid-epoch resume of the webdataset training loader: ``ShardLoader.state_dict``/``load_state_dict`` round trips
(finite, ``epoch_length`` and resampled modes, with and without worker processes) continue with exactly the batches of
an uninterrupted run, a changed stream (seed, shards) restarts the epoch with a warning, and a Lightning fit saves the
loader state in its checkpoints and continues at the right batch when resumed with ``ckpt_path``.

Elastic resume (another world size, worker count or per-device batch; ranks simulated in-process): the samples read
before and after the resume are together the epoch's samples, each once; a chain of changes within one epoch too;
``data.keep_global_batch`` sets the gradient accumulation or refuses in one line; and a Lightning fit resumed on 1
process from a 2-process checkpoint keeps the global batch, the step count and the LR schedule."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from datamodules.errors import ResumeSettingsError
from datamodules.streams import ShardLoader
from datamodules.webdataset import WebDataModule
from zigma.flow_module import FlowMatchingModule


def attach(dm, rank=0, world_size=1):
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)  # what rank_and_world reads
    return dm


def indices(batch) -> list[int]:
    """Global sample indices of a latent batch (latent_scale=1: each latent is filled with its sample index)."""
    return batch["x"].flatten(1)[:, 0].round().long().tolist()


def drain(loader: ShardLoader) -> list[list[int]]:
    """One iterator's batches, as lists of sample indices."""
    return [indices(batch) for batch in loader]


def take(loader: ShardLoader, count: int) -> list[list[int]]:
    iterator = iter(loader)
    return [indices(next(iterator)) for _ in range(count)]


MODES = {  # mode -> WebDataModule settings
    "counted": {},
    "epoch_length": {"epoch_length": 5},
    "resampled": {"resampled": True, "epoch_length": 5},
}


def make_loader(shards, mode, *, num_workers, batch_size=4, rank=0, world_size=1, seed=0) -> ShardLoader:
    dm = WebDataModule(shards, batch_size=batch_size, num_workers=num_workers, latent_scale=1, shuffle_buffer=6,
                       seed=seed, **MODES[mode])  # fmt: skip
    return attach(dm, rank, world_size).train_dataloader()


def state_of(epoch, done, *, mode="counted", num_workers=1, num_batches, batch_size=4, world_size=1, num_shards=4,
             segments=(), offset=0) -> dict:  # fmt: skip
    return {"epoch": epoch, "batches_done": done, "batch_size": batch_size, "world_size": world_size, "seed": 0,
            "mode": mode, "num_workers": num_workers, "num_batches": num_batches, "num_shards": num_shards,
            "accumulate_grad_batches": 1, "segments": [list(s) for s in segments], "offset": offset}  # fmt: skip


@pytest.fixture
def shards(make_shards):
    return make_shards([8, 8, 8, 5])  # 2 workers: 16 and 13 samples, 4 + 3 batches of 4 (unequal quotas)


@pytest.mark.parametrize(
    ("mode", "num_workers", "k"),
    [("counted", 0, 3), ("counted", 2, 3), ("counted", 2, 7), ("epoch_length", 2, 4), ("resampled", 0, 2),
     ("resampled", 2, 3)],
)  # fmt: skip
def test_state_round_trip_continues_exactly(shards, mode, num_workers, k):
    """k batches, state_dict, a fresh DataModule + load_state_dict: the rest of the epoch and the next epoch are the
    uninterrupted run's (k = len: the epoch was complete and the next iterator starts the next one)."""
    reference = make_loader(shards, mode, num_workers=num_workers)
    epoch0, epoch1 = drain(reference), drain(reference)
    assert len(epoch0) == len(epoch1) == len(reference) and epoch0 != epoch1
    loader = make_loader(shards, mode, num_workers=num_workers)
    seen = take(loader, k)
    assert seen == epoch0[:k]
    state = loader.state_dict()
    assert state == state_of(0, k, mode=mode, num_workers=max(1, num_workers), num_batches=len(loader))
    assert all(type(v) in (int, str, list) for v in state.values())  # plain values: torch.load(weights_only=True)

    resumed = make_loader(shards, mode, num_workers=num_workers)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    rest = drain(resumed) if k < len(epoch0) else []
    assert seen + rest == epoch0
    assert resumed.state_dict()["batches_done"] == len(epoch0)
    assert drain(resumed) == epoch1  # the next epoch after a resumed one
    assert resumed.state_dict()["epoch"] == 1


def test_set_epoch_keeps_the_restored_position_and_another_epoch_drops_it(shards):
    reference = make_loader(shards, "counted", num_workers=0)
    reference.sampler.set_epoch(3)
    epoch3 = drain(reference)
    loader = make_loader(shards, "counted", num_workers=0)
    loader.load_state_dict({"epoch": 3, "batches_done": 2})
    loader.sampler.set_epoch(3)  # Lightning's call at the start of the resumed epoch: must not rewind
    assert drain(loader) == epoch3[2:]
    loader.load_state_dict({"epoch": 3, "batches_done": 2})
    loader.sampler.set_epoch(4)  # another epoch: from its beginning
    assert len(drain(loader)) == len(loader) and loader.state_dict()["epoch"] == 4


@pytest.mark.parametrize("change", ["seed", "num_shards"])
def test_changed_stream_warns_and_restarts_the_epoch(make_shards, change):
    shards = make_shards([8] * 4)
    loader = make_loader(shards, "counted", num_workers=0)
    take(loader, 2)
    state = loader.state_dict()
    other = shards[:3] if change == "num_shards" else shards
    resumed = make_loader(other, "counted", num_workers=0, seed=1 if change == "seed" else 0)
    fresh = make_loader(other, "counted", num_workers=0, seed=1 if change == "seed" else 0)
    with pytest.warns(UserWarning, match=rf"cannot continue epoch 0 after batch 2.*{change} .*restarts"):
        resumed.load_state_dict(state)
    assert drain(resumed) == drain(fresh)  # the whole epoch 0 of the new stream


# ------------------------------------------------------------------------------------------------ elastic resume
def run_ranks(shards, world_size, *, num_workers=0, batch_size=4, state=None, batches=None, **settings):
    """Ranks 0..world_size-1 of one configuration, simulated in this process: each restores ``state`` (if given) and
    reads ``batches`` batches (None: to the end of the epoch). Returns (sample indices read by all ranks, rank 0's
    state afterwards, rank 0's loader)."""
    seen, loaders = [], []
    for rank in range(world_size):
        dm = WebDataModule(shards, batch_size=batch_size, num_workers=num_workers, latent_scale=1, shuffle_buffer=6,
                           **settings)  # fmt: skip
        loader = attach(dm, rank, world_size).train_dataloader()
        if state is not None:
            loader.load_state_dict(state)
        iterator = iter(loader)
        for _, batch in zip(range(batches) if batches is not None else iter(int, 1), iterator):
            seen += indices(batch)
        loaders.append(loader)
    return seen, loaders[0].state_dict(), loaders[0]


@pytest.mark.parametrize(
    ("before", "after", "k"),
    [((2, 0, 4), (1, 0, 4), 2), ((1, 0, 4), (2, 0, 4), 2), ((2, 2, 2), (1, 0, 4), 3), ((1, 0, 4), (2, 0, 2), 3)],
    ids=["2->1", "1->2", "2procs_2workers->1", "1->2_smaller_batch"],
)
def test_elastic_resume_reads_every_sample_of_the_epoch_once(make_shards, caplog, before, after, k):
    """k batches per rank under ``before`` = (world size, workers, batch), then the rest of the epoch under ``after``:
    together exactly the epoch's 32 samples (4 shards of 8), none twice. The old run with 2 workers checks the
    replay's model of the DataLoader's round-robin interleaving against real worker processes."""
    shards = make_shards([8, 8, 8, 8])
    (world, workers, batch), (world2, workers2, batch2) = before, after
    first, state, _ = run_ranks(shards, world, num_workers=workers, batch_size=batch, batches=k)
    assert len(first) == world * batch * k
    with caplog.at_level(logging.INFO, logger="zigma.data"):
        rest, final, loader = run_ranks(shards, world2, num_workers=workers2, batch_size=batch2, state=state)
    assert sorted(first + rest) == list(range(32))  # every sample of the epoch, each once
    offset = len(first) // (world2 * batch2)
    fresh = make_loader(shards, "counted", num_workers=workers2, batch_size=batch2, world_size=world2)
    assert final["batches_done"] == offset + len(rest) // (world2 * batch2) >= len(fresh)
    assert (final["segments"], final["offset"], final["num_batches"]) == ([], 0, len(fresh))  # the epoch is read
    notes = [r.getMessage() for r in caplog.records if "continues after" in r.getMessage()]
    assert notes == [f"train data: epoch 0 continues after {len(first)} samples with {len(rest)} unread ones in "
                     f"{len(rest) // (world2 * batch2)} batches per process, from batch {offset} of "
                     f"{final['num_batches']}; checkpoint {world} processes x {max(1, workers)} workers x batch "
                     f"{batch}, now {world2} x {max(1, workers2)} x {batch2}"]  # one line, rank 0 only  # fmt: skip
    drain(fresh)
    assert drain(loader) == drain(fresh)  # the next epoch is the new configuration's own


def test_a_chain_of_changes_and_a_plain_resume_within_one_epoch(make_shards):
    """2 -> 1 process (a checkpoint in the middle of the rest, resumed on 1 process again) -> 2 processes with batch
    2 -> 1 process: every sample once; the state keeps the epoch's earlier configurations."""
    shards = make_shards([8, 8, 8, 8])
    seen, state, _ = run_ranks(shards, 2, batches=1)
    more, state, _ = run_ranks(shards, 1, state=state, batches=2)
    assert state["segments"] == [[2, 1, 4, 1]] and state["batches_done"] == 4
    again, state, _ = run_ranks(shards, 1, state=state, batches=1)  # same configuration: fast-forward in the rest
    assert state["segments"] == [[2, 1, 4, 1]] and state["batches_done"] == 5
    two, state, _ = run_ranks(shards, 2, batch_size=2, state=state, batches=2)
    assert state["segments"] == [[2, 1, 4, 1], [1, 1, 4, 3]] and state["offset"] == 5  # 20 samples / 4
    rest, state, _ = run_ranks(shards, 1, state=state)  # 4 of the last 12 samples: one batch
    assert sorted(seen + more + again + two + rest) == list(range(32))


def test_epoch_length_mode_carries_the_global_sample_count_over(make_shards):
    """epoch_length=5 batches per process: after 1 batch on each of 2 processes (8 samples), 1 process continues at
    its batch 2 of its own stream; after 3 (24 samples, more than 5 batches of 4) the epoch is complete."""
    shards = make_shards([8, 8, 8, 8])
    reference = make_loader(shards, "epoch_length", num_workers=0)
    _, state, _ = run_ranks(shards, 2, batches=1, epoch_length=5)
    rest, final, _ = run_ranks(shards, 1, state=state, epoch_length=5)
    assert rest == [i for batch in drain(reference)[2:] for i in batch]
    assert (final["epoch"], final["batches_done"], final["segments"]) == (0, 5, [])
    _, state, _ = run_ranks(shards, 2, batches=3, epoch_length=5)
    rest, final, _ = run_ranks(shards, 1, state=state, epoch_length=5)
    assert rest == [i for batch in drain(reference) for i in batch]  # the whole next epoch
    assert (final["epoch"], final["batches_done"]) == (1, 5)


class _Loop(SimpleNamespace):
    """What ``pending_loader_state`` and ``shift_batch_progress`` read of a Lightning trainer."""


def fake_trainer(state, *, world_size=1, accumulate=1):
    counters = [SimpleNamespace(ready=state["batches_done"], started=state["batches_done"],
                                processed=state["batches_done"], completed=state["batches_done"] - 1)
                for _ in range(2)]  # fmt: skip
    progress = SimpleNamespace(current=counters[0], total=counters[1])
    fit_loop = _Loop(_combined_loader_states_to_load=[state], restarting=True,
                     epoch_loop=SimpleNamespace(batch_progress=progress))  # fmt: skip
    return SimpleNamespace(global_rank=0, world_size=world_size, accumulate_grad_batches=accumulate, fit_loop=fit_loop)


@pytest.mark.parametrize(("world_size", "batch_size", "expected"), [(1, 4, 2), (1, 2, 4), (4, 1, 2), (1, 8, 1)])
def test_keep_global_batch_sets_the_accumulation_and_moves_the_batch_counters(make_shards, world_size, batch_size,
                                                                              expected):  # fmt: skip
    shards = make_shards([8, 8, 8, 8])
    _, state, _ = run_ranks(shards, 2, batches=2)  # global batch 2 x 4 x 1 = 8
    dm = WebDataModule(shards, batch_size=batch_size, num_workers=0, latent_scale=1, shuffle_buffer=6,
                       keep_global_batch=True)  # fmt: skip
    dm.trainer = fake_trainer(state, world_size=world_size)
    loader = dm.train_dataloader()
    assert dm.trainer.accumulate_grad_batches == expected == loader.state_dict()["accumulate_grad_batches"]
    assert world_size * batch_size * expected == 8
    position = 16 // (world_size * batch_size)  # 16 samples read: whole optimizer steps of the new configuration
    assert loader.batches_done == position and position % expected == 0
    progress = dm.trainer.fit_loop.epoch_loop.batch_progress.current
    assert (progress.ready, progress.completed) == (position, position - 1)


def test_position_after_a_change_starts_a_whole_accumulation_window(make_shards):
    """Accumulation 2, checkpoint after 3 steps of 2 processes x batch 4 (24 samples) resumed on 1 process x batch 8:
    24 samples are 3 batches of 8, rounded up to batch 4 so that the next optimizer step accumulates 2 batches; the
    last 8 samples are one batch, so the epoch has 5 batches (a normal one 4) and Lightning's counters say 4."""
    shards = make_shards([8, 8, 8, 8])
    first, state, _ = run_ranks(shards, 2, batches=3)
    dm = WebDataModule(shards, batch_size=8, num_workers=0, latent_scale=1, shuffle_buffer=6)
    dm.trainer = fake_trainer(state, accumulate=2)
    loader = dm.train_dataloader()
    assert (loader.batches_done, len(loader), dm.trainer.accumulate_grad_batches) == (4, 5, 2)
    assert dm.trainer.fit_loop.epoch_loop.batch_progress.current.ready == 4
    rest = drain(loader)
    assert len(rest) == 1 and sorted(first + rest[0]) == list(range(32))
    assert len(loader) == 4  # Lightning's next epoch reads a normal epoch's length
    reference = make_loader(shards, "counted", num_workers=0, batch_size=8)
    drain(reference)
    again = make_loader(shards, "counted", num_workers=0, batch_size=8)
    again.load_state_dict(loader.state_dict())  # a checkpoint at the end of the resumed epoch: the next one follows
    assert drain(again) == drain(loader) == drain(reference)


def test_keep_global_batch_refuses_in_one_line_when_no_accumulation_keeps_it(make_shards):
    shards = make_shards([8, 8, 8, 8])
    _, state, _ = run_ranks(shards, 2, batches=2)
    dm = WebDataModule(shards, batch_size=3, num_workers=0, latent_scale=1, shuffle_buffer=6, keep_global_batch=True)
    dm.trainer = fake_trainer(state)
    with pytest.raises(ResumeSettingsError) as err:  # cli.main prints a DataError in one line
        dm.train_dataloader()
    assert str(err.value) == (
        "data.keep_global_batch=true: the checkpoint's global batch 2 processes x data.batch_size 4 x "
        "trainer.accumulate_grad_batches 1 = 8 is not a multiple of 1 processes x data.batch_size 3 = 3; choose a "
        "data.batch_size (or process count) whose product divides it, or set data.keep_global_batch=false"
    )


# ------------------------------------------------------------------------------------------------------ lightning
class _Record(L.Callback):
    def __init__(self):
        self.seen: dict[int, list[int]] = {}  # global step -> the step's sample indices (the last batch of it)
        self.batches: list[tuple[int, int, int, list[int]]] = []  # (epoch, batch_idx, global step, sample indices)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step] = indices(batch)
        self.batches.append((trainer.current_epoch, batch_idx, trainer.global_step, indices(batch)))


def _fit(shards, tmp_path, *, callbacks=(), ckpt_path=None, max_steps=9, **data_settings) -> tuple[_Record, L.Trainer]:
    record = _Record()
    module = FlowMatchingModule(net={"in_channels": 4, "img_dim": 8, "patch_size": 4, "embed_dim": 16, "depth": 1,
                                     "scan_type": "zigzagN2"})  # fmt: skip
    data = WebDataModule(shards, batch_size=4, num_workers=0, latent_scale=1, shuffle_buffer=6, **data_settings)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[record, *callbacks], enable_checkpointing=bool(callbacks))  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)
    assert isinstance(trainer.train_dataloader, ShardLoader)  # not re-wrapped by Lightning
    return record, trainer


def test_lightning_checkpoint_holds_the_loader_state_and_resume_continues(make_shards, tmp_path):
    """6 batches per epoch, checkpoints at steps 4 (epoch 0, batch 4) and 8 (epoch 1, batch 2); resuming from either
    continues with the batches of the uninterrupted run."""
    shards = make_shards([8, 8, 8], latent_shape=(4, 8, 8))
    every4 = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=4, save_top_k=-1)
    full, _ = _fit(shards, tmp_path, callbacks=[every4])
    assert sorted(full.seen) == list(range(9))
    for step, (epoch, done) in {4: (0, 4), 8: (1, 2)}.items():
        ckpt = torch.load(tmp_path / "ckpt" / f"step={step}.ckpt", weights_only=True)
        state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert state == [state_of(epoch, done, num_batches=6, num_shards=3)]
        resumed, _ = _fit(shards, tmp_path / f"resume{step}", ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt")
        assert resumed.seen == {s: full.seen[s] for s in range(step, 9)}


def test_lightning_resume_on_one_process_from_two_keeps_global_batch_steps_and_lr(make_shards, tmp_path, monkeypatch,
                                                                                    caplog):  # fmt: skip
    """A checkpoint after 3 steps of 2 processes x batch 4 (simulated: this process reads rank 0's share; rank 1's
    is read by a plain loader), resumed on 1 process with ``keep_global_batch``: accumulation 2, and Lightning's
    batch counter moves to batch 6 of 8, so the epoch's last 8 samples make exactly one optimizer step (step 3),
    epoch 1 starts after it with 2 batches per step (step 4), and the AdamW step count and the LR schedule equal the
    global step."""
    shards = make_shards([8, 8, 8, 8], latent_shape=(4, 8, 8))
    every3 = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=3, save_top_k=-1)
    with monkeypatch.context() as patch:
        patch.setattr(WebDataModule, "rank_and_world", lambda self: (0, 2))
        two, _ = _fit(shards, tmp_path, callbacks=[every3], max_steps=3)
    rank1, _, _ = run_ranks(shards, 2, batches=3)  # ranks 0 and 1 of the first 3 steps
    assert [i for *_, ids in two.batches for i in ids] == rank1[:12]
    with caplog.at_level(logging.INFO, logger="zigma.data"):
        one, trainer = _fit(shards, tmp_path / "one", ckpt_path=tmp_path / "ckpt" / "step=3.ckpt", max_steps=5,
                            keep_global_batch=True)  # fmt: skip
    assert trainer.accumulate_grad_batches == 2
    assert [(epoch, idx, step) for epoch, idx, step, _ in one.batches] == [
        (0, 6, 3), (0, 7, 3), (1, 0, 4), (1, 1, 4)]  # fmt: skip
    epoch0 = rank1 + [i for epoch, *_, ids in one.batches if epoch == 0 for i in ids]
    assert sorted(epoch0) == list(range(32))
    fresh = make_loader(shards, "counted", num_workers=0)
    drain(fresh)
    assert [ids for epoch, *_, ids in one.batches if epoch == 1] == drain(fresh)[:2]
    optimizer, scheduler = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == 5 == scheduler.last_epoch
    assert all(int(state["step"]) == 5 for state in optimizer.state.values())
    notes = [r.getMessage() for r in caplog.records if "continues after" in r.getMessage()]
    assert len(notes) == 1 and notes[0].endswith(
        "checkpoint 2 processes x 1 workers x batch 4, now 1 x 1 x 4; data.keep_global_batch: "
        "trainer.accumulate_grad_batches 1 -> 2 (global batch 8)"
    )
