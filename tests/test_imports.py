"""Module boundaries: importing zigma needs only torch; Lightning stays out of sys.modules."""

import subprocess
import sys

from tests.conftest import ROOT


def test_import_zigma_does_not_import_lightning():
    code = (
        "import sys, zigma, zigma.ops, zigma.scan, zigma.model, zigma.presets, zigma.checkpoint, zigma.__main__\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'triton', 'mamba_ssm', 'selective_scan_cuda', "
        "'torch._dynamo') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
