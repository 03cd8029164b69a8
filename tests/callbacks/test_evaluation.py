"""FID/FVD evaluation callbacks on tiny models, through the real Inception/I3D loading code with random stand-ins.

Real pixels come from a small in-memory DataModule that counts how often its reference set is read, so the tests see
whether reference statistics were computed or loaded from the cache.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from callbacks.evaluation import FIDEvaluation, FVDEvaluation, clips_of, count_tag, frames_of, frechet_metric
from datamodules.base import ZigMaDataModule
from zigma.flow_module import FlowMatchingModule
from zigma.metrics.frechet import GaussianStats
from zigma.metrics.inception import INCEPTION_WEIGHTS_FILE, load_inception, to_uint8
from zigma.sampling import SampleResult

pytest.importorskip("torch_fidelity", reason="FID's Inception comes from torch-fidelity")

IMAGE_NET = {"in_channels": 1, "img_dim": 8, "patch_size": 2, "embed_dim": 16, "depth": 2, "scan_type": "zigzagN8",
             "use_pe": 2, "drop_path_rate": 0.0}  # fmt: skip
VIDEO_NET = {**IMAGE_NET, "scan_type": "v2", "video_frames": 3}


class RealData(ZigMaDataModule):
    """``count`` random real samples of ``shape`` in pixel space; counts the reads of its reference set."""

    def __init__(self, shape: tuple[int, ...], count: int = 12, key: str = "x", name: str = "random-real"):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.real = torch.rand(count, *shape, generator=gen) * 1.6 - 0.8
        self.sample_shape = shape
        self.key = key  # "x": pixel-space model data; "pixels": images the module encodes with its VAE
        self.name = name
        self.reads = 0

    def train_dataloader(self) -> DataLoader:
        return DataLoader([{self.key: x} for x in self.real], batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([{self.key: x} for x in self.real[:4]], batch_size=4)

    @property
    def reference_name(self) -> str:
        return self.name

    def reference_pixels(self, batch_size: int = 50):
        self.reads += 1
        yield from self.real.split(batch_size)


def tiny_module(net: dict = IMAGE_NET) -> FlowMatchingModule:
    torch.manual_seed(0)
    return FlowMatchingModule(net=net, ema_decay=0.5, sample_steps=2)


def fid(weights, cache, **kwargs) -> FIDEvaluation:
    settings = {"num_samples": 6, "batch_size": 4, "sample_steps": 2, "feature": 64, "weights_path": str(weights),
                "reference_cache_dir": str(cache), **kwargs}  # fmt: skip
    return FIDEvaluation(**settings)


def run(stage: str, module, data, *callbacks, **trainer_kwargs) -> L.Trainer:
    trainer_kwargs.setdefault("logger", False)
    trainer = L.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks), **trainer_kwargs)  # fmt: skip
    getattr(trainer, stage)(module, datamodule=data, **({} if stage == "fit" else {"verbose": False}))
    return trainer


def test_count_tag():
    assert [count_tag(n) for n in (5000, 50000, 2048, 6)] == ["5k", "50k", "2048", "6"]


def test_torchmetrics_fid_through_the_real_inception_is_zero_on_itself_and_grows_with_a_shift(random_inception_weights):
    metric = frechet_metric(load_inception(random_inception_weights, feature=192))
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(40, 200, (8, 3, 32, 32), generator=gen)
    metric.update(images.to(torch.uint8), real=True)
    values = []
    for shift in (0, 30, 60):
        metric.reset()  # fakes only: the real side is kept (reset_real_features=False)
        metric.update((images + shift).clamp(0, 255).to(torch.uint8), real=False)
        values.append(float(metric.compute()))
    print("FID at shifts 0, 30, 60:", values)
    assert metric.real_features_num_samples == 8 and metric.real_features_sum.dtype == torch.float64
    assert abs(values[0]) < 1e-4 * values[1]
    assert 0 < values[1] < values[2]


class Images(torch.utils.data.Dataset):
    """uint8 (3, H, W) images, the input torch-fidelity's ``calculate_metrics`` takes."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def test_fid_equals_torch_fidelity_calculate_metrics_with_the_same_weights_file(random_inception_weights):
    """Our pipeline (torchmetrics' metric around load_inception, TF1 resize) against torch-fidelity's own FID of the
    same images with the same weights file: the reference implementation of TF-FID in PyTorch."""
    import torch_fidelity

    gen = torch.Generator().manual_seed(2)
    real = torch.randint(0, 256, (12, 3, 40, 40), generator=gen).to(torch.uint8)
    fake = (real.int() + torch.randint(-40, 60, real.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    metric = frechet_metric(load_inception(random_inception_weights, feature=192))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    ours = float(metric.compute())
    theirs = torch_fidelity.calculate_metrics(
        input1=Images(fake), input2=Images(real), fid=True, feature_layer_fid="192", cuda=False, cache=False,
        verbose=False, batch_size=6, feature_extractor_weights_path=str(random_inception_weights),
    )["frechet_inception_distance"]  # fmt: skip
    print(f"FID ours {ours:.6g}, torch-fidelity {theirs:.6g}")
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_fid_is_logged_with_its_count_and_the_reference_is_computed_once(tmp_path, random_inception_weights, capsys):
    data = RealData((1, 8, 8))
    first = run("validate", tiny_module(), data, fid(random_inception_weights, tmp_path, progress=True))
    bars = capsys.readouterr().err  # rank 0's bars, asked for (stderr is no terminal here): reals, then fakes
    assert "fid reference:   0%" in bars and "0/6" in bars and "val fid samples:   0%" in bars
    value = float(first.callback_metrics["val/fid_6"])
    assert np.isfinite(value) and value >= 0
    assert float(first.callback_metrics["val/fid_samples"]) == 6 and float(first.callback_metrics["val/fid_nfe"]) > 0
    files = sorted(tmp_path.glob("*.npz"))
    assert len(files) == 1 and data.reads == 1
    meta = GaussianStats.load(files[0]).meta
    assert meta["dataset"] == "random-real" and meta["count"] == 6 and meta["resolution"] == 8
    assert meta["extractor"] == "inception-v3-compat-pool64" and meta["antialias"] is False

    again = run("validate", tiny_module(), data, fid(random_inception_weights, tmp_path))  # a later run: cache hit
    assert data.reads == 1 and float(again.callback_metrics["val/fid_6"]) == pytest.approx(value, rel=1e-6)
    assert "samples" not in capsys.readouterr().err  # progress unset and the Trainer's bar off: no bar

    run("validate", tiny_module(), data, fid(random_inception_weights, tmp_path, reference_count=10))  # a new key
    assert data.reads == 2 and len(list(tmp_path.glob("*.npz"))) == 2
    other = RealData((1, 8, 8), name="other-real")  # another dataset: its own statistics
    run("validate", tiny_module(), other, fid(random_inception_weights, tmp_path))
    assert other.reads == 1 and len(list(tmp_path.glob("*.npz"))) == 3


def test_latent_models_are_scored_on_vae_decoded_pixels(tmp_path, random_inception_weights, tiny_vae_dir):
    torch.manual_seed(0)
    module = FlowMatchingModule(net={**IMAGE_NET, "in_channels": 4}, vae=str(tiny_vae_dir), sample_steps=2)
    data = RealData((3, 16, 16), key="pixels")  # 16 px images; the tiny VAE halves them to 4 x 8 x 8 latents
    trainer = run("validate", module, data, fid(random_inception_weights, tmp_path))
    assert np.isfinite(float(trainer.callback_metrics["val/fid_6"]))
    (stats_file,) = tmp_path.glob("*.npz")
    assert GaussianStats.load(stats_file).meta["resolution"] == 16  # the decoded size, not the latent one


def test_the_fakes_do_not_depend_on_the_batch_size(tmp_path, random_inception_weights):
    data = RealData((1, 8, 8))
    values = []
    for batch_size in (4, 5, 6):
        callback = fid(random_inception_weights, tmp_path, batch_size=batch_size)
        trainer = run("validate", tiny_module(), data, callback)
        assert int(callback.metrics[0].metric.fake_features_num_samples) == 6
        values.append(float(trainer.callback_metrics["val/fid_6"]))
    assert values == pytest.approx([values[0]] * 3, rel=1e-5)


def test_test_stage_logs_under_test_and_model_checkpoint_can_monitor_fid(tmp_path, random_inception_weights):
    data = RealData((1, 8, 8))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/fid_6", mode="min", save_top_k=1)
    run("fit", tiny_module(), data, fid(random_inception_weights, tmp_path), checkpoint, max_steps=4,
        val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0)  # fmt: skip
    assert checkpoint.best_model_path and np.isfinite(float(checkpoint.best_model_score))
    tested = run("test", tiny_module(), data, fid(random_inception_weights, tmp_path))
    assert "test/fid_6" in tested.callback_metrics and "val/fid_6" not in tested.callback_metrics


def test_a_non_finite_sample_stops_the_evaluation(tmp_path, random_inception_weights, monkeypatch):
    module = tiny_module()
    monkeypatch.setattr(module, "generate", lambda x0, y=None, **kw: SampleResult(x=x0 * float("nan"), nfe=1))
    with pytest.raises(FloatingPointError, match=r"NaN/Inf at global step 0 \(samples 0\.\.3\)"):
        run("validate", module, RealData((1, 8, 8)), fid(random_inception_weights, tmp_path))


def test_bad_settings_are_refused_with_the_field_named(tmp_path, random_inception_weights):
    with pytest.raises(ValueError, match=r"fid.num_samples=1: a covariance needs at least 2"):
        fid(random_inception_weights, tmp_path, num_samples=1)
    with pytest.raises(ValueError, match=r"fid.reference_count=1"):
        fid(random_inception_weights, tmp_path, reference_count=1)
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE) as info:
        fid(tmp_path / "nowhere.pth", tmp_path)
    assert "nowhere.pth" in str(info.value) and "curl" in str(info.value)
    assert FIDEvaluation(num_samples=0, weights_path=str(tmp_path / "nowhere.pth")).enabled is False  # off: no check
    with pytest.raises(ValueError, match="fvd evaluates video models"):
        run("validate", tiny_module(), RealData((1, 8, 8)),
            FVDEvaluation(num_samples=2, i3d_path=__file__, frame_fid=False))  # fmt: skip
    with pytest.raises(ValueError, match="fid evaluates image models"):
        run("validate", tiny_module(VIDEO_NET), RealData((3, 1, 8, 8)), fid(random_inception_weights, tmp_path))
    with pytest.raises(FileNotFoundError, match=r"i3d_torchscript\.pt"):
        FVDEvaluation(num_samples=2, i3d_path=str(tmp_path / "i3d.pt"), frame_fid=False)


def test_reference_statistics_for_another_resolution_are_refused(tmp_path, random_inception_weights):
    extractor = load_inception(random_inception_weights, feature=64)
    stats = GaussianStats(64, meta={"dataset": "x", "resolution": 16, "count": 4, "extractor": extractor.name,
                                    "antialias": False}).update(torch.randn(4, 64))  # fmt: skip
    path = stats.save(tmp_path / "ref16.npz")
    callback = fid(random_inception_weights, tmp_path, reference=str(path))
    with pytest.raises(ValueError, match=r"resolution: file has 16, this run needs 8"):
        run("validate", tiny_module(), RealData((1, 8, 8)), callback)


def test_real_pixels_of_another_size_are_refused(tmp_path, random_inception_weights):
    data = RealData((1, 8, 8))
    data.real = torch.zeros(6, 1, 16, 16)  # the data's reals at 16 px, the model's samples at 8 px
    with pytest.raises(ValueError, match=r"real pixels are \(16, 16\), the samples 8x8"):
        run("validate", tiny_module(), data, fid(random_inception_weights, tmp_path))


def test_reference_from_an_image_folder(tmp_path, random_inception_weights):
    from PIL import Image

    folder = tmp_path / "reals"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cache = tmp_path / "cache"
    trainer = run("validate", tiny_module(), RealData((1, 8, 8)),
                  fid(random_inception_weights, cache, reference=str(folder), reference_count=7))  # fmt: skip
    assert np.isfinite(float(trainer.callback_metrics["val/fid_6"]))
    (stats_file,) = cache.glob("*.npz")
    meta = GaussianStats.load(stats_file).meta
    assert meta["dataset"] == str(folder.resolve()) and meta["count"] == 7 and meta["resolution"] == 8


# --- video ----------------------------------------------------------------------------------------------------------


def fvd(i3d, weights, cache, **kwargs) -> FVDEvaluation:
    settings = {"num_samples": 4, "batch_size": 3, "sample_steps": 2, "feature": 64, "weights_path": str(weights),
                "i3d_path": str(i3d), "reference_cache_dir": str(cache), **kwargs}  # fmt: skip
    return FVDEvaluation(**settings)


def test_fvd_and_frame_fid_of_a_video_model_reach_tensorboard(tmp_path, tiny_i3d_path, random_inception_weights):
    data = RealData((3, 1, 8, 8), count=6)
    logger = TensorBoardLogger(tmp_path / "tb", name="fvd")
    trainer = run("validate", tiny_module(VIDEO_NET), data,
                  fvd(tiny_i3d_path, random_inception_weights, tmp_path, reference_count=6), logger=logger)  # fmt: skip
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    for tag in ("val/fvd_4", "val/frame_fid_4"):
        assert np.isfinite(float(trainer.callback_metrics[tag])), tag
        assert events.Scalars(tag)[0].value == pytest.approx(float(trainer.callback_metrics[tag]))
    assert float(trainer.callback_metrics["val/fvd_samples"]) == 4
    metas = sorted((GaussianStats.load(p).meta for p in tmp_path.glob("*.npz")), key=lambda m: m["count"])
    assert [(m["count"], m["dim"], m["frames"]) for m in metas] == [(6, 400, 3), (18, 64, 3)]  # clips, frames
    assert metas[0]["extractor"] == "i3d-torchscript-stylegan-v" and data.reads == 2


def test_clip_and_frame_layouts_keep_clips_apart():
    b, t = 2, 3
    values = torch.tensor([[10 * i + j for j in range(t)] for i in range(b)], dtype=torch.float32)  # (B, T)
    pixels = (values / 127.5 - 1)[:, :, None, None, None].expand(b, t, 3, 4, 4)  # (B, T, C, H, W)
    clips, frames = clips_of(pixels), frames_of(pixels)
    assert clips.shape == (b, 3, t, 4, 4) and frames.shape == (b * t, 3, 4, 4)
    for i in range(b):
        for j in range(t):
            assert (clips[i, :, j] == 10 * i + j).all() and (frames[i * t + j] == 10 * i + j).all()


class Recorder(torch.nn.Module):
    """Calls ``inner`` and keeps a copy of every input."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.inputs = []

    def forward(self, x, *args, **kwargs):
        self.inputs.append(x.clone())
        return self.inner(x, *args, **kwargs)


def test_video_axes_are_preserved_from_the_sampler_to_i3d_and_inception(
    tmp_path, tiny_i3d_path, random_inception_weights, monkeypatch
):
    """Channel c of sample i's frame t is the constant 10 i + t + 100 c (uint8); I3D must see clip i with its frames in
    order and channels apart, and the per-frame Inception the frames clip by clip."""
    module = tiny_module({**VIDEO_NET, "in_channels": 3})

    def noise(indices, seed=None):
        grid = torch.tensor([[[10 * int(i) + t + 100 * c for c in range(3)] for t in range(3)] for i in indices],
                            dtype=torch.float32)  # (B, T, C)  # fmt: skip
        return (grid / 127.5 - 1)[..., None, None].expand(-1, -1, -1, 8, 8).clone()

    monkeypatch.setattr(module, "noise", noise)
    monkeypatch.setattr(module, "generate", lambda x0, y=None, **kw: SampleResult(x=x0, nfe=1))  # identity
    callback = fvd(tiny_i3d_path, random_inception_weights, tmp_path, batch_size=2, reference_count=6)
    build = callback._build_metrics

    def build_recording(*args):
        metrics = build(*args)
        metrics[0].extractor.detector = Recorder(metrics[0].extractor.detector)  # I3D
        metrics[1].extractor.net = Recorder(metrics[1].extractor.net)  # the per-frame Inception
        return metrics

    monkeypatch.setattr(callback, "_build_metrics", build_recording)
    run("validate", module, RealData((3, 3, 8, 8), count=6), callback)
    i3d, inception = callback.metrics[0].extractor, callback.metrics[1].extractor
    clips = torch.cat(i3d.detector.inputs)[-4:]  # (4, C, T, H, W) as I3D received the fakes (after the 6 reals)
    frames = torch.cat(inception.net.inputs)[-12:]  # (4 * 3, C, H, W)
    expected = to_uint8(noise(torch.arange(4)))  # (4, T, C, 8, 8)
    assert clips.shape == (4, 3, 3, 8, 8) and clips.dtype == torch.uint8
    for i in range(4):
        for t in range(3):
            assert (clips[i, :, t] == expected[i, t]).all(), (i, t)
            assert (frames[i * 3 + t] == expected[i, t]).all(), (i, t)
