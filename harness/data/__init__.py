"""Datasets the harness can evaluate on, by name."""
from __future__ import annotations

from harness.data import synthetic

DATASETS = ("shapes",)


class DatasetError(ValueError):
    """A dataset name, split or size the harness cannot use."""


def load_samples(name: str, split: str = "test", samples_per_type: int = 50) -> list:
    """Samples of a dataset; 'shapes' is the embedded synthetic benchmark (balanced over types)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if split not in synthetic.SPLITS:
        raise DatasetError(f"unknown split {split!r} of {name!r}; allowed: {', '.join(synthetic.SPLITS)}")
    if isinstance(samples_per_type, bool) or not isinstance(samples_per_type, int) or samples_per_type < 1:
        raise DatasetError(f"samples_per_type {samples_per_type!r} is invalid; allowed: an integer >= 1")
    n = samples_per_type * len(synthetic.QUESTION_TYPES)
    return [synthetic.make_sample(split, i) for i in range(n)]


def score(sample, prediction: str) -> float:
    return synthetic.score(sample.qtype, prediction, sample.answer)
