"""Datasets and grain pipelines."""
from jaxopd.data.pipeline import batched_iterator, group_rows
from jaxopd.data import toy

__all__ = ["batched_iterator", "group_rows", "toy"]
