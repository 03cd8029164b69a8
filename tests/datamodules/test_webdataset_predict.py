"""``predict`` with a shard DataModule needs no shards: a training config whose shards are missing still predicts (the
same requests as every DataModule: sample indices in order, class labels drawn from ``predict_seed``), while fit,
validate and test still refuse the missing shards in one line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.base import SampleRequests
from datamodules.webdataset import VideoWebDataModule, WebDataModule
from tests.e2e.helpers import QUICKSTART, main_in_process
from tests.test_compat import CKPT, EXPECTED
from zigma.conditions import class_labels
from zigma.flow_module import FlowMatchingModule
from zigma_lightning.cli import check_model_matches_data
from zigma_lightning.errors import ConfigError

MISSING = r"names 125 file\(s\) that do not exist"


def missing_shards(tmp_path: Path) -> str:
    return str(tmp_path / "nowhere" / "train-{000000..000124}.tar")


@pytest.mark.parametrize("make", [
    lambda shards: WebDataModule(shards, label_key="cls", num_classes=5, num_predict_samples=11, predict_batch_size=4,
                                 predict_seed=3),
    lambda shards: VideoWebDataModule(shards, num_classes=101, num_predict_samples=11, predict_batch_size=4,
                                      predict_seed=3),
])  # fmt: skip
def test_predict_reads_no_shard_and_requests_what_every_datamodule_requests(tmp_path, make):
    dm = make(missing_shards(tmp_path))
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [len(b["index"]) for b in batches] == [4, 4, 3]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(11))
    labels = torch.cat([b["y"] for b in batches])
    expected = SampleRequests(11, dm.num_classes, seed=3).labels  # the base class's requests (embedded data too)
    assert torch.equal(labels, expected) and torch.equal(labels, class_labels(dm.num_classes, 11, 3))
    facts = dm.yields("predict")  # what the CLI checks the model against: no shapes, the configured classes
    assert (facts.sample_shape, facts.pixel_shape, facts.context_dim) == ((), None, 0)
    assert facts.num_classes == dm.num_classes


def test_fit_validate_and_test_still_refuse_missing_shards(tmp_path):
    dm = WebDataModule(missing_shards(tmp_path), num_classes=0)
    for stage in ("fit", "validate", "test"):
        with pytest.raises(ValueError, match=MISSING):
            dm.setup(stage)
    for use in (dm.yields, dm.train_dataloader, dm.val_dataloader, lambda: next(dm.reference_pixels())):
        with pytest.raises(ValueError, match=MISSING):
            use()
    captions = WebDataModule(missing_shards(tmp_path), caption_key="txt.npy")  # caption widths need the shards
    with pytest.raises(ValueError, match=MISSING):
        captions.yields("predict")


def test_the_cli_check_refuses_missing_shards_in_one_line_except_for_predict(tmp_path):
    model = FlowMatchingModule(net={"in_channels": 4, "img_dim": 8, "patch_size": 2, "embed_dim": 16, "depth": 1,
                                    "num_classes": 5})  # fmt: skip
    dm = WebDataModule(missing_shards(tmp_path), label_key="cls", num_classes=5)
    check_model_matches_data(model, dm, stage="predict")
    with pytest.raises(ConfigError, match=r"^shards=.*" + MISSING):
        check_model_matches_data(model, dm, stage="fit")
    unlabelled = WebDataModule(missing_shards(tmp_path))  # the classes are still checked for predict
    with pytest.raises(ConfigError, match=r"model.net.num_classes=5 but WebDataModule has no class labels"):
        check_model_matches_data(model, unlabelled, stage="predict")


@pytest.mark.slow
def test_predict_with_a_shard_config_makes_the_embedded_configs_images(tmp_path):
    """The quickstart checkpoint of ``tests/test_compat.py`` predicted through a ``WebDataModule`` config naming 125
    missing shards: the same five images, byte for byte, that predict makes with the embedded faces' config."""
    config = tmp_path / "shards.yaml"
    config.write_text(f"data:\n  class_path: datamodules.WebDataModule\n  init_args:\n"
                      f"    shards: {missing_shards(tmp_path)}\n")  # fmt: skip
    out = tmp_path / "samples"
    main_in_process("predict", *QUICKSTART, "--config", str(config), "--ckpt_path", str(CKPT),
                    "--predict_writer.output_dir", str(out), "--predict_writer.save_npz", "true",
                    runs=tmp_path / "runs")  # fmt: skip
    with np.load(out / "samples.npz") as saved:
        images, index = saved["arr_0"], saved["index"]
    assert list(images.shape) == EXPECTED["predict_shape"] and index.tolist() == list(range(5))
    assert hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest() == EXPECTED["predict_uint8_sha256"]
