"""Lightning callbacks for ZigMa runs: sample grids and prediction writers."""

from callbacks.samples import SampleGridLogger, SampleWriter

__all__ = ["SampleGridLogger", "SampleWriter"]
