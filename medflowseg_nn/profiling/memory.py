"""Exact accounting of the activation memory a training forward keeps for backward (no nnU-Net import).

nnU-Net's planner sizes patch and batch from ``compute_conv_feature_map_size`` (activation elements stored for
backward at batch size 1). :func:`measure_saved_for_backward` measures that quantity on any network and device
with :func:`torch.autograd.graph.saved_tensors_hooks`: every tensor autograd saves during the forward goes
through the pack hook, which records its untyped storage once (views and in-place results share a storage, so a
storage is counted once whatever number of nodes save it). Parameters and buffers are model state, not
activations: their storages are counted separately (``param_bytes``) and left out of ``bytes`` / ``elements``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["SavedTensorStats", "count_saved_tensors", "measure_saved_for_backward"]


@dataclasses.dataclass
class SavedTensorStats:
    """What autograd saved for backward. ``elements`` counts real values (a complex element is 2), so it is in
    the unit of ``compute_conv_feature_map_size``; ``bytes`` is the memory of those storages."""

    bytes: int = 0
    elements: int = 0
    n_saved: int = 0  # pack-hook calls (tensors saved, with repeats)
    n_storages: int = 0  # distinct activation storages
    param_bytes: int = 0  # saved parameter / buffer storages, not in ``bytes``
    bytes_by_dtype: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def megabytes(self) -> float:
        return self.bytes / 2 ** 20


def _real_elements(storage_bytes: int, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return storage_bytes * (2 if dtype.is_complex else 1) // size


@contextlib.contextmanager
def count_saved_tensors(exclude: Iterable[Tensor] = ()) -> Iterator[SavedTensorStats]:
    """Context manager: count the storages of every tensor saved for backward inside the block.

    ``exclude``: tensors (parameters, buffers) whose storages are model state; counted in ``param_bytes``.
    The saved tensors are referenced until the block exits, so no storage is freed and its address reused while
    counting (a freed-then-reused address would otherwise be counted once instead of twice).
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    stats = SavedTensorStats()
    seen: set[int] = set()
    keep: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        stats.n_saved += 1
        if t.layout != torch.strided:  # sparse / nested: no single untyped storage; not used by our networks
            logger.warning("saved tensor with layout %s not counted", t.layout)
            return t
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in seen or nbytes == 0:
            return t
        seen.add(ptr)
        keep.append(t)
        if ptr in excluded:
            stats.param_bytes += nbytes
            return t
        stats.n_storages += 1
        stats.bytes += nbytes
        stats.elements += _real_elements(nbytes, t.dtype)
        key = str(t.dtype).replace("torch.", "")
        stats.bytes_by_dtype[key] = stats.bytes_by_dtype.get(key, 0) + nbytes
        return t

    def unpack(t: Tensor) -> Tensor:
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield stats
    finally:
        keep.clear()


def _first_tensor(out: object) -> Tensor:
    return out[0] if isinstance(out, (list, tuple)) else out  # type: ignore[index,return-value]


def measure_saved_for_backward(net: nn.Module, inputs: Sequence[Tensor], backward: bool = True,
                               forward: Callable[..., object] | None = None) -> SavedTensorStats:
    """Activation storages saved during one training forward of ``net(*inputs)``; then (``backward``) one
    backward of ``output.float().mean()`` to check the graph runs. Train mode, gradients on, restored after.

    ``forward`` replaces ``net`` as the callable (e.g. a lambda that routes inputs); parameters still come from
    ``net``. Only the forward is counted: the loss's own saved tensors are not part of the network.
    """
    was_training = net.training
    net.train()
    state = list(net.parameters()) + list(net.buffers())
    try:
        with torch.enable_grad():
            net.zero_grad(set_to_none=True)
            with count_saved_tensors(exclude=state) as stats:
                out = _first_tensor((forward or net)(*inputs))
            if backward:
                out.float().mean().backward()
            del out
        net.zero_grad(set_to_none=True)
    finally:
        net.train(was_training)
    logger.debug("saved for backward: %d tensors, %d storages, %.1f MB (%s), params %.1f MB", stats.n_saved,
                 stats.n_storages, stats.megabytes, stats.bytes_by_dtype, stats.param_bytes / 2 ** 20)
    return stats
