"""A first run's console is clean (issue 17): no "Epoch N/-2", no "Total FLOPs: 0", no eval-mode warning."""

from __future__ import annotations

import re
import warnings

import pytest

import cli
from callbacks.console import StepLimitedRichProgressBar
from tests.e2e.helpers import QUICKSTART


def test_first_screen_of_a_step_limited_fit(tmp_path, capsys):
    """One step of the tiny quickstart with the progress bar and model summary on, as a new user would see it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = cli.main(["fit", *QUICKSTART, "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "true",
                        "--trainer.logger.init_args.save_dir", str(tmp_path)])  # fmt: skip
    screen = capsys.readouterr().out
    bars = [cb for cb in run.trainer.callbacks if isinstance(cb, StepLimitedRichProgressBar)]
    assert len(bars) == 1 and run.trainer.max_epochs == -1  # step-limited: Lightning's "unbounded" epochs
    assert "Epoch 0" in screen and not re.search(r"Epoch \d+/-", screen)
    flops = re.search(r"Total FLOPs: (\S+)", screen)
    assert flops is not None and flops.group(1) != "0", screen
    assert "Modules in eval mode: 0" in screen
    assert not [w for w in caught if "eval mode" in str(w.message)]
    # the held EMA copy follows the module's mode (train now) yet samples in eval mode (tests/zigma/test_ema.py)
    assert run.model.ema.network.training


@pytest.mark.parametrize(("max_epochs", "label"), [(-1, "Epoch 3"), (None, "Epoch 3"), (5, "Epoch 3/4")])
def test_train_label_shows_the_epoch_bound_only_when_there_is_one(max_epochs, label):
    bar = StepLimitedRichProgressBar()
    bar._trainer = type("Trainer", (), {"max_epochs": max_epochs})()
    assert bar._get_train_description(3).strip() == label
