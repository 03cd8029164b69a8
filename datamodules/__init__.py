"""LightningDataModules for ZigMa: the embedded default faces and webdataset shards of images, latents and video."""

from datamodules.base import SampleRequests, ZigMaDataModule
from datamodules.embedded import EmbeddedFacesDataModule
from datamodules.webdataset import VideoWebDataModule, WebDataModule

__all__ = ["EmbeddedFacesDataModule", "SampleRequests", "VideoWebDataModule", "WebDataModule", "ZigMaDataModule"]
