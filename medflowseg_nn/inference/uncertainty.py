"""Per-voxel uncertainty maths of K-sample flow segmentation (pure torch/numpy; no nnU-Net imports).

Two maps are written per case by ``mfs_predict --save_uncertainty`` (file ``CASE_<name>.nii.gz``, float32,
same size/spacing/origin/direction as the input image):

* ``entropy`` — **predictive entropy** ``H = -Σ_c p̄_c log p̄_c`` (natural log, nats; 0 … log C) of the
  *averaged* class probabilities ``p̄`` that are exported (the same probabilities as ``--save_probabilities``'
  .npz, i.e. averaged over the K samples, the sliding-window patches, mirroring and folds). High where the
  model is unsure between classes, whatever the reason.
* ``disagreement`` — **mean pairwise disagreement** of the K samples' label maps: the fraction of the
  ``K(K-1)/2`` sample pairs whose argmax labels differ at the voxel (0 … 1; always 0 for K = 1). Sample ``k`` is
  the full-image segmentation grown from prior seed ``seed + k``: its per-patch probabilities are stitched over
  the sliding window with nnU-Net's Gaussian weights (and averaged over mirroring), then argmaxed. With F
  folds the members are the F·K (fold, sample) segmentations (fold f's sample k: fold f's weights, seed
  ``seed + k``; for K = 1 a fold's member is its own prediction), so the map counts pairs within a fold and
  across folds: how much the *generated* segmentation depends on the noise and on the fold; it needs F·K ≥ 2.

With ``n_c`` of the M members voting for class ``c`` the disagreement is ``1 - Σ_c n_c (n_c - 1) / (M (M - 1))``
(:func:`votes_disagreement`), so members' votes can be summed over folds before it is taken.
**Regions** (nnU-Net's region-based training, R overlapping binary channels): per region ``r`` the binary
entropy ``h(p̄_r)`` (:func:`binary_entropy`) and the pairwise disagreement of the K samples' region masks
``p_r > 0.5`` (:func:`region_disagreement`), ``[R, *S]`` each. The exported single maps are the **sum** of the
binary entropies (the entropy of the R independent Bernoulli variables, 0 … R log 2) and the **mean** of the
per-region disagreements (0 … 1).

Both maps are computed in nnU-Net's preprocessed geometry (:mod:`medflowseg_nn.inference.sliding_window`) and
reverted to the input geometry by :mod:`medflowseg_nn.inference.export` (outside the crop box both are 0).
Memory of the disagreement map: K · C · voxels floats while a case is predicted.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from medflowseg_nn import calibration

ArrayLike = Union[np.ndarray, Tensor]


def predictive_entropy(probabilities: ArrayLike) -> np.ndarray:
    """``probabilities [C, *S]`` (summing to 1 over C) → entropy ``[*S]`` float32 in nats (0 log 0 = 0; computed
    in float64 by :func:`medflowseg_nn.calibration.predictive_entropy`, the one implementation)."""
    p = probabilities.detach().cpu().numpy() if isinstance(probabilities, Tensor) else np.asarray(probabilities)
    return np.maximum(calibration.predictive_entropy(p), 0).astype(np.float32)


def binary_entropy(probabilities: ArrayLike) -> np.ndarray:
    """``probabilities [R, *S]`` of R independent regions → per-region binary entropy ``[R, *S]`` float32 in nats
    (0 … log 2; 0 log 0 = 0), computed in float64."""
    p = probabilities.detach().cpu().numpy() if isinstance(probabilities, Tensor) else np.asarray(probabilities)
    p = np.clip(p.astype(np.float64), 0, 1)
    # the two-class predictive entropy of (p, 1 - p): one implementation of -Σ p log p (calibration's)
    return np.maximum(calibration.predictive_entropy(np.stack([p, 1 - p])), 0).astype(np.float32)


def region_entropy(probabilities: ArrayLike) -> np.ndarray:
    """``[R, *S]`` region probabilities → ``[*S]``: the sum of the per-region binary entropies (nats)."""
    return binary_entropy(probabilities).sum(0)


def class_votes(labels: Tensor, num_classes: int) -> Tensor:
    """``labels [M, *S]`` (integer label maps of M members) → ``[C, *S]`` float32: members voting for each class."""
    return torch.stack([(labels == c).sum(0).float() for c in range(num_classes)])


def votes_disagreement(votes: Tensor, members: int) -> Tensor:
    """``votes [C, *S]`` of M members (:func:`class_votes`, possibly summed over folds) → ``[*S]``: the fraction
    of the M(M-1)/2 member pairs whose labels differ (zeros for M < 2)."""
    if members < 2:
        return torch.zeros(votes.shape[1:], dtype=torch.float32, device=votes.device)
    agree = torch.zeros(votes.shape[1:], dtype=torch.float32, device=votes.device)
    for n_c in votes:
        agree += n_c * (n_c - 1)
    return 1 - agree / (members * (members - 1))


def mask_votes_disagreement(votes: Tensor, members: int) -> Tensor:
    """``votes [R, *S]``: how many of M members' masks contain region r → ``[R, *S]`` per-region fraction of
    member pairs whose masks differ (zeros for M < 2)."""
    if members < 2:
        return torch.zeros(votes.shape, dtype=torch.float32, device=votes.device)
    n = votes
    return 1 - (n * (n - 1) + (members - n) * (members - n - 1)) / (members * (members - 1))


def region_disagreement(masks: Tensor) -> Tensor:
    """``masks [K, R, *S]`` (the K samples' binary region masks) → ``[R, *S]``: per region the fraction of sample
    pairs whose masks differ (zeros for K = 1)."""
    return mask_votes_disagreement(masks.float().sum(0), masks.shape[0])  # samples voting "in the region"


def pairwise_disagreement(labels: Tensor, num_classes: int) -> Tensor:
    """``labels [K, *S]`` (integer label maps of K samples) → fraction of sample pairs that disagree ``[*S]``.

    Returns zeros for K = 1."""
    return votes_disagreement(class_votes(labels, num_classes), labels.shape[0])


class SampleAccumulator:
    """Stitches the K samples' patch probabilities over nnU-Net's sliding window, like nnU-Net stitches logits.

    Args:
        num_samples: K. num_classes: C. shape: spatial shape ``S`` of the (padded) preprocessed image.
        slicers: nnU-Net's sliding-window slicers, in the order the patches are predicted.
        gaussian: the Gaussian importance map ``[*P]`` nnU-Net uses (``None`` = uniform weights).
        multilabel: C overlapping regions (disagreement per region, then the mean over regions).
    Patches must be added in slicer order with :meth:`add` (one call per patch).
    """

    def __init__(self, num_samples: int, num_classes: int, shape: Sequence[int], slicers: Sequence[tuple],
                 gaussian: Optional[Tensor], device: torch.device, multilabel: bool = False):
        dtype = torch.half if device.type == "cuda" else torch.float32
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.slicers = list(slicers)
        self.gaussian = gaussian
        self.index = 0
        self.sum = torch.zeros((num_samples, num_classes, *shape), dtype=dtype, device=device)  # [K, C, *S]
        self.weight = torch.zeros(tuple(shape), dtype=torch.float32, device=device)  # [*S]

    def add(self, samples: Tensor) -> None:
        """``samples [K, C, *P]``: the probabilities of the next patch (in slicer order)."""
        if self.index >= len(self.slicers):
            raise RuntimeError(f"more patches than sliding-window slicers ({len(self.slicers)})")
        sl = self.slicers[self.index]
        self.index += 1
        samples = samples.to(self.sum.device, torch.float32)
        w = 1.0 if self.gaussian is None else self.gaussian.to(self.sum.device, torch.float32)
        self.sum[(slice(None), *sl)] += (samples * w).to(self.sum.dtype)
        self.weight[sl[1:]] += w

    def probabilities(self) -> Tensor:
        """Stitched per-sample probabilities ``[K, C, *S]`` (float32)."""
        return self.sum.float() / self.weight.clamp_min(1e-8)

    def disagreement(self) -> Tensor:
        """``[*S]`` float32 on the CPU: pairwise disagreement of the K stitched samples' argmax labels (regions:
        the mean over regions of :meth:`region_disagreement`)."""
        if self.multilabel:
            return self.region_disagreement().mean(0)
        self.check_complete()
        return pairwise_disagreement(self.sum.argmax(1), self.num_classes).cpu()

    def region_disagreement(self) -> Tensor:
        """``[R, *S]`` float32 on the CPU: per region, the K stitched samples' pairwise mask disagreement
        (a sample's mask is its stitched probability > 0.5)."""
        self.check_complete()
        return region_disagreement(self.probabilities() > 0.5).cpu()

    def votes(self) -> Tensor:
        """``[C, *S]`` float32 on the CPU: how many of the K stitched samples vote for each class (regions: contain
        each region), to be summed over folds and given to :func:`votes_disagreement` (regions:
        :func:`mask_votes_disagreement`)."""
        self.check_complete()
        if self.multilabel:
            return (self.probabilities() > 0.5).float().sum(0).cpu()
        return class_votes(self.sum.argmax(1), self.num_classes).cpu()

    def check_complete(self) -> None:
        if self.index != len(self.slicers):
            raise RuntimeError(f"{self.index} of {len(self.slicers)} patches were added")
