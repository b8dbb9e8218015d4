"""Bad input gets a one-line error naming the file or argument, and exit code 2."""
from __future__ import annotations

import pytest

from medflowseg_nn.cli import plan_and_preprocess, predict, train
from medflowseg_nn.inference.runner import list_cases
from medflowseg_nn.synthetic import make_synthetic_dataset


def run(main, argv, capsys) -> str:
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


def test_missing_env_var(monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert "nnUNet_raw is not set" in run(plan_and_preprocess.main, ["-d", "4"], capsys)


def test_unknown_dataset_id(nnunet_env, capsys):
    assert "unknown dataset '777'" in run(plan_and_preprocess.main, ["-d", "777"], capsys)


def test_missing_plans_when_training(nnunet_env, capsys):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, num_train=2, shape=(8, 8, 8))
    msg = run(train.main, ["990", "3d_fullres", "0", "-device", "cpu"], capsys)
    assert "MedFlowSegPlans.json not found" in msg and "mfs_plan_and_preprocess -d 990" in msg


def test_unknown_trainer(nnunet_env, capsys):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, num_train=2, shape=(8, 8, 8))
    pre = nnunet_env["nnUNet_preprocessed"] / "Dataset990_Synthetic"
    pre.mkdir()
    (pre / "MedFlowSegPlans.json").write_text('{"configurations": {"3d_fullres": {}}}')
    (pre / "dataset.json").write_text("{}")
    assert "unknown trainer 'NoSuchTrainer'" in run(train.main, ["990", "3d_fullres", "0", "-tr", "NoSuchTrainer",
                                                                 "-device", "cpu"], capsys)


def test_missing_model_when_predicting(nnunet_env, tmp_path, capsys):
    make_synthetic_dataset(nnunet_env["nnUNet_raw"], 990, num_train=2, shape=(8, 8, 8))
    msg = run(predict.main, ["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-d", "990", "-device", "cpu"], capsys)
    assert "no trained model" in msg and "mfs_train 990 3d_fullres 0" in msg


def test_missing_checkpoint_when_predicting(tmp_path, capsys):
    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    (model / "dataset.json").write_text("{}")
    (model / "plans.json").write_text("{}")
    msg = run(predict.main, ["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(model), "-f", "0",
                             "-device", "cpu"], capsys)
    assert "checkpoint_final.pth not found" in msg


def test_predict_needs_a_model(capsys):
    assert "-m MODEL_FOLDER" in run(predict.main, ["-i", "x", "-o", "y"], capsys)


def test_input_folder_without_matching_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(Exception, match="no images in"):
        list_cases(str(tmp_path), ".nii.gz")


def test_ablation_flags_pick_variants():
    assert train.resolve_trainer_name("MedFlowSegTrainer", no_dbsa=True) == "MedFlowSegTrainer_noDBSA"
    assert train.resolve_trainer_name("MedFlowSegTrainer", True, True) == "MedFlowSegTrainer_noAttention"
    with pytest.raises(Exception, match="pick the variant"):
        train.resolve_trainer_name("MedFlowSegTrainer_5epochs", no_faa=True)


def test_a_bug_shows_its_traceback_and_exits_1(tmp_path, monkeypatch, capsys):
    """An internal error (here a KeyError injected into the predictor) is not disguised as a user error."""
    from medflowseg_nn.inference import predictor

    def broken(self, *args, **kwargs):
        raise KeyError("injected bug")

    monkeypatch.setattr(predictor.MedFlowSegPredictor, "initialize_from_trained_model_folder", broken)
    (tmp_path / "model").mkdir()
    code = predict.main(["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tmp_path / "model"),
                         "-device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "KeyError: 'injected bug'" in err
    assert "error: internal error (KeyError" in err


def test_a_bad_argument_still_gets_one_line(tmp_path, capsys):
    msg = run(predict.main, ["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tmp_path),
                             "--num_samples", "0"], capsys)
    assert msg == "error: --steps and --num_samples must be >= 1"
    assert "Traceback" not in capsys.readouterr().err


def test_mc_dropout_needs_several_samples(tmp_path, capsys):
    msg = run(predict.main, ["-i", "x", "-o", "y", "-m", str(tmp_path), "--mc_dropout"], capsys)
    assert "--num_samples K >= 2" in msg
