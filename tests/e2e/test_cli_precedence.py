"""What a checkpoint decides and what the command line decides (issue 13, deliverables 1 and 3), and one-line errors
for mistyped keys and unwritable run directories (deliverable 4), through ``cli.main`` in-process.

The rule: with ``--ckpt_path`` the checkpoint fixes the architecture (``model.net``, ``model.preset``,
``model.cond_dropout_prob``; a conflicting value given is refused), and every other setting given on the command line
or in a config takes effect over the one saved in the checkpoint.
"""

from __future__ import annotations

import logging
import os
import subprocess

import pytest
import torch
import yaml

from tests.e2e.helpers import QUICKSTART, tensorboard_scalars
from zigma.flow_module import lr_lambda
from zigma_lightning import cli

pytestmark = pytest.mark.slow


def run(*args: str, save_dir) -> cli.ZigMaCLI:
    return cli.main([*args, "--trainer.logger.init_args.save_dir", str(save_dir)])


def refused(capsys, *args: str, save_dir) -> str:
    """Run ``args``, expect exit status 2 and return the single line written to stderr (besides log records)."""
    with pytest.raises(SystemExit) as exit_info:
        run(*args, save_dir=save_dir)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.strip() and not line.startswith(("INFO", "Seed set"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def saved_config(save_dir) -> dict:
    (path,) = save_dir.rglob("config.yaml")
    return yaml.safe_load(path.read_text())


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of the tiny quickstart model (lr 0.002, sample_steps 3), started with ``--ckpt_path last`` in an
    empty directory: fit starts from scratch with a warning. Returns the last checkpoint."""
    runs = tmp_path_factory.mktemp("runs")
    records = Records()
    logging.getLogger("zigma.cli").addHandler(records)
    try:
        run("fit", *QUICKSTART, "--trainer.max_steps", "2", "--ckpt_path", "last", save_dir=runs)
    finally:
        logging.getLogger("zigma.cli").removeHandler(records)
    assert any("ckpt_path=last: no readable checkpoint" in m and "starting from scratch" in m for m in records.messages)
    ckpt = runs / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True, mmap=True)["global_step"] == 2
    return ckpt


def test_predict_sampler_flags_take_effect(trained, tmp_path):
    """The README's sampler flags change the samples (they were replaced by the checkpoint's values before)."""
    pngs = {}
    for steps in (2, 25):
        out = tmp_path / f"samples{steps}"
        run("predict", *QUICKSTART, "--ckpt_path", str(trained), "--model.sample_steps", str(steps),
            "--data.init_args.num_predict_samples", "1", "--predict_writer.output_dir", str(out),
            "--predict_writer.grid", "false", save_dir=tmp_path / f"runs{steps}")  # fmt: skip
        pngs[steps] = (out / "000000.png").read_bytes()
        assert saved_config(tmp_path / f"runs{steps}")["model"]["sample_steps"] == steps
    assert pngs[2] != pngs[25]


def test_resumed_run_trains_with_the_new_lr_and_says_so(trained, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="zigma.cli")
    result = run("fit", *QUICKSTART, "--ckpt_path", str(trained), "--trainer.max_steps", "3", "--model.lr", "0.001",
                 "--model.ema_decay", "0.9", save_dir=tmp_path)  # fmt: skip
    (changed,) = [r.getMessage() for r in caplog.records if "take effect" in r.getMessage()]
    assert changed.endswith("take effect: lr: 0.004 -> 0.001, ema_decay: 0.99 -> 0.9"), changed
    # the optimizer and the schedule follow the new lr (Lightning restored the old ones from the checkpoint)
    optimizer = result.trainer.optimizers[0]
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.001, 0.001]
    assert result.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [0.001, 0.001]
    # quickstart: 50 warm-up steps, cosine over max_steps; the resumed step 2 trained with the new lr
    expected = 0.001 * lr_lambda(2, 50, 3, "cosine", 0.1)
    scalars = tensorboard_scalars(tmp_path)
    assert scalars["lr/pg1"] == scalars["lr/pg2"] == [(2, pytest.approx(expected, rel=1e-6))]  # LearningRateMonitor
    assert result.model.ema.decay == 0.9
    config = saved_config(tmp_path)["model"]
    assert (config["lr"], config["ema_decay"], config["net"]["depth"]) == (0.001, 0.9, 2)
    # TensorBoard hides what a killed process logged after the checkpoint: purge_step set in the logger's config
    assert saved_config(tmp_path)["trainer"]["logger"]["init_args"]["purge_step"] == 2
    saved = torch.load(tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3 and saved["hyper_parameters"]["lr"] == 0.001


def test_architecture_comes_from_the_checkpoint_when_not_given(trained, tmp_path):
    """No model config at all: the checkpoint's ``model.net`` builds the network, and config.yaml records it."""
    result = run("predict", "--data", "datamodules.EmbeddedFacesDataModule", "--data.init_args.num_predict_samples",
                 "1", "--model.sample_steps", "2", "--predict_writer.output_dir", str(tmp_path / "samples"),
                 "--ckpt_path", str(trained), save_dir=tmp_path)  # fmt: skip
    assert (result.model.model.config["depth"], result.model.model.config["embed_dim"]) == (2, 16)
    assert saved_config(tmp_path)["model"]["net"]["depth"] == 2
    assert (tmp_path / "samples" / "000000.png").is_file()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.net.depth", "3"], "model.net.depth=3 (checkpoint: 2)"),
        (["--model.preset", "zigzag8_b1_pe2"], "model.preset='zigzag8_b1_pe2' (checkpoint: None)"),
        (["--model.cond_dropout_prob", "0.1"], "model.cond_dropout_prob=0.1 (checkpoint: 0.0)"),
    ],
)
def test_conflicting_architecture_is_refused_in_one_line(trained, tmp_path, capsys, args, expected):
    line = refused(capsys, "predict", *QUICKSTART, "--ckpt_path", str(trained), *args, save_dir=tmp_path)
    assert line.startswith(f"error: {expected}: the checkpoint {trained} fixes the architecture"), line


def test_the_quickstart_config_does_not_fit_a_tiny_checkpoint(trained, tmp_path, capsys):
    """A config whose architecture differs is refused too, naming every conflict and where the run's config is."""
    line = refused(capsys, "predict", "--config", "configs/quickstart.yaml", "--ckpt_path", str(trained),
                   save_dir=tmp_path)  # fmt: skip
    assert "model.net.embed_dim=128 (checkpoint: 16), model.net.depth=4 (checkpoint: 2)" in line
    assert f"(its run's settings: {trained.parent.parent / 'config.yaml'})" in line


def test_data_that_does_not_fit_the_checkpoint_is_refused_without_advice_to_change_the_model(trained, tmp_path,
                                                                                             capsys):  # fmt: skip
    """The model/data check no longer tells to set a model.net value the checkpoint would refuse."""
    line = refused(capsys, "predict", *QUICKSTART, "--ckpt_path", str(trained), "--data.init_args.image_size", "16",
                   save_dir=tmp_path)  # fmt: skip
    assert line == (
        f"error: model.net.img_dim=32 does not match the data: EmbeddedFacesDataModule yields samples of "
        f"shape (1, 16, 16); the checkpoint {trained} fixes the architecture: use data that fits it"
    )


def test_runtime_keys_of_net_may_differ(trained, tmp_path, caplog):
    """scan_backend and drop_path_rate change how the network runs, not its weights: given, they win."""
    caplog.set_level(logging.INFO, logger="zigma.cli")
    result = run("predict", *QUICKSTART, "--ckpt_path", str(trained), "--model.net.scan_backend", "torch",
                 "--data.init_args.num_predict_samples", "1", "--model.sample_steps", "2",
                 "--predict_writer.output_dir", str(tmp_path / "samples"), save_dir=tmp_path)  # fmt: skip
    assert result.model.model.config["scan_backend"] == "torch"
    assert any("net.scan_backend: None -> 'torch'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("subcommand", ["predict", "validate", "test"])
def test_evaluation_without_a_checkpoint_is_refused(subcommand, tmp_path, capsys):
    line = refused(capsys, subcommand, *QUICKSTART, "--ckpt_path", "last", save_dir=tmp_path)
    assert line == (f"error: ckpt_path=last: no readable checkpoint under {tmp_path / 'quickstart'} to {subcommand} "
                    "with; train first (python cli.py fit ...) or pass a checkpoint file")  # fmt: skip
    line = refused(capsys, subcommand, *QUICKSTART, save_dir=tmp_path)
    assert line.startswith(f"error: {subcommand} needs --ckpt_path")
    assert not (tmp_path / "quickstart").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.net.embed_dimm", "8"],
         "unknown key 'embed_dimm' in model.net (zigma.flow_module.ZigMaArgs); did you mean embed_dim?"),
        (["--data.init_args.batch_sizee", "8"],
         "unknown key 'batch_sizee' in data (datamodules.EmbeddedFacesDataModule); did you mean batch_size?"),
        (["--trainer.max_stepss", "8"], "unknown option --trainer.max_stepss; did you mean --trainer.max_steps?"),
        (["--nope", "1"], "unknown option --nope (see --help for the options)"),
        (["--model.net.ssm_cfg.d_statee", "8"], "ssm_cfg: unknown key 'd_statee'; did you mean d_state?"),
        (["--model.lr", "fast"], "model.lr: Expected a <class 'float'>. Got value: fast"),
    ],
)  # fmt: skip
def test_mistyped_keys_fail_in_one_line_with_a_suggestion(tmp_path, capsys, args, expected):
    assert refused(capsys, "fit", *QUICKSTART, *args, save_dir=tmp_path) == f"error: {expected}"


def test_a_run_directory_that_cannot_be_created_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = refused(capsys, "fit", *QUICKSTART, save_dir=blocker / "runs")
    assert line.startswith(f"error: cannot write to {blocker / 'runs' / 'quickstart'}: {blocker} is not a directory")


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write to: a read-only tmpfs as root (permission bits do not stop root), else mode 500."""
    directory = tmp_path / "read_only"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o500)
        yield directory
        directory.chmod(0o700)
        return
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(directory)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"root, and cannot mount a read-only tmpfs: {mount.stderr.decode().strip()}")
    yield directory
    subprocess.run(["umount", str(directory)], check=True)


def test_a_read_only_run_directory_is_refused_before_training(read_only_dir, tmp_path, capsys):
    line = refused(capsys, "fit", *QUICKSTART, save_dir=read_only_dir)
    assert line.startswith(f"error: cannot write to {read_only_dir / 'quickstart'}: "), line
    assert line.endswith("; set trainer.logger.init_args.save_dir to a writable directory or fix its permissions")


def test_a_read_only_sample_directory_is_refused_before_predicting(trained, read_only_dir, tmp_path, capsys):
    out = read_only_dir / "samples"
    line = refused(capsys, "predict", *QUICKSTART, "--ckpt_path", str(trained), "--predict_writer.output_dir", str(out),
                   save_dir=tmp_path)  # fmt: skip
    assert line.startswith(f"error: cannot write to {out}: ") and "set predict_writer.output_dir" in line, line
