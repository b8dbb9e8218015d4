"""Image → label log-probabilities by integrating the learned flow (no nnU-Net imports).

:class:`FlowSegmenter` wraps a vector field so that it behaves like a segmentation network ``image → logits``:
nnU-Net's sliding window, mirroring and export then work unchanged. Its ``state_dict`` is the wrapped field's,
so checkpoints of the field load into it directly (nnU-Net's predictor reloads weights per fold).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from medflowseg_nn.flow.label_space import target_to_log_probabilities
from medflowseg_nn.flow.loss import interpret_output
from medflowseg_nn.flow.solver import SolverConfig, integrate, sample_prior


class FlowSegmenter(nn.Module):
    """``forward(image [B, C, *S]) -> [B, K, *S]`` log-probabilities averaged over ``num_samples`` flows.

    Each of the ``num_samples`` flows starts from its own seeded prior (seed ``seed + k``); the same seed gives
    the same prior for every patch, so results are deterministic. Samples are batched through the network.
    """

    def __init__(self, field: nn.Module, num_classes: int, parameterization: str,
                 solver: SolverConfig = SolverConfig(), seed: int = 0, num_samples: int = 1,
                 logit_scale: float = 5.0):
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.field = field
        self.num_classes = num_classes
        self.parameterization = parameterization
        self.solver = solver
        self.seed = seed
        self.num_samples = num_samples
        self.logit_scale = logit_scale
        self._prior_cache: dict[tuple, Tensor] = {}
        self.last_samples: Tensor | None = None  # [num_samples, B, K, *S] probabilities of the last call

    def prior(self, batch: int, spatial: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        """``[num_samples * batch, K, *S]`` seeded prior, cached per shape/device/dtype."""
        key = (batch, spatial, str(device), dtype)
        if key not in self._prior_cache:
            draws = [sample_prior((1, self.num_classes, *spatial), self.seed + k, device, dtype)
                     for k in range(self.num_samples)]
            self._prior_cache = {key: torch.cat([d.expand(batch, *d.shape[1:]) for d in draws], 0)}
        return self._prior_cache[key]

    def velocity(self, image: Tensor, x: Tensor, t: Tensor) -> Tensor:
        raw = self.field(image, x, t)
        return interpret_output(raw, x, t, self.parameterization, self.logit_scale).velocity

    def forward(self, image: Tensor) -> Tensor:
        batch, spatial = image.shape[0], tuple(image.shape[2:])
        x0 = self.prior(batch, spatial, image.device, image.dtype)
        image_k = image.repeat(self.num_samples, *([1] * (image.ndim - 1))) if self.num_samples > 1 else image
        if self.solver.steps == 1 and self.solver.method == "euler":
            t0 = torch.zeros(x0.shape[0], device=image.device, dtype=image.dtype)
            out = interpret_output(self.field(image_k, x0, t0), x0, t0, self.parameterization, self.logit_scale)
            log_p = torch.log_softmax(out.logits.float(), 1) if self.parameterization == "x1" \
                else target_to_log_probabilities(out.x1_hat)
        else:
            x1 = integrate(lambda x, t: self.velocity(image_k, x, t), x0, self.solver)
            log_p = target_to_log_probabilities(x1)
        if self.num_samples == 1:
            self.last_samples = None
            return log_p
        probs = log_p.exp().reshape(self.num_samples, batch, *log_p.shape[1:])
        self.last_samples = probs
        return torch.log(probs.mean(0).clamp_min(1e-8))

    # checkpoints hold the field's weights: delegate so nnU-Net's per-fold reload works on the wrapper
    def state_dict(self, *args: Any, **kwargs: Any) -> dict:  # type: ignore[override]
        return self.field.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        return self.field.load_state_dict(state_dict, strict=strict, assign=assign)
