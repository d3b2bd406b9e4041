"""Batches of :class:`pipeline.read.dataset.FeatureDataset` items without a stacking copy.

:meth:`pipeline.read.dataset.FeatureDataset.__getitems__` writes a batch's features into one tensor
(:func:`new_batch`: in shared memory inside a DataLoader worker) and :func:`collate_features` hands that tensor on
as the batch's ``features`` instead of stacking the items again.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["collate_features", "new_batch"]


def new_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty float32 batch tensor; in shared memory inside a DataLoader worker, so sending it to the main process
    copies nothing (what ``default_collate`` does for the tensors it stacks)."""
    if torch.utils.data.get_worker_info() is not None:
        n = int(np.prod(shape))
        storage = torch.UntypedStorage._new_shared(n * 4)
        return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)
    return torch.empty(shape, dtype=torch.float32)


def collate_features(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` for :class:`FeatureDataset` items, without copying features that already sit in one batch
    tensor (as :meth:`FeatureDataset.__getitems__` returns them): ``features`` becomes that tensor."""
    from torch.utils.data import default_collate

    feats = [it["features"] for it in items]
    base = feats[0]
    shared = (
        base.dim() == 3
        and base.storage_offset() == 0
        and all(f.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() for f in feats)
        and all(f.storage_offset() == j * base.numel() for j, f in enumerate(feats))
        and base.untyped_storage().nbytes() == len(feats) * base.numel() * base.element_size()
    )
    if not shared:
        return default_collate(items)
    rest = default_collate([{k: v for k, v in it.items() if k != "features"} for it in items])
    rest["features"] = base.as_strided((len(feats), *base.shape), (base.numel(), *base.stride()), 0)
    return rest
