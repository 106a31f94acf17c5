"""Counting the calls that make the host wait for the GPU, for finding and testing host syncs.

On a GPU, a call whose result the host must read before it goes on (a data-dependent size, a
value read back) waits for every kernel queued before it, and the GPU then idles until Python
has queued the next ones. ``HostReads`` finds such calls on any device, the CPU included, by
their ATen operator; ``cuda_syncs`` counts what CUDA itself reports as synchronising (device-to-
host copies too) on a GPU.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Records the operator calls, made under it, whose result the host must read: data-dependent
    sizes (``nonzero``, ``unique``, ``masked_select``, NMS, indexing by a bool mask) and values
    read back (``item``). ``calls`` lists their names in order."""

    READS = {"nonzero", "_local_scalar_dense", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
             "masked_select", "equal", "is_nonzero", "nms"}
    INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in self.READS or (name in self.INDEXING and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))

    def summary(self) -> str:
        """``"N (name count, ...)"``, the most frequent first."""
        counts = Counter(self.calls).most_common()
        return f"{len(self.calls)} ({', '.join(f'{name} {n}' for name, n in counts)})" if counts else "0"


@contextmanager
def cuda_syncs() -> Iterator[list[str]]:
    """The synchronising CUDA calls made under it, one message each, from
    ``torch.cuda.set_sync_debug_mode("warn")``."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))
