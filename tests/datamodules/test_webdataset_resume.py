"""Mid-epoch resume of the webdataset training loader: ``ShardLoader.state_dict``/``load_state_dict`` round trips
(finite, ``epoch_length`` and resampled modes, with and without worker processes) continue with exactly the batches of
an uninterrupted run, a changed stream restarts the epoch with a warning, and a Lightning fit saves the loader state
in its checkpoints and continues at the right batch when resumed with ``ckpt_path``."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

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
    assert state == {"epoch": 0, "batches_done": k, "batch_size": 4, "world_size": 1, "seed": 0, "mode": mode,
                     "num_workers": max(1, num_workers), "num_batches": len(loader)}  # fmt: skip
    assert all(type(v) in (int, str) for v in state.values())  # plain values: torch.load(weights_only=True)

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


@pytest.mark.parametrize("change", ["batch_size", "world_size"])
def test_changed_stream_warns_and_restarts_the_epoch(make_shards, change):
    shards = make_shards([8] * 4)
    loader = make_loader(shards, "counted", num_workers=0)
    take(loader, 2)
    state = loader.state_dict()
    other = {"batch_size": {"batch_size": 2}, "world_size": {"world_size": 2}}[change]
    resumed = make_loader(shards, "counted", num_workers=0, **other)
    fresh = make_loader(shards, "counted", num_workers=0, **other)
    with pytest.warns(UserWarning, match=rf"cannot continue epoch 0 after batch 2.*{change} .*restarts"):
        resumed.load_state_dict(state)
    assert drain(resumed) == drain(fresh)  # the whole epoch 0 of the new stream


# ------------------------------------------------------------------------------------------------------ lightning
class _Record(L.Callback):
    def __init__(self):
        self.seen: dict[int, list[int]] = {}  # global step -> the step's sample indices

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step] = indices(batch)


def _fit(shards, tmp_path, *, callbacks=(), ckpt_path=None) -> _Record:
    record = _Record()
    module = FlowMatchingModule(net={"in_channels": 4, "img_dim": 8, "patch_size": 4, "embed_dim": 16, "depth": 1,
                                     "scan_type": "zigzagN2"})  # fmt: skip
    data = WebDataModule(shards, batch_size=4, num_workers=0, latent_scale=1, shuffle_buffer=6)
    trainer = L.Trainer(max_steps=9, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[record, *callbacks], enable_checkpointing=bool(callbacks))  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)
    assert isinstance(trainer.train_dataloader, ShardLoader)  # not re-wrapped by Lightning
    return record


def test_lightning_checkpoint_holds_the_loader_state_and_resume_continues(make_shards, tmp_path):
    """6 batches per epoch, checkpoints at steps 4 (epoch 0, batch 4) and 8 (epoch 1, batch 2); resuming from either
    continues with the batches of the uninterrupted run."""
    shards = make_shards([8, 8, 8], latent_shape=(4, 8, 8))
    every4 = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", "{step}", every_n_train_steps=4, save_top_k=-1)
    full = _fit(shards, tmp_path, callbacks=[every4])
    assert sorted(full.seen) == list(range(9))
    for step, (epoch, done) in {4: (0, 4), 8: (1, 2)}.items():
        ckpt = torch.load(tmp_path / "ckpt" / f"step={step}.ckpt", weights_only=True)
        state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert state == [{"epoch": epoch, "batches_done": done, "batch_size": 4, "world_size": 1, "seed": 0,
                          "mode": "counted", "num_workers": 1, "num_batches": 6}]  # fmt: skip
        resumed = _fit(shards, tmp_path / f"resume{step}", ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt")
        assert resumed.seen == {s: full.seen[s] for s in range(step, 9)}
