"""Datasets and grain pipelines."""
from jaxopd.data.pipeline import batched_iterator
from jaxopd.data import toy

__all__ = ["batched_iterator", "toy"]
