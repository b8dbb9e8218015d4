"""MedFlowSegPredictor: sample-disagreement hooks on nnU-Net's sliding window and the robust, atomic case loop.

Uses an untrained (perturbed) vector field saved as a fold-0 checkpoint of tiny plans, so no training is needed;
``tests/cli/test_predict_cli.py`` runs the same paths with a trained smoke model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medflowseg_nn.cli import plan_and_preprocess
from medflowseg_nn import nnunet_compat
from medflowseg_nn.inference.export import PARTIAL_DIR
from medflowseg_nn.flow.solver import SolverConfig
from medflowseg_nn.inference.predictor import MedFlowSegPredictor
from medflowseg_nn.inference.runner import CaseJob, ExportOptions, case_outputs, predict_cases
from medflowseg_nn.inference.sampler import FlowSegmenter
from medflowseg_nn.synthetic import make_synthetic_dataset, synthetic_case
from medflowseg_nn.inference.uncertainty import SampleAccumulator, pairwise_disagreement, predictive_entropy
from tests.conftest import set_nnunet_env
from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer

PATCH = [12, 16, 12]
GEOMETRY = dict(spacing=(0.9, 1.0, 1.2), origin=(10.0, -5.0, 3.0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))


def write_case(path: Path, shape, seed: int) -> None:
    image, _ = synthetic_case(shape, np.random.default_rng(seed))
    img = sitk.GetImageFromArray(image)
    img.SetSpacing(GEOMETRY["spacing"])
    img.SetOrigin(GEOMETRY["origin"])
    img.SetDirection(GEOMETRY["direction"])
    sitk.WriteImage(img, str(path), useCompression=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Planned synthetic dataset, a fabricated model folder (tiny plans, perturbed untrained field), 3 inputs."""
    root = tmp_path_factory.mktemp("predictor")
    with pytest.MonkeyPatch.context() as mp:
        set_nnunet_env(root, mp)
        raw = make_synthetic_dataset(root / "nnUNet_raw", 991, num_train=4, shape=(20, 24, 20))
        assert plan_and_preprocess.main(["-d", "991", "-c", "3d_fullres", "-np", "1"]) == 0
        pre = root / "nnUNet_preprocessed" / raw.name
        plans = json.loads((pre / "MedFlowSegPlans.json").read_text())
        config = plans["configurations"]["3d_fullres"]
        config["patch_size"] = PATCH
        config["architecture"]["arch_kwargs"].update(features_per_stage=[4, 8, 16], n_conv_per_stage=[1, 1, 1],
                                                     n_conv_per_stage_decoder=[1, 1])
        # the plain x_t input: these tests stitch K one-step samples, which differ only when the field sees x0
        plans["flow_matching"]["network"]["time_scaled_x_t"] = False
        model = root / "model"
        (model / "fold_0").mkdir(parents=True)
        (model / "plans.json").write_text(json.dumps(plans))
        (model / "dataset.json").write_text((pre / "dataset.json").read_text())
        pm = PlansManager(plans)
        torch.manual_seed(0)
        net = MedFlowSegTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3, False)
        with torch.no_grad():
            for p in net.parameters():
                if p.abs().sum() == 0:
                    p.normal_(std=0.05)
        torch.save({"network_weights": net.state_dict(), "trainer_name": "MedFlowSegTrainer",
                    "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
                   model / "fold_0" / "checkpoint_final.pth")
        inputs = root / "inputs"
        inputs.mkdir()
        for i, shape in enumerate([(18, 24, 22), (20, 20, 20), (16, 26, 18)]):
            write_case(inputs / f"case{i}_0000.nii.gz", shape, i)
        yield SimpleNamespace(root=root, model=model, inputs=inputs)


def make_predictor(env, **kwargs) -> MedFlowSegPredictor:
    predictor = MedFlowSegPredictor(device=torch.device("cpu"), perform_everything_on_device=False,
                                    allow_tqdm=False, **kwargs)
    predictor.initialize_from_trained_model_folder(str(env.model), [0])
    return predictor


def jobs_for(env, out: Path, cases=("case0", "case1", "case2")) -> list[CaseJob]:
    return [CaseJob(c, (str(env.inputs / f"{c}_0000.nii.gz"),), str(out / c)) for c in cases]


@pytest.mark.parametrize("two_d", [False, True])
def test_sample_accumulator_stitches_patches_back(two_d):
    """Patches cut from a volume and stitched with Gaussian weights give the volume back, at every voxel."""
    shape, patch = (5, 20, 18) if two_d else (14, 20, 18), (12, 10) if two_d else (8, 12, 10)
    steps = compute_steps_for_sliding_window(shape[1:] if two_d else shape, patch, 0.5)
    if two_d:
        slicers = [(slice(None), d, slice(a, a + patch[0]), slice(b, b + patch[1]))
                   for d in range(shape[0]) for a in steps[0] for b in steps[1]]
    else:
        slicers = [(slice(None), *(slice(s, s + p) for s, p in zip(start, patch)))
                   for start in zip(*[g.ravel() for g in np.meshgrid(*steps, indexing="ij")])]
    volume = torch.rand(3, 2, *shape)  # [K, C, *S]
    gaussian = compute_gaussian(tuple(patch), 1. / 8, 10, device=torch.device("cpu"))
    acc = SampleAccumulator(3, 2, shape, slicers, gaussian, torch.device("cpu"))
    for sl in slicers:
        acc.add(volume[(slice(None), *sl)])
    assert torch.allclose(acc.probabilities(), volume, atol=1e-5)
    assert torch.equal(acc.disagreement(), pairwise_disagreement(volume.argmax(1), 2))


def test_disagreement_equals_per_seed_flows_with_mirroring(env, monkeypatch):
    """One padded patch with 8 mirrorings: the stitched samples are the seed+k flows, mirrored back and averaged."""
    captured = {}
    original = SampleAccumulator.disagreement
    monkeypatch.setattr(SampleAccumulator, "disagreement",
                        lambda self: captured.setdefault("p", self.probabilities()) is not None and original(self))
    predictor = make_predictor(env, num_samples=3, seed=5)
    data = torch.randn(1, 10, 16, 12, generator=torch.Generator().manual_seed(0))
    out = predictor.predict_case(data, with_disagreement=True)
    logits, disagreement = out.logits, out.disagreement.numpy()
    assert disagreement.shape == (10, 16, 12) and 0 <= disagreement.min() and disagreement.max() <= 1
    assert disagreement.max() > 0

    x = pad_nd_image(data, PATCH)[None]  # [1, 1, 12, 16, 12], one voxel padded on both sides of axis 0
    combos = nnunet_compat.mirror_combinations(predictor.allowed_mirroring_axes)
    assert len(combos) == 8
    reference = []
    with torch.no_grad():
        for k in range(3):
            seg = FlowSegmenter(predictor.segmenter.field, 3, "x1", seed=5 + k)
            reference.append(sum(torch.flip(seg(torch.flip(x, c)).exp(), c) for c in combos)[0] / len(combos))
    reference = torch.stack(reference)  # [K, C, *P]
    assert torch.allclose(captured["p"], reference, atol=1e-4)
    expected = pairwise_disagreement(reference.argmax(1), 3)[1:11].numpy()
    assert np.mean(disagreement != expected) < 0.01  # near-ties may flip between batched and single runs

    # stitching the samples never changes the logits
    assert torch.equal(predictor.predict_logits_from_preprocessed_data(data), logits)


def test_multi_patch_disagreement_and_single_sample(env):
    data = torch.randn(1, 16, 20, 16, generator=torch.Generator().manual_seed(1))  # 2 x 2 x 2 patches
    disagreement = make_predictor(env, num_samples=2, use_mirroring=False).predict_case(data, True).disagreement
    assert disagreement.shape == (16, 20, 16)
    assert set(np.unique(disagreement.numpy())) <= {0.0, 1.0} and disagreement.max() == 1
    single = make_predictor(env, num_samples=1, use_mirroring=False).predict_case(data, True).disagreement
    assert not single.any()


@pytest.mark.parametrize("mirroring,num_samples", [(True, 1), (False, 2)])
def test_logits_are_bit_identical_to_nnunets_sliding_window(env, mirroring, num_samples):
    """Our stitching loop reproduces nnU-Net's (padding, slicers, mirror order, Gaussian, float16 sums) exactly."""
    predictor = make_predictor(env, num_samples=num_samples, use_mirroring=mirroring)
    data = torch.randn(1, 15, 21, 13, generator=torch.Generator().manual_seed(2))  # padded, several patches
    ours = predictor.predict_sliding_window_return_logits(data)
    theirs = nnUNetPredictor.predict_sliding_window_return_logits(predictor, data)  # nnU-Net's own loop
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def assert_same_geometry(path: Path, reference: Path) -> None:
    a, b = sitk.ReadImage(str(path)), sitk.ReadImage(str(reference))
    assert a.GetSize() == b.GetSize()
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(a, get)(), getattr(b, get)()), get


def test_predict_cases_writes_probabilities_uncertainty_and_overlays(env, tmp_path):
    predictor = make_predictor(env, num_samples=3, use_mirroring=False)
    options = ExportOptions(True, str(tmp_path / "unc"), str(tmp_path / "png"))
    jobs = jobs_for(env, tmp_path / "out", ("case0", "case2"))
    os.makedirs(tmp_path / "out")
    assert predict_cases(predictor, jobs, options, 0, 0) == {}
    for job in jobs:
        paths = case_outputs(job, ".nii.gz", options)
        assert all(os.path.isfile(p) for p in paths.values())
        for kind in ("seg", "entropy", "disagreement"):
            assert_same_geometry(Path(paths[kind]), Path(job.files[0]))
        probs = np.load(paths["npz"])["probabilities"]
        image = sitk.GetArrayFromImage(sitk.ReadImage(job.files[0]))
        assert probs.shape == (3, *image.shape)
        assert np.allclose(probs.sum(0), 1, atol=1e-3)
        entropy = sitk.GetArrayFromImage(sitk.ReadImage(paths["entropy"]))
        assert np.allclose(entropy, predictive_entropy(probs), atol=1e-4)
        assert entropy.min() >= 0 and entropy.max() <= np.log(3) + 1e-4
        disagreement = sitk.GetArrayFromImage(sitk.ReadImage(paths["disagreement"]))
        assert 0 <= disagreement.min() and disagreement.max() <= 1 and disagreement.max() > 0
        seg = sitk.GetArrayFromImage(sitk.ReadImage(paths["seg"]))
        assert np.array_equal(seg, probs.argmax(0))
    for folder in ("out", "unc", "png"):
        assert not (tmp_path / folder / PARTIAL_DIR).exists() or not os.listdir(tmp_path / folder / PARTIAL_DIR)


def test_failed_export_leaves_no_output_of_that_case(env, tmp_path, monkeypatch):
    original = SimpleITKIO.write_seg

    def failing(self, seg, output_fname, properties):
        if os.path.basename(output_fname).startswith("case1"):
            raise OSError("disk full")
        original(self, seg, output_fname, properties)

    monkeypatch.setattr(SimpleITKIO, "write_seg", failing)
    options = ExportOptions(True, str(tmp_path / "unc"), None)
    jobs = jobs_for(env, tmp_path / "out", ("case0", "case1"))
    failures = predict_cases(make_predictor(env, num_samples=2, use_mirroring=False), jobs, options, 0, 0)
    assert list(failures) == ["case1"] and failures["case1"].startswith("case1_0000.nii.gz: export failed")
    assert "disk full" in failures["case1"]
    written = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert not [n for n in written if n.startswith("case1")]
    assert {"case0.nii.gz", "case0.npz", "case0.pkl", "case0_entropy.nii.gz",
            "case0_disagreement.nii.gz"} <= set(written)


def test_background_pools_match_in_process_and_isolate_a_corrupt_case(env, tmp_path):
    """nnU-Net's preprocessing workers and the spawn export pool; an unreadable file kills the preprocessing
    worker, the remaining cases are preprocessed in-process and only the bad case fails."""
    bad = tmp_path / "bad_0000.nii.gz"
    bad.write_bytes(os.urandom(300))
    jobs = jobs_for(env, tmp_path / "pool", ("case0", "case2"))
    jobs.insert(1, CaseJob("bad", (str(bad),), str(tmp_path / "pool" / "bad")))
    os.makedirs(tmp_path / "pool")
    predictor = make_predictor(env, num_samples=2, use_mirroring=False, seed=3)
    failures = predict_cases(predictor, jobs, ExportOptions(), 1, 1)
    assert list(failures) == ["bad"] and failures["bad"].startswith("bad_0000.nii.gz: preprocessing failed")
    reference = jobs_for(env, tmp_path / "ref", ("case0", "case2"))
    os.makedirs(tmp_path / "ref")
    assert predict_cases(predictor, reference, ExportOptions(), 0, 0) == {}
    for job, ref in zip([jobs[0], jobs[2]], reference):
        a = sitk.GetArrayFromImage(sitk.ReadImage(job.output_truncated + ".nii.gz"))
        assert np.array_equal(a, sitk.GetArrayFromImage(sitk.ReadImage(ref.output_truncated + ".nii.gz")))


def test_one_fold_is_loaded_once_and_again_after_the_weights_change(env, monkeypatch):
    """nnU-Net reloads every fold for every case; with one fold the same weights are loaded once, and again only
    when something changed them in place (a load, an optimiser step) — the outputs stay those of the fold."""
    predictor = make_predictor(env, use_mirroring=False)
    loads = []
    original = predictor.segmenter.load_state_dict
    monkeypatch.setattr(predictor.segmenter, "load_state_dict", lambda sd, **kw: loads.append(1) or original(sd, **kw))
    data = torch.randn(1, 12, 16, 12, generator=torch.Generator().manual_seed(3))
    first = predictor.predict_case(data).logits
    assert torch.equal(predictor.predict_case(data).logits, first) and len(loads) == 1
    with torch.no_grad():
        next(predictor.segmenter.parameters()).add_(1.0)  # weights changed behind the predictor's back
    assert torch.equal(predictor.predict_case(data).logits, first) and len(loads) == 2


def test_sampler_settings_name_the_path_mean_only_where_it_changes_the_output():
    settings = MedFlowSegPredictor.sampler_settings
    assert settings(SolverConfig(2, path_mean=True), 1) == {"steps": 2, "solver": "euler", "num_samples": 1,
                                                            "path_mean": True}
    assert "path_mean" not in settings(SolverConfig(2), 1)  # temperatures fitted before the option still match
    assert "path_mean" not in settings(SolverConfig(1, path_mean=True), 1)  # one Euler step: the same output
