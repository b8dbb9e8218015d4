"""``MedFlowSegTrainer`` on nnU-Net's region-based training and the ignore label (planned synthetic datasets).

Each dataset is planned once; the trainer is initialised as nnU-Net does it and fed its own dataloaders' batches
(region targets with the ignore channel appended, deep-supervision lists).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medflowseg_nn.errors import UserError
from medflowseg_nn.synthetic import IGNORE_LABEL
from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer
from medflowseg_nn.trainers.variants import MedFlowSegTrainer_velocity
from tests.conftest import plan_synthetic_dataset, tiny_network_plans

CONFIG = "3d_fullres"
KINDS = {"regions": dict(regions=True), "ignore": dict(ignore_fraction=0.7),
         "regions_ignore": dict(regions=True, ignore_fraction=0.5)}


@pytest.fixture(scope="module", params=list(KINDS))
def planned(request, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        planned = plan_synthetic_dataset(tmp_path_factory.mktemp(request.param), mp,
                                         970 + list(KINDS).index(request.param), **KINDS[request.param])
        planned.kind = request.param
        yield planned


def make_trainer(planned, cls=MedFlowSegTrainer):
    plans = tiny_network_plans(planned.plans)
    trainer = cls(plans, CONFIG, 0, planned.dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    return trainer


@pytest.mark.parametrize("cls", [MedFlowSegTrainer, MedFlowSegTrainer_velocity])
def test_train_and_validation_step(planned, cls):
    trainer = make_trainer(planned, cls)
    lm = trainer.label_manager
    regions, ignore = "regions" in planned.kind, "ignore" in planned.kind
    assert lm.has_regions == regions and lm.has_ignore_label == ignore
    assert trainer.loss.multilabel == regions
    train_loader, val_loader = trainer.get_dataloaders()
    batch = next(train_loader)
    full = batch["target"][0]  # deep supervision is on by default: a list
    if regions:  # nnU-Net's region channels, the ignore label appended as the last one
        assert full.shape[1] == lm.num_segmentation_heads + int(ignore) == 2 + int(ignore)
    trainer.network.train()
    before = [p.detach().clone() for p in trainer.network.parameters()]
    out = trainer.train_step(batch)
    assert np.isfinite(out["loss"]) and out["loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))

    trainer.network.eval()
    trainer.on_validation_epoch_start()
    val_batch = next(val_loader)
    result = trainer.validation_step(val_batch)
    assert result["tp_hard"].shape == (2,)  # regions: whole, core; classes: outer, core (background dropped)
    # the pseudo Dice counts only the voxels that are not ignored: tp + fn = reference foreground there
    encoded = trainer.encode_target(val_batch["target"][0])
    reference = encoded.labels if regions else torch.stack([encoded.labels == c for c in (1, 2)], 1).float()
    mask = torch.ones_like(reference[:, :1]) if encoded.mask is None else encoded.mask
    counted = (reference * mask).sum((0, *range(2, reference.ndim))).numpy()
    assert np.allclose(result["tp_hard"] + result["fn_hard"], counted)
    if ignore:
        assert encoded.mask.mean() < 0.8  # a good share ignored (0.5 / 0.7 of the training labels)
    assert np.isfinite(result["loss"])


def test_ignored_voxels_see_only_the_prior(planned):
    """At t > 0 on the label's path the network input x_t at ignored voxels is the prior draw, whatever the
    label (own-estimate training, the default, shows no label anywhere: it is switched off here)."""
    if "ignore" not in planned.kind:
        pytest.skip("no ignore label")
    trainer = make_trainer(planned)
    trainer.flow_config = trainer.flow_config.replace(own_estimate_fraction=0.0)
    batch = next(trainer.get_dataloaders()[0])
    seen = {}

    def spy(image, x_t, t):
        seen.update(x_t=x_t, t=t)
        return real(image, x_t, t)

    class HalfWay:  # t = 0.5 for every sample: x_t = x0 only because the label is ignored there
        def sample(self, batch_size, device="cpu", generator=None):
            return torch.full((batch_size,), 0.5, device=device)

    real = trainer.network.forward
    trainer.network.forward = spy
    trainer.time_sampler = HalfWay()
    torch.manual_seed(0)
    with torch.no_grad():
        trainer._flow_loss(batch["data"], batch["target"])
    torch.manual_seed(0)
    x0 = torch.randn_like(seen["x_t"])
    encoded = trainer.encode_target(batch["target"][0])
    where = (encoded.mask == 0).expand_as(x0)
    assert where.any() and (seen["t"] == 0.5).all()
    assert torch.allclose(seen["x_t"][where], x0[where], atol=1e-6)
    assert not torch.allclose(seen["x_t"][~where], x0[~where], atol=1e-2)  # elsewhere half the label


@pytest.mark.parametrize("labels, key", [
    ({"background": 0, "ignore": 1, "a": 2}, "ignore"),  # the ignore label must be the highest
    ({"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order"),  # regions without an order
])
def test_invalid_label_definitions_give_one_line_user_error(planned, labels, key):
    if planned.kind != "regions":
        pytest.skip("one dataset is enough")
    dataset_json = {**planned.dataset_json, "labels": labels}
    dataset_json.pop("regions_class_order", None)
    with pytest.raises(UserError) as e:
        MedFlowSegTrainer(copy.deepcopy(planned.plans), CONFIG, 0, dataset_json, device=torch.device("cpu"))
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)


def test_ignore_value_in_dataset(planned):
    if planned.kind != "ignore":
        pytest.skip("plain labels with the ignore label only")
    assert planned.dataset_json["labels"]["ignore"] == IGNORE_LABEL
    assert make_trainer(planned).label_manager.num_segmentation_heads == 3  # the ignore label is no class
