"""The ``zigma`` command (``zigma_lightning.commands.main``), ``python -m zigma`` and the missing-extra line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.helpers import ROOT
from zigma_lightning import commands
from zigma_lightning.extras import missing_extra_message


def test_help_lists_the_lightning_subcommands_and_the_tools(capsys):
    assert commands.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate, test", "predict", "prepare", "reference-stats", "sample", "export"):
        assert f"\n  {name} " in out, out


def test_fit_help_is_lightning_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        commands.main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--ckpt_path" in out and "--model.lr" in out and "--predict_writer.output_dir" in out


def test_prepare_dispatches_to_the_prepare_tool(capsys):
    with pytest.raises(SystemExit) as exit_info:
        commands.main(["prepare", "--help"])
    assert exit_info.value.code == 0
    assert "images" in capsys.readouterr().out


def test_unknown_command_fails_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        commands.main(["trian"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: unknown command 'trian'; choose one of fit, validate, test, predict, prepare, reference-stats, "
        "sample, export\n"
    )


def test_a_missing_optional_dependency_names_its_extra(monkeypatch, capsys):
    def missing(argv):
        raise ModuleNotFoundError("No module named 'torch_fidelity'", name="torch_fidelity")

    monkeypatch.setitem(commands.TOOLS, "needs-eval", ("zigma_lightning.commands", "test tool"))
    monkeypatch.setattr(commands, "run_tool", lambda name, argv: missing(argv))
    with pytest.raises(SystemExit) as exit_info:
        commands.main(["needs-eval"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        'error: torch_fidelity is not installed: pip install "zigma-lightning[eval]" (from a clone: pip install -e '
        '".[eval]", or pip install -r requirements.txt)\n'
    )


@pytest.mark.parametrize(("module", "extra"), [("transformers", "text"), ("mamba_ssm.ops", "gpu"), ("torch", None)])
def test_extras_map_optional_modules_only(module, extra):
    line = missing_extra_message(module)
    assert (line is None) if extra is None else f"zigma-lightning[{extra}]" in line


def test_a_missing_non_optional_module_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(commands, "run_tool", lambda name, argv: __import__("no_such_module_zigma"))
    with pytest.raises(ModuleNotFoundError, match="no_such_module_zigma"):
        commands.main(["prepare"])


def test_python_dash_m_zigma_is_the_command():
    """One subprocess: ``python -m zigma --help`` runs the command."""
    proc = subprocess.run([sys.executable, "-m", "zigma", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == commands.usage(), proc.stderr
