"""The pieces of ``ArgumentDiagnosis`` (the CLI's one-line messages for refused arguments are asserted end to end in
tests/e2e/test_cli_precedence.py and tests/e2e/test_bad_configs.py)."""

from __future__ import annotations

from typing import Literal

import pytest

from tests.e2e.helpers import QUICKSTART
from zigma_lightning import cli
from zigma_lightning.arguments import class_of, closest_key, given_flags, literal_choices, without


def test_given_flags_reads_separate_and_joined_values_and_appends():
    args = ["--config", "a.yaml", "--model.lr=0.1", "--print_config", "--trainer.callbacks+=X", "--x", "1"]
    assert given_flags(args) == [(0, "config", "a.yaml"), (2, "model.lr", "0.1"), (3, "print_config", None),
                                 (4, "trainer.callbacks", "X"), (5, "x", "1")]  # fmt: skip
    assert without(args, 0) == args[2:] and without(args, 2) == [*args[:2], *args[3:]]
    assert without(args, 3) == [*args[:3], *args[4:]]


def test_closest_key_prefers_siblings():
    known = {"trainer.max_steps", "trainer.max_epochs", "model.max_steps"}
    assert closest_key("trainer.max_stepss", known) == "trainer.max_steps"
    assert closest_key("model.nope", known) is None


def test_literal_choices_and_class_of():
    assert literal_choices(Literal["a", "b"] | None) == "'a', 'b', null"
    assert literal_choices(Literal[1, 2] | Literal["x"]) == "1, 2, 'x'"
    assert literal_choices(float) is None and literal_choices(Literal["a"] | int) is None
    assert class_of(int | None) is int and class_of(int | str) is None


@pytest.mark.slow
def test_unknown_keys_in_a_config_file_are_named_with_the_file(tmp_path, capsys):
    """In-process CLI: a mistyped key inside a YAML config (not on the command line) still gets one line."""
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  net:\n    embed_dimm: 8\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", *QUICKSTART, "--config", str(config), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: unknown key 'embed_dimm' in model.net (zigma.flow_module.ZigMaArgs); did you mean "
                      f"embed_dim? in {config}"]  # fmt: skip
