"""SampleGridLogger: image grids and GIF video clips in TensorBoard (read back from the event files), failed sampling
raises; video_grid against torch's add_video layout."""

import io
import warnings
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageSequence
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import _prepare_video

from callbacks import SampleGridLogger
from callbacks.samples import add_video_clips, to_unit_range, video_grid
from zigma.flow_module import FlowMatchingModule

IMAGE_NET = {"in_channels": 1, "img_dim": 8, "patch_size": 2, "embed_dim": 16, "depth": 2, "scan_type": "zigzagN8",
             "use_pe": 2, "drop_path_rate": 0.0}  # fmt: skip
VIDEO_NET = {**IMAGE_NET, "scan_type": "v2", "video_frames": 2}


def tiny_module(net: dict) -> FlowMatchingModule:
    """A grayscale 8x8 model whose EMA moves within two steps (so the logged samples are the trained EMA's)."""
    return FlowMatchingModule(net=net, ema_decay=0.5, sample_steps=2)


def fit(module: FlowMatchingModule, logger, callback: SampleGridLogger, max_steps: int = 2) -> L.Trainer:
    """Fit ``module`` for ``max_steps`` steps on 4 random items of its sample shape, batch 2."""
    items = [{"x": x} for x in torch.randn(4, *module.sample_shape)]
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module, DataLoader(items, batch_size=2))
    return trainer


def read_images(log_dir, tag: str) -> list:
    """Every image event of ``tag`` in the event files of ``log_dir`` (ImageEvent: step, width, height, bytes)."""
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    assert tag in events.Tags()["images"], events.Tags()["images"]
    return events.Images(tag)


def gif_frames(encoded: bytes) -> list[np.ndarray]:
    """The frames of an animated GIF as (H, W) uint8 grayscale arrays (Pillow composes delta frames)."""
    gif = Image.open(io.BytesIO(encoded))
    assert gif.format == "GIF"
    return [np.asarray(frame.convert("L")) for frame in ImageSequence.Iterator(gif)]


class RecordDecoded:
    """Wraps ``pl_module.decode`` to keep what it returned, i.e. the pixels the sample logger logged."""

    def __init__(self):
        self.decoded: list[torch.Tensor] = []

    def wrap(self, module: FlowMatchingModule) -> FlowMatchingModule:
        decode = module.decode

        def recording(x):
            out = decode(x)
            self.decoded.append(out.detach().cpu().clone())
            return out

        module.decode = recording
        return module


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize("channels", [1, 3])
def test_video_grid_matches_add_video_layout_and_conversion(batch, channels):
    videos = torch.rand(batch, 3, channels, 4, 5) * 2.2 - 1.1  # a little outside [-1, 1]: clamped
    unit = to_unit_range(videos).numpy()
    expected = (_prepare_video(unit).astype(np.float32) * 255).clip(0, 255).astype(np.uint8)  # as summary.video does
    got = video_grid(videos)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_add_video_clips_keeps_clips_and_frames_in_order(tmp_path, channels):
    """Clip b, frame t is the constant gray level 40 * b + 10 * t + 5: a GIF with clips swapped or frames out of order
    puts a wrong level in some tile."""
    b, t, h, w = 3, 4, 6, 5
    levels = torch.tensor([[40 * i + 10 * j + 5 for j in range(t)] for i in range(b)], dtype=torch.float32)
    videos = (levels / 255 * 2 - 1).view(b, t, 1, 1, 1).expand(b, t, channels, h, w) + 0.5 / 255  # exact after uint8
    writer = SummaryWriter(tmp_path)
    add_video_clips(writer, "clips", videos, step=7, fps=5)
    writer.close()
    (event,) = read_images(tmp_path, "clips")
    assert event.step == 7 and (event.height, event.width) == (h, 4 * w)  # 3 clips padded to 4: one row of 4
    frames = gif_frames(event.encoded_image_string)
    assert len(frames) == t
    assert Image.open(io.BytesIO(event.encoded_image_string)).info["duration"] == 200
    for j, frame in enumerate(frames):
        assert frame.shape == (h, 4 * w)
        for i in range(b):
            np.testing.assert_array_equal(frame[:, i * w : (i + 1) * w], int(levels[i, j]), err_msg=f"clip {i} t {j}")
        np.testing.assert_array_equal(frame[:, 3 * w :], 0)  # the padding clip is black


def test_sample_grid_logger_logs_the_image_grid_at_its_step(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    fit(tiny_module(IMAGE_NET), logger, SampleGridLogger(every_n_steps=2, num_samples=4, num_steps=2))
    (event,) = read_images(logger.log_dir, "samples/ema")  # step 2 once: on_train_end does not log it again
    assert event.step == 2
    assert (event.height, event.width) == (2 * 9 + 1, 2 * 9 + 1)  # 2 x 2 grid of 8x8 with 1-pixel padding
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "samples/ema_video" not in events.Tags()["images"]


def test_sample_grid_logger_logs_video_clips_of_a_video_model(tmp_path):
    """A real fit of a 2-frame grayscale video model: the frames grid and a GIF video at step 2, whose top-left clip
    is sample 0's decoded frames in time order (grayscale GIFs are lossless, so exactly)."""
    logger = TensorBoardLogger(tmp_path)
    record = RecordDecoded()
    module = record.wrap(tiny_module(VIDEO_NET))
    fit(module, logger, SampleGridLogger(every_n_steps=2, num_samples=4, num_steps=2, fps=4))
    (grid,) = read_images(logger.log_dir, "samples/ema")
    assert grid.step == 2
    assert (grid.height, grid.width) == (4 * 9 + 1, 2 * 9 + 1)  # clips in rows, frames in columns
    (video,) = read_images(logger.log_dir, "samples/ema_video")
    assert video.step == 2 and (video.height, video.width) == (2 * 8, 2 * 8)  # 4 clips tiled 2 x 2
    (pixels,) = record.decoded  # (4, 2, 1, 8, 8)
    assert pixels.shape == (4, 2, 1, 8, 8)
    frames = gif_frames(video.encoded_image_string)
    assert len(frames) == 2
    expected = (to_unit_range(pixels) * 255).to(torch.uint8)[:, :, 0].numpy()  # (B, T, H, W)
    assert not np.array_equal(expected[0, 0], expected[0, 1]) and not np.array_equal(expected[0, 0], expected[1, 0])
    for t, frame in enumerate(frames):
        assert frame.shape == (video.height, video.width)
        np.testing.assert_array_equal(frame[:8, :8], expected[0, t], err_msg=f"clip 0, frame {t}")
        np.testing.assert_array_equal(frame, video_grid(pixels)[t, ..., 0].numpy())


def failing_generate(failure: str):
    def generate(x0, y=None, **kwargs):
        if failure == "raise":
            raise RuntimeError("sampler exploded")
        x = x0.clone()
        x[0, 0, 0, 0] = float("nan")
        x[1, 0, 1, 1] = float("inf")
        return type("Result", (), {"x": x, "nfe": 1})()

    return generate


@pytest.mark.parametrize(
    ("failure", "error", "match"),
    [pytest.param("raise", RuntimeError, "sampler exploded", id="raise"),
     pytest.param("nan", FloatingPointError, r"EMA samples at global step 1: 2 of 256 values are NaN or Inf",
                  id="nonfinite")],
)  # fmt: skip
def test_sample_grid_logger_raises_when_sampling_fails(tmp_path, failure, error, match):
    """A failed sample stops training with its error; it is never logged as noise."""
    module = tiny_module(IMAGE_NET)
    module.generate = failing_generate(failure)
    logger = TensorBoardLogger(tmp_path)
    with pytest.raises(error, match=match):
        fit(module, logger, SampleGridLogger(every_n_steps=1, num_samples=4, num_steps=2), max_steps=2)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "samples/ema" not in events.Tags()["images"]


def test_sample_grid_logger_warns_once_and_logs_only_the_grid_for_clips_without_gif_channels(tmp_path):
    """4-channel clips (latents without a VAE to decode them) have no GIF mode: grid only, one warning per run."""
    module = tiny_module({**VIDEO_NET, "in_channels": 4})
    writer = SummaryWriter(tmp_path)
    callback = SampleGridLogger(num_samples=2, num_steps=2)
    with pytest.warns(UserWarning, match="4 channels and a GIF needs 1 or 3"):
        callback.log_grid(SimpleNamespace(global_step=1, logger=SimpleNamespace(experiment=writer)), module)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*a GIF needs")  # warned once already
        callback.log_grid(SimpleNamespace(global_step=2, logger=SimpleNamespace(experiment=writer)), module)
    writer.close()
    assert [event.step for event in read_images(tmp_path, "samples/ema")] == [1, 2]
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert "samples/ema_video" not in events.Tags()["images"]


def test_sample_grid_logger_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        SampleGridLogger(every_n_steps=0)
    with pytest.raises(ValueError, match="fps must be >= 1; got 0"):
        SampleGridLogger(fps=0)


def test_sample_writer_npz_holds_every_sample_in_index_order_as_the_pngs(tmp_path):
    from callbacks import SampleWriter
    from datamodules.base import SampleRequests

    module = tiny_module(IMAGE_NET)
    writer = SampleWriter(output_dir=str(tmp_path / "out"), save_npz=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[writer])  # fmt: skip
    trainer.predict(module, DataLoader(SampleRequests(5), batch_size=2), return_predictions=False)
    with np.load(tmp_path / "out" / "samples.npz") as data:
        images, index = data["arr_0"], data["index"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8 and index.tolist() == [0, 1, 2, 3, 4]
    for i in range(5):  # the PNG of sample i holds the same pixels (both are written from one uint8 array)
        png = np.asarray(Image.open(tmp_path / "out" / f"{i:06d}.png").convert("L"))
        np.testing.assert_array_equal(png, images[i, ..., 0])
    assert not list((tmp_path / "out").glob("*.partial"))


def test_text_models_sample_from_the_first_training_captions_kept_across_resume(tmp_path, monkeypatch):
    module = tiny_module({**IMAGE_NET, "has_text": True, "d_context": 8})
    captions = torch.randn(4, 3, 8)  # (items, tokens, d_context)
    items = [{"x": x, "y": y} for x, y in zip(torch.randn(4, *module.sample_shape), captions)]
    seen = []
    generate = module.generate

    def recording(x0, y=None, **kwargs):
        seen.append(y.detach().clone())
        return generate(x0, y, **kwargs)

    monkeypatch.setattr(module, "generate", recording)
    callback = SampleGridLogger(every_n_steps=2, num_samples=3, num_steps=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=TensorBoardLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[callback])  # fmt: skip
    trainer.fit(module, DataLoader(items, batch_size=2, shuffle=False))
    assert [e.step for e in read_images(trainer.logger.log_dir, "samples/ema")] == [2]
    torch.testing.assert_close(seen[0].cpu(), captions[:3])  # batch 0 (2 captions) and the first of batch 1
    resumed = SampleGridLogger(every_n_steps=2, num_samples=3, num_steps=2)
    resumed.load_state_dict(callback.state_dict())
    resumed.on_train_batch_start(trainer, module, {"x": None, "y": torch.zeros(2, 3, 8)}, 0)  # later batches
    torch.testing.assert_close(resumed.state_dict()["captions"], captions[:3])  # unchanged


def test_class_rows_draw_one_grid_row_per_class_with_the_given_guidance(tmp_path):
    module = FlowMatchingModule(net={**IMAGE_NET, "num_classes": 3}, cond_dropout_prob=0.1, sample_steps=2)
    calls = []
    generate = module.generate

    def recording(x0, y=None, **kwargs):
        calls.append((y.tolist(), kwargs["guidance_scale"]))
        return generate(x0, y, **kwargs)

    module.generate = recording
    writer = SummaryWriter(tmp_path)
    trainer = SimpleNamespace(global_step=1, logger=SimpleNamespace(experiment=writer))
    SampleGridLogger(num_samples=6, num_steps=2, class_rows=True, guidance_scale=2.0).log_grid(trainer, module)
    writer.close()
    assert calls == [([0, 0, 1, 1, 2, 2], 2.0)]
    (event,) = read_images(tmp_path, "samples/ema")
    assert (event.height, event.width) == (3 * 9 + 1, 2 * 9 + 1)  # 3 classes in rows, 2 samples each
    with pytest.raises(ValueError, match="class_rows needs num_samples to be a multiple of the 3 classes; got 5"):
        SampleGridLogger(num_samples=5, class_rows=True).log_grid(trainer, module)
