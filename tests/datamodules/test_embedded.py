"""Training data of the embedded faces: deterministic order and flips, mid-epoch state round trips (also with
worker processes), rank splitting for DDP, and where Lightning stores the loader state."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.embedded import (
    EmbeddedFacesDataModule,
    ResumableLoader,
    epoch_flips,
    epoch_order,
    load_lfw_faces,
    rank_positions,
)


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    dm = EmbeddedFacesDataModule()
    dm.setup()
    return dm.faces


def make_loader(faces, *, batch_size=8, repeats=1, seed=0, rank=0, world_size=1, num_workers=0, hflip=True):
    dm = EmbeddedFacesDataModule(batch_size=batch_size, repeats=repeats, seed=seed, hflip=hflip,
                                 num_workers=num_workers)  # fmt: skip
    dm.faces = faces
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)  # what train_dataloader reads
    return dm.train_dataloader()


def take(loader: ResumableLoader, count: int) -> list[torch.Tensor]:
    """The next ``count`` batches' x from one iterator (one epoch at most)."""
    iterator = iter(loader)
    return [next(iterator)["x"] for _ in range(count)]


def drain(loader: ResumableLoader) -> list[torch.Tensor]:
    return [batch["x"] for batch in loader]


def assert_same_batches(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"batch {i}")


def test_epoch_order_is_a_permutation_depending_only_on_seed_and_epoch():
    torch.manual_seed(1)
    np.random.seed(1)
    first = epoch_order(100, seed=3, epoch=2)
    torch.manual_seed(2)
    np.random.seed(2)
    np.testing.assert_array_equal(epoch_order(100, seed=3, epoch=2), first)  # global RNGs play no part
    assert sorted(first.tolist()) == list(range(100))
    assert not np.array_equal(epoch_order(100, seed=3, epoch=3), first)
    assert not np.array_equal(epoch_order(100, seed=4, epoch=2), first)


def test_epoch_flips_depend_on_seed_epoch_and_position():
    flips = epoch_flips(1000, seed=0, epoch=0)
    np.testing.assert_array_equal(epoch_flips(1000, seed=0, epoch=0), flips)
    assert 400 < flips.sum() < 600
    assert not np.array_equal(epoch_flips(1000, seed=0, epoch=1), flips)
    assert not np.array_equal(epoch_flips(1000, seed=1, epoch=0), flips)
    assert not np.array_equal(flips, epoch_order(1000, 0, 0) % 2 == 1)  # another stream than the order's


def test_batches_follow_the_plan_and_leave_the_global_rng_alone(faces):
    loader = make_loader(faces, batch_size=12, repeats=2)
    items = loader.sampler.items(epoch=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    batches = drain(loader)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(batches) == len(loader) == 200 // 12
    x = torch.cat(batches)  # (192, 1, 32, 32): the last 8 of 200 items are dropped
    assert x.shape == (192, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    for row, (index, flip) in zip(x, items):
        torch.testing.assert_close(row, faces[index % 100].flip(-1) if flip else faces[index % 100], rtol=0, atol=0)
    assert 0 < sum(flip for _, flip in items) < len(items)
    torch.manual_seed(999)  # a different global seed gives the same epoch
    assert_same_batches(drain(make_loader(faces, batch_size=12, repeats=2)), batches)


def test_hflip_false_never_flips(faces):
    loader = make_loader(faces, hflip=False)
    assert not any(flip for _, flip in loader.sampler.items(epoch=0))


def test_epochs_differ_and_follow_each_other(faces):
    loader = make_loader(faces)
    epoch0, epoch1 = drain(loader), drain(loader)
    assert loader.state_dict()["epoch"] == 1
    assert not torch.equal(torch.cat(epoch0), torch.cat(epoch1))
    fresh = make_loader(faces)
    fresh.sampler.set_epoch(1)  # what Lightning calls at the start of epoch 1
    assert_same_batches(drain(fresh), epoch1)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("k", [0, 5, 12, 17])  # epoch 0 start, mid-epoch, end of epoch 0, mid-epoch 1 (12 per epoch)
def test_state_round_trip_continues_exactly(faces, num_workers, k):
    reference = drain(make_loader(faces)) + drain_second_epoch(make_loader(faces))
    loader = make_loader(faces, num_workers=num_workers)
    seen = take(loader, min(k, 12))
    if k > 12:
        seen += take(loader, k - 12)
    state = loader.state_dict()
    assert state == {"epoch": int(k > 12), "batches_done": k - 12 * (k > 12), "batch_size": 8, "world_size": 1,
                     "num_items": 100, "seed": 0}  # fmt: skip
    resumed = make_loader(faces, num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = []
    while len(seen) + len(rest) < len(reference):  # the rest of the epoch, then the next epoch
        rest += drain(resumed)
    assert_same_batches(seen + rest, reference)


def drain_second_epoch(loader: ResumableLoader) -> list[torch.Tensor]:
    loader.sampler.set_epoch(1)
    return drain(loader)


def test_set_epoch_keeps_a_restored_mid_epoch_position(faces):
    loader = make_loader(faces)
    loader.load_state_dict({"epoch": 3, "batches_done": 4})
    loader.sampler.set_epoch(3)  # Lightning's call after restoring: must not rewind
    assert len(drain(loader)) == 12 - 4
    loader.sampler.set_epoch(5)
    assert loader.state_dict()["batches_done"] == 0 and loader.state_dict()["epoch"] == 5


@pytest.mark.parametrize(("num_items", "batch_size", "world_size"), [(100, 8, 2), (100, 8, 3), (96, 4, 2), (7, 2, 3)])
def test_rank_positions_are_disjoint_complete_and_equal_in_length(num_items, batch_size, world_size):
    per_rank = [rank_positions(num_items, batch_size, r, world_size) for r in range(world_size)]
    usable = num_items // (world_size * batch_size) * world_size * batch_size
    assert {len(p) for p in per_rank} == {usable // world_size}
    assert sorted(np.concatenate(per_rank).tolist()) == list(range(usable))  # disjoint, nothing but the remainder
    with pytest.raises(ValueError, match=r"rank=\d+ must be in \[0, world_size"):
        rank_positions(num_items, batch_size, world_size, world_size)


def test_ddp_ranks_read_disjoint_items_in_equal_batches(faces):
    """World 2 without processes: each rank builds its loader from (rank, world) as train_dataloader does."""
    loaders = [make_loader(faces, batch_size=8, repeats=1, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 100 // 16
    items = [loader.sampler.items(epoch=0) for loader in loaders]
    indices = [[index for index, _ in rank_items] for rank_items in items]
    assert not set(indices[0]) & set(indices[1])
    order, flips = epoch_order(100, 0, 0), epoch_flips(100, 0, 0)
    assert sorted(indices[0] + indices[1]) == sorted(order[:96].tolist())  # complete up to the 4 dropped
    # global batch j = rank 0's j-th batch then rank 1's: together the epoch order, flips included
    merged = [item for j in range(6) for r in range(2) for item in items[r][8 * j : 8 * j + 8]]
    assert merged == [(int(order[p]), bool(flips[p])) for p in range(96)]
    batches = [drain(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == 6


def test_ddp_resume_loads_rank_zero_state_on_every_rank(faces):
    """Lightning saves rank 0's loader state only; every rank continues its own slice from it."""
    loaders = [make_loader(faces, rank=r, world_size=2) for r in range(2)]
    before = [take(loader, 2) for loader in loaders]
    state = loaders[0].state_dict()
    assert state == loaders[1].state_dict()
    for r in range(2):
        resumed = make_loader(faces, rank=r, world_size=2)
        resumed.load_state_dict(state)
        reference = drain(make_loader(faces, rank=r, world_size=2))
        assert_same_batches(before[r] + drain(resumed), reference)


def test_world_size_change_carries_the_position_over_without_repeats(faces):
    loaders = [make_loader(faces, rank=r, world_size=2, hflip=False) for r in range(2)]
    read = [loader.sampler.items(0)[:16] for loader in loaders]  # 2 batches of 8 on each rank
    for loader in loaders:
        take(loader, 2)
    single = make_loader(faces, world_size=1, hflip=False)
    with pytest.warns(UserWarning, match="2 processes x batch 8"):
        single.load_state_dict(loaders[0].state_dict())
    assert single.state_dict()["batches_done"] == 4  # 32 items read together
    rest = single.sampler.items(0, single.sampler.batches_done)
    seen = {index for rank_items in read for index, _ in rank_items}
    assert not seen & {index for index, _ in rest} and len(seen) + len(rest) == 96
    # and back: 3 batches of 8 on one process (24 items) -> rounded up to 2 batches per rank of 2 (32 items)
    one = make_loader(faces, world_size=1)
    take(one, 3)
    two = make_loader(faces, rank=1, world_size=2)
    with pytest.warns(UserWarning, match="resuming at batch 2"):
        two.load_state_dict(one.state_dict())


def test_datamodule_rejects_bad_seed_and_too_large_batches(faces):
    with pytest.raises(ValueError, match=r"data\.seed must be >= 0"):
        EmbeddedFacesDataModule(seed=-1)
    with pytest.raises(ValueError, match=r"data\.batch_size=64 x 2 processes"):
        make_loader(faces, batch_size=64, world_size=2)


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: dict[int, torch.Tensor] = {}  # global step -> the step's batch

    def training_step(self, batch, batch_idx):
        self.seen[self.global_step] = batch["x"].clone()
        return self.layer(batch["x"].mean((1, 2, 3))[:, None]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_checkpoints_and_restores_the_loader_state(tmp_path, num_workers):
    """A step checkpoint holds the loader state at loops.fit_loop.state_dict.combined_loader; resuming from it
    continues with exactly the batches of the uninterrupted run (across the epoch boundary at 12 batches)."""
    kwargs = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  default_root_dir=tmp_path)  # fmt: skip
    every5 = L.pytorch.callbacks.ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=5, save_top_k=-1)
    full, trainer = _Tiny(), L.Trainer(max_steps=15, callbacks=[every5], **kwargs)
    trainer.fit(full, EmbeddedFacesDataModule(batch_size=8, repeats=1, num_workers=num_workers))
    assert isinstance(trainer.train_dataloader, ResumableLoader)  # not re-wrapped with Lightning's sampler
    ckpt = torch.load(tmp_path / "step=5.ckpt", weights_only=True)
    state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state == [{"epoch": 0, "batches_done": 5, "batch_size": 8, "world_size": 1, "num_items": 100, "seed": 0}]

    resumed = _Tiny()
    data = EmbeddedFacesDataModule(batch_size=8, repeats=1, num_workers=num_workers)
    L.Trainer(max_steps=15, **kwargs).fit(resumed, data, ckpt_path=tmp_path / "step=5.ckpt")
    assert sorted(resumed.seen) == list(range(5, 15))
    for step, x in resumed.seen.items():
        torch.testing.assert_close(x, full.seen[step], rtol=0, atol=0, msg=f"step {step}")


def test_reference_pixels_are_the_100_faces_in_stored_order():
    dm = EmbeddedFacesDataModule(image_size=16)
    faces = torch.cat(list(dm.reference_pixels(batch_size=30)))
    torch.testing.assert_close(faces, load_lfw_faces(16))
    assert dm.reference_name == "lfw-embedded-100"


def test_digits_yield_labelled_images_in_range_in_the_epoch_order():
    from sklearn.datasets import load_digits as sklearn_digits

    from datamodules.embedded import EmbeddedDigitsDataModule, load_digits

    dm = EmbeddedDigitsDataModule(batch_size=10, seed=5)
    dm.setup()
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1)
    assert dm.yields().num_classes == 10 and dm.sample_shape == (1, 8, 8)  # native size by default
    batch = next(iter(dm.train_dataloader()))
    images, labels = load_digits()
    assert images.shape == (1797, 1, 8, 8) and labels.tolist()[:3] == [0, 1, 2]
    exact = torch.from_numpy(sklearn_digits().images).float().unsqueeze(1) / 8 - 1  # 0..16 -> -1..1, no resampling
    torch.testing.assert_close(images, exact, rtol=0, atol=0)
    larger, _ = load_digits(16)
    assert larger.shape == (1797, 1, 16, 16) and larger.min() == -1 and larger.max() == 1
    order = epoch_order(1797, seed=5, epoch=0)[:10]
    torch.testing.assert_close(batch["x"], images[order], rtol=0, atol=0)  # no flips: a mirrored digit is no digit
    assert batch["y"].dtype == torch.int64 and batch["y"].tolist() == labels[order].tolist()
    val = next(iter(dm.val_dataloader()))
    assert val["x"].shape == (100, 1, 8, 8) and val["y"].tolist() == labels[:100].tolist()
