"""nnU-Net's cascade with the flow model: ``3d_lowres`` → ``3d_cascade_fullres`` end to end on synthetic volumes.

The volumes (40³) are small, so the planner is given a small GPU memory target (``--gpu_memory_target 0.05``):
patches then cover less than nnU-Net's 25 % of the median shape and it keeps ``3d_lowres`` (with the default 8 GB
the 3d_fullres patch covers the whole case and no cascade is planned). Training uses fold ``all`` (training cases
= validation cases), so the low-resolution stage's final validation writes the previous-stage segmentation of
every case the cascade stage trains on, as nnU-Net's 5-fold run would. The trainer is the smoke variant with
mirroring off in the final validation (:class:`CascadeSmokeTrainer`, found by ``mfs_train -tr`` through a
patched plugin lookup), so the test fits a CPU budget.

The ``slow`` test runs the same chain on the real LeftAtrium data (skipped when absent).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medflowseg_nn import plugins
from medflowseg_nn.cli import plan_and_preprocess, predict, train
from medflowseg_nn.synthetic import make_synthetic_dataset
from medflowseg_nn.trainers.variants import MedFlowSegTrainer_smoke
from tests.conftest import set_nnunet_env, shared_dataset, shrink_network
from tests.integration.test_real_data import link_subset

DATASET = 975
SHAPE = (40, 40, 40)
IMAGE_CHANNELS, NUM_CLASSES = 1, 3  # synthetic: 1 channel; background, outer, core


class CascadeSmokeTrainer(MedFlowSegTrainer_smoke):
    """The smoke trainer without mirroring at the final validation (training augmentation unchanged)."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        configured = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return configured


TRAINER = CascadeSmokeTrainer.__name__


def use_test_trainer(mp: pytest.MonkeyPatch) -> None:
    """``mfs_train -tr CascadeSmokeTrainer`` finds the class above (the registered lookup for everything else)."""
    lookup = plugins.get_trainer_class
    mp.setattr(plugins, "get_trainer_class", lambda name: CascadeSmokeTrainer if name == TRAINER else lookup(name))


def train_chain(dataset: str, fold: str) -> None:
    for configuration in ("3d_lowres", "3d_cascade_fullres"):
        assert train.main([dataset, configuration, fold, "-tr", TRAINER, "-device", "cpu", "--quiet"]) == 0


def first_conv(state_dict: dict) -> torch.Tensor:
    return state_dict["encoder.0.convs.0.conv.weight"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    with pytest.MonkeyPatch.context() as mp:
        set_nnunet_env(root, mp)
        use_test_trainer(mp)
        raw = make_synthetic_dataset(root / "nnUNet_raw", DATASET, num_train=3, num_test=2, shape=SHAPE)
        assert plan_and_preprocess.main(["-d", str(DATASET), "-c", "3d_fullres", "3d_lowres", "-np", "1",
                                         "--no_verify", "--gpu_memory_target", "0.05"]) == 0
        pre = root / "nnUNet_preprocessed" / raw.name
        yield SimpleNamespace(root=root, raw=raw, pre=pre, mp=mp,
                              plans=json.loads((pre / "MedFlowSegPlans.json").read_text()),
                              dataset_json=json.loads((pre / "dataset.json").read_text()))


@pytest.fixture(scope="module")
def trained(planned):
    train_chain(str(DATASET), "all")
    results = planned.root / "nnUNet_results" / planned.raw.name
    return SimpleNamespace(lowres=results / f"{TRAINER}__MedFlowSegPlans__3d_lowres",
                           cascade=results / f"{TRAINER}__MedFlowSegPlans__3d_cascade_fullres")


def test_planner_keeps_the_cascade(planned):
    configs = planned.plans["configurations"]
    assert configs["3d_lowres"]["next_stage"] == "3d_cascade_fullres"
    assert configs["3d_cascade_fullres"] == {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    assert np.prod(configs["3d_lowres"]["spacing"]) > np.prod(configs["3d_fullres"]["spacing"])


def test_network_input_channels_are_image_previous_stage_and_x_t(planned):
    pm = PlansManager(planned.plans)
    for configuration, extra in (("3d_fullres", 0), ("3d_lowres", 0), ("3d_cascade_fullres", NUM_CLASSES - 1)):
        cm = pm.get_configuration(configuration)
        n_in = determine_num_input_channels(pm, cm, planned.dataset_json)
        assert n_in == IMAGE_CHANNELS + extra
        net = MedFlowSegTrainer_smoke.build_network_architecture(pm, cm, n_in, NUM_CLASSES, False)
        assert net.input_channels == n_in
        assert first_conv(net.state_dict()).shape[1] == n_in + NUM_CLASSES  # image ⊕ previous stage ⊕ x_t
        assert net.cond_encoder[0].convs[0].conv.weight.shape[1] == n_in  # the conditioning branch sees no x_t
        patch = cm.patch_size
        image, x_t = torch.randn(1, n_in, *patch), torch.randn(1, NUM_CLASSES, *patch)
        out = net(image, x_t, torch.zeros(1))
        assert out.shape == (1, NUM_CLASSES, *patch)
        if extra:  # the image alone, without the previous stage, is refused
            with pytest.raises(ValueError, match="image"):
                net(image[:, :IMAGE_CHANNELS], x_t, torch.zeros(1))


def test_lowres_final_validation_exports_the_next_stage(planned, trained):
    exported = trained.lowres / "predicted_next_stage" / "3d_cascade_fullres"
    fullres = planned.pre / planned.plans["configurations"]["3d_fullres"]["data_identifier"]
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (planned.raw / "imagesTr").iterdir())
    dataset_class = infer_dataset_class(str(fullres))
    # what the cascade stage's dataloader reads: the 3d_fullres case and the low-resolution stage's segmentation
    dataset = dataset_class(str(fullres), cases, folder_with_segs_from_previous_stage=str(exported))
    for case in cases:
        _, target, seg_prev, _ = dataset.load_case(case)
        assert seg_prev.shape[-3:] == target.shape[-3:], case  # resampled to the next stage's grid
        assert set(np.unique(seg_prev[:]).tolist()) <= {0, 1, 2}
    assert (trained.lowres / "fold_all" / "validation" / "summary.json").is_file()
    assert (trained.cascade / "fold_all" / "validation" / "summary.json").is_file()


def test_trained_cascade_has_image_previous_stage_and_x_t_inputs(trained):
    low = torch.load(trained.lowres / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    casc = torch.load(trained.cascade / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert first_conv(low["network_weights"]).shape[1] == IMAGE_CHANNELS + NUM_CLASSES
    assert first_conv(casc["network_weights"]).shape[1] == IMAGE_CHANNELS + (NUM_CLASSES - 1) + NUM_CLASSES


def run_predict(model: Path, inputs: Path, out: Path, *extra: str) -> int:
    return predict.main(["-i", str(inputs), "-o", str(out), "-m", str(model), "-f", "all", "-device", "cpu",
                         "--disable_tta", "-nps", "0", *extra])


def test_predict_lowres_then_cascade(planned, trained, tmp_path, capsys):
    inputs = planned.raw / "imagesTs"
    low, casc = tmp_path / "low", tmp_path / "cascade"
    assert run_predict(trained.lowres, inputs, low, "-npp", "0") == 0
    # background preprocessing (nnU-Net's iterator with the previous stage's files) ...
    assert run_predict(trained.cascade, inputs, casc, "-prev_stage_predictions", str(low), "-npp", "1",
                       "--save_probabilities") == 0
    # ... and the in-process fallback give the same input, hence the same output
    inproc = tmp_path / "cascade_inproc"
    assert run_predict(trained.cascade, inputs, inproc, "-prev_stage_predictions", str(low), "-npp", "0",
                       "--save_probabilities") == 0
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in inputs.iterdir())
    for case in cases:
        image = sitk.ReadImage(str(inputs / f"{case}_0000.nii.gz"))
        seg = sitk.ReadImage(str(casc / f"{case}.nii.gz"))
        assert seg.GetSize() == image.GetSize() and set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2}
        np.testing.assert_allclose(np.load(casc / f"{case}.npz")["probabilities"],
                                   np.load(inproc / f"{case}.npz")["probabilities"], atol=1e-5)
    # the previous stage is an input: an empty low-resolution segmentation changes the probabilities
    empty = tmp_path / "empty"
    empty.mkdir()
    for case in cases:
        seg = sitk.ReadImage(str(low / f"{case}.nii.gz"))
        blank = sitk.Image(seg.GetSize(), seg.GetPixelID())
        blank.CopyInformation(seg)
        sitk.WriteImage(blank, str(empty / f"{case}.nii.gz"))
    assert run_predict(trained.cascade, inputs, tmp_path / "from_empty", "-prev_stage_predictions", str(empty),
                       "-npp", "0", "--save_probabilities") == 0
    assert not np.allclose(np.load(tmp_path / "from_empty" / f"{cases[0]}.npz")["probabilities"],
                           np.load(casc / f"{cases[0]}.npz")["probabilities"], atol=1e-4)


def test_cascade_prediction_errors(planned, trained, tmp_path, capsys):
    inputs = planned.raw / "imagesTs"
    assert run_predict(trained.cascade, inputs, tmp_path / "a", "-npp", "0") == 2
    assert "-prev_stage_predictions" in capsys.readouterr().err
    assert run_predict(trained.lowres, inputs, tmp_path / "b", "-npp", "0", "-prev_stage_predictions",
                       str(tmp_path)) == 2
    assert "only for cascade" in capsys.readouterr().err
    # a case without its previous-stage file fails alone; the others are written
    low = tmp_path / "low"
    assert run_predict(trained.lowres, inputs, low, "-npp", "0") == 0
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in inputs.iterdir())
    (low / f"{cases[0]}.nii.gz").unlink()
    out = tmp_path / "c"
    assert run_predict(trained.cascade, inputs, out, "-npp", "0", "-prev_stage_predictions", str(low)) == 2
    err = capsys.readouterr().err
    assert f"no previous-stage segmentation for {cases[0]}" in err
    assert not (out / f"{cases[0]}.nii.gz").exists() and (out / f"{cases[1]}.nii.gz").is_file()
    shutil.rmtree(out)


@pytest.mark.slow
def test_left_atrium_lowres_then_cascade(tmp_path, monkeypatch):
    """The chain on 4 real LeftAtrium cases: 2 train = validate (custom split), 2 predicted. nnU-Net's plans keep
    no 3d_lowres for these volumes (the 3d_fullres patch covers > 25 % of the median case; with 2 GB the lowres
    shape is still within 2x of the fullres one and nnU-Net drops it), so the planner gets a 1 GB target; the
    networks are shrunk (8-64 features, one conv per stage) and the planner's patch sizes kept."""
    source = shared_dataset("Dataset140_LeftAtrium")
    paths = set_nnunet_env(tmp_path, monkeypatch)
    use_test_trainer(monkeypatch)
    raw, cases = link_subset(source, paths["nnUNet_raw"], 4)
    dataset_id = raw.name[7:10]
    assert plan_and_preprocess.main(["-d", dataset_id, "-c", "3d_fullres", "3d_lowres", "-np", "2",
                                     "--gpu_memory_target", "1"]) == 0
    pre = paths["nnUNet_preprocessed"] / raw.name
    plans = json.loads((pre / "MedFlowSegPlans.json").read_text())
    assert "3d_cascade_fullres" in plans["configurations"]
    shrink_network(pre / "MedFlowSegPlans.json", ("3d_fullres", "3d_lowres"))  # the cascade inherits 3d_fullres
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases[:2], "val": cases[:2]}]))
    train_chain(dataset_id, "0")
    results = paths["nnUNet_results"] / raw.name
    casc = results / f"{TRAINER}__MedFlowSegPlans__3d_cascade_fullres"
    assert json.loads((casc / "fold_0" / "validation" / "summary.json").read_text())["foreground_mean"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for case in cases[2:]:
        (inputs / f"{case}_0000.nii.gz").symlink_to((raw / "imagesTr" / f"{case}_0000.nii.gz").resolve())
    low = tmp_path / "low"
    common = ["-i", str(inputs), "-d", dataset_id, "-tr", TRAINER, "-f", "0", "-device", "cpu", "--disable_tta"]
    assert predict.main(common + ["-o", str(low), "-c", "3d_lowres"]) == 0
    assert predict.main(common + ["-o", str(tmp_path / "cascade"), "-c", "3d_cascade_fullres",
                                  "-prev_stage_predictions", str(low)]) == 0
    for case in cases[2:]:
        seg = sitk.ReadImage(str(tmp_path / "cascade" / f"{case}.nii.gz"))
        assert seg.GetSize() == sitk.ReadImage(str(inputs / f"{case}_0000.nii.gz")).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= {0, 1}
