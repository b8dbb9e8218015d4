"""The per-patch sampler: image → K sampled label probability maps by integrating the learned flow.

No nnU-Net imports (the sliding window and export around it live in the sibling modules).

:class:`FlowSegmenter` wraps a vector field so that it behaves like a segmentation network ``image → logits``:
nnU-Net's sliding window, mirroring and export then work unchanged. Its ``state_dict`` is the wrapped field's,
so checkpoints of the field load into it directly (nnU-Net's predictor reloads weights per fold).

K samples (``num_samples``): sample ``k`` starts from the seeded prior ``x0_k = N(0, I)`` drawn with seed
``seed + k``. The K flows of a patch go through the network in calls of ``samples_per_call · B`` patches; a
field that ``shares_image_across_samples`` gets the image once per call and runs its image-only parts
(conditioning encoder, image part of the first conv) once for the samples of that call. By default
(``samples_per_call=None``) all K share one call off the CPU (a larger batch is expected to use a GPU better; not
measured here, no GPU) and run one per call on the CPU, where ``benchmarks/bench_samples.py`` measured the batched
K = 8 at 1.16–1.30× the cost of 8 single calls per Hippocampus tile (RESULTS.md, 2026-12-03; the image-only work
shared within a batch was ≈ 1 % of it). Outputs do not depend on the chunking (each sample has its own seeded
prior; float rounding of another batch size aside). The returned log-probabilities are those of the sample average
``log(mean_k p_k)``. :meth:`FlowSegmenter.sample` returns the per-sample log-probabilities ``[K, B, C, *S]`` as
well, which the sliding window stitches into the sample-disagreement map
(:mod:`medflowseg_nn.inference.sliding_window`).

One Euler step from t = 0 sees only the seeded prior as x_t, so the first convolution's x_t part is computed once
per patch shape and reused for every patch (:meth:`FlowSegmenter.prior_projection`; the field's split first
convolution, same output up to float rounding). A field with the time-scaled input (``time_scaled_x_t``, the
default since 2026-12-03) ignores the prior at t = 0, where every solver starts: that evaluation runs once per
patch for all K samples (:meth:`FlowSegmenter.start_output`, the image alone through the first convolution), so
K one-step samples are one evaluation (and identical: sample diversity needs two or more steps) and K samples of
N Euler steps cost ``1 + K·(N − 1)`` evaluations instead of ``K·N``.

Drawn hypotheses (``hypotheses``, for N ≥ 2 steps): with ``mean`` (the default) every step moves towards the
field's soft clean-mask estimate x̂1, and since the field barely depends on its prior the K samples hardly differ.
With ``voxel`` or ``level`` each sample's step from t moves towards a segmentation DRAWN from x̂1's probabilities
instead (:func:`~medflowseg_nn.flow.label_space.draw_target`: every voxel independently, or one level set of the
map per sample), so the next evaluation refines a different hypothesis per sample and the K samples spread where
the model is unsure — the stochastic sampler of discrete flows (draw x1 from the model, move along its path). The
last interval always moves to the soft estimate (it is the output). The uniforms come from CPU generators seeded
per sample (``seed + k``, offset from the prior's), the same for every patch: outputs stay deterministic.

Model samples (``model_samples``, MC dropout): sample k also runs its own seeded thinned network
(:mod:`medflowseg_nn.inference.model_samples`), with its own evaluations (none shared): K one-step samples cost K.

Regions (``multilabel=True``): the outputs are per-region sigmoid logits (log-odds) instead of log-probabilities,
what nnU-Net's export expects for region models; the sample average is ``logit(mean_k sigmoid(l_k))`` per
region (:func:`average_region_logits`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from medflowseg_nn.flow.label_space import draw_target, target_to_logits
from medflowseg_nn.flow.loss import interpret_output, velocity_towards
from medflowseg_nn.flow.solver import SolverConfig, integrate, sample_prior, time_grid
from medflowseg_nn.inference.model_samples import DROPOUT_SEED_OFFSET, dropout_layers, sampled_dropout
from medflowseg_nn.inference.sample_average import average_log_probabilities, average_region_logits
from medflowseg_nn.networks.vector_field_unet import repeat_batch

logger = logging.getLogger(__name__)
#: what each step of N >= 2 moves towards: the soft estimate, or a segmentation drawn from it (module docstring)
HYPOTHESES = ("mean", "voxel", "level")
HYPOTHESIS_SEED_OFFSET = 1_000_003  # the draws' generators must not replay the prior's random stream


@dataclass(frozen=True)
class SampledPatch:
    """What one sampler call returns. ``mean_log_probabilities [B, C, *S]``: log of the K samples' mean
    probabilities; ``sample_log_probabilities [K, B, C, *S]``: each sample's log-probabilities (float32)."""

    mean_log_probabilities: Tensor
    sample_log_probabilities: Tensor


class FlowSegmenter(nn.Module):
    """``forward(image [B, C_img, *S]) -> [B, C, *S]`` log-probabilities averaged over ``num_samples`` flows.

    Each of the ``num_samples`` flows starts from its own seeded prior (seed ``seed + k``); the same seed gives
    the same prior for every patch of a given shape, so results are deterministic. Samples are batched through
    the network. ``C = num_classes``. ``multilabel``: C overlapping regions (sigmoid logits out, see the module).
    ``hypotheses``: one of :data:`HYPOTHESES` (drawn hypotheses for N >= 2 steps, see the module).
    ``model_samples``: each sample with its own thinned network (MC dropout, see the module).
    """

    def __init__(self, field: nn.Module, num_classes: int, parameterization: str,
                 solver: SolverConfig = SolverConfig(), seed: int = 0, num_samples: int = 1,
                 logit_scale: float = 5.0, multilabel: bool = False, samples_per_call: Optional[int] = None,
                 hypotheses: str = "mean", model_samples: bool = False):
        super().__init__()
        if hypotheses not in HYPOTHESES:
            raise ValueError(f"hypotheses must be one of {HYPOTHESES}, got {hypotheses!r}")
        if model_samples and not dropout_layers(field):
            raise ValueError("model_samples needs a field with dropout layers (flow_matching.network.dropout > 0)")
        self.hypotheses, self.model_samples = hypotheses, bool(model_samples)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if samples_per_call is not None and samples_per_call < 1:
            raise ValueError(f"samples_per_call must be >= 1 or None, got {samples_per_call}")
        self.samples_per_call = samples_per_call
        self.field = field
        self.num_classes = num_classes
        self.parameterization = parameterization
        self.solver = solver
        self.seed = seed
        self.num_samples = num_samples
        self.logit_scale = logit_scale
        self.multilabel = multilabel
        self._prior_cache: dict[tuple, Tensor] = {}
        self._projection_cache: dict[tuple, Tensor] = {}
        if num_samples > 1 and self.prior_free_one_step() and not self.model_samples:
            logger.warning("%d one-step samples of a field with the time-scaled input are identical (computed "
                           "once): sample disagreement needs steps >= 2", num_samples)

    def prior(self, batch: int, spatial: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        """``[num_samples * batch, C, *S]`` seeded prior (sample-major: rows ``k*batch .. (k+1)*batch-1`` hold
        sample ``k``, the same noise for every batch element), cached for the last shape/device/dtype."""
        key = (batch, spatial, str(device), dtype, self.seed, self.num_samples)
        if key not in self._prior_cache:
            draws = [sample_prior((1, self.num_classes, *spatial), self.seed + k, device, dtype)
                     for k in range(self.num_samples)]
            self._prior_cache = {key: torch.cat([d.expand(batch, *d.shape[1:]) for d in draws], 0)}
        return self._prior_cache[key]

    def prior_projection(self, x0: Tensor) -> Optional[Tensor]:
        """The field's first-convolution x_t part of the cached prior ``x0`` (the same for every patch of a shape,
        so one convolution per shape instead of one per patch), or None for a field without ``x_t_projection``.
        Recomputed when the field's weights change (nnU-Net's predictor loads each fold into the same network);
        not used while gradients are recorded (nothing cached may enter a backward graph)."""
        if not hasattr(self.field, "x_t_projection") or torch.is_grad_enabled():
            return None
        key = (tuple(x0.shape), str(x0.device), x0.dtype, self.seed, self.num_samples,
               torch.is_autocast_enabled(x0.device.type), self.field.x_t_projection_state())
        if key not in self._projection_cache:
            self._projection_cache = {key: self.field.x_t_projection(x0)}
        return self._projection_cache[key]

    def velocity(self, image: Tensor, x: Tensor, t: Tensor, start: Optional[Tensor] = None,
                 uniform: Optional[Tensor] = None) -> Tensor:
        """v(x, t | image) ``[n·B, C, *S]`` for ``x [n·B, C, *S]``; ``start``: the field's t = 0 output for one
        sample (:meth:`start_output`), repeated instead of a network call where every t is 0. ``uniform``
        (``[n·B, 1, *S]`` or broadcastable): move towards a segmentation drawn from the estimate with it
        (:func:`draw_target`) instead of towards the estimate, ``v = (h - x) / (1 - t)``."""
        if start is not None and not bool(t.any()):
            raw = repeat_batch(start, x.shape[0] // start.shape[0])
        else:
            raw = self.field(image, x, t)
        out = interpret_output(raw, x, t, self.parameterization, self.logit_scale, multilabel=self.multilabel)
        if uniform is None:
            return out.velocity
        drawn = draw_target(out.x1_hat, uniform, multilabel=self.multilabel)
        return velocity_towards(drawn, x, t)

    def hypothesis_generators(self, first_sample: int, n: int) -> Optional[list[torch.Generator]]:
        """Per sample ``first_sample .. first_sample + n - 1`` a CPU generator for its draws (seeded as the
        module says), or None with ``hypotheses="mean"``. :meth:`next_uniform` draws from them."""
        if self.hypotheses == "mean":
            return None
        return [torch.Generator(device="cpu").manual_seed(self.seed + k + HYPOTHESIS_SEED_OFFSET)
                for k in range(first_sample, first_sample + n)]

    def next_uniform(self, generators: list[torch.Generator], like: Tensor) -> Tensor:
        """``[n·B, 1, *S]`` (``voxel``) or ``[n·B, 1, 1, ...]`` (``level``) uniforms for ``like [n·B, C, *S]``,
        sample-major as the prior: each sample's draw from its own generator, shared by the B patches."""
        batch = like.shape[0] // len(generators)
        shape = (1, 1, *(like.shape[2:] if self.hypotheses == "voxel" else [1] * (like.ndim - 2)))
        draws = [torch.rand(shape, generator=g).expand(batch, *shape[1:]) for g in generators]
        return torch.cat(draws, 0).to(like.device)

    def probabilities(self, log_p: Tensor) -> Tensor:
        """This sampler's outputs (e.g. ``[K, C, *P]``) → probabilities of the same shape: ``exp`` of the
        log-probabilities, or the sigmoid of the region log-odds (``multilabel``)."""
        return torch.sigmoid(log_p) if self.multilabel else log_p.exp()

    def average(self, log_p: Tensor) -> Tensor:
        """``[K, B, C, *S]`` per-sample outputs → ``[B, C, *S]`` output of the sample-mean probabilities."""
        return average_region_logits(log_p) if self.multilabel else average_log_probabilities(log_p)

    def chunk_size(self, device: torch.device) -> int:
        """Samples per network call: ``samples_per_call``, or for ``None`` all K off the CPU and 1 on it."""
        if self.samples_per_call is not None:
            return min(self.samples_per_call, self.num_samples)
        return 1 if device.type == "cpu" else self.num_samples

    def sample_log_probabilities(self, image: Tensor) -> Tensor:
        """``image [B, C_img, *S]`` → per-sample log-probabilities ``[num_samples, B, C, *S]`` (float32).

        The samples run in calls of :meth:`chunk_size` samples (``chunk * B`` rows each). One Euler step with the
        ``x1`` parameterisation is ``log_softmax`` of the raw network output at ``(x0_k, t = 0)`` (regions: the
        raw output itself, the per-region sigmoid logits). A :meth:`prior_free_start` field is evaluated at t = 0
        once for all K samples (:meth:`start_output`): one step is then that one evaluation, and N steps cost
        ``1 + K·(N − 1)`` evaluations (Euler) instead of ``K·N``.
        """
        if self.model_samples:
            return torch.stack([self._model_sample(image, k) for k in range(self.num_samples)])
        batch, spatial = image.shape[0], tuple(image.shape[2:])
        x0 = self.prior(batch, spatial, image.device, image.dtype)
        start = self.start_output(image)
        if start is not None and self.one_step:
            # x1: x̂1 = softmax(output), the same for every prior; velocity: x̂1 = x0_k + output, one per prior
            k = 1 if self.parameterization == "x1" else self.num_samples
            t0 = torch.zeros(k * batch, device=image.device, dtype=image.dtype)
            log_p = self._one_step_log_p(repeat_batch(start, k), x0[:k * batch], t0)
            log_p = log_p.reshape(k, batch, *log_p.shape[1:])
            return log_p.expand(self.num_samples, *log_p.shape[1:])
        projection = self.prior_projection(x0) if self.one_step else None
        chunk = self.chunk_size(image.device)
        parts = []
        for begin in range(0, self.num_samples, chunk):
            rows = slice(begin * batch, min(begin + chunk, self.num_samples) * batch)
            parts.append(self._samples(image, x0[rows], None if projection is None else projection[rows], start,
                                       first_sample=begin))
        log_p = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        return log_p.reshape(self.num_samples, batch, *log_p.shape[1:])

    @property
    def one_step(self) -> bool:
        """The solver is one Euler step from t = 0 (one network evaluation at the prior)."""
        return self.solver.steps == 1 and self.solver.method == "euler"

    def prior_free_start(self) -> bool:
        """The field sees ``t · x_t`` (``time_scaled_x_t``): its output at t = 0, where every solver starts, does
        not depend on the prior draw, so one evaluation serves all K samples."""
        return bool(getattr(self.field, "time_scaled_x_t", False))

    def prior_free_one_step(self) -> bool:
        """One Euler step of a :meth:`prior_free_start` field with the ``x1`` output: all K samples are the same."""
        return self.one_step and self.prior_free_start() and self.parameterization == "x1"

    def start_output(self, image: Tensor) -> Optional[Tensor]:
        """Raw field output at t = 0 ``[B, C, *S]`` for all K samples of a :meth:`prior_free_start` field, else
        None. A field that ``accepts_prior_free`` (``VectorFieldUNet``) is called with ``x_t=None`` and convolves
        the image alone; any other gets the first prior (its output does not depend on it)."""
        if not self.prior_free_start():
            return None
        batch = image.shape[0]
        t0 = torch.zeros(batch, device=image.device, dtype=image.dtype)
        if getattr(self.field, "accepts_prior_free", False):
            return self.field(image, None, t0)
        return self.field(image, self.prior(batch, tuple(image.shape[2:]), image.device, image.dtype)[:batch], t0)

    def _one_step_log_p(self, raw: Tensor, x0: Tensor, t0: Tensor) -> Tensor:
        """Log-probabilities ``[n * B, C, *S]`` of one Euler step from ``x0`` given the field's output there."""
        out = interpret_output(raw, x0, t0, self.parameterization, self.logit_scale, multilabel=self.multilabel)
        if self.parameterization != "x1":
            return target_to_logits(out.x1_hat, multilabel=self.multilabel)
        return out.logits.float() if self.multilabel else torch.log_softmax(out.logits.float(), 1)

    def _samples(self, image: Tensor, x0: Tensor, projection: Optional[Tensor], start: Optional[Tensor],
                 first_sample: int = 0) -> Tensor:
        """Log-probabilities ``[n * B, C, *S]`` of the n samples (``first_sample`` ...) whose priors are ``x0
        [n * B, C, *S]``; ``start``: the field's output at t = 0 for one sample (:meth:`start_output`), reused by
        every sample, or None."""
        n = x0.shape[0] // image.shape[0]
        shared = getattr(self.field, "shares_image_across_samples", False)
        image_k = image if shared else repeat_batch(image, n)
        if not self.one_step:
            gens = self.hypothesis_generators(first_sample, n)
            last = float(time_grid(self.solver.steps, self.solver.grid)[-2])  # the last interval: no draw

            def velocity(x: Tensor, t: Tensor) -> Tensor:
                draw = gens is not None and float(t[0]) < last
                return self.velocity(image_k, x, t, start, self.next_uniform(gens, x) if draw else None)
            x1 = integrate(velocity, x0, self.solver)
            return target_to_logits(x1, multilabel=self.multilabel)
        t0 = torch.zeros(x0.shape[0], device=image.device, dtype=image.dtype)
        raw = self.field(image_k, x0, t0) if projection is None else \
            self.field(image_k, x0, t0, x_t_projection=projection)
        return self._one_step_log_p(raw, x0, t0)

    def _model_sample(self, image: Tensor, k: int) -> Tensor:
        """Sample ``k`` through its own thinned network (``model_samples``): log-probabilities ``[B, C, *S]``."""
        batch = image.shape[0]
        x0 = self.prior(batch, tuple(image.shape[2:]), image.device, image.dtype)[k * batch:(k + 1) * batch]
        with sampled_dropout(self.field, self.seed + k + DROPOUT_SEED_OFFSET, image.device):
            start = self.start_output(image)
            if start is not None and self.one_step:
                return self._one_step_log_p(start, x0, torch.zeros(batch, device=image.device, dtype=image.dtype))
            return self._samples(image, x0, None, start, first_sample=k)

    def sample(self, image: Tensor) -> SampledPatch:
        """``image [B, C_img, *S]`` → :class:`SampledPatch` (sample mean and the K samples)."""
        log_p = self.sample_log_probabilities(image)
        return SampledPatch(mean_log_probabilities=self.average(log_p), sample_log_probabilities=log_p)

    def forward(self, image: Tensor) -> Tensor:
        """``image [B, C_img, *S]`` → ``[B, C, *S]`` log of the sample-mean probabilities."""
        return self.average(self.sample_log_probabilities(image))

    # checkpoints hold the field's weights: delegate so nnU-Net's per-fold reload works on the wrapper
    def state_dict(self, *args: Any, **kwargs: Any) -> dict:  # type: ignore[override]
        return self.field.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,  # type: ignore[override]
                        assign: bool = False):
        return self.field.load_state_dict(state_dict, strict=strict, assign=assign)
