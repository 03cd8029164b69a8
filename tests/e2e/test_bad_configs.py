"""Bad configurations fail before any training step with a message naming the key (issue 7, deliverable 5).

The CLI runs in-process (``cli.main``) to keep 40 cases fast; tests/e2e/test_cli.py covers the same path in
subprocesses. Each case must exit with status 2 and one line of error before the Trainer starts fitting.
"""

from __future__ import annotations

import pytest

from tests.e2e.helpers import QUICKSTART
from zigma_lightning import cli

pytestmark = pytest.mark.slow

BAD = [
    # (id, extra arguments, text the error must contain)
    ("img_dim_vs_data", ["--model.net.img_dim", "16"], "model.net.img_dim=16 does not match the data"),
    ("channels_vs_data", ["--model.net.in_channels", "3"], "model.net.in_channels=3 does not match the data"),
    ("patch_vs_img", ["--model.net.patch_size", "3"], "patch_size=3 must divide img_dim=32"),
    ("unknown_scan", ["--model.net.scan_type", "spiral"], "unknown scan_type 'spiral'"),
    ("video_scan_on_images", ["--model.net.scan_type", "zzvideo_sst"], "is a video scan"),
    ("video_model_image_data", ["--model.net.video_frames", "4", "--model.net.scan_type", "v2"], "video_frames=4"),
    ("image_scan_with_frames", ["--model.net.video_frames", "4"], "is an image scan"),
    ("use_pe", ["--model.net.use_pe", "3"], "use_pe must be 0"),
    ("embed_dim", ["--model.net.embed_dim", "0"], "embed_dim must be a positive integer"),
    ("depth", ["--model.net.depth", "0"], "depth must be a positive integer"),
    ("text_without_d_context", ["--model.net.has_text", "true"], "d_context"),
    (
        "text_model_without_captions",
        ["--model.net.has_text", "true", "--model.net.d_context", "8"],
        "has_text=true but the data has no caption features",
    ),
    ("classes_without_labels", ["--model.net.num_classes", "10"], "model.net.num_classes=10 but"),
    ("cond_dropout", ["--model.net.cond_dropout_prob", "1.5"], "cond_dropout_prob"),
    (
        "hilbert_grid",
        ["--model.net.img_dim", "24", "--data.init_args.image_size", "24", "--model.net.scan_type", "hilbertN2"],
        "power-of-two",
    ),
    ("sincos_width", ["--model.net.use_pe", "1", "--model.net.embed_dim", "130"], "divisible by 4"),
    ("scan_backend_name", ["--model.net.scan_backend", "fast"], "scan_backend must be one of"),
    ("path_type", ["--model.path_type", "cosine"], "path_type"),
    ("prediction", ["--model.prediction", "eps"], "prediction"),
    ("weight_with_velocity", ["--model.loss_weight", "velocity"], "loss_weight"),
    ("lr", ["--model.lr", "0"], "model.lr must be > 0"),
    ("lr_schedule", ["--model.lr_schedule", "step"], "model.lr_schedule"),
    ("sample_method", ["--model.sample_method", "euler2"], "method"),
    ("sample_mode", ["--model.sample_mode", "gibbs"], "model.sample_mode"),
    (
        "diffusion_form",
        ["--model.sample_mode", "sde", "--model.sample_method", "Euler", "--model.diffusion_form", "cubic"],
        "diffusion_form",
    ),
    ("guidance_unconditional", ["--model.guidance_scale", "2.0"], "guidance_scale"),
    ("preset", ["--model.preset", "zigzag8_b1"], "model.preset='zigzag8_b1'"),
    ("ema_decay", ["--model.ema_decay", "1.5"], "ema decay"),
    ("ema_update_every", ["--model.ema_update_every", "0"], "update_every"),
    ("warmup", ["--model.warmup_steps", "-1"], "model.warmup_steps"),
    ("train_eps", ["--model.train_eps", "0.7"], "eps"),
    (
        "time_distribution",
        ["--model.time_distribution", "normal"],
        "time_distribution='normal' is not a valid TimeDistribution; allowed values: 'uniform', 'logit_normal'",
    ),
    ("max_nonfinite", ["--model.max_nonfinite_steps", "0"], "max_nonfinite_steps"),
    ("image_size", ["--data.init_args.image_size", "0"], "data.image_size"),
    ("batch_size", ["--data.init_args.batch_size", "0"], "data.batch_size"),
    ("predict_count", ["--data.init_args.num_predict_samples", "0"], "data.num_predict_samples must be >= 1; got 0"),
    ("predict_batch", ["--data.init_args.predict_batch_size", "0"], "data.predict_batch_size must be >= 1; got 0"),
    ("missing_ckpt", ["--ckpt_path", "missing.ckpt"], "ckpt_path='missing.ckpt': file not found"),
    ("missing_config", ["--config", "configs/missing.yaml"], "missing.yaml"),
    ("unknown_key", ["--model.nope", "1"], "nope"),
    ("unknown_data_class", ["--data", "datamodules.NoSuchDataModule"], "NoSuchDataModule"),
    ("precision_value", ["--trainer.precision", "13-mixed"], "trainer.precision"),
    ("precision_unsupported_here", ["--trainer.precision", "transformer-engine"], "transformer"),
    ("gpu_on_cpu_machine", ["--trainer.accelerator", "gpu"], "gpu"),
    ("fid_one_sample", ["--fid.num_samples", "1"], "fid.num_samples=1: a covariance needs at least 2 samples"),
    (
        "fid_missing_inception",
        ["--fid.num_samples", "10", "--fid.weights_path", "nowhere.pth"],
        "Inception-v3 FID weights not found at nowhere.pth",
    ),
    ("fvd_missing_i3d", ["--fvd.num_samples", "4", "--fvd.frame_fid", "false"], "I3D detector for FVD not found"),
    ("fid_reference_count", ["--fid.num_samples", "0", "--fid.reference_count", "1"], "fid.reference_count=1"),
]


@pytest.mark.parametrize(("args", "expected"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_configuration_fails_before_training(args, expected, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", *QUICKSTART, "--trainer.logger.init_args.save_dir", str(tmp_path), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err, err[-1500:]
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO", "Seed set"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines  # one line, no usage dump or traceback
    assert not (tmp_path / "quickstart").exists()  # no run directory: nothing started


def test_there_are_at_least_30_distinct_cases():
    assert len({case[0] for case in BAD}) >= 30


def test_devices_must_match_slurm_tasks(monkeypatch, capsys, tmp_path):
    for key, value in {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_JOB_NAME": "zigma", "SLURM_NODELIST": "n1",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", *QUICKSTART, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "trainer.devices=1 x trainer.num_nodes=1 != SLURM_NTASKS=4" in capsys.readouterr().err
