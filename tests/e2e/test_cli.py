"""The training application through cli.py, in subprocesses: fit, TensorBoard, checkpoints, resume, predict,
--print_config, and configuration errors."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.e2e.helpers import QUICKSTART, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short quickstart-shaped fit (4 steps), shared by the tests below."""
    runs = tmp_path_factory.mktemp("runs")
    proc = run_cli("fit", *QUICKSTART, runs=runs)
    version = runs / "quickstart" / "version_0"
    return runs, version, proc


def scalar_tags(version):
    acc = EventAccumulator(str(version), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_fit_writes_tensorboard_tags_and_checkpoints(trained):
    _, version, _ = trained
    acc = scalar_tags(version)
    scalars = set(acc.Tags()["scalars"])
    # ThroughputMonitor: device/ tags per process (global train/samples_per_sec is added with > 1 process)
    for tag in [
        "train/loss",
        "lr/pg1",  # LearningRateMonitor: decayed and not decayed parameter groups
        "lr/pg2",
        "grad_norm",
        "train/device/samples_per_sec",
        "train/device/flops_per_sec",
        "val/loss",
    ]:
        assert tag in scalars, (tag, sorted(scalars))
    assert "samples/ema" in acc.Tags()["images"]
    assert len(acc.Scalars("val/loss")) == 2  # after optimizer steps 2 and 4
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    ckpts = sorted(p.name for p in (version / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step000002.ckpt", "step000004.ckpt"]
    assert (version / "config.yaml").is_file()


def test_checkpoint_is_plain_and_holds_raw_and_ema_weights(trained):
    _, version, _ = trained
    ckpt = torch.load(version / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 4
    keys = ckpt["state_dict"].keys()
    assert "model.x_embedder.proj.weight" in keys and "ema.network.x_embedder.proj.weight" in keys
    assert int(ckpt["state_dict"]["ema.num_updates"]) == 4
    assert ckpt["zigma"]["scan"] == "zigzagN8" and ckpt["zigma"]["config"]["embed_dim"] == 16
    assert not any(k.startswith("ema.network") and "path" in k for k in keys)
    assert len(ckpt["optimizer_states"]) == 1 and len(ckpt["lr_schedulers"]) == 1
    raw, ema = (
        ckpt["state_dict"]["model.final_layer.linear.weight"],
        ckpt["state_dict"]["ema.network.final_layer.linear.weight"],
    )
    assert not torch.equal(raw, ema)


def test_resume_from_last_restores_step_optimizer_scheduler_and_ema(trained, tmp_path):
    runs, version, _ = trained
    probe = tmp_path / "probe.pt"
    last = torch.load(version / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    run_cli("fit", *QUICKSTART, "--ckpt_path", "last", "--trainer.max_steps", "6",
            "--trainer.callbacks+=tests.e2e.helpers.StateProbe", runs=runs,
            env={"ZIGMA_STATE_PROBE": str(probe)})  # fmt: skip
    state = torch.load(probe, weights_only=True)
    assert state["global_step"] == 4
    for key, value in last["state_dict"].items():
        torch.testing.assert_close(state["state_dict"][key], value, rtol=0, atol=0, msg=key)
    saved_opt = last["optimizer_states"][0]["state"]
    assert saved_opt.keys() == state["optimizer"]["state"].keys()
    for idx, entry in saved_opt.items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state["optimizer"]["state"][idx][name], entry[name], rtol=0, atol=0)
    assert state["scheduler"]["last_epoch"] == last["lr_schedulers"][0]["last_epoch"] == 4
    # the same TensorBoard run continues (no new version directory), and it reaches step 6
    assert sorted(p.name for p in (runs / "quickstart").iterdir()) == ["version_0"]
    final = torch.load(version / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert final["global_step"] == 6


def test_predict_writes_requested_images_and_grid(trained, tmp_path):
    _, version, _ = trained
    out = tmp_path / "samples"
    run_cli("predict", *QUICKSTART, "--ckpt_path", str(version / "checkpoints" / "step000004.ckpt"),
            "--predict_writer.output_dir", str(out), "--data.init_args.num_predict_samples", "5",
            "--model.sample_method", "heun", "--model.sample_steps", "3", "--model.sample_seed", "3",
            runs=tmp_path / "predict_runs")  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "grid.png", "shards"]


def _printed_config(capsys, *args: str) -> str:
    """``cli.main(["fit", *args, "--print_config"])`` in-process: the YAML it prints (it exits 0 when done)."""
    import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_print_config_round_trips(tmp_path, capsys):
    first = _printed_config(capsys, *QUICKSTART)
    saved = tmp_path / "printed.yaml"
    saved.write_text(first)
    second = _printed_config(capsys, "--config", str(saved))
    assert first == second and "scan_type: zigzagN8" in first


# One bad-config case through the real entry point (a subprocess: exit status, stderr); the other cases run
# in-process in tests/e2e/test_bad_configs.py, which holds every case that was listed here.
@pytest.mark.parametrize(
    ("args", "expected"),
    [(["--model.net.img_dim", "16"], "model.net.img_dim=16 does not match the data")],
)
def test_bad_configuration_fails_before_training_with_one_line(tmp_path, args, expected):
    proc = run_cli("fit", *QUICKSTART, *args, runs=tmp_path, check=False, timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Training:" not in proc.stderr and not (tmp_path / "quickstart").exists()
