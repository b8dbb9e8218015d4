"""Per-voxel uncertainty of K-sample flow segmentation, and writing it with the input image's geometry.

Two maps are written per case by ``mfs_predict --save_uncertainty`` (file ``CASE_<name>.nii.gz``, float32,
same size/spacing/origin/direction as the input image):

* ``entropy`` — **predictive entropy** ``H = -Σ_c p̄_c log p̄_c`` (natural log, nats; 0 … log C) of the
  *averaged* class probabilities ``p̄`` that are exported (the same probabilities as ``--save_probabilities``'
  .npz, i.e. averaged over the K samples, the sliding-window patches, mirroring and folds). High where the
  model is unsure between classes, whatever the reason.
* ``disagreement`` — **mean pairwise disagreement** of the K samples' label maps: the fraction of the
  ``K(K-1)/2`` sample pairs whose argmax labels differ at the voxel (0 … 1; always 0 for K = 1). Sample ``k`` is
  the full-image segmentation grown from prior seed ``seed + k``: its per-patch probabilities are stitched over
  the sliding window with nnU-Net's Gaussian weights (and averaged over mirroring), then argmaxed. With several
  folds the per-fold maps are averaged. It measures how much the *generated* segmentation depends on the
  noise; it needs K ≥ 2.

With ``n_c`` of the K samples voting for class ``c`` the disagreement is ``1 - Σ_c n_c (n_c - 1) / (K (K - 1))``.
Both maps are computed/kept in nnU-Net's preprocessed geometry and reverted to the input geometry with the
configuration's probability resampling, the cropping bounding box and the axis transpose (outside the crop
box both are 0). Memory of the disagreement map: K · C · voxels floats while a case is predicted.
"""
from __future__ import annotations

import itertools
import logging
from typing import Optional, Sequence, Union

import numpy as np
import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from torch import Tensor

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, Tensor]


def predictive_entropy(probabilities: ArrayLike, eps: float = 1e-12) -> np.ndarray:
    """``probabilities [C, *S]`` (summing to 1 over C) → entropy ``[*S]`` float32 in nats."""
    p = torch.as_tensor(np.asarray(probabilities) if not isinstance(probabilities, Tensor) else probabilities)
    p = p.float().clamp_min(0)
    h = -(p * torch.log(p.clamp_min(eps))).sum(0)
    return h.clamp_min(0).cpu().numpy().astype(np.float32)


def pairwise_disagreement(labels: Tensor, num_classes: int) -> Tensor:
    """``labels [K, *S]`` (integer label maps of K samples) → fraction of sample pairs that disagree ``[*S]``.

    Returns zeros for K = 1."""
    k = labels.shape[0]
    if k < 2:
        return torch.zeros(labels.shape[1:], dtype=torch.float32, device=labels.device)
    agree = torch.zeros(labels.shape[1:], dtype=torch.float32, device=labels.device)
    for c in range(num_classes):
        n_c = (labels == c).sum(0).float()
        agree += n_c * (n_c - 1)
    return 1 - agree / (k * (k - 1))


class SampleAccumulator:
    """Stitches the K samples' patch probabilities over nnU-Net's sliding window, like nnU-Net stitches logits.

    Args:
        num_samples: K. num_classes: C. shape: spatial shape ``S`` of the (padded) preprocessed image.
        slicers: nnU-Net's sliding-window slicers, in the order the patches are predicted.
        gaussian: the Gaussian importance map ``[*P]`` nnU-Net uses (``None`` = uniform weights).
    Patches must be added in slicer order with :meth:`add` (one call per patch).
    """

    def __init__(self, num_samples: int, num_classes: int, shape: Sequence[int], slicers: Sequence[tuple],
                 gaussian: Optional[Tensor], device: torch.device):
        dtype = torch.half if device.type == "cuda" else torch.float32
        self.num_classes = num_classes
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
        """``[*S]`` float32 on the CPU: pairwise disagreement of the K stitched samples' argmax labels."""
        if self.index != len(self.slicers):
            raise RuntimeError(f"{self.index} of {len(self.slicers)} patches were added")
        return pairwise_disagreement(self.sum.argmax(1), self.num_classes).cpu()



class SampleDisagreementMixin:
    """Hooks on ``nnUNetPredictor``'s sliding window (mix in before it) that stitch the K samples.

    With ``compute_disagreement`` and a :class:`~medflowseg_nn.segmenter.FlowSegmenter` of K ≥ 2 samples, each
    sliding-window pass records the per-sample probabilities of every network call, undoes the mirroring in
    nnU-Net's call order, averages over mirrors and adds the patch to a :class:`SampleAccumulator` with the
    same Gaussian nnU-Net uses. After ``predict_logits_from_preprocessed_data`` :attr:`last_disagreement` holds
    the fold-averaged disagreement map ``[*S]`` (zeros for K = 1). nnU-Net's logits are untouched.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compute_disagreement = False
        self.last_disagreement: Optional[np.ndarray] = None  # [*S] of the last case (preprocessed geometry)
        self._accumulator: Optional[SampleAccumulator] = None
        self._maps: list[Tensor] = []  # one [*S] map per fold of the current case

    @property
    def segmenter(self):
        """The :class:`FlowSegmenter` (unwrapping torch.compile)."""
        return getattr(self.network, "_orig_mod", self.network)

    def _mirror_combinations(self) -> list[tuple[int, ...]]:
        """Flip axes of each network call in ``_internal_maybe_mirror_and_predict``, in nnU-Net's order."""
        if not self.use_mirroring or self.allowed_mirroring_axes is None:
            return [()]
        axes = [a + 2 for a in self.allowed_mirroring_axes]
        return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: Tensor, slicers, do_on_device: bool = True):
        recording = self.compute_disagreement and getattr(self.segmenter, "num_samples", 1) > 1
        if not recording:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        device = self.device if do_on_device else torch.device("cpu")
        gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                    value_scaling_factor=10, device=device) if self.use_gaussian else None
        self._accumulator = SampleAccumulator(self.segmenter.num_samples, self.label_manager.num_segmentation_heads,
                                              data.shape[1:], slicers, gaussian, device)
        self.segmenter.record_samples = True
        try:
            logits = super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
            self._maps.append(self._accumulator.disagreement())  # [*S_padded]
        finally:
            self.segmenter.record_samples, self._accumulator = False, None
            self.segmenter.recorded.clear()
        return logits

    @torch.inference_mode()
    def _internal_maybe_mirror_and_predict(self, x: Tensor) -> Tensor:
        prediction = super()._internal_maybe_mirror_and_predict(x)
        if self._accumulator is not None:
            recorded = self.segmenter.recorded  # one [K, 1, C, *P] per network call, in nnU-Net's call order
            combos = self._mirror_combinations()
            if len(recorded) != len(combos):
                raise RuntimeError(f"expected {len(combos)} network calls per patch, got {len(recorded)}")
            samples = sum(torch.flip(s, [a + 1 for a in axes]) if axes else s for s, axes in zip(recorded, combos))
            self._accumulator.add(samples[:, 0] / len(combos))
            recorded.clear()
        return prediction

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: Tensor) -> Union[np.ndarray, Tensor]:
        n_maps = len(self._maps)
        logits = super().predict_sliding_window_return_logits(input_image)
        if len(self._maps) > n_maps:  # revert nnU-Net's padding (pad_nd_image pads (new - old) // 2 below)
            shape = input_image.shape[1:]
            self._maps[-1] = self._maps[-1][tuple(slice((p - s) // 2, (p - s) // 2 + s)
                                                  for p, s in zip(self._maps[-1].shape, shape))]
        return logits

    def predict_logits_from_preprocessed_data(self, data: Tensor) -> Tensor:
        """nnU-Net's fold ensemble; also sets :attr:`last_disagreement` ``[*S]`` (fold mean) when requested."""
        self._maps = []
        logits = super().predict_logits_from_preprocessed_data(data)
        if self.compute_disagreement:
            self.last_disagreement = torch.stack(self._maps).mean(0).numpy() if self._maps \
                else np.zeros(data.shape[1:], np.float32)
        self._maps = []
        return logits


def revert_to_original_geometry(volume: ArrayLike, properties: dict, plans_manager,
                                configuration_manager, clip: tuple[float, float] = (0.0, np.inf)) -> np.ndarray:
    """A map ``[*S]`` in nnU-Net's preprocessed geometry → ``[*S_orig]`` in the input image's array layout.

    The same three steps nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape`` applies to
    probabilities: resample to the cropped original spacing (``resampling_fn_probabilities``), insert into the
    bounding box used for cropping (0 outside), revert the transpose. Values are clipped to ``clip`` (cubic
    resampling overshoots)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    volume = volume.cpu().numpy() if isinstance(volume, Tensor) else np.asarray(volume)
    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    target_shape = properties["shape_after_cropping_and_before_resampling"]
    current_spacing = configuration_manager.spacing if len(configuration_manager.spacing) == len(target_shape) \
        else [spacing_transposed[0], *configuration_manager.spacing]
    resampled = configuration_manager.resampling_fn_probabilities(volume[None].astype(np.float32), target_shape,
                                                                  current_spacing, spacing_transposed)
    resampled = resampled.cpu().numpy() if isinstance(resampled, Tensor) else np.asarray(resampled)
    resampled = np.clip(resampled[0].astype(np.float32), *clip)
    full = np.zeros(properties["shape_before_cropping"], dtype=np.float32)
    full = insert_crop_into_image(full, resampled, properties["bbox_used_for_cropping"])
    return np.ascontiguousarray(np.asarray(full).transpose(plans_manager.transpose_backward))


def write_map(volume: np.ndarray, path: str, properties: dict) -> None:
    """Write a float map ``[*S_orig]`` (the layout nnU-Net's reader returned, as the exported segmentation has)
    as NIfTI with the input's geometry, taken from the reader's entry in ``properties`` like ``write_seg``
    does (SimpleITK ``sitk_stuff`` or nibabel ``nibabel_stuff``; otherwise only the spacing is known)."""
    volume = np.asarray(volume, dtype=np.float32)
    if "nibabel_stuff" in properties:
        import nibabel
        from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

        stuff = properties["nibabel_stuff"]
        image = nibabel.Nifti1Image(volume.transpose((2, 1, 0)), affine=stuff.get("reoriented_affine",
                                                                                   stuff["original_affine"]))
        if "reoriented_affine" in stuff:  # NibabelIOWithReorient: back from RAS to the original orientation
            image = image.as_reoriented(ornt_transform(axcodes2ornt("RAS"), io_orientation(stuff["original_affine"])))
        nibabel.save(image, path)
        return
    import SimpleITK as sitk

    geometry = properties.get("sitk_stuff")
    if geometry is not None and len(geometry["spacing"]) == 2 or geometry is None and volume.shape[0] == 1:
        volume = volume[0]  # 2D images are [1, y, x] in nnU-Net
    image = sitk.GetImageFromArray(volume)
    if geometry is not None:
        image.SetSpacing(geometry["spacing"])
        image.SetOrigin(geometry["origin"])
        image.SetDirection(geometry["direction"])
    else:
        image.SetSpacing([float(s) for s in properties["spacing"][-volume.ndim:]][::-1])
    sitk.WriteImage(image, path, useCompression=True)
