"""``mfs_predict --steps N --solver heun`` end to end on a trained smoke model, in-process.

A spy on the sampler's ``integrate`` records every ODE integration (its solver configuration and how many times
it evaluates the field), so the test knows the multi-step solver really ran, not only that the run succeeded.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from medflowseg_nn.cli import plan_and_preprocess, predict, train
from medflowseg_nn.inference import sampler
from medflowseg_nn.synthetic import make_synthetic_dataset
from tests.conftest import set_nnunet_env

GEOMETRY = dict(spacing=(0.9, 1.0, 1.2), origin=(10.0, -5.0, 3.0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
TRAINER = "MedFlowSegTrainer_smoke"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Plan, shrink the network in the plans, train ``MedFlowSegTrainer_smoke``; 2 test images with geometry."""
    root = tmp_path_factory.mktemp("predict_solver")
    with pytest.MonkeyPatch.context() as mp:
        set_nnunet_env(root, mp)
        raw = make_synthetic_dataset(root / "nnUNet_raw", 984, num_train=5, num_test=2, shape=(16, 20, 16))
        assert plan_and_preprocess.main(["-d", "984", "-c", "3d_fullres", "-np", "1", "--no_verify"]) == 0
        plans_file = root / "nnUNet_preprocessed" / raw.name / "MedFlowSegPlans.json"
        plans = json.loads(plans_file.read_text())
        plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"].update(
            features_per_stage=[4, 8, 16], n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])
        plans_file.write_text(json.dumps(plans))
        assert train.main(["984", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]) == 0
        inputs = root / "inputs"
        inputs.mkdir()
        for f in sorted((raw / "imagesTs").iterdir()):
            img = sitk.ReadImage(str(f))
            img.SetSpacing(GEOMETRY["spacing"])
            img.SetOrigin(GEOMETRY["origin"])
            img.SetDirection(GEOMETRY["direction"])
            sitk.WriteImage(img, str(inputs / f.name), useCompression=True)
        model = root / "nnUNet_results" / raw.name / f"{TRAINER}__MedFlowSegPlans__3d_fullres"
        yield SimpleNamespace(inputs=inputs, model=model, cases=sorted(f.name[:-len("_0000.nii.gz")]
                                                                      for f in inputs.iterdir()))


@pytest.fixture
def spy(monkeypatch):
    """Records (solver config, number of field evaluations) of every ``integrate`` the sampler calls."""
    calls = []
    original = sampler.integrate

    def recording(velocity, x0, config):
        counter = [0]

        def counted(x, t):
            counter[0] += 1
            return velocity(x, t)

        out = original(counted, x0, config)
        calls.append((config, counter[0]))
        return out

    monkeypatch.setattr(sampler, "integrate", recording)
    return calls


def run(trained, out: Path, *extra: str) -> int:
    return predict.main(["-i", str(trained.inputs), "-o", str(out), "-m", str(trained.model), "-f", "0",
                         "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0", "--save_probabilities",
                         *extra])


def outputs(trained, out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    result = {}
    for case in trained.cases:
        pred, ref = sitk.ReadImage(str(out / f"{case}.nii.gz")), sitk.ReadImage(str(trained.inputs /
                                                                                   f"{case}_0000.nii.gz"))
        assert pred.GetSize() == ref.GetSize()
        for get in ("GetSpacing", "GetOrigin", "GetDirection"):
            assert np.allclose(getattr(pred, get)(), getattr(ref, get)()), get
        seg = sitk.GetArrayFromImage(pred)
        assert set(np.unique(seg)) <= {0, 1, 2}
        probs = np.load(out / f"{case}.npz")["probabilities"]
        assert probs.shape == (3, *seg.shape) and np.allclose(probs.sum(0), 1, atol=1e-3)
        assert np.array_equal(probs.argmax(0), seg)
        result[case] = (seg, probs)
    return result


def test_heun_three_steps_runs_the_multistep_solver(trained, tmp_path, spy):
    assert run(trained, tmp_path / "heun", "--steps", "3", "--solver", "heun") == 0
    heun = outputs(trained, tmp_path / "heun")
    assert len(spy) >= len(trained.cases)  # at least one patch per case (the images fit one patch each)
    for config, evaluations in spy:
        assert (config.steps, config.method, config.grid) == (3, "heun", "uniform")
        assert config.euler_last_step  # x1 parameterisation: no corrector at the singular t = 1
        assert evaluations == config.num_evaluations == 5

    spy.clear()
    assert run(trained, tmp_path / "one") == 0  # the plans' default: one Euler step, no ODE loop
    one = outputs(trained, tmp_path / "one")
    assert spy == []
    differences = [np.abs(heun[c][1] - one[c][1]).max() for c in trained.cases]
    assert max(differences) > 1e-3, differences


def test_steps_without_solver_uses_the_plans_euler(trained, tmp_path, spy):
    assert json.loads((trained.model / "plans.json").read_text())["flow_matching"]["solver"] == "euler"
    assert run(trained, tmp_path / "euler", "--steps", "2") == 0
    outputs(trained, tmp_path / "euler")
    assert spy and all((c.steps, c.method) == (2, "euler") and n == 2 for c, n in spy)


def test_path_mean_flag_reaches_the_solver_and_averages_the_two_estimates(trained, tmp_path, spy):
    """``--steps 2 --path_mean``: the solver runs with ``path_mean``, and the output is neither the one-step nor
    the two-step one (per patch it is their mean, ``test_sampler``; the sliding window's Gaussian-weighted sum of
    log-probabilities over overlapping tiles is not linear in them). Raw probabilities: the fold's temperature
    was fitted for one step only."""
    assert run(trained, tmp_path / "mean", "--steps", "2", "--path_mean", "--no_temperature") == 0
    mean = outputs(trained, tmp_path / "mean")
    assert spy and all(c.path_mean and (c.steps, n) == (2, 2) for c, n in spy)
    spy.clear()
    assert run(trained, tmp_path / "two", "--steps", "2", "--no_temperature") == 0
    two = outputs(trained, tmp_path / "two")
    assert spy and not any(c.path_mean for c, _ in spy)  # the plans' default: off
    assert run(trained, tmp_path / "one", "--no_temperature") == 0
    one = outputs(trained, tmp_path / "one")
    for other in (one, two):
        assert max(np.abs(mean[c][1] - other[c][1]).max() for c in trained.cases) > 1e-3
