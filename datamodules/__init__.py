"""LightningDataModules for ZigMa: the embedded default faces (and, later, webdataset images/latents/video)."""

from datamodules.base import SampleRequests, ZigMaDataModule
from datamodules.embedded import EmbeddedFacesDataModule

__all__ = ["EmbeddedFacesDataModule", "SampleRequests", "ZigMaDataModule"]
