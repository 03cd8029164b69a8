"""Image and video metrics without Lightning: Gaussian feature statistics, FID's Inception and
FVD's I3D extractors and cached reference statistics. torchmetrics, torch-fidelity and PIL are imported only when
used."""

from zigma.metrics.frechet import GaussianStats
from zigma.metrics.i3d import I3DFeatures, load_i3d, to_i3d_layout
from zigma.metrics.inception import INCEPTION_WEIGHTS_FILE, InceptionFeatures, load_inception, to_uint8
from zigma.metrics.reference import compute_stats, load_reference, reference_stats

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "GaussianStats",
    "I3DFeatures",
    "InceptionFeatures",
    "compute_stats",
    "load_i3d",
    "load_inception",
    "load_reference",
    "reference_stats",
    "to_i3d_layout",
    "to_uint8",
]
