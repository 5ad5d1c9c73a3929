# Copyright the dit-hf authors. Licensed under the Apache License, Version 2.0.
"""Collate functions of the training data sets (`CachedImages`, the latent caches), apart from `dit_hf.data` so that
the latent caches load where `datasets` is not installed (e.g. the benchmarks on a bare GPU machine).

A data set that delivers whole batches names its collate function as its `collate` attribute; the trainer's data
loader uses it.
"""

import torch


def whole_batch_collate(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`collate_fn` for data sets whose `__getitems__` returns a whole batch (a dict of stacked tensors) at once."""
    if not isinstance(batch, dict):
        raise TypeError(
            "This collate_fn expects the dict made by the data set's __getitems__ (a whole batch), not a list."
        )
    return batch
