"""Shared test settings: make the repository importable and keep CPU tests deterministic and small."""

import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. The flag must be set before anything imports triton (the
# Lightning Trainer does), since triton.language's own @jit helpers are wrapped according to it at import time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
