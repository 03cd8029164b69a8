"""``zigma sample`` and ``zigma export``: the same bytes as ``predict``, exact resume after a kill, disjoint DDP
ranks, every checkpoint kind (Lightning, export, upstream), caption files, and one-line errors for bad input.

The models are tiny: the quickstart fixture checkpoint (1×32×32, 3 Euler steps) and 3×8×8 ZigMa's written here."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from callbacks import SampleWriter
from datamodules.base import ZigMaDataModule
from tests.e2e.helpers import ROOT
from tests.zigma.test_checkpoint import perturbed, upstream_checkpoint
from zigma import ZigMa, from_pretrained, save_pretrained
from zigma.sample_store import SampleStore, to_uint8_hwc
from zigma_lightning import export, sample
from zigma_lightning.sample_model import load_sampling_module

FIXTURES = ROOT / "tests" / "fixtures"
CKPT = FIXTURES / "quickstart_c37874f.ckpt"
EXPECTED = json.loads((FIXTURES / "quickstart_c37874f.json").read_text())
TINY = {"in_channels": 3, "img_dim": 8, "patch_size": 2, "embed_dim": 16, "depth": 2, "scan_type": "zigzagN8"}
FLOW = {"sample_steps": 3, "sample_method": "euler"}


def run(*argv: str) -> int:
    return sample.main([str(a) for a in argv])


def images(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as data:
        return data["arr_0"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """7 SDE samples of the fixture checkpoint in shards of 2, made in one go (the resume and DDP reference)."""
    out = tmp_path_factory.mktemp("reference")
    assert run("--ckpt", CKPT, "--count", 7, "--batch-size", 2, "--mode", "sde", "--out", out) == 0
    return out


def tiny_export(folder: Path, flow: dict | None = None, **net) -> Path:
    torch.manual_seed(0)
    save_pretrained(perturbed(ZigMa(**{**TINY, **net})), folder, flow={**FLOW, **(flow or {})})
    return folder


def test_samples_are_the_bytes_predict_made_from_the_same_checkpoint(tmp_path):
    out = tmp_path / "out"
    assert run("--ckpt", CKPT, "--count", 5, "--batch-size", 4, "--out", out, "--png") == 0
    pixels = images(out)
    assert list(pixels.shape) == EXPECTED["predict_shape"]
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == EXPECTED["predict_uint8_sha256"]
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(5)] + ["grid.png"]
    assert json.loads((out / "manifest.json").read_text())["settings"]["count"] == 5


def test_a_killed_run_resumes_to_the_bytes_of_an_uninterrupted_one(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ("--ckpt", CKPT, "--count", 7, "--batch-size", 2, "--mode", "sde", "--out", out)
    real_write, made = SampleStore.write, []

    def killed_after_two(self, indices, pixels):
        if len(made) == 2:
            raise KeyboardInterrupt  # the run dies while making its third batch
        made.append(list(map(int, indices)))
        return real_write(self, indices, pixels)

    monkeypatch.setattr(SampleStore, "write", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(*argv)
    assert not (out / "samples.npz").exists() and len(list((out / "shards").glob("*.npz"))) == 2
    (out / "shards" / ".000000004.npz.999999999-00.tmp").write_bytes(b"torn")  # a dead writer's leftover

    def recorded(self, indices, pixels):
        made.append(list(map(int, indices)))
        return real_write(self, indices, pixels)

    monkeypatch.setattr(SampleStore, "write", recorded)
    assert run(*argv) == 0
    assert made == [[0, 1], [2, 3], [4, 5], [6]]  # the rerun made only the missing shards
    assert (out / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()
    assert not list(out.rglob("*.tmp"))

    assert run(*argv, "--seed", 1) == 2  # another run's settings are refused
    assert "seed: 0 -> 1" in one_error_line(capsys)


@pytest.mark.slow
def test_two_ddp_processes_make_each_sample_once(reference, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zigma", "sample", "--ckpt", str(CKPT), "--count", "7", "--batch-size", "2",
           "--mode", "sde", "--out", str(out), "--accelerator", "cpu", "--devices", "2"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = {p.name: np.load(p)["index"].tolist() for p in (out / "shards").glob("*.npz")}
    assert sorted(i for index in shards.values() for i in index) == list(range(7))
    assert (out / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()


def test_export_holds_the_ema_weights_and_samples_the_same_bytes(reference, tmp_path, capsys):
    assert export.main([str(CKPT), "--out", str(tmp_path / "export")]) == 0
    state = torch.load(CKPT, map_location="cpu", weights_only=True)["state_dict"]
    loaded = from_pretrained(tmp_path / "export").state_dict()
    for name, value in loaded.items():
        torch.testing.assert_close(value, state[f"ema.network.{name}"], rtol=0, atol=0)
    out = tmp_path / "out"
    assert run("--ckpt", tmp_path / "export", "--count", 7, "--batch-size", 2, "--mode", "sde", "--out", out) == 0
    assert (out / "samples.npz").read_bytes() == (reference / "samples.npz").read_bytes()

    never_averaged = tmp_path / "no_ema.ckpt"
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    ckpt["state_dict"]["ema.num_updates"] = torch.tensor(0)
    torch.save(ckpt, never_averaged)
    assert export.main([str(never_averaged), "--out", str(tmp_path / "refused")]) == 2
    assert "never updated (ema.num_updates = 0); pass --weights model" in one_error_line(capsys)
    assert not (tmp_path / "refused").exists()
    assert export.main([str(never_averaged), "--out", str(tmp_path / "live"), "--weights", "model"]) == 0
    torch.testing.assert_close(from_pretrained(tmp_path / "live").state_dict()["pos_embed"],
                               state["model.pos_embed"], rtol=0, atol=0)  # fmt: skip


def test_an_upstream_checkpoint_samples_as_its_export(tmp_path):
    torch.manual_seed(0)
    ema = perturbed(ZigMa(**TINY))
    torch.save(upstream_checkpoint(perturbed(ZigMa(**TINY)), ema, params=TINY), tmp_path / "0001000.pt")
    save_pretrained(ema, tmp_path / "export")  # no flow.json: the defaults, as for the upstream file
    for name in ("0001000.pt", "export"):
        assert run("--ckpt", tmp_path / name, "--count", 3, "--steps", 3, "--out", tmp_path / f"out_{name}") == 0
    assert images(tmp_path / "out_0001000.pt").shape == (3, 8, 8, 3)
    assert (tmp_path / "out_0001000.pt/samples.npz").read_bytes() == (tmp_path / "out_export/samples.npz").read_bytes()


def test_a_text_model_samples_caption_i_mod_k_from_a_caption_file_as_predict_does(tmp_path):
    folder = tiny_export(tmp_path / "text", {"guidance_scale": 2.0}, has_text=True, d_context=8, cond_dropout_prob=0.1)
    captions = torch.randn(2, 4, 8)
    np.save(tmp_path / "captions.npy", captions.numpy())
    out = tmp_path / "out"
    assert run("--ckpt", folder, "--count", 3, "--captions", tmp_path / "captions.npy", "--out", out) == 0
    module = load_sampling_module(folder)
    indices = torch.arange(3)
    result = module.generate(module.noise(indices), captions[indices % 2], guidance_scale=2.0)
    np.testing.assert_array_equal(images(out), to_uint8_hwc(result.x))

    class TextData(ZigMaDataModule):
        context_dim = 8

    data = TextData(num_predict_samples=3, predict_batch_size=3, predict_captions=str(tmp_path / "captions.npy"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SampleWriter(str(tmp_path / "predict"), save_npz=True, png=False)])  # fmt: skip
    trainer.predict(module, data.predict_dataloader(), return_predictions=False)
    assert (tmp_path / "predict" / "samples.npz").read_bytes() == (out / "samples.npz").read_bytes()
    with pytest.raises(ValueError, match=r"set data.predict_captions to a .npy/.npz/.pt file of shape \(K, N, 8\)"):
        TextData().predict_dataloader()


@pytest.mark.parametrize(
    ("net", "extra", "message"),
    [
        ({}, ["--labels", "1"], "error: --labels 1: the model is not class-conditional\n"),
        ({"num_classes": 3}, ["--labels", "0,3"], "error: --labels: class 3 is not one of the model's classes 0 .. 2"),
        ({}, ["--steps", "1"], "error: --steps: "),
        ({}, ["--method", "rk5"], "error: --method: "),
        ({}, ["--guidance-scale", "2"], "error: --guidance-scale 2.0: needs a conditional model trained with"),
        ({}, ["--count", "0"], "error: --count must be >= 1; got 0\n"),
        ({"has_text": True, "d_context": 8}, [], "error: the model is text-conditioned: pass --captions FILE"),
        ({"has_text": True, "d_context": 8}, ["--captions", "missing.npy"], "error: --captions: missing.npy not found"),
        (
            {"has_text": True, "d_context": 8},
            ["--captions", "{bad}"],
            "error: --captions: {bad} holds shape (2, 4, 7); expected caption features (K, N, 8)\n",
        ),
        ({"has_text": True, "d_context": 8}, ["--prompts", "{prompts}"], "error: --prompts needs --clip DIR"),
        ({"in_channels": 4}, [], "error: the model makes 4-channel latents: pass --vae DIR"),
        ({"in_channels": 4}, ["--vae", "{missing}"], "error: --vae {missing}: "),
    ],
)
def test_bad_input_stops_with_one_line_naming_the_option(tmp_path, capsys, net, extra, message):
    folder = tiny_export(tmp_path / "model", **net)
    np.save(tmp_path / "bad.npy", np.zeros((2, 4, 7), np.float32))
    (tmp_path / "prompts.txt").write_text("a face\n")
    paths = {"bad": tmp_path / "bad.npy", "prompts": tmp_path / "prompts.txt", "missing": tmp_path / "no_vae"}
    extra = [a.format(**paths) for a in extra]
    assert run("--ckpt", folder, "--count", 2, "--out", tmp_path / "out", *extra) == 2
    assert one_error_line(capsys).startswith(message.format(**paths))
    assert not (tmp_path / "out" / "samples.npz").exists()


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert run("--ckpt", tmp_path / "nope.ckpt", "--count", 2, "--out", tmp_path / "out") == 2
    assert one_error_line(capsys) == f"error: --ckpt: {tmp_path / 'nope.ckpt'} not found (a Lightning .ckpt, a " \
        "`zigma export` directory or an upstream .pt)\n"  # fmt: skip
