"""Lightning callbacks for ZigMa runs: sample grids and prediction writers."""

from callbacks.performance import PerformanceSwitches
from callbacks.samples import SampleGridLogger, SampleWriter

__all__ = ["PerformanceSwitches", "SampleGridLogger", "SampleWriter"]
