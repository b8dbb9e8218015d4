"""Packed-ensemble training (``MedFlowSegTrainer_ensemble4``): the config's checks, the narrow members the plans
build, a real train step that updates every member on its own rows, validation on the members' mean, and the
saved plans rebuilding the same field for inference."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medflowseg_nn.config import FlowMatchingConfig, NetworkOptions
from medflowseg_nn.model import feature_map_size
from medflowseg_nn.networks.member_ensemble import MemberEnsembleField
from medflowseg_nn.trainers.variants import MedFlowSegTrainer_ensemble4
from tests.trainers.test_train_and_validation_step import make_trainer, planned, real_batches  # noqa: F401


def test_config_members_and_refusals():
    net = NetworkOptions(ensemble_members=4)
    assert net.members == 4 and net.member_width == 0.5 and NetworkOptions().members == 1
    assert FlowMatchingConfig(network=net).build_time_sampler().group == 4
    assert FlowMatchingConfig.from_dict(FlowMatchingConfig(network=net).to_dict()).network == net  # plans round trip
    with pytest.raises(ValueError, match="cannot both"):
        NetworkOptions(mimo_members=2, ensemble_members=2)
    with pytest.raises(ValueError, match="member_width"):
        NetworkOptions(ensemble_members=2, member_width=0.0)
    with pytest.raises(ValueError, match=">= 1"):
        NetworkOptions(ensemble_members=0)
    with pytest.raises(ValueError, match="own_estimate_fraction 0 or 1"):
        FlowMatchingConfig(own_estimate_fraction=0.5, network=net)


def test_the_wide_variant_is_the_measured_combination(planned):
    """``_ensemble4WideDice2`` trains what value_product measured with ``--flow network.ensemble_members=4
    network.member_width=0.7 dice_weight=2`` on the default trainer."""
    import dataclasses

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer
    from medflowseg_nn.trainers.variants import MedFlowSegTrainer_ensemble4WideDice2
    plans = json.loads(planned.plans_file.read_text())
    cm = PlansManager(plans).get_configuration("3d_fullres")
    base = MedFlowSegTrainer.resolved_flow_config(plans, cm)
    wide = base.replace(network=dataclasses.replace(base.network, ensemble_members=4, member_width=0.7),
                        dice_weight=2.0)
    assert MedFlowSegTrainer_ensemble4WideDice2.resolved_flow_config(plans, cm) == wide  # nothing else changed


def test_train_step_trains_every_narrow_member_on_its_own_rows(planned):
    trainer = make_trainer(planned, MedFlowSegTrainer_ensemble4)
    net = trainer.network
    assert isinstance(net, MemberEnsembleField) and len(net.members) == 4
    assert trainer.plans_manager.plans["flow_matching"]["network"]["ensemble_members"] == 4
    planned_features = trainer.configuration_manager.network_arch_init_kwargs["features_per_stage"]
    assert net.members[0].features == [max(1, round(f / 2)) for f in planned_features]
    batch, val_batch = real_batches(trainer)
    b = batch["data"].shape[0]
    rows = []  # image rows each member sees per call
    hooks = [m.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0])) for m in net.members]
    before = [{k: v.detach().clone() for k, v in m.named_parameters()} for m in net.members]
    torch.manual_seed(0)
    loss = trainer.train_step(batch)["loss"]
    for h in hooks:
        h.remove()
    assert np.isfinite(loss) and loss > 0
    assert b in rows  # the flow's forward: every loaded row once per member (own-estimate calls may be fewer)
    for member, old in zip(net.members, before):
        changed = [k for k, v in member.named_parameters() if not torch.equal(v, old[k])]
        assert len(changed) > 0.5 * len(old)
    trainer.network.eval()
    result = trainer.validation_step(val_batch)
    assert np.isfinite(result["loss"]) and result["tp_hard"].shape == (2,)


def test_the_saved_plans_rebuild_the_ensemble_and_count_its_memory(planned):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer
    trainer = make_trainer(planned, MedFlowSegTrainer_ensemble4)
    saved = PlansManager(trainer.plans_manager.plans)
    cm = saved.get_configuration(trainer.configuration_name)
    net = MedFlowSegTrainer.build_network_architecture(saved, cm, 1, 3, enable_deep_supervision=False)
    assert isinstance(net, MemberEnsembleField) and len(net.members) == 4
    net.load_state_dict(trainer.network.state_dict())
    image = torch.randn(2, 1, *cm.patch_size)
    with torch.no_grad():
        out = net.eval()(image, None, torch.zeros(2))
    assert out.shape == (2, 3, *image.shape[2:]) and torch.allclose(out.exp().sum(1), torch.ones(1), atol=1e-5)
    options = trainer.flow_config.network
    assert feature_map_size(cm, 1, 3, options) == int(net.compute_conv_feature_map_size(cm.patch_size))
    one = feature_map_size(cm, 1, 3, NetworkOptions(**{**options.__dict__, "ensemble_members": 1}))
    assert 1.5 * one < feature_map_size(cm, 1, 3, options) < 2.5 * one  # four half-width members ≈ twice one net



def test_member_calibrations_are_fitted_per_member_and_stored_with_the_fold(planned):
    import os

    from medflowseg_nn.calibration_folder import roi_rows
    from medflowseg_nn.temperature import apply_temperature, load_calibration, temperature_of_rows
    from medflowseg_nn.recalibration import top_label_map_of_rows
    from medflowseg_nn.trainers.member_temperatures import calibrate_members, member_predictor, validation_cases
    from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer
    assert calibrate_members(make_trainer(planned, MedFlowSegTrainer)) is None  # one network: nothing to fit
    trainer = make_trainer(planned, MedFlowSegTrainer_ensemble4)
    batch, _ = real_batches(trainer)
    trainer.train_step(batch)
    final = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    trainer.save_checkpoint(final)
    trainer.load_checkpoint(final)  # as mfs_train --val: the weights are checkpoint_final.pth's
    calibrations = calibrate_members(trainer)
    temperatures = [c.temperature for c in calibrations]
    net = trainer.network
    assert len(temperatures) == 4 and all(t > 0 for t in temperatures)
    assert net.training and all(m.training for m in net.members)  # left in the mode it was found in
    assert net.member_temperature.tolist() == pytest.approx(temperatures)
    saved = torch.load(final, map_location="cpu", weights_only=False)["network_weights"]["member_temperature"]
    assert saved.tolist() == pytest.approx(temperatures)
    stored = load_calibration(trainer.output_folder, {"steps": 1, "solver": "euler", "num_samples": 1})
    assert stored.temperature == 1.0 and stored.top_label_map is None
    assert stored.member_maps == tuple(c.top_label_map for c in calibrations)
    # member 1's T and map by hand: its own softmax on the fold's validation cases' ROI voxels
    predictor = member_predictor(trainer, net.members[1].eval())
    rows, labels = [], []
    for _, data, reference in validation_cases(trainer):
        probs = torch.softmax(predictor.predict_sliding_window_return_logits(data).float(), 0).numpy()
        p, y = roi_rows(probs, reference, 3, None)
        rows.append(p)
        labels.append(y)
    rows, labels = np.concatenate(rows), np.concatenate(labels)
    assert temperature_of_rows(rows, labels) == pytest.approx(temperatures[1], rel=1e-3)
    by_hand = top_label_map_of_rows(apply_temperature(rows, temperatures[1], axis=1), labels)
    assert np.allclose(by_hand.confidence, calibrations[1].top_label_map.confidence, atol=1e-3)


def test_training_then_final_validation_fits_members_and_the_predictor_maps_each(planned):
    """run_training + perform_actual_validation as ``mfs_train`` calls them: the member temperatures land in
    checkpoint_final.pth, the member maps in temperature.json, and ``mfs_predict``'s predictor applies each member's
    map before the average."""
    import os

    from medflowseg_nn.inference.predictor import MedFlowSegPredictor
    from medflowseg_nn.recalibration import apply_top_label_map
    from medflowseg_nn.trainers.member_temperatures import member_predictor, validation_cases
    from medflowseg_nn.trainers.variants import MedFlowSegTrainer_smoke

    class EnsembleSmoke(MedFlowSegTrainer_ensemble4):
        trainer_overrides = MedFlowSegTrainer_smoke.trainer_overrides
        val_multistep_batches = 0

    trainer = make_trainer(planned, EnsembleSmoke)
    trainer.run_training()
    trainer.perform_actual_validation(False)
    stored = torch.load(os.path.join(trainer.output_folder, "checkpoint_final.pth"), map_location="cpu",
                        weights_only=False)["network_weights"]["member_temperature"]
    assert stored.tolist() == trainer.network.member_temperature.tolist() != [1.0] * 4
    assert os.path.isfile(os.path.join(trainer.output_folder, "validation", "summary.json"))
    predictor = MedFlowSegPredictor(use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(os.path.dirname(trainer.output_folder), [trainer.fold])
    maps = predictor.fold_calibrations[0].member_maps
    assert len(maps) == 4 and predictor.fold_calibrations[0].temperature == 1.0  # no fold T on the average
    assert trainer.weights_file == "checkpoint_final.pth"
    fitted = json.load(open(os.path.join(trainer.output_folder, "temperature.json")))["fitted_on"]
    assert fitted["checkpoint"] == "checkpoint_final.pth"
    _, data, _ = next(iter(validation_cases(trainer)))
    out = predictor.predict_case(data, with_disagreement=True, with_mapped=True)
    net = trainer.network.eval()
    members = [torch.softmax(member_predictor(trainer, m).predict_sliding_window_return_logits(data).float() / T, 0)
               for m, T in zip(net.members, net.member_temperature.tolist())]
    assert torch.allclose(out.logits.exp(), sum(members) / 4, atol=1e-4)
    assert torch.allclose(out.mapped.exp(), sum(apply_top_label_map(p, m) for p, m in zip(members, maps)) / 4,
                          atol=1e-4)
    assert out.disagreement.shape == data.shape[1:] and 0 <= float(out.disagreement.min())


def test_with_val_best_the_member_calibration_goes_with_checkpoint_best_and_final_is_left_alone(planned):
    """``mfs_train --val_best`` loads checkpoint_best.pth before the final validation: the member temperatures
    fitted on those weights go into that file (checkpoint_final.pth's weights untouched) and temperature.json names
    it, so ``mfs_predict -chk checkpoint_final.pth`` does not apply maps fitted on other weights."""
    import os

    from medflowseg_nn.temperature import load_calibration
    from medflowseg_nn.trainers.member_temperatures import calibrate_members
    trainer = make_trainer(planned, MedFlowSegTrainer_ensemble4)
    best, final = (os.path.join(trainer.output_folder, f"checkpoint_{n}.pth") for n in ("best", "final"))
    trainer.save_checkpoint(best)
    batch, _ = real_batches(trainer)
    trainer.train_step(batch)
    trainer.save_checkpoint(final)
    final_before = torch.load(final, map_location="cpu", weights_only=False)["network_weights"]
    trainer.load_checkpoint(best)
    assert trainer.weights_file == "checkpoint_best.pth"
    temperatures = [c.temperature for c in calibrate_members(trainer)]
    final_after = torch.load(final, map_location="cpu", weights_only=False)["network_weights"]
    assert all(torch.equal(final_before[k], final_after[k]) for k in final_before)
    best_weights = torch.load(best, map_location="cpu", weights_only=False)["network_weights"]
    assert best_weights["member_temperature"].tolist() == pytest.approx(temperatures) != [1.0] * 4
    sampler = {"steps": 1, "solver": "euler", "num_samples": 1}
    assert len(load_calibration(trainer.output_folder, sampler, "checkpoint_best.pth").member_maps) == 4
    assert load_calibration(trainer.output_folder, sampler, "checkpoint_final.pth") is None


def test_under_ddp_rank_0_fits_and_the_other_ranks_take_its_broadcast(planned, monkeypatch):
    import os

    from medflowseg_nn.recalibration import TopLabelMap
    from medflowseg_nn.temperature import FoldCalibration
    from medflowseg_nn.trainers import member_temperatures
    fitted = [FoldCalibration(1.0 + m / 10, TopLabelMap((0.5,), (0.7,))) for m in range(4)]
    sent = []

    def broadcast(box, src):  # what rank 0 sends arrives in every rank's box
        assert src == 0
        sent.append(box[0])
        box[0] = fitted

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast)
    monkeypatch.setattr(member_temperatures, "fit_member_calibrations", lambda *a: pytest.fail("rank 1 fitted"))
    trainer = make_trainer(planned, MedFlowSegTrainer_ensemble4)
    trainer.is_ddp, trainer.local_rank = True, 1
    written = os.path.join(trainer.output_folder, "temperature.json")
    if os.path.exists(written):  # the module's earlier tests share this output folder
        os.remove(written)
    assert member_temperatures.calibrate_members(trainer) == fitted and sent == [None]
    assert trainer.network.member_temperature.tolist() == pytest.approx([1.0, 1.1, 1.2, 1.3])
    assert not os.path.exists(written)  # rank 0 writes
