"""LightningDataModules for ZigMa: the embedded default faces and webdataset shards of images, latents and video.

The DataModules are imported on first use (``datamodules.WebDataModule``), so that the data tools
(``datamodules.prepare``, ``datamodules.images``, ...) and their worker processes do not import Lightning.
"""

import importlib

_HOMES = {
    "SampleRequests": "datamodules.base",
    "ZigMaDataModule": "datamodules.base",
    "EmbeddedFacesDataModule": "datamodules.embedded",
    "EmbeddedDigitsDataModule": "datamodules.embedded",
    "VideoWebDataModule": "datamodules.webdataset",
    "WebDataModule": "datamodules.webdataset",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = [
    "EmbeddedDigitsDataModule",
    "EmbeddedFacesDataModule",
    "SampleRequests",
    "VideoWebDataModule",
    "WebDataModule",
    "ZigMaDataModule",
]
