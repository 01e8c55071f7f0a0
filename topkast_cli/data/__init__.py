"""Datasets: each config in conf/dataset/ names a DataModule class with `_target_`."""

from .base import DataModule, EpochSampler

__all__ = ["DataModule", "EpochSampler"]
