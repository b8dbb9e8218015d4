"""Model samples (MC dropout): each of the K samples also runs its own thinned network.

Why: the K flows of one field differ only through the prior and the drawn hypotheses, which all refine the SAME
network's estimate; a fold ensemble averages independently trained errors, which is what calibrates it (issue #9,
``benchmarks/RESULTS.md``). A field trained with dropout (``flow_matching.network.dropout > 0``,
``MedFlowSegTrainer_dropout``) holds many thinned networks; sampling one per flow (Gal & Ghahramani, 2016, "Dropout
as a Bayesian approximation") puts that model-level diversity into the K samples of one model.

Determinism: sample k's dropout masks come from torch's generator seeded with ``seed + k +``
:data:`DROPOUT_SEED_OFFSET` inside :func:`torch.random.fork_rng` (the caller's random state is restored), so
sample k is the same thinned network for every patch of a shape and every case — one fixed member per sample,
as in an ensemble — and outputs do not depend on anything run before. Written here rather than taken from a
library: MONAI and torchmetrics have no seeded per-sample dropout switch for an arbitrary module.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

#: sample k's masks are drawn with seed + k + this (so they do not replay the prior's or the hypotheses' streams)
DROPOUT_SEED_OFFSET = 2_000_003
#: the dropout modules torch has (their common base class is private)
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def dropout_layers(module: nn.Module) -> list[nn.Module]:
    """The dropout layers of ``module`` that drop something (``p > 0``)."""
    return [m for m in module.modules() if isinstance(m, DROPOUT_TYPES) and m.p > 0]


@contextmanager
def sampled_dropout(module: nn.Module, seed: int, device: torch.device) -> Iterator[None]:
    """Inside: ``module``'s dropout layers in training mode (everything else as it was), torch's generators
    seeded with ``seed`` (CPU, and ``device``'s when it is a CUDA device). On exit the layers' modes and the
    random states are restored. Raises ValueError for a module without dropout (nothing would be sampled)."""
    layers = dropout_layers(module)
    if not layers:
        raise ValueError("the field has no dropout layers: model samples need a model trained with "
                         "flow_matching.network.dropout > 0 (e.g. MedFlowSegTrainer_dropout)")
    modes = [m.training for m in layers]
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for m in layers:
            m.train()
        try:
            yield
        finally:
            for m, mode in zip(layers, modes):
                m.train(mode)
