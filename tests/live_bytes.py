"""The engine tests' memory tracker: the peak of live tensor bytes, counted op by op (a ``TorchDispatchMode``)."""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Peak of the summed sizes of tensor storages produced by ops and still referenced."""

    def __init__(self) -> None:
        super().__init__()
        self.tracked: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.tracked.items() if ref.expired()]:
            self.live -= self.tracked.pop(key)[1]
        # Views and in-place results alias an input (a parameter's detach, W_U.T): they allocate nothing.
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.tracked and key not in inputs:
                    self.tracked[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        return out
