"""Micro-batches for the training step on the CPU: the batch's rows in consecutive chunks, each through forward and
backward on its own, the gradients accumulated, then one clip and one optimiser step per batch, as in nnU-Net.

Why: on the CPU the vector field's forward + backward over a large batch costs more per row than over smaller
chunks of it. Measured on this project's 2-vCPU machines (``benchmarks/RESULTS.md``, 2026-12-05 17:45), 2d
Hippocampus plans (batch 277, patch 56×40), glibc thresholds raised: 7.4 s for the whole batch, 5.6 s as two chunks
of 139 / 138 rows — every operator was faster per row in the chunks (convolutions forward 2.3 → 1.3 s, norms 0.40 →
0.20 s, ``cat`` 0.18 → 0.03 s): maps of 80–160 MiB per tensor against 40–80 MiB. 3d_fullres (batch 7): 9.8 → 8.4 s.
On an accelerator the split would only cost parallelism, so CUDA keeps one chunk.

What changes against one chunk: the per-row loss terms (flow MSE, cross-entropy) are the same up to float rounding;
the batch soft Dice of the flow loss and nnU-Net's Dice of the deep-supervision heads are taken over each chunk's
rows (the loss of a chunk is weighted by its share of the rows); t and the priors are drawn per chunk from the same
distributions. Under DDP (torchrun) each rank keeps its whole batch: the ranks' batches can differ by a row, and
the batch Dice's all-gather needs the same number of chunks on every rank.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

#: ``[B, …]`` tensor or nnU-Net's deep-supervision list of them
Rows = Union[torch.Tensor, list[torch.Tensor]]


def micro_batch_slices(batch_size: int, max_rows: int) -> list[slice]:
    """``batch_size`` rows in ``ceil(batch_size / max_rows)`` consecutive chunks, the larger ones first, sizes
    differing by at most one (277 rows, at most 117 each: 93 + 92 + 92)."""
    if batch_size < 1 or max_rows < 1:
        raise ValueError(f"batch_size and max_rows must be positive, got {batch_size} and {max_rows}")
    chunks = math.ceil(batch_size / max_rows)
    size, larger = divmod(batch_size, chunks)
    bounds = [0]
    for i in range(chunks):
        bounds.append(bounds[-1] + size + (i < larger))
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def rows_of(x: Rows, rows: slice) -> Rows:
    """The rows ``rows`` of a tensor, or of every tensor of a deep-supervision list."""
    return [s[rows] for s in x] if isinstance(x, (list, tuple)) else x[rows]


def rows_within(budget_mib: Optional[float], features: Union[int, Sequence[int]], patch_size: Sequence[int],
                batch_size: int, network_rows_per_row: int = 1, element_bytes: int = 4) -> int:
    """Loader rows per micro-batch so that the largest feature map — the decoder's concatenation at full
    resolution, ``2 × features`` channels over the patch (``features``: the first stage's, or the plans' list per
    stage), ``network_rows_per_row`` network rows per loaded row — stays within ``budget_mib`` (float32 on the
    CPU); ``batch_size`` (one chunk) when the budget is ``None``. Never below one row. The 64 MiB default was the
    fastest split measured in 2d (3 chunks of 277 rows) and 3d_fullres (4 chunks of 7)."""
    if budget_mib is None:
        return batch_size
    first = features if isinstance(features, int) else features[0]
    row_bytes = 2 * first * network_rows_per_row * math.prod(int(s) for s in patch_size) * element_bytes
    return max(1, min(batch_size, int(budget_mib * 2 ** 20 // row_bytes)))


def accumulate_gradients(batch_size: int, max_rows: int, loss_of: Callable[[slice], torch.Tensor],
                         grad_scaler=None) -> torch.Tensor:
    """Backward of ``loss_of(rows) × len(rows) / batch_size`` for every micro-batch of :func:`micro_batch_slices`
    (through ``grad_scaler`` when given); returns the weighted sum, detached: the batch's loss. Gradients add up in
    the parameters' ``.grad``; the caller zeroes them before and steps after."""
    total = torch.zeros(())
    for rows in micro_batch_slices(batch_size, max_rows):
        part = loss_of(rows) * ((rows.stop - rows.start) / batch_size)
        (part if grad_scaler is None else grad_scaler.scale(part)).backward()
        total = total.to(part.device) + part.detach()
    return total
