"""``mfs_find_best_configuration`` on two trained smoke configurations (2d and 3d_fullres, folds 0 and 1, validation
probabilities kept), then the sequence its ``inference_instructions.txt`` prints, run as written (in-process):
``mfs_predict`` → ``mfs_ensemble`` → ``mfs_apply_postprocessing``; and ``mfs_predict -f 0 1`` uncertainty over
(fold, sample) members; ``mfs_pool_calibration`` on the same folds."""
from __future__ import annotations

import json
import shlex
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from medflowseg_nn.calibration_folder import folder_rows
from medflowseg_nn.cli import ensemble, find_best_configuration, pool_calibration, postprocessing, predict
from medflowseg_nn.temperature import calibration_of_rows
from tests.cli.conftest import TRAINER, WORKFLOW_CONFIGURATIONS, WORKFLOW_DATASET, train_smoke_folds
from tests.conftest import set_nnunet_env

DATASET = WORKFLOW_DATASET
CONFIGURATIONS = WORKFLOW_CONFIGURATIONS


@pytest.fixture(scope="module")
def trained(tmp_path_factory, planned_workflow_dataset):
    """Smoke folds 0 and 1 of 2d and 3d_fullres with ``--npz``; 2 test images as inputs."""
    root = tmp_path_factory.mktemp("find_best")
    with pytest.MonkeyPatch.context() as mp:
        set_nnunet_env(root, mp)
        raw, _ = train_smoke_folds(planned_workflow_dataset, root, (0, 1), CONFIGURATIONS, ("--npz",))
        inputs = root / "inputs"
        inputs.mkdir()
        for f in sorted((raw / "imagesTs").iterdir())[:2]:
            shutil.copy(f, inputs)
        yield SimpleNamespace(root=root, raw=raw, inputs=inputs, results=root / "nnUNet_results" / raw.name,
                              models={c: root / "nnUNet_results" / raw.name / f"{TRAINER}__MedFlowSegPlans__{c}"
                                      for c in CONFIGURATIONS})


@pytest.fixture(scope="module")
def best(trained):
    with pytest.MonkeyPatch.context() as mp:
        set_env(trained, mp)
        assert find_best_configuration.main([str(DATASET), "-c", *CONFIGURATIONS, "-tr", TRAINER, "-f", "0", "1",
                                             "-np", "1"]) == 0
    return json.loads((trained.results / "inference_information.json").read_text())


def set_env(trained, mp: pytest.MonkeyPatch) -> None:
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        mp.setenv(name, str(trained.root / name))
    mp.setenv("nnUNet_def_n_proc", "2")
    mp.setenv("nnUNet_n_proc_DA", "0")


def dice_of(summary_file) -> float:
    return json.loads(summary_file.read_text())["foreground_mean"]["Dice"]


def test_scores_every_model_and_pair_and_picks_the_best(trained, best):
    ens = f"ensemble___{TRAINER}__MedFlowSegPlans__2d___{TRAINER}__MedFlowSegPlans__3d_fullres___0_1"
    results = best["all_results"]
    assert list(results) == [f"{TRAINER}__MedFlowSegPlans__2d", f"{TRAINER}__MedFlowSegPlans__3d_fullres", ens]
    for c in CONFIGURATIONS:  # the single models' scores are nnU-Net's summary of the merged validation folders
        merged = trained.models[c] / "crossval_results_folds_0_1"
        assert results[f"{TRAINER}__MedFlowSegPlans__{c}"] == pytest.approx(dice_of(merged / "summary.json"))
        assert len(list(merged.glob("*.nii.gz"))) == 2  # one validation case per fold of 5
    ens_folder = trained.results / "ensembles" / ens
    assert results[ens] == pytest.approx(dice_of(ens_folder / "summary.json"))
    for case in ens_folder.glob("*.nii.gz"):  # the ensemble is the mean of the two models' validation probabilities
        name = case.name[: -len(".nii.gz")]
        probs = [np.load(next(trained.models[c].glob(f"fold_*/validation/{name}.npz")))["probabilities"]
                 for c in CONFIGURATIONS]
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(case)))
        assert np.array_equal(seg, ((probs[0] + probs[1]) / 2).argmax(0))
    top = max(results.values())
    chosen = best["best_model_or_ensemble"]
    assert chosen["result_on_crossval_pre_pp"] == top
    first_best = next(k for k, v in results.items() if v == top)
    members = [f"{m['trainer']}__{m['plans_identifier']}__{m['configuration']}"
               for m in chosen["selected_model_or_models"]]
    assert (members == first_best.split("___")[1:3]) if first_best.startswith("ensemble___") \
        else members == [first_best]
    pp = trained.root / chosen["postprocessing_file"]
    assert pp.is_file() and (pp.parent / "postprocessed" / "summary.json").is_file()
    assert chosen["result_on_crossval_post_pp"] == pytest.approx(dice_of(pp.parent / "postprocessed" / "summary.json"))


def run_instruction(line: str, folders: dict[str, str]) -> int:
    tokens = [folders.get(t, t) for t in shlex.split(line)]
    program, args = tokens[0], tokens[1:]
    if program == "mfs_predict":
        return predict.main([*args, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta"])  # speed only
    mains = {"mfs_ensemble": ensemble.main, "mfs_apply_postprocessing": postprocessing.main_apply}
    return mains[program](args)


@pytest.mark.parametrize("winner", ["written", "ensemble"])
def test_instructions_run_as_written(trained, best, tmp_path, monkeypatch, winner):
    """The written instructions; and those of an ensemble winner (what nnU-Net prints then), run in order."""
    set_env(trained, monkeypatch)
    info = dict(best)
    if winner == "ensemble":
        info["best_model_or_ensemble"] = {**best["best_model_or_ensemble"], "selected_model_or_models": [
            {"configuration": c, "trainer": TRAINER, "plans_identifier": "MedFlowSegPlans"} for c in CONFIGURATIONS]}
        text = find_best_configuration.inference_instructions(info, str(trained.results), 1)
    else:
        text = (trained.results / "inference_instructions.txt").read_text()
    commands = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    programs = [shlex.split(c)[0] for c in commands]
    n_models = len(info["best_model_or_ensemble"]["selected_model_or_models"])
    assert programs == ["mfs_predict"] * n_models + ["mfs_ensemble"] * (n_models > 1) + ["mfs_apply_postprocessing"]
    folders = {"INPUT_FOLDER": str(trained.inputs), "OUTPUT_FOLDER": str(tmp_path / "out"),
               "OUTPUT_FOLDER_PP": str(tmp_path / "pp"),
               **{f"OUTPUT_FOLDER_MODEL_{j}": str(tmp_path / f"m{j}") for j in (1, 2)}}
    for line in commands:
        assert run_instruction(line, folders) == 0, line
    cases = sorted(f.name.replace("_0000", "") for f in trained.inputs.iterdir())
    assert sorted(p.name for p in (tmp_path / "pp").glob("*.nii.gz")) == cases
    if n_models > 1:
        for case in cases:
            name = case[: -len(".nii.gz")]
            members = [np.load(tmp_path / f"m{j}" / f"{name}.npz")["probabilities"] for j in (1, 2)]
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / case)))
            assert np.array_equal(seg, ((members[0] + members[1]) / 2).argmax(0))


def test_missing_npz_and_untrained_configuration_exit_2(trained, tmp_path, monkeypatch, capsys):
    set_env(trained, monkeypatch)
    assert find_best_configuration.main([str(DATASET), "-c", "2d", "3d_lowres", "-tr", "NoSuchTrainer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no trained model NoSuchTrainer__MedFlowSegPlans__2d")
    validation = trained.models["2d"] / "fold_1" / "validation"
    hidden = tmp_path / "npz"
    hidden.mkdir()
    for f in validation.glob("*.npz"):
        shutil.move(str(f), hidden / f.name)
    try:
        assert find_best_configuration.main([str(DATASET), "-c", *CONFIGURATIONS, "-tr", TRAINER,
                                             "-f", "0", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "has no .npz probabilities" in err[0] and "--val --npz" in err[0]
    finally:
        for f in hidden.iterdir():
            shutil.move(str(f), validation / f.name)


def test_predict_with_two_folds_counts_fold_sample_pairs(trained, tmp_path, monkeypatch):
    """``mfs_predict -f 0 1 --num_samples 2``: 4 members, 6 pairs — the fold 0 pair, the fold 1 pair (each fold's
    own map, from a run with that fold only) and 4 cross-fold pairs: 6·D − d0 − d1 is a count in 0 … 4."""
    set_env(trained, monkeypatch)
    flags = ["-i", str(trained.inputs), "-m", str(trained.models["3d_fullres"]), "-device", "cpu", "-npp", "0",
             "-nps", "0", "--disable_tta", "--num_samples", "2", "--seed", "5", "--save_uncertainty"]
    for name, folds in (("both", ["0", "1"]), ("f0", ["0"]), ("f1", ["1"])):
        assert predict.main([*flags, "-o", str(tmp_path / name), "-f", *folds]) == 0
    for f in trained.inputs.iterdir():
        case = f.name[: -len("_0000.nii.gz")]
        d = {name: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "uncertainty" /
                                                             f"{case}_disagreement.nii.gz")))
             for name in ("both", "f0", "f1")}
        cross = 6 * d["both"] - d["f0"] - d["f1"]
        assert np.allclose(cross, np.round(cross), atol=1e-4) and cross.min() > -1e-4 and cross.max() < 4 + 1e-4
        assert 0 <= d["both"].min() and d["both"].max() <= 1


def test_pool_calibration_writes_one_fit_into_every_fold_and_restores_the_own_fits(trained, tmp_path, monkeypatch,
                                                                                  capsys):
    """``mfs_pool_calibration`` on a copy of the 2d model: one T + map fitted on both folds' validation cases (the
    known answer: the fit on their rows at once) in both folds, the own fits kept, ``--restore`` puts them back."""
    set_env(trained, monkeypatch)
    name = trained.models["2d"].name
    model = tmp_path / "nnUNet_results" / trained.results.name / name
    shutil.copytree(trained.models["2d"], model)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "nnUNet_results"))
    folds = ("fold_0", "fold_1")
    own = {f: (model / f / "temperature.json").read_bytes() for f in folds}
    assert pool_calibration.main([str(DATASET), "-c", "2d", "-tr", TRAINER, "-f", "0", "1"]) == 0
    assert "pooled calibration (T" in capsys.readouterr().out
    pooled = [json.loads((model / f / "temperature.json").read_text()) for f in folds]
    assert pooled[0] == pooled[1] and pooled[0]["fitted_on"]["sampler"] == \
        json.loads(own["fold_0"])["fitted_on"]["sampler"]
    gt = trained.root / "nnUNet_preprocessed" / trained.raw.name / "gt_segmentations"
    rows = [folder_rows(str(model / f / "validation"), str(gt)) for f in folds]
    direct = calibration_of_rows(np.concatenate([r for r, _, _ in rows]), np.concatenate([y for _, y, _ in rows]))
    assert pooled[0]["temperature"] == pytest.approx(direct.temperature, rel=1e-6)
    assert pooled[0]["fitted_on"]["cases"] == [c for _, _, cases in rows for c in cases]
    assert {f: (model / f / "temperature_own_fold.json").read_bytes() for f in folds} == own
    assert pool_calibration.main([str(DATASET), "-c", "2d", "-tr", TRAINER, "-f", "0", "1", "--restore"]) == 0
    assert {f: (model / f / "temperature.json").read_bytes() for f in folds} == own
    assert pool_calibration.main([str(DATASET), "-c", "2d", "-tr", TRAINER, "-f", "0"]) == 2
    assert "at least two distinct folds" in capsys.readouterr().err
