"""The residual-encoder presets ``MedFlowSegPlannerResEncM`` / ``L`` / ``XL``: plans, network, estimate, training.

A tiny synthetic 3D dataset is fingerprinted once and planned with each preset (``mfs_plan_and_preprocess -pl``)
and, for comparison, with nnU-Net's ``nnUNetPlannerResEncM``; the M plans are preprocessed and trained for a
smoke budget with ``mfs_train -p MedFlowSegResEncUNetMPlans``, then used by ``mfs_predict -p``.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM)
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medflowseg_nn import nnunet_compat
from medflowseg_nn.cli import plan_and_preprocess, predict, train
from medflowseg_nn.config import PLANS_KEY
from medflowseg_nn.model import MEMORY_ESTIMATE_KEY, check_memory_estimate
from medflowseg_nn.networks.residual_vector_field_unet import ResidualEncoderVectorFieldUNet
from medflowseg_nn.planners.mfs_resenc_planners import MedFlowSegPlannerResEncM
from medflowseg_nn.plugins import get_planner_class
from medflowseg_nn.synthetic import make_synthetic_dataset
from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer
from tests.conftest import set_nnunet_env

DATASET = 976
PRESETS = {"M": "MedFlowSegResEncUNetMPlans", "L": "MedFlowSegResEncUNetLPlans", "XL": "MedFlowSegResEncUNetXLPlans"}
NNUNET_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
IN_CH, NUM_CLASSES = 1, 3


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("resenc")
    with pytest.MonkeyPatch.context() as mp:
        set_nnunet_env(root, mp)
        raw = make_synthetic_dataset(root / "nnUNet_raw", DATASET, num_train=5, num_test=1, shape=(16, 20, 16))
        for size in PRESETS:
            args = ["-d", str(DATASET), "-c", "3d_fullres", "-np", "1", "--no_verify", "-pl",
                    f"MedFlowSegPlannerResEnc{size}"]
            assert plan_and_preprocess.main(args + ([] if size == "M" else ["--no_pp"])) == 0
        pre = root / "nnUNet_preprocessed" / raw.name
        yield SimpleNamespace(root=root, raw=raw, pre=pre, dataset_json=json.loads((pre / "dataset.json").read_text()),
                              plans={s: json.loads((pre / f"{n}.json").read_text()) for s, n in PRESETS.items()})


def test_presets_are_registered_and_subclass_nnunets():
    cls = get_planner_class("MedFlowSegPlannerResEncM")
    assert cls is MedFlowSegPlannerResEncM and issubclass(cls, nnUNetPlannerResEncM)


@pytest.mark.parametrize("size", list(PRESETS))
def test_plans_name_network_blocks_and_flow_block(planned, size):
    plans = planned.plans[size]
    assert plans["plans_name"] == PRESETS[size]
    assert PLANS_KEY in plans and plans[MEMORY_ESTIMATE_KEY]["network"] == plans[PLANS_KEY]["network"]
    for name, cfg in plans["configurations"].items():
        arch = cfg["architecture"]
        assert arch["network_class_name"] == f"{ResidualEncoderVectorFieldUNet.__module__}." \
                                             "ResidualEncoderVectorFieldUNet"
        n = arch["arch_kwargs"]["n_stages"]
        assert list(arch["arch_kwargs"]["n_blocks_per_stage"]) == list(NNUNET_BLOCKS[:n])
        assert cfg["data_identifier"] == f"nnUNetPlans_{name}"  # nnU-Net's ResEnc convention: data shared


def build(plans: dict, configuration: str) -> tuple[torch.nn.Module, object]:
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    assert check_memory_estimate(plans, cm, IN_CH, NUM_CLASSES,
                                 MedFlowSegTrainer.resolved_flow_config(plans, cm).network) == 1.0
    return MedFlowSegTrainer.build_network_architecture(pm, cm, IN_CH, NUM_CLASSES), cm


@pytest.mark.parametrize("size", list(PRESETS))
@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_residual_network_forward_backward_at_the_planned_patch(planned, size, configuration):
    net, cm = build(planned.plans[size], configuration)
    assert isinstance(net, ResidualEncoderVectorFieldUNet)
    blocks = [m for m in net.encoder.modules() if isinstance(m, BasicBlockD)]
    assert len(blocks) == sum(cm.network_arch_init_kwargs["n_blocks_per_stage"])
    assert all(float(b.conv2.norm.weight.detach().abs().sum()) == 0 for b in blocks)  # ResidualEncoderUNet's init
    net.train()
    patch = cm.patch_size
    image, x_t = torch.randn(2, IN_CH, *patch), torch.randn(2, NUM_CLASSES, *patch)
    out = net(image, x_t, torch.tensor([0.0, 0.5]))
    outputs = out if isinstance(out, list) else [out]
    assert outputs[0].shape == (2, NUM_CLASSES, *patch)
    sum(o.float().pow(2).mean() for o in outputs).backward()
    assert all(p.grad is not None for p in net.encoder.parameters() if p.requires_grad)


def test_estimate_is_computed_on_our_residual_network(planned):
    plans = planned.plans["M"]
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    patch = tuple(plans["configurations"]["3d_fullres"]["patch_size"])
    planner = MedFlowSegPlannerResEncM(DATASET)
    ours = planner.static_estimate_VRAM_usage(patch, IN_CH, NUM_CLASSES, arch["network_class_name"],
                                              arch["arch_kwargs"], tuple(arch["_kw_requires_import"]))
    net, _ = build(plans, "3d_fullres")
    assert ours == net.compute_conv_feature_map_size(patch) + np.prod([IN_CH + NUM_CLASSES, *patch])
    kwargs = {k: v for k, v in arch["arch_kwargs"].items()}
    with nnunet_compat.nonzero_da_threads():
        theirs = nnUNetPlannerResEncM.static_estimate_VRAM_usage(
            patch, IN_CH, NUM_CLASSES, "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            kwargs, tuple(arch["_kw_requires_import"]))
    assert ours > theirs  # time modulation, DBSA / FAA buffers and the input are counted too


def test_train_and_predict_with_the_resenc_plans(planned, tmp_path):
    assert train.main([str(DATASET), "3d_fullres", "0", "-tr", "MedFlowSegTrainer_smoke", "-p", PRESETS["M"],
                       "-device", "cpu", "--quiet"]) == 0
    model = planned.root / "nnUNet_results" / planned.raw.name / \
        f"MedFlowSegTrainer_smoke__{PRESETS['M']}__3d_fullres"
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["init_args"]["plans"]["plans_name"] == PRESETS["M"]
    assert any(".stage.blocks.0.conv1." in k for k in ckpt["network_weights"])  # residual encoder trained
    assert json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"] == \
        planned.plans["M"]["configurations"]["3d_fullres"]["architecture"]
    out = tmp_path / "pred"
    assert predict.main(["-i", str(planned.raw / "imagesTs"), "-o", str(out), "-d", str(DATASET), "-c",
                         "3d_fullres", "-tr", "MedFlowSegTrainer_smoke", "-p", PRESETS["M"], "-f", "0",
                         "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0"]) == 0
    for image in (planned.raw / "imagesTs").iterdir():
        seg = sitk.ReadImage(str(out / image.name.replace("_0000", "")))
        assert seg.GetSize() == sitk.ReadImage(str(image)).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= {0, 1, 2}
