"""WebDataModule / VideoWebDataModule on tiny shards: batch contents (scaled latents, pixels, labels, one caption per
sample, video crops), per-epoch seeded order, the bad-sample budget, equal batch counts per rank (simulated ranks and a
real 2-process gloo run with 2 workers per rank), and Lightning's epoch hook."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.decoding import _CAPTION
from datamodules.errors import BadSampleBudgetExceeded
from datamodules.manifest import write_manifest
from datamodules.shards import manifest_counts, sample_rng
from datamodules.webdataset import VideoWebDataModule, WebDataModule


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def attach(dm, rank=0, world_size=1):
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)  # what rank_and_world reads
    return dm


def indices(batch) -> list[int]:
    """Global sample indices of a latent batch built with latent_scale=1 (latents are filled with the index)."""
    return batch["x"].flatten(1)[:, 0].round().long().tolist()


def epoch_indices(loader) -> list[int]:
    return [i for batch in loader for i in indices(batch)]


# ------------------------------------------------------------------------------------------------------ contents
def test_latent_batches_are_scaled_float32_and_upstream_key_works(make_shards):
    for key in ("img_feature256.npy", "latent.npy"):  # ours and upstream FacesHQ's
        shards = make_shards([4, 4], latent_key=key)
        dm = attach(WebDataModule(shards, batch_size=4, num_workers=0))
        assert dm.sample_shape == (4, 4, 4) and dm.pixel_shape is None
        assert dm.num_classes == 0 and dm.context_dim == 0
        batch = next(iter(dm.train_dataloader()))
        assert set(batch) == {"x"} and batch["x"].shape == (4, 4, 4, 4) and batch["x"].dtype == torch.float32
        idx = (batch["x"][:, 0, 0, 0] / 0.18215).round()
        torch.testing.assert_close(batch["x"], idx.view(4, 1, 1, 1).expand(4, 4, 4, 4) * 0.18215)


def test_labels_are_int64_class_ids(make_shards):
    shards = make_shards([6, 6], num_classes=5)
    dm = attach(WebDataModule(shards, label_key="cls", num_classes=5, batch_size=4, num_workers=0, latent_scale=1))
    assert dm.num_classes == 5
    for batch in dm.train_dataloader():
        assert batch["y"].dtype == torch.int64
        assert batch["y"].tolist() == [i % 5 for i in indices(batch)]


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_image_batches_are_resized_center_cropped_pixels(make_shards, fmt):
    shards = make_shards([8, 8], image=fmt, image_size=(12, 10))  # landscape: shorter side 10
    dm = attach(WebDataModule(shards, kind="image", resolution=8, batch_size=4, num_workers=0))
    assert dm.sample_shape is None and dm.pixel_shape == (3, 8, 8)  # the latent shape is the VAE's business
    batch = next(iter(dm.train_dataloader()))
    pixels = batch["pixels"]
    assert set(batch) == {"pixels"} and pixels.shape == (4, 3, 8, 8) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    if fmt == "png":  # lossless: compare with a reference resize (10 -> 8, 12 -> 10) + centre crop
        with tarfile.open(shards[0]) as tar:
            member = tar.extractfile("000000.png").read()
        image = Image.open(io.BytesIO(member)).convert("RGB").resize((10, 8), Image.Resampling.BICUBIC)
        want = torch.from_numpy(np.asarray(image.crop((1, 0, 9, 8)), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        decoded = dm.decoder({"__key__": "000000", "png": member})["pixels"]
        torch.testing.assert_close(decoded, want)


def test_hflip_mirrors_some_samples_seeded(make_shards):
    shards = make_shards([8, 8], image="png", image_size=(8, 8))
    plain = WebDataModule(shards, kind="image", resolution=8, hflip=False, num_workers=0).decoder
    flips = WebDataModule(shards, kind="image", resolution=8, hflip=True, num_workers=0, seed=1).decoder
    with tarfile.open(shards[0]) as tar:
        samples = [{"__key__": f"{i:06d}", "png": tar.extractfile(f"{i:06d}.png").read()} for i in range(8)]
    flipped = []
    for sample in samples:
        a, b = plain(sample)["pixels"], flips(sample)["pixels"]
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
        flipped.append(not torch.equal(a, b))
        assert torch.equal(b, flips(sample)["pixels"])  # a function of (seed, epoch, key)
    assert any(flipped) and not all(flipped)


def test_one_caption_per_sample_seeded_per_epoch(make_shards):
    shards = make_shards([8, 8], captions=(5, 2, 3))

    def caption_choice(seed, epoch):
        dm = attach(WebDataModule(shards, caption_key="caption_feature.npy", batch_size=8, num_workers=0,
                                  latent_scale=1, seed=seed))  # fmt: skip
        assert dm.context_dim == 3
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        chosen = {}
        for batch in loader:
            assert batch["y"].shape == (8, 2, 3) and batch["y"].dtype == torch.float32
            for i, y in zip(indices(batch), batch["y"]):
                chosen[i] = int(y[0, 0]) - 100 * i
                assert torch.all(y == y[0, 0])  # one caption's features, not a mix
            assert len({chosen[i] for i in indices(batch)}) > 1  # drawn per sample, not once per batch
        return chosen

    epoch0 = caption_choice(seed=0, epoch=0)
    assert sorted(epoch0) == list(range(16)) and set(epoch0.values()) <= set(range(5))
    assert epoch0 == {i: int(sample_rng(0, f"{i:06d}", 0, 0, _CAPTION).integers(5)) for i in range(16)}
    assert epoch0 == caption_choice(seed=0, epoch=0)  # reproducible per seed
    assert epoch0 != caption_choice(seed=0, epoch=1)  # a new draw each epoch
    assert epoch0 != caption_choice(seed=1, epoch=0)


def test_video_temporal_crop_seeded_and_exact_when_equal(make_shards):
    shards = make_shards([4, 4], latent_key=None, num_classes=3, video_frames=6)
    dm = attach(VideoWebDataModule(shards, video_frames=6, label_key="cls", num_classes=3, batch_size=4,
                                   num_workers=0, latent_scale=1))  # fmt: skip
    assert dm.sample_shape == (6, 4, 2, 2) and dm.num_classes == 3
    for batch in dm.train_dataloader():
        first = batch["x"][:, :, 0, 0, 0]  # (B, T) = 100 * index + t
        idx = (first[:, 0] // 100).long()
        torch.testing.assert_close(first, (100 * idx[:, None] + torch.arange(6)).float())  # all frames, in order
        assert batch["y"].tolist() == (idx % 3).tolist()

    def starts(seed):
        dm = attach(VideoWebDataModule(shards, video_frames=4, label_key="cls", num_classes=3, batch_size=4,
                                       num_workers=0, latent_scale=1, seed=seed))  # fmt: skip
        assert dm.sample_shape == (4, 4, 2, 2)
        out = {}
        for batch in dm.train_dataloader():
            assert batch["x"].shape == (4, 4, 4, 2, 2)
            first = batch["x"][:, :, 0, 0, 0]
            for clip in first:
                index, start = int(clip[0] // 100), int(clip[0] % 100)
                torch.testing.assert_close(clip, 100.0 * index + start + torch.arange(4.0))  # consecutive frames
                out[index] = start
        return out

    assert starts(0) == starts(0) and set(starts(0).values()) <= {0, 1, 2} and len(set(starts(0).values())) > 1


def test_prepare_latent_layouts_both_flips_and_moments(make_shards):
    def both_flips(i):  # [0]: the image's latent (+i), [1]: its mirror image's (-i)
        pair = np.stack([np.full((4, 2, 2), i, np.float32), np.full((4, 2, 2), -i, np.float32)])
        return {"latent.npy": npy_bytes(pair)}

    shards = make_shards([8, 8], start=1, latent_key=None, extra=both_flips)
    dm = attach(WebDataModule(shards, hflip=True, batch_size=16, num_workers=0, latent_scale=1))
    assert dm.sample_shape == (4, 2, 2)
    x = next(iter(dm.train_dataloader()))["x"]
    signs = torch.sign(x[:, 0, 0, 0])
    assert torch.equal(x, signs.view(-1, 1, 1, 1) * x.abs()) and (signs > 0).any() and (signs < 0).any()

    def moments(i):
        return {"latent_mean.npy": npy_bytes(np.full((4, 2, 2), i, np.float32)),
                "latent_std.npy": npy_bytes(np.full((4, 2, 2), 0.01, np.float32))}  # fmt: skip

    shards = make_shards([8, 8], latent_key=None, extra=moments)
    loader = attach(WebDataModule(shards, batch_size=16, num_workers=0, latent_scale=1)).train_dataloader()
    loader.sampler.set_epoch(0)
    x0 = next(iter(loader))["x"]
    loader.sampler.set_epoch(0)
    assert torch.equal(next(iter(loader))["x"], x0)  # the posterior draw is a function of (seed, epoch, key)
    idx = x0.flatten(1).mean(1).round()
    assert (x0 - idx.view(-1, 1, 1, 1)).abs().max() < 0.06 and (x0 - idx.view(-1, 1, 1, 1)).std() > 0.005
    loader.sampler.set_epoch(1)
    x1 = next(iter(loader))["x"]
    assert not torch.equal(x1.sort(0).values, x0.sort(0).values)  # a fresh sample each epoch


def test_manifest_counts_replace_the_header_scan(make_shards):
    shards = make_shards([8, 8])
    manifest = {"format": "zigma-shards", "version": 1, "kind": "images", "resolution": 8, "keys": {},
                "latents": "sample", "latent_shape": [4, 4, 4], "vae": None, "num_classes": 0, "label_names": [],
                "caption_feature_shape": None,
                "splits": {"train": {"complete": True, "count": 12, "bad": 0, "bad_paths": [], "shard_size": 8,
                                     "shards": [{"name": "train-000000.tar", "count": 4},
                                                {"name": "train-000001.tar", "count": 8}],
                                     "inputs": {}, "created": "", "command": ""}}}  # fmt: skip
    write_manifest(Path(shards[0]).parent, manifest)  # deliberately under-counts shard 0
    dm = attach(WebDataModule(shards, batch_size=4, num_workers=2, latent_scale=1))
    loader = dm.train_dataloader()
    assert loader.stream.quotas == [1, 2] and len(epoch_indices(loader)) == 12
    manifest["splits"]["train"]["complete"] = False  # what an interrupted prepare run leaves: provisional counts
    write_manifest(Path(shards[0]).parent, manifest)
    assert manifest_counts(shards) == {}


def write_latent_manifest(shards, *, scale: float, scaled: bool) -> None:
    """A manifest as ``prepare`` writes it for these shards' latents, recording a VAE of ``scale``."""
    manifest = {"format": "zigma-shards", "version": 1, "kind": "images", "resolution": 8, "keys": {},
                "latents": "sample", "latent_shape": [4, 4, 4], "latent_scaled": scaled,
                "vae": {"name_or_path": "vae", "subfolder": None, "scale": scale, "shift": 0.0, "mean": None,
                        "std": None, "sample": True, "dtype": "float32"},
                "num_classes": 0, "label_names": [], "caption_feature_shape": None, "splits": {}}  # fmt: skip
    write_manifest(Path(shards[0]).parent, manifest)


def test_latent_scale_comes_from_the_manifest_and_a_disagreeing_one_is_refused(make_shards):
    """Unset, data.latent_scale is the manifest's (raw latents: vae.scale; scaled latents: 1.0) and ``vae_scale`` is
    the VAE's; without a manifest upstream's 0.18215 (the test above). A set value that disagrees: one line."""
    shards = make_shards([4, 4])
    write_latent_manifest(shards, scale=0.5, scaled=False)
    dm = attach(WebDataModule(shards, batch_size=4, num_workers=0, shuffle_buffer=0))
    assert (dm.latent_scale, dm.vae_scale) == (0.5, 0.5)
    x = next(iter(dm.train_dataloader()))["x"]  # latents filled with their sample index, times 0.5
    assert sorted((x[:, 0, 0, 0] / 0.5).tolist()) in ([0, 1, 2, 3], [4, 5, 6, 7])
    assert WebDataModule(shards, batch_size=4, num_workers=0, latent_scale=0.5).latent_scale == 0.5
    with pytest.raises(
        ValueError,
        match=r"^data\.latent_scale=0\.18215: the shards' manifest records raw latents of a "
        r"VAE with scale 0\.5, which need latent_scale=0\.5; leave data\.latent_scale unset",
    ):
        WebDataModule(shards, batch_size=4, num_workers=0, latent_scale=0.18215)
    write_latent_manifest(shards, scale=0.5, scaled=True)
    dm = WebDataModule(shards, batch_size=4, num_workers=0)
    assert (dm.latent_scale, dm.vae_scale) == (1.0, 0.5)
    with pytest.raises(ValueError, match=r"records latents already scaled .* need latent_scale=1\.0"):
        WebDataModule(shards, batch_size=4, num_workers=0, latent_scale=0.5)
    plain = make_shards([4], image="png")  # pixels: no latent scale at all
    assert WebDataModule(plain, kind="image", resolution=8, batch_size=2, num_workers=0).latent_scale is None


# ------------------------------------------------------------------------------------------------------ epochs
def test_epoch_reads_every_sample_once_in_a_new_order(make_shards):
    shards = make_shards([8] * 4)
    dm = attach(WebDataModule(shards, batch_size=4, num_workers=2, latent_scale=1, shuffle_buffer=6))
    loader = dm.train_dataloader()
    assert len(loader) == 8
    epoch0, epoch1 = epoch_indices(loader), epoch_indices(loader)  # without set_epoch: the next epoch
    assert sorted(epoch0) == sorted(epoch1) == list(range(32))
    assert epoch0 != epoch1
    loader.sampler.set_epoch(0)  # what Lightning calls
    assert epoch_indices(loader) == epoch0
    other = attach(WebDataModule(shards, batch_size=4, num_workers=2, latent_scale=1, shuffle_buffer=6, seed=1))
    assert epoch_indices(other.train_dataloader()) != epoch0


def test_val_loader_fixed_order_or_none(make_shards):
    shards = make_shards([4, 4])
    val = make_shards([4, 4], prefix="val", start=100)
    dm = attach(WebDataModule(shards, val_shards=val, batch_size=2, num_workers=2, latent_scale=1))
    loader = dm.val_dataloader()
    first = epoch_indices(loader)
    assert sorted(first) == list(range(100, 108)) and epoch_indices(loader) == first
    assert WebDataModule(shards, num_workers=0).val_dataloader() == []


@pytest.mark.parametrize("resampled", [False, True])
def test_equal_batches_per_rank_simulated(make_shards, resampled):
    shards = make_shards([8, 8, 8, 8, 3])  # rank 0 holds shards 0, 2, 4 (19 samples), rank 1 shards 1, 3 (16)
    counts, seen = [], []
    for rank in (0, 1):
        dm = attach(WebDataModule(shards, batch_size=4, num_workers=2, latent_scale=1, resampled=resampled,
                                  epoch_length=5 if resampled else None), rank, 2)  # fmt: skip
        loader = dm.train_dataloader()
        got = epoch_indices(loader)
        counts.append((len(loader), len(got) // 4))
        seen.append(got)
    if resampled:
        assert counts == [(5, 5), (5, 5)]
    else:
        assert counts == [(4, 4), (4, 4)]  # min over ranks of the full batches per worker (rank 1: 2 + 2)
        assert not set(seen[0]) & set(seen[1])  # disjoint shards
        assert len(set(seen[0])) == len(seen[0])


def test_epoch_length_wraps_around_and_fewer_shards_than_workers(make_shards):
    shards = make_shards([8, 8])  # 2 shards, 2 ranks x 2 workers: one shard per rank, worker 1 idle
    for rank in (0, 1):
        dm = attach(WebDataModule(shards, batch_size=4, num_workers=2, latent_scale=1, epoch_length=5), rank, 2)
        loader = dm.train_dataloader()
        assert loader.stream.quotas == [5, 0]
        got = epoch_indices(loader)
        assert len(got) == 20 and set(got) == set(range(8 * rank, 8 * rank + 8))  # 2.5 passes over its shard


# ------------------------------------------------------------------------------------------------------ errors
def test_bad_samples_are_skipped_within_budget_and_raise_past_it(make_shards, caplog):
    shards = make_shards([8, 8, 8, 8])
    with open(shards[1], "r+b") as f:  # a corrupt npy (key 000010)
        data = f.read()
        f.seek(data.index(b"\x93NUMPY", data.index(b"000010.img_feature256.npy")))
        f.write(b"garbage!")
    with tarfile.open(shards[2]) as tar:
        os.truncate(shards[2], tar.getmember("000020.img_feature256.npy").offset_data + 10)
    dm = attach(WebDataModule(shards, batch_size=4, num_workers=0, latent_scale=1, max_bad_samples=8))
    loader = dm.train_dataloader()
    with caplog.at_level(logging.WARNING, logger="zigma.data"):
        got = epoch_indices(loader)
    assert len(got) == 4 * len(loader)  # the planned batches, wrapping around for the samples it lost
    assert 10 not in got and 20 not in got
    assert f"shard {shards[1]} key 000010" in caplog.text and f"shard {shards[2]} key after" in caplog.text
    dm = attach(WebDataModule(shards, batch_size=4, num_workers=0, latent_scale=1, max_bad_samples=1))
    with pytest.raises(RuntimeError, match=r"more than max_bad_samples=1 .*shard .*train-00000[12]\.tar"):
        epoch_indices(dm.train_dataloader())


def overwrite_npy(shard: str, key: str, garbage: bytes = b"garbage!") -> None:
    """Overwrite the npy magic of sample ``key``'s latent in ``shard`` (same size: a bit flip on disk)."""
    with open(shard, "r+b") as f:
        data = f.read()
        f.seek(data.index(b"\x93NUMPY", data.index(f"{key}.img_feature256.npy".encode())))
        f.write(garbage)


@pytest.mark.parametrize("damage", ["whole_shard", "first_sample"])
def test_damage_in_the_first_shard_is_skipped_within_the_budget_like_anywhere_else(make_shards, caplog, damage):
    # issue 13: the start-up shape probe read only the first shard and stopped training on its damage
    shards = make_shards([4, 4, 4])
    if damage == "whole_shard":  # random bytes over all of shard 0 (same size)
        size = os.path.getsize(shards[0])
        Path(shards[0]).write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
        key, lost = "<first sample>", set(range(4))
    else:
        overwrite_npy(shards[0], "000000")
        key, lost = "000000", {0}
    with caplog.at_level(logging.WARNING, logger="zigma.data"):
        dm = attach(WebDataModule(shards, batch_size=1, num_workers=0, latent_scale=1, shuffle_buffer=0,
                                  max_bad_samples=1))  # fmt: skip
    assert dm.sample_shape == (4, 4, 4)
    assert f"skipping bad sample 1/1 (reading the data's shapes): shard {shards[0]} key {key}" in caplog.text
    got = epoch_indices(dm.train_dataloader())
    assert set(got) == set(range(12)) - lost  # the stream skips the same damage (and wraps around for its quota)
    with pytest.raises(BadSampleBudgetExceeded) as raised:
        WebDataModule(shards, batch_size=1, num_workers=0, latent_scale=1, max_bad_samples=0)
    message = str(raised.value)
    assert message.startswith(f"1 bad sample, more than max_bad_samples=0 (reading the data's shapes); the last: "
                              f"shard {shards[0]} key {key}: ")  # fmt: skip
    assert message.endswith(". Check or rewrite that shard, or raise data.max_bad_samples") and "\n" not in message


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_exceeded_budget_is_one_line_in_the_main_process_and_from_workers(make_shards, num_workers):
    # issue 13: from a DataLoader worker torch re-raised it wrapped in the worker's traceback (124 lines at the CLI)
    shards = make_shards([4, 4, 4, 4])
    overwrite_npy(shards[3], "000013")  # shard 3: worker 1 of 2 (``split_shards``), worker 0 of 1
    dm = attach(WebDataModule(shards, batch_size=2, num_workers=num_workers, latent_scale=1, max_bad_samples=0))
    with pytest.raises(BadSampleBudgetExceeded) as raised:
        epoch_indices(dm.train_dataloader())
    worker = 1 if num_workers == 2 else 0
    message = str(raised.value)  # numpy's error text varies with its version: the rest is exact
    assert message.startswith(f"1 bad sample, more than max_bad_samples=0 (rank 0, worker {worker}, epoch 0); the "
                              f"last: shard {shards[3]} key 000013: ValueError: ")  # fmt: skip
    assert message.endswith(". Check or rewrite that shard, or raise data.max_bad_samples") and "\n" not in message


def test_construction_errors_name_the_setting(make_shards):
    shards = make_shards([4, 4])
    with pytest.raises(ValueError, match=r"cannot read a sample from .*train-000000.tar.*no 'feat.npy'.*img_feature"):
        WebDataModule(shards, latent_key="feat.npy")
    with pytest.raises(ValueError, match=r"needs data\.num_classes"):
        WebDataModule(shards, label_key="cls")
    with pytest.raises(ValueError, match=r"needs data\.label_key"):
        WebDataModule(shards, num_classes=10)
    with pytest.raises(ValueError, match="epoch_length"):
        WebDataModule(shards, resampled=True)
    with pytest.raises(ValueError, match=r"data\.kind='video'"):
        WebDataModule(shards, kind="video")
    with pytest.raises(ValueError, match=r"2 shard\(s\) for 3 processes"):
        attach(WebDataModule(shards, num_workers=0), 0, 3).train_dataloader()
    with pytest.raises(ValueError, match=r"data\.batch_size=9"):
        attach(WebDataModule(shards, batch_size=9, num_workers=0)).train_dataloader()


# ------------------------------------------------------------------------------------------------------ lightning
class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(indices(batch))
        return (self.weight - batch["x"].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        raise AssertionError("no validation shards: Lightning must skip validation")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_runs_epochs_and_sets_the_data_epoch(make_shards, tmp_path):
    shards = make_shards([8, 8])
    dm = WebDataModule(shards, batch_size=4, num_workers=0, latent_scale=1)
    module = _Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert trainer.num_training_batches == 4
    assert sorted(module.seen[0]) == sorted(module.seen[1]) == list(range(16))
    fresh = attach(WebDataModule(shards, batch_size=4, num_workers=0, latent_scale=1))
    loader = fresh.train_dataloader()
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        assert module.seen[epoch] == epoch_indices(loader)  # Lightning's epoch e is data epoch e


# ------------------------------------------------------------------------------------------------------ real DDP
def _ddp_worker(rank: int, world: int, init_file: str, cases: dict[str, list[str]], out_dir: str) -> None:
    # a spawned process would spawn its DataLoader workers too (each re-importing torch and lightning: slow); fork them
    torch.multiprocessing.set_start_method("fork", force=True)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=timedelta(seconds=30))  # fmt: skip
    try:
        results = {}
        for name, shards in cases.items():
            dm = WebDataModule(shards, batch_size=4, num_workers=2, latent_scale=1, seed=3)  # rank: torch.distributed
            loader = dm.train_dataloader()
            seen, batches = [], 0
            for batch in loader:
                step = torch.ones(1)
                torch.distributed.all_reduce(step)  # one collective per step, as DDP: a short rank would hang here
                seen += indices(batch)
                batches += 1
            results[name] = {"len": len(loader), "batches": batches, "seen": seen}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_ranks_two_workers_read_every_sample_once(make_shards, tmp_path):
    cases = {
        "more_shards": make_shards([8] * 8),  # 8 shards > 2 ranks x 2 workers
        "fewer_shards": make_shards([8] * 2, start=1000),  # 2 shards < 2 x 2: one idle worker per rank
    }
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), cases, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = {"more_shards": list(range(64)), "fewer_shards": list(range(1000, 1016))}
    for name, want in expected.items():
        per_rank = [r[name] for r in ranks]
        assert per_rank[0]["batches"] == per_rank[1]["batches"] == per_rank[0]["len"] == per_rank[1]["len"]
        assert sorted(per_rank[0]["seen"] + per_rank[1]["seen"]) == want  # each sample exactly once


def test_reference_pixels_are_every_validation_image_in_order_unflipped(make_shards):
    shards = make_shards([5, 4], image="png", image_size=(8, 8))
    dm = WebDataModule(shards[:1], val_shards=shards, kind="image", resolution=8, hflip=True, num_workers=0)
    batches = list(dm.reference_pixels(batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 1]  # all 9 validation images, whatever the training batch size
    plain = WebDataModule(shards, kind="image", resolution=8, hflip=False, num_workers=0).decoder
    with tarfile.open(shards[1]) as tar:
        last = plain({"__key__": "000008", "png": tar.extractfile("000008.png").read()})["pixels"]
    torch.testing.assert_close(batches[-1][0], last)  # shard order, and never flipped
    assert dm.reference_name.startswith("shards:") and dm.reference_name.endswith("(2)")
    latents = WebDataModule(make_shards([4]), num_workers=0)
    with pytest.raises(NotImplementedError, match="reads latents, not pixels"):
        next(latents.reference_pixels())


def test_model_refuses_latents_of_another_vae_scale(make_shards, tiny_vae_dir):
    """One latent scale: model.vae_scale unset is the VAE config's (0.18215 = upstream's), which the data applies to
    manifest-less shards by default; a data scale that differs is refused by the model in one line."""
    from zigma.flow_module import FlowMatchingModule

    net = {"in_channels": 4, "img_dim": 4, "patch_size": 2, "embed_dim": 16, "depth": 2, "scan_type": "zigzagN8"}
    model = FlowMatchingModule(net=net, vae=str(tiny_vae_dir))
    shards = make_shards([4])
    model.check_latent_scale(WebDataModule(shards, batch_size=2, num_workers=0).vae_scale)
    model.check_latent_scale(WebDataModule(shards, batch_size=2, num_workers=0, latent_scale=1.0).vae_scale)  # unknown
    with pytest.raises(
        ValueError,
        match=r"^model\.vae_scale=0\.18215 but the data's latents are scaled by 0\.5 "
        r"\(data\.latent_scale or the shards' manifest\): set model\.vae_scale=0\.5$",
    ):
        model.check_latent_scale(WebDataModule(shards, batch_size=2, num_workers=0, latent_scale=0.5).vae_scale)
    FlowMatchingModule(net=net, vae=str(tiny_vae_dir), vae_scale=0.5).check_latent_scale(0.5)
    FlowMatchingModule(net=net).check_latent_scale(0.5)  # pixel-space model: nothing to decode with
