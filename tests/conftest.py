"""Shared test settings: make the repository importable and keep CPU tests deterministic and small."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
