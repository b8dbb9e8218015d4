"""One-concern variants of :class:`MedFlowSegTrainer`: each changes exactly one thing via class attributes."""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import \
    nnUNetTrainerNoMirroring

from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer


class MedFlowSegTrainer_1epoch(MedFlowSegTrainer):
    trainer_overrides = {"num_epochs": 1}


class MedFlowSegTrainer_5epochs(MedFlowSegTrainer):
    trainer_overrides = {"num_epochs": 5}


class MedFlowSegTrainer_50epochs(MedFlowSegTrainer):
    trainer_overrides = {"num_epochs": 50}


class MedFlowSegTrainer_smoke(MedFlowSegTrainer):
    """For tests and smoke runs: 2 epochs of 2 training and 1 validation iteration."""
    trainer_overrides = {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}
    val_multistep_batches = 1
    val_multistep_steps = 2


class MedFlowSegTrainer_demo(MedFlowSegTrainer):
    """For ``mfs_demo`` on CPU: 12 short epochs."""
    trainer_overrides = {"num_epochs": 12, "num_iterations_per_epoch": 25, "num_val_iterations_per_epoch": 5,
                         "save_every": 4}
    val_multistep_batches = 1


class MedFlowSegTrainer_noDBSA(MedFlowSegTrainer):
    network_overrides = {"use_dbsa": False}


class MedFlowSegTrainer_noFAA(MedFlowSegTrainer):
    network_overrides = {"use_faa": False}


class MedFlowSegTrainer_noAttention(MedFlowSegTrainer):
    network_overrides = {"use_dbsa": False, "use_faa": False}


class MedFlowSegTrainer_velocity(MedFlowSegTrainer):
    """Velocity-output network (the paper's literal parameterisation; plain flow matching on the label's path,
    since the velocity target x1 − x0 does not fit an x_t moved onto the model's own estimate). The plain x_t
    input: the target x1 − x0 at t = 0 needs x0, which the time-scaled input hides there."""
    flow_overrides = {"parameterization": "velocity", "own_estimate_fraction": 0.0}
    network_overrides = {"time_scaled_x_t": False}


class MedFlowSegTrainer_uniformTime(MedFlowSegTrainer):
    """t ~ U(0, 1) with no extra mass at t = 0, on the label's path (the setting that fails for one-step
    inference: the label is visible in x_t)."""
    flow_overrides = {"time_sampler": "uniform", "zero_fraction": 0.0, "own_estimate_fraction": 0.0}


class MedFlowSegTrainer_velocityUniformTime(MedFlowSegTrainer):
    """The paper's literal setting: velocity output and t ~ U(0, 1), plain x_t input."""
    flow_overrides = {"parameterization": "velocity", "time_sampler": "uniform", "zero_fraction": 0.0,
                      "own_estimate_fraction": 0.0}
    network_overrides = {"time_scaled_x_t": False}


class MedFlowSegTrainer_ownEstimate(MedFlowSegTrainer):
    """Half of the t > 0 samples trained on x_t between the prior and the network's own one-step estimate
    (:mod:`medflowseg_nn.flow.own_estimate`), so that the later sampler steps learn to correct the first one."""
    flow_overrides = {"own_estimate_fraction": 0.5}


class MedFlowSegTrainer_ownEstimateAll(MedFlowSegTrainer):
    """Every t > 0 sample on the sampler's own path (``own_estimate_fraction`` 1): no training input shows the
    label, so the t > 0 half of the batch also learns the segmentation from the image (and to correct x̂1).
    The default since 2026-12-03; kept by name for the result folders trained with it."""
    flow_overrides = {"own_estimate_fraction": 1.0}


class MedFlowSegTrainer_labelPath(MedFlowSegTrainer):
    """Plain flow matching (the default before 2026-12-03): every t > 0 sample on the label's path
    x_t = (1 − t) x0 + t x1 (``own_estimate_fraction`` 0). Measured 1-epoch one-step Dice 0.720 vs 0.772 with
    own-estimate training (``benchmarks/RESULTS.md``, 2026-12-03)."""
    flow_overrides = {"own_estimate_fraction": 0.0}


class MedFlowSegTrainer_oneStepOnly(MedFlowSegTrainer):
    """Diagnostic: every sample at t = 0 (``zero_fraction`` 1), i.e. nnU-Net's task with a noise input channel;
    it measures what the t > 0 half of the batch costs one-step Dice. Few-step sampling is untrained."""
    flow_overrides = {"zero_fraction": 1.0}


class MedFlowSegTrainer_deepSupervision(MedFlowSegTrainer):
    """Deep supervision: 1x1 heads on the decoder stages below full resolution, nnU-Net's Dice + CE and weights
    on the samples at t = 0 (see ``MedFlowSegTrainer._flow_loss``). The default since 2026-12-02; this variant
    forces it on for plans that say otherwise (e.g. planned before)."""
    network_overrides = {"deep_supervision": True}


class MedFlowSegTrainer_noDeepSupervision(MedFlowSegTrainer):
    """The single full-resolution output, as before 2026-12-02 (no auxiliary heads)."""
    network_overrides = {"deep_supervision": False}


class MedFlowSegTrainer_smokeNoMirroring(MedFlowSegTrainer_smoke, nnUNetTrainerNoMirroring):
    """The smoke budget without mirroring (nnU-Net's ``nnUNetTrainerNoMirroring``: no mirror augmentation and no
    8x test-time mirroring in the final validation), for smoke runs on large volumes such as BraTS."""


class MedFlowSegTrainer_smokeOneEpoch(MedFlowSegTrainer_smokeNoMirroring):
    """One epoch of the smoke budget, no mirroring: for the after-training workflow tests, which train two
    configurations x two folds (on 2 cores each epoch end costs ~1 s of nnU-Net's progress plot and checkpoint)."""
    trainer_overrides = {**MedFlowSegTrainer_smoke.trainer_overrides, "num_epochs": 1}


class MedFlowSegTrainer_auxOwnEstimate(MedFlowSegTrainer):
    """Deep-supervision heads trained on every label-free sample: the t = 0 ones and those on the sampler's own
    path (``aux_on_own_estimate``), twice the auxiliary signal of the default at own-estimate fraction 1."""
    flow_overrides = {"aux_on_own_estimate": True}


class MedFlowSegTrainer_timeScaledInput(MedFlowSegTrainer):
    """The network sees ``t · x_t`` (``time_scaled_x_t``): at t = 0, the one-step prediction, the prior noise no
    longer enters the first convolution, so that evaluation has nnU-Net's input (the image alone). The default
    since 2026-12-03; kept by name for the result folders trained with it and for plans planned before."""
    network_overrides = {"time_scaled_x_t": True}


class MedFlowSegTrainer_plainInput(MedFlowSegTrainer):
    """The network sees x_t itself (the default before 2026-12-03): at t = 0 its input holds the prior noise
    beside the image, so one-step samples of different priors differ (a little)."""
    network_overrides = {"time_scaled_x_t": False}


class MedFlowSegTrainer_dropout(MedFlowSegTrainer):
    """Channel dropout 0.1 after every UNet convolution (nnU-Net's ``dropout_op``), so that ``mfs_predict
    --mc_dropout --num_samples K`` draws K thinned networks of this one model (:mod:`medflowseg_nn.inference.
    model_samples`): model-level diversity in the K samples (issue #9)."""
    network_overrides = {"dropout": 0.1}


class MedFlowSegTrainer_deepDropout(MedFlowSegTrainer):
    """Channel dropout 0.1 in the two deepest stages only (the bottleneck and the stage above it, encoder and
    decoder), as Bayesian SegNet's central units: model samples for ``--mc_dropout`` with the full-resolution
    stages left whole (``MedFlowSegTrainer_dropout`` in every block cost 0.07 Dice on the 2d CPU protocol)."""
    network_overrides = {"dropout": 0.1, "dropout_stages": [-2, -1]}


class MedFlowSegTrainer_shallowDropout(MedFlowSegTrainer):
    """Channel dropout 0.1 in the full-resolution stage only (encoder, conditioning encoder and decoder blocks at
    the image's resolution): the other end of ``MedFlowSegTrainer_deepDropout``, to locate where MC dropout's useful
    diversity and its accuracy cost sit (issue #9)."""
    network_overrides = {"dropout": 0.1, "dropout_stages": [0]}


class MedFlowSegTrainer_lightDropout(MedFlowSegTrainer):
    """Channel dropout 0.05 after every UNet convolution: half of ``MedFlowSegTrainer_dropout``'s rate, a point
    between its calibrated but less accurate MC-dropout samples and the defaults (issue #9)."""
    network_overrides = {"dropout": 0.05}


class MedFlowSegTrainer_spatialLabelSmoothing(MedFlowSegTrainer):
    """Spatially varying label smoothing (SVLS, σ = 1) of the full-resolution output's CE target: boundary voxels
    learn soft targets, the interior stays one-hot (:mod:`medflowseg_nn.flow.label_smoothing`), for calibration
    where a fold ensemble's members disagree (issue #9)."""
    flow_overrides = {"label_smoothing_sigma": 1.0}


class MedFlowSegTrainer_noDice(MedFlowSegTrainer):
    """The full-resolution output trained on CE + the flow MSE without the soft Dice: proper scores only, for
    calibration (the Dice loss is known to push probabilities to 0 / 1; issue #9)."""
    flow_overrides = {"dice_weight": 0.0}


class MedFlowSegTrainer_diceWeight2(MedFlowSegTrainer):
    """The soft Dice at twice the CE's weight: on the 2d CPU protocol (4 seeds, 2026-12-06) +0.004 one-step Dice over
    the default weight 1 and slightly better ECE / AURC / NLL after the fold's post-hoc step, but the case-level
    rank correlation of the mean entropy with 1 − Dice falls from 0.55 to 0.38 on every seed — the reason it is
    not the default (``benchmarks/RESULTS.md``)."""
    flow_overrides = {"dice_weight": 2.0}


class MedFlowSegTrainer_wholeBatch(MedFlowSegTrainer):
    """Every training step's batch through one forward and backward on the CPU too (no micro-batches; before
    2026-12-05 the only behaviour): for comparisons of the step's time."""
    cpu_micro_batch_mib = None


class MedFlowSegTrainer_microBatches3(MedFlowSegTrainer):
    """Micro-batches scaled to small batches: the budget that splits the 2d Hippocampus plans' 277 rows into 3
    chunks (64 MiB) scaled by 32 / 277, so that the 2d CPU protocol's batch of 32 runs as 3 chunks (11 + 11 + 10
    rows) as the planned batch does: measures what the chunked batch Dice does to accuracy."""
    cpu_micro_batch_mib = 64.0 * 32 / 277


class MedFlowSegTrainer_mimo2(MedFlowSegTrainer):
    """Two MIMO subnetworks in one UNet (:mod:`medflowseg_nn.networks.mimo`): each trained on its own shuffle of
    the batch, predicting with their mean probability — model-level diversity from one model (issue #9)."""
    network_overrides = {"mimo_members": 2}


class MedFlowSegTrainer_mimo3(MedFlowSegTrainer):
    """Three MIMO subnetworks in one UNet, as many members as a 3-fold ensemble (issue #9)."""
    network_overrides = {"mimo_members": 3}


class MedFlowSegTrainer_ensemble4(MedFlowSegTrainer):
    """A packed ensemble (:mod:`medflowseg_nn.networks.member_ensemble`): four independent networks, each half the
    planned width (about one network's convolution FLOPs), each trained on its own shuffle of every batch and
    predicting with their mean probability — a fold ensemble's model averaging inside one model (issue #9)."""
    network_overrides = {"ensemble_members": 4, "member_width": 0.5}


class MedFlowSegTrainer_ensemble4WideDice2(MedFlowSegTrainer_ensemble4, MedFlowSegTrainer_diceWeight2):
    """The packed ensemble with members at 0.7 of the planned width (≈ 2× one network's convolution FLOPs) and the
    Dice term at twice the CE's weight (``_diceWeight2``), calibrated member by member: on the 2d CPU protocol (two
    seeds, ``benchmarks/RESULTS.md`` 2026-12-07 00:00, ``value_product.py``) ONE model with the Dice of nnU-Net's
    3-fold ensemble (0.833 vs 0.832), a lower ROI AURC (0.0090 / 0.0092 vs 0.0093) and ECE 0.0022 / 0.0041 (vs
    0.0034) — at about 3.6× the training and 5× the CPU prediction of one nnU-Net model."""
    network_overrides = {"ensemble_members": 4, "member_width": 0.7}


class MedFlowSegTrainer_mimo2Repeat(MedFlowSegTrainer_mimo2):
    """Two MIMO subnetworks with input repetition 0.5 (half of the groups give both members the same row): each
    member better trained on a short budget, at the cost of diversity (issue #9: three members without repetition
    learnt too slowly for the 2d CPU protocol's 500 iterations)."""
    flow_overrides = {"mimo_input_repetition": 0.5}
