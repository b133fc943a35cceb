"""Irregularly sampled time series: per-subject records, padded batches, normalisation, loaders.

The batch format (:class:`IrregularBatch`) keeps each sample's own observation times, padded to
the longest sample, with a per-entry observation ``mask`` and a per-time-point ``valid`` flag;
see :func:`collate_series` for the padding conventions.

References
----------
Rubanova, Chen, Duvenaud, "Latent ODEs for Irregularly-Sampled Time Series", NeurIPS 2019.
"""

from .batch import IrregularBatch, collate_series
from .csv_loader import load_csv
from .dataset import IrregularDataset, SubjectSeries
from .normalize import Normalizer, split_and_normalize
from .pbcseq import PBCSEQ_CHANNELS, PBCSEQ_LOG_CHANNELS, load_pbcseq
from .physionet import (
    PHYSIONET_DESCRIPTORS,
    PHYSIONET_PAPER_CHANNELS,
    PHYSIONET_TIME_SERIES,
    load_physionet,
)

__all__ = [
    "PBCSEQ_CHANNELS",
    "PBCSEQ_LOG_CHANNELS",
    "PHYSIONET_DESCRIPTORS",
    "PHYSIONET_PAPER_CHANNELS",
    "PHYSIONET_TIME_SERIES",
    "IrregularBatch",
    "IrregularDataset",
    "Normalizer",
    "SubjectSeries",
    "collate_series",
    "load_csv",
    "load_pbcseq",
    "load_physionet",
    "split_and_normalize",
]
