"""Lightning callbacks for ZigMa runs: sample grids and clips, prediction writers, FID/FVD evaluation."""

from callbacks.evaluation import FIDEvaluation, FVDEvaluation
from callbacks.performance import PerformanceSwitches
from callbacks.samples import SampleGridLogger, SampleWriter

__all__ = ["FIDEvaluation", "FVDEvaluation", "PerformanceSwitches", "SampleGridLogger", "SampleWriter"]
