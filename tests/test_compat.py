"""A checkpoint written before issue 14 (main at c37874f) still loads, resumes and predicts the same images.

``tests/fixtures/quickstart_c37874f.ckpt`` (264 kB) is ``last.ckpt`` (step 2) of a 3-step run of the tiny quickstart
model, made in a worktree of c37874f:

    git worktree add /tmp/c378 c37874f && cd /tmp/c378
    python cli.py fit --config configs/quickstart.yaml --config tests/e2e/tiny.yaml --trainer.max_steps 3 \
        --trainer.logger.init_args.save_dir /tmp/fx/runs
    cp /tmp/fx/runs/quickstart/version_0/checkpoints/last.ckpt tests/fixtures/quickstart_c37874f.ckpt

and ``tests/fixtures/quickstart_c37874f.json`` records, at the same commit, what ``predict`` made from it (twice,
identical): the sha256 of the uint8 pixels (``arr_0`` of ``samples.npz``, shape (5, 32, 32, 1)) of

    python cli.py predict --config configs/quickstart.yaml --config tests/e2e/tiny.yaml \
        --ckpt_path tests/fixtures/quickstart_c37874f.ckpt --predict_writer.output_dir OUT \
        --predict_writer.save_npz true --trainer.logger.init_args.save_dir RUNS

The tests use only the command line (``cli.main``) and ``torch.load``, so they hold whatever the modules are called.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from tests.e2e.helpers import QUICKSTART

FIXTURES = Path(__file__).parent / "fixtures"
CKPT = FIXTURES / "quickstart_c37874f.ckpt"
EXPECTED = json.loads((FIXTURES / "quickstart_c37874f.json").read_text())

pytestmark = pytest.mark.slow


def run(*args: str, save_dir: Path):
    return cli.main([*args, "--trainer.logger.init_args.save_dir", str(save_dir)])


def test_fixture_is_the_recorded_file_and_loads_with_weights_only():
    assert hashlib.sha256(CKPT.read_bytes()).hexdigest() == EXPECTED["checkpoint_sha256"]
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == EXPECTED["global_step"]
    assert ckpt["state_dict"] and all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())


def test_predict_from_the_old_checkpoint_makes_the_recorded_images(tmp_path):
    out = tmp_path / "samples"
    run("predict", *QUICKSTART, "--ckpt_path", str(CKPT), "--predict_writer.output_dir", str(out),
        "--predict_writer.save_npz", "true", save_dir=tmp_path / "runs")  # fmt: skip
    saved = np.load(out / "samples.npz")
    images = saved["arr_0"]
    assert images.dtype == np.uint8 and list(images.shape) == EXPECTED["predict_shape"]
    assert saved["index"].tolist() == list(range(EXPECTED["predict_shape"][0]))
    assert hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest() == EXPECTED["predict_uint8_sha256"]


def test_fit_resumes_from_the_old_checkpoint_at_its_step(tmp_path, monkeypatch):
    """The resumed run starts at the saved step with the saved weights and optimizer state, and takes one step."""
    probe = tmp_path / "probe.pt"
    monkeypatch.setenv("ZIGMA_STATE_PROBE", str(probe))
    step = EXPECTED["global_step"]
    runs = tmp_path / "runs"
    run("fit", *QUICKSTART, "--ckpt_path", str(CKPT), "--trainer.max_steps", str(step + 1),
        "--trainer.callbacks+=tests.e2e.helpers.StateProbe", save_dir=runs)  # fmt: skip
    old = torch.load(CKPT, map_location="cpu", weights_only=True)
    start = torch.load(probe, weights_only=True)
    assert start["global_step"] == step
    assert start["state_dict"].keys() == old["state_dict"].keys()
    for name, value in old["state_dict"].items():
        torch.testing.assert_close(start["state_dict"][name], value, rtol=0, atol=0, msg=name)
    saved_adam = old["optimizer_states"][0]["state"]
    assert {k: v["step"].item() for k, v in start["optimizer"]["state"].items()} == {
        k: v["step"].item() for k, v in saved_adam.items()
    }
    (last,) = runs.rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step + 1
