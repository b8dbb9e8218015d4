"""Sliding-window inference of the flow sampler: patches → one case's logits and K-sample disagreement.

:func:`stitch_patches` runs the sampler over nnU-Net's sliding-window slicers with nnU-Net's conventions —
mirroring in its call order (mean of the mirrored outputs), its Gaussian patch weights, float16 accumulation and
division — so that the stitched logits are bit-identical to what ``nnUNetPredictor`` computes with the same
network (a test compares them). What nnU-Net's loop cannot do, this one returns as a value: the K samples'
probabilities, stitched with the same weights into the sample-disagreement map.

Imports no nnU-Net module (slicers, Gaussian and mirror order are passed in by the predictor, which gets them
from :mod:`medflowseg_nn.nnunet_compat`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from medflowseg_nn.inference.sampler import FlowSegmenter
from medflowseg_nn.inference.uncertainty import SampleAccumulator


@dataclass(frozen=True)
class CasePrediction:
    """One case in nnU-Net's preprocessed geometry.

    ``logits [C, *S]``: log of the sample-mean probabilities (regions: their log-odds), averaged over mirrorings, Gaussian-weighted tiles
    and folds (what nnU-Net's ``predict_logits_from_preprocessed_data`` returns; export applies the softmax).
    ``disagreement [*S]`` (float32) or ``None`` when not requested: the K samples' pairwise label disagreement
    (zeros for K = 1). ``votes [C, *S]`` (float32) or ``None`` when not requested: how many of the K samples
    vote for each class (regions: contain each region), summed over folds for the (fold, sample) disagreement.
    ``mapped [C, *S]`` or ``None``: logits of the probabilities after the folds' top-label maps
    (:mod:`medflowseg_nn.recalibration`), for the exported probabilities only — the segmentation comes from
    ``logits``, whose argmax no calibration moves (a map is not linear, so nnU-Net's resampling of mapped logits
    could move a boundary by a fraction of a voxel; :func:`~medflowseg_nn.inference.export.top_class_as`)."""

    logits: Tensor
    disagreement: Optional[Tensor] = None
    votes: Optional[Tensor] = None
    mapped: Optional[Tensor] = None


@dataclass(frozen=True)
class MirroredPatch:
    """``mean_log_probabilities [1, C, *P]`` as nnU-Net's mirroring computes it (mean over mirrorings of the
    sampler's output); ``sample_probabilities [K, C, *P]`` the mirror-mean probability of each sample, or None."""

    mean_log_probabilities: Tensor
    sample_probabilities: Optional[Tensor]


def predict_mirrored(sampler: FlowSegmenter, patch: Tensor, combinations: Sequence[tuple[int, ...]],
                     with_samples: bool) -> MirroredPatch:
    """``patch [1, C_img, *P]`` through the sampler once per mirroring (``combinations``: tensor dims flipped per
    call, the first ``()``), each output flipped back; arithmetic in nnU-Net's order (sum, then divide)."""
    prediction: Optional[Tensor] = None
    samples: Optional[Tensor] = None
    for axes in combinations:
        x = torch.flip(patch, axes) if axes else patch
        if with_samples:
            out = sampler.sample(x)
            mean = out.mean_log_probabilities
            per_sample = sampler.probabilities(out.sample_log_probabilities[:, 0])  # [K, C, *P]
            per_sample = torch.flip(per_sample, axes) if axes else per_sample  # same dims as [B, C, *P]
            samples = per_sample if samples is None else samples + per_sample
        else:
            mean = sampler(x)
        mean = torch.flip(mean, axes) if axes else mean
        if prediction is None:
            prediction = mean
        else:
            prediction += mean
    if len(combinations) > 1:
        prediction /= len(combinations)
        samples = None if samples is None else samples / len(combinations)
    return MirroredPatch(prediction, samples)


@torch.inference_mode()
def stitch_patches(sampler: FlowSegmenter, data: Tensor, slicers: Sequence[tuple], num_classes: int,
                   combinations: Sequence[tuple[int, ...]], gaussian: Optional[Tensor], device: torch.device,
                   results_device: torch.device, with_samples: bool = False,
                   progress: bool = False, with_votes: bool = False) -> CasePrediction:
    """Predict every patch of ``data [C_img, *S]`` (already padded to at least the patch size) and stitch.

    Args:
        slicers: nnU-Net's sliding-window slicers ``(slice(None), *spatial)``; ``gaussian [*P]`` its float16
            weights (``None`` = uniform); ``combinations``: see :func:`predict_mirrored`.
        device: where the network runs; ``results_device``: where the ``[C, *S]`` sums live.
        with_samples: also stitch the K samples and return their disagreement (only meaningful for K ≥ 2;
            zeros for K = 1). with_votes: also return the K samples' class votes (K ≥ 2, else ``None``).
    Returns:
        :class:`CasePrediction` in the padded geometry (``logits`` float16 on ``results_device``).
    """
    data = data.to(results_device)
    logits = torch.zeros((num_classes, *data.shape[1:]), dtype=torch.half, device=results_device)
    weights = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
    stitch_k = with_samples and sampler.num_samples > 1
    accumulator = SampleAccumulator(sampler.num_samples, num_classes, data.shape[1:], slicers, gaussian,
                                    results_device, multilabel=sampler.multilabel) if stitch_k else None
    for sl in tqdm(slicers, disable=not progress):
        patch = torch.clone(data[sl][None], memory_format=torch.contiguous_format).to(device)
        out = predict_mirrored(sampler, patch, combinations, stitch_k)
        prediction = out.mean_log_probabilities[0].to(results_device)
        if gaussian is not None:
            prediction *= gaussian
        logits[sl] += prediction
        weights[sl[1:]] += gaussian if gaussian is not None else 1
        if accumulator is not None:
            accumulator.add(out.sample_probabilities)
    torch.div(logits, weights, out=logits)
    if torch.any(torch.isinf(logits)):
        raise RuntimeError("inf in the stitched logits: the float16 sums overflowed (nnU-Net has the same limit)")
    disagreement = None
    if with_samples:
        disagreement = accumulator.disagreement() if accumulator is not None \
            else torch.zeros(data.shape[1:], dtype=torch.float32)
    votes = accumulator.votes() if with_votes and accumulator is not None else None
    return CasePrediction(logits, disagreement, votes)
