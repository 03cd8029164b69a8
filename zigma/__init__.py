"""zigma: the ZigMa zigzag-Mamba diffusion backbone, its scan orders, objective and samplers.

Importing ``zigma`` needs only torch (and numpy/einops); Lightning is imported only by ``zigma.flow_module``.
"""

from zigma.checkpoint import from_pretrained, load_upstream_checkpoint, save_pretrained
from zigma.model import ZigMa
from zigma.presets import PRESETS, create_model
from zigma.scan import ScanSpec

__all__ = [
    "PRESETS",
    "ScanSpec",
    "ZigMa",
    "create_model",
    "from_pretrained",
    "load_upstream_checkpoint",
    "save_pretrained",
]
