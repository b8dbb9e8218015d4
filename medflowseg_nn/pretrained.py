"""``mfs_train -pretrained_weights FILE``: start a vector field from an nnU-Net or a MedFlowSeg checkpoint.

nnU-Net's ``load_pretrained_weights`` requires every key of the network (but the segmentation layers) in the file
with the same shape, which never holds for a flow model: ours has time embeddings and modulations, DBSA/FAA and
a conditioning encoder that nnU-Net's ``PlainConvUNet`` lacks, and its first convolution sees ``image ⊕ x_t``.
This module transfers what corresponds, tensor by tensor:

* **nnU-Net checkpoint** (``PlainConvUNet`` keys): ``encoder.stages.S.*.X`` → ``encoder.S.X``,
  ``decoder.stages.I`` → ``decoder.I``, ``decoder.transpconvs.I`` → ``upsample.I`` (same order, same shapes for
  the same plans); ``decoder.encoder.*`` (a second reference to the encoder) is ignored.
* **First convolution**: the checkpoint's kernel ``[F, C_img, k…]`` fills our image slice ``[:, :C_img]``; the
  ``x_t`` slice ``[:, C_img:]`` is set to **zero**. With the time modulations and the DBSA/FAA residuals
  zero-initialised too, the field then starts as *exactly* the pretrained segmenter (same logits for any x_t and
  t) and learns its dependence on x_t from zero, instead of the pretrained features being perturbed at once by
  a randomly weighted noise input (at t = 0 x_t is pure noise). A MedFlowSeg checkpoint with another label count
  is handled the same way (its image slice copied).
* **Segmentation heads** (nnU-Net's ``decoder.seg_layers``: the last is our ``seg_head``, the others our
  ``aux_heads``): copied only when the checkpoint records the same labels (``init_args.dataset_json``) and our
  parameterisation is ``x1`` (our head then predicts clean-mask logits, as nnU-Net's does); otherwise skipped,
  as nnU-Net skips them.
* **MedFlowSeg checkpoint**: the same key names; everything of equal shape is copied (heads under the rule above,
  with the checkpoint's parameterisation from its plans).

Everything else keeps its initialisation. Each category is reported in one log line. A file that is not a
checkpoint, or from which nothing transfers, is a :class:`UserError`.

May be imported by the CLIs (it imports no trainer).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from medflowseg_nn.config import FlowMatchingConfig
from medflowseg_nn.errors import UserError

logger = logging.getLogger(__name__)

#: PlainConvUNet key → ours (``None``: nothing of ours corresponds)
NNUNET_RULES: tuple[tuple[str, str], ...] = (
    (r"^encoder\.stages\.(\d+)\.\d+\.(.*)$", r"encoder.\1.\2"),
    (r"^decoder\.stages\.(\d+)\.(.*)$", r"decoder.\1.\2"),
    (r"^decoder\.transpconvs\.(\d+)\.(.*)$", r"upsample.\1.\2"),
)
HEAD_PATTERN = re.compile(r"^(seg_head|aux_heads\.\d+)\.")
SEG_LAYER_PATTERN = re.compile(r"^decoder\.seg_layers\.(\d+)\.(.*)$")


@dataclass
class TransferReport:
    """What was done, by our state-dict key: copied whole, image slice copied (x_t slice zeroed), skipped with a
    reason, and absent from the checkpoint (left at initialisation)."""

    source_kind: str
    copied: list[str] = field(default_factory=list)
    sliced: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    def skip(self, key: str, reason: str) -> None:
        self.skipped.setdefault(reason, []).append(key)


def unwrap(network: nn.Module) -> nn.Module:
    """The module under DDP (``.module``) and ``torch.compile`` (``_orig_mod``)."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


def read_checkpoint(path: str) -> dict:
    """``torch.load`` a checkpoint (nnU-Net's format: ``network_weights`` + ``init_args``), or a :class:`UserError`."""
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights {path} not found — pass a checkpoint_final.pth of mfs_train or "
                        "nnUNetv2_train")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a wrong file
        raise UserError(f"{path} is not a torch checkpoint ({type(e).__name__}) — pass a checkpoint_final.pth of "
                        "mfs_train or nnUNetv2_train") from e
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise UserError(f"{path} has no 'network_weights' — it is not a checkpoint of mfs_train or nnUNetv2_train")
    checkpoint["network_weights"] = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v
                                     for k, v in checkpoint["network_weights"].items()}
    return checkpoint


def source_kind(weights: dict) -> str:
    """``nnunet`` (PlainConvUNet keys) or ``medflowseg`` (ours)."""
    return "nnunet" if any(k.startswith(("encoder.stages.", "decoder.seg_layers.")) for k in weights) \
        else "medflowseg"


def renamed(weights: dict[str, Tensor], kind: str, n_stages: int) -> dict[str, Tensor]:
    """The checkpoint's tensors under our key names (nnU-Net's seg layer ``n_stages - 2`` is our ``seg_head``)."""
    if kind == "medflowseg":
        return dict(weights)
    out = {}
    for key, value in weights.items():
        head = SEG_LAYER_PATTERN.match(key)
        if head:
            i = int(head.group(1))
            out[("seg_head." if i == n_stages - 2 else f"aux_heads.{i}.") + head.group(2)] = value
            continue
        for pattern, target in NNUNET_RULES:
            if re.match(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
    return out


def heads_transferable(checkpoint: dict, kind: str, labels: dict, parameterization: str) -> Optional[str]:
    """``None`` when the segmentation heads may be copied, else the reason why not."""
    init_args = checkpoint.get("init_args") or {}
    source_labels = (init_args.get("dataset_json") or {}).get("labels")
    if source_labels is None:
        return "segmentation heads: the checkpoint does not record its labels"
    if source_labels != labels:
        return "segmentation heads: the checkpoint was trained on other labels"
    if parameterization != "x1":
        return f"segmentation heads: our '{parameterization}' parameterisation does not predict label logits"
    if kind == "medflowseg":
        theirs = FlowMatchingConfig.from_plans(init_args.get("plans") or {}).parameterization
        if theirs != parameterization:
            return f"segmentation heads: the checkpoint's parameterisation is '{theirs}'"
    return None


def first_conv_slice(key: str, ours: Tensor, theirs: Tensor, network: nn.Module,
                     source: dict[str, Tensor]) -> bool:
    """Whether ``theirs`` is the image part of our first convolution ``[F, C_img + C, k…]``."""
    c_img = getattr(network, "input_channels", None)
    c = getattr(network, "num_classes", None)
    if c_img is None or not key.startswith("encoder.0.") or ours.ndim < 3 or ours.shape[1] != c_img + c:
        return False
    if theirs.shape[0] != ours.shape[0] or theirs.shape[2:] != ours.shape[2:]:
        return False
    source_classes = source["seg_head.weight"].shape[0] if "seg_head.weight" in source else 0
    return theirs.shape[1] - source_classes == c_img if source_classes and theirs.shape[1] > c_img \
        else theirs.shape[1] == c_img


def transfer(network: nn.Module, checkpoint: dict, labels: dict, parameterization: str) -> TransferReport:
    """Copy what corresponds from ``checkpoint`` into ``network`` (see the module docstring); returns the report."""
    net = unwrap(network)
    weights = checkpoint["network_weights"]
    kind = source_kind(weights)
    source = renamed(weights, kind, int(getattr(net, "n_stages", 0)))
    head_reason = heads_transferable(checkpoint, kind, labels, parameterization)
    state = net.state_dict()
    report = TransferReport(kind)
    for key, ours in state.items():
        theirs = source.get(key)
        if theirs is None:
            report.kept.append(key)
        elif HEAD_PATTERN.match(key) and head_reason is not None:
            report.skip(key, head_reason)
        elif theirs.shape == ours.shape:
            state[key] = theirs.to(ours.dtype)
            report.copied.append(key)
        elif first_conv_slice(key, ours, theirs, net, source):
            new = torch.zeros_like(ours)
            new[:, : net.input_channels] = theirs.to(ours.dtype)
            state[key] = new
            report.sliced.append(key)
        else:
            report.skip(key, "shape differs")
    if not report.copied and not report.sliced:
        raise UserError(f"nothing in the checkpoint matches this network ({len(weights)} tensors, none with our "
                        "names and shapes) — pretrain with the same plans (PlainConvUNet or MedFlowSeg)")
    net.load_state_dict(state)
    return report


def unique(keys: list[str], state: dict[str, Tensor]) -> list[str]:
    """Keys naming distinct tensors (nnU-Net's conv blocks list each tensor twice, as ``conv`` and ``all_modules``)."""
    seen, out = set(), []
    for key in keys:
        ptr = state[key].data_ptr() if state[key].numel() else key
        if ptr not in seen:
            seen.add(ptr)
            out.append(key)
    return out


def load_pretrained_weights(network: nn.Module, path: str, labels: dict, parameterization: str,
                            log: Callable[[str], None] = logger.info) -> TransferReport:
    """Read ``path``, transfer into ``network`` and log one line per category; returns the report."""
    checkpoint = read_checkpoint(path)
    report = transfer(network, checkpoint, labels, parameterization)
    state = unwrap(network).state_dict()

    def names(keys: list[str], limit: int = 4) -> str:
        keys = unique(keys, state)
        prefixes = sorted({k.split(".")[0] for k in keys})
        return f"{len(keys)} tensor(s) ({', '.join(prefixes[:limit])}{', …' if len(prefixes) > limit else ''})"

    origin = "nnU-Net" if report.source_kind == "nnunet" else "MedFlowSeg"
    log(f"pretrained weights {path} ({origin} checkpoint, {checkpoint.get('trainer_name', 'unknown trainer')}): "
        f"copied {names(report.copied)}")
    if report.sliced:
        log(f"pretrained first convolution {', '.join(unique(report.sliced, state))}: image channels copied, the "
            "x_t channels set to zero (the field starts as the pretrained segmenter, independent of x_t)")
    for reason, keys in report.skipped.items():
        log(f"pretrained weights skipped, {reason}: {names(keys)}")
    if report.kept:
        log(f"not in the checkpoint, kept at initialisation: {names(report.kept, 8)}")
    return report
