"""The plans' ``flow_matching`` block as a typed, validated dataclass.

Plans JSON is the single source of truth: the planner writes this block, the trainer reads it (and its one-
concern variants edit it before the plans are copied into the results folder), the predictor reads it back
from the results folder's ``plans.json``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from medflowseg_nn.flow.loss import PARAMETERIZATIONS
from medflowseg_nn.flow.path import TimeSampler, build_time_sampler
from medflowseg_nn.flow.solver import SolverConfig
from medflowseg_nn.networks.layers import stage_indices
from medflowseg_nn.networks.vector_field_unet import default_dbsa_stages, default_faa_stages

PLANS_KEY = "flow_matching"


@dataclass(frozen=True)
class NetworkOptions:
    """Vector-field network options (see :class:`~medflowseg_nn.networks.vector_field_unet.VectorFieldUNet`).

    ``dbsa_stages`` / ``faa_stages``: ``None`` = the default placement, ``[]`` = module off.
    ``deep_supervision``: 1x1 seg heads on the decoder stages below full resolution, trained with Dice + CE on
    the one-step estimate at t = 0 (``MedFlowSegTrainer``); the heads are kept (unused) at inference. On by
    default since 2026-12-02 (bench_value: one-step Dice 0.290 → 0.378, ROI ECE 0.128 → 0.098, 2 seeds); a
    ``network`` block written before the option existed (no ``deep_supervision`` key) means off, so models and
    plans made before keep their meaning. ``time_scaled_x_t``: the network sees ``t · x_t``, so its t = 0
    evaluation (the one-step prediction) sees the image alone (:mod:`medflowseg_nn.networks.vector_field_unet`);
    on by default since 2026-12-03 (2d CPU protocol, ``benchmarks/RESULTS.md``), a block written before (no key)
    means off. ``dropout``: channel dropout with this probability after every convolution of the UNet blocks (nnU-Net's
    ``dropout_op``; 0 = none, the default), which ``mfs_predict --mc_dropout`` samples at inference;
    ``dropout_stages``: only the blocks of these stages (encoder, conditioning encoder and decoder at that
    resolution; negative counts from the deepest, written out by :meth:`resolved`); ``None`` = every stage.
    ``mimo_members``: M ≥ 2 trains M subnetworks in the channels of one UNet and predicts with their mean
    probability (:mod:`medflowseg_nn.networks.mimo`); 1 (the default) = one network. ``ensemble_members``: M ≥ 2
    builds a packed ensemble, M independent networks each ``member_width`` × the planned features, trained together
    on MIMO's row groups and predicting with their mean probability (:mod:`medflowseg_nn.networks.member_ensemble`).
    """

    use_dbsa: bool = True
    use_faa: bool = True
    dbsa_stages: Optional[list[int]] = None
    faa_stages: Optional[list[int]] = None
    time_embed_dim: int = 128
    cond_features_divisor: int = 4
    faa_num_bands: int = 8
    deep_supervision: bool = True
    time_scaled_x_t: bool = True
    dropout: float = 0.0
    dropout_stages: Optional[list[int]] = None
    mimo_members: int = 1
    ensemble_members: int = 1
    member_width: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"flow_matching.network.dropout must be in [0, 1), got {self.dropout}")
        if self.mimo_members < 1:
            raise ValueError(f"flow_matching.network.mimo_members must be >= 1, got {self.mimo_members}")
        if self.ensemble_members < 1:
            raise ValueError(f"flow_matching.network.ensemble_members must be >= 1, got {self.ensemble_members}")
        if self.mimo_members > 1 and self.ensemble_members > 1:
            raise ValueError("flow_matching.network: mimo_members and ensemble_members cannot both be > 1")
        if not 0.0 < self.member_width <= 1.0:
            raise ValueError(f"flow_matching.network.member_width must be in (0, 1], got {self.member_width}")

    @property
    def members(self) -> int:
        """Rows per training group: the MIMO or packed-ensemble members (1 for one network)."""
        return max(self.mimo_members, self.ensemble_members)

    def resolved(self, n_stages: int) -> "NetworkOptions":
        """The same options with the default placements written out for a network of ``n_stages`` stages, so
        that plans saved with a trained model keep describing it when the code's defaults change."""
        dropout_stages = None if self.dropout_stages is None else stage_indices(self.dropout_stages, n_stages,
                                                                                "dropout_stages")
        return dataclasses.replace(
            self, dbsa_stages=default_dbsa_stages(n_stages) if self.dbsa_stages is None else list(self.dbsa_stages),
            faa_stages=default_faa_stages(n_stages) if self.faa_stages is None else list(self.faa_stages),
            dropout_stages=dropout_stages)

    def network_kwargs(self) -> dict[str, Any]:
        """The flow keywords of :class:`VectorFieldUNet` (``dropout`` is nnU-Net's ``dropout_op``, see
        :func:`medflowseg_nn.model.architecture_kwargs`)."""
        return {"dbsa_stages": self.dbsa_stages if self.use_dbsa else [],
                "faa_stages": self.faa_stages if self.use_faa else [],
                "time_embed_dim": self.time_embed_dim, "cond_features_divisor": self.cond_features_divisor,
                "faa_num_bands": self.faa_num_bands, "deep_supervision": self.deep_supervision,
                "time_scaled_x_t": self.time_scaled_x_t, "dropout_stages": self.dropout_stages}


@dataclass(frozen=True)
class FlowMatchingConfig:
    """Everything about the flow that is not nnU-Net's.

    Attributes:
        parameterization: network output meaning, ``x1`` (clean mask) or ``velocity``.
            ``velocity`` needs ``network.time_scaled_x_t`` false (refused otherwise).
        time_sampler: ``uniform`` or ``logit_normal``; ``zero_fraction`` of each batch is drawn from
            U(0, ``zero_width``) instead (exactly t = 0 when ``zero_width`` is 0).
        mse_weight / seg_weight: weights of the flow MSE and of Dice + CE on the one-step estimate.
        steps / solver / time_grid: default ODE integration at inference (1 step Euler = one network call).
        path_mean: with ``steps`` >= 2, the output is the mean of the clean estimates of the solver's evaluations
            instead of the last one (``SolverConfig.path_mean``).
        prior_seed: seed of the Gaussian prior at inference.
        own_estimate_fraction: share of the t > 0 samples trained on x_t between x0 and the network's own one-step
            estimate instead of the label (:mod:`medflowseg_nn.flow.own_estimate`; ``x1`` only); 0 = off (plain
            flow matching on the label's path). 1 by default since 2026-12-03; a block written before the default
            moved (one without the key) means 0, and the ``velocity`` parameterisation needs 0.
        aux_on_own_estimate: the deep-supervision heads are trained on every label-free sample — those at t = 0
            and those on the sampler's own path (:func:`~medflowseg_nn.flow.own_estimate.label_free`) — instead
            of the t = 0 samples only (``False``, the meaning of a block without the key). Needs
            ``own_estimate_fraction`` > 0 (refused otherwise: it would change nothing).
        mimo_input_repetition: with ``network.mimo_members`` > 1, the share of the training groups whose members
            all get the same loaded row (Havasi et al.'s input repetition: members less independent, each better
            trained on a short budget); 0 = every member its own shuffle (:mod:`medflowseg_nn.trainers.mimo`).
        label_smoothing_sigma: σ of the spatially varying label smoothing of the CE target of the full-resolution
            output (:mod:`medflowseg_nn.flow.label_smoothing`); 0 = the one-hot target (nnU-Net's CE).
        dice_weight: weight of the soft Dice inside the full-resolution output's Dice + CE term; 0 leaves CE and
            the flow MSE (a Brier score on x̂1 at t = 0), proper scores only, for calibration (issue #9).
    """

    parameterization: str = "x1"
    time_sampler: str = "logit_normal"
    zero_fraction: float = 0.5
    zero_width: float = 0.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mse_weight: float = 1.0
    seg_weight: float = 1.0
    logit_scale: float = 5.0
    steps: int = 1
    solver: str = "euler"
    time_grid: str = "uniform"
    path_mean: bool = False
    prior_seed: int = 0
    own_estimate_fraction: float = 1.0
    aux_on_own_estimate: bool = False
    label_smoothing_sigma: float = 0.0
    dice_weight: float = 1.0
    mimo_input_repetition: float = 0.0
    network: NetworkOptions = field(default_factory=NetworkOptions)

    def __post_init__(self) -> None:
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"flow_matching.parameterization must be one of {PARAMETERIZATIONS}, "
                             f"got {self.parameterization!r}")
        if not 0.0 <= self.own_estimate_fraction <= 1.0:
            raise ValueError(f"flow_matching.own_estimate_fraction must be in [0, 1], got {self.own_estimate_fraction}")
        if self.own_estimate_fraction > 0 and self.parameterization != "x1":
            raise ValueError("flow_matching.own_estimate_fraction needs the x1 parameterization (the velocity target "
                             "x1 - x0 does not match an x_t moved onto the model's own estimate)")
        if self.parameterization == "velocity" and self.network.time_scaled_x_t:
            raise ValueError("flow_matching.parameterization 'velocity' needs network.time_scaled_x_t false: the "
                             "velocity target x1 - x0 at t = 0 needs x0, which the time-scaled input t * x_t hides")
        if self.aux_on_own_estimate and self.own_estimate_fraction == 0:
            raise ValueError("flow_matching.aux_on_own_estimate needs own_estimate_fraction > 0: with 0 no sample is "
                             "on the own path and the option would change nothing (a block written before the "
                             "own-estimate default means 0; set own_estimate_fraction to use it)")
        if self.network.members > 1 and (self.parameterization != "x1" or self.own_estimate_fraction not in (0, 1)):
            raise ValueError("flow_matching.network mimo_members / ensemble_members > 1 need the x1 parameterization "
                             "(the members' outputs are averaged as probabilities) and own_estimate_fraction 0 or 1 "
                             "(a random share of the rows would split the members' groups)")
        if not 0.0 <= self.mimo_input_repetition <= 1.0:
            raise ValueError(f"flow_matching.mimo_input_repetition must be in [0, 1], got {self.mimo_input_repetition}")
        if self.label_smoothing_sigma < 0:
            raise ValueError(f"flow_matching.label_smoothing_sigma must be >= 0, got {self.label_smoothing_sigma}")
        if self.dice_weight < 0:
            raise ValueError(f"flow_matching.dice_weight must be >= 0, got {self.dice_weight}")
        self.build_time_sampler()
        self.solver_config()

    def build_time_sampler(self) -> TimeSampler:
        """The training time sampler; one t per group of rows when ``network.members`` > 1."""
        return build_time_sampler(self.time_sampler, self.zero_fraction, self.zero_width, self.logit_mean,
                                  self.logit_std, group=self.network.members)

    def solver_config(self, steps: Optional[int] = None, method: Optional[str] = None,
                      path_mean: Optional[bool] = None) -> SolverConfig:
        """The inference solver: the plans' settings, each argument given (not None) instead of its own."""
        return SolverConfig(steps=steps or self.steps, method=method or self.solver, grid=self.time_grid,
                            euler_last_step=self.parameterization == "x1",
                            path_mean=self.path_mean if path_mean is None else path_mean)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "FlowMatchingConfig":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown keys in the plans' flow_matching block: {sorted(unknown)}")
        net = d.pop("network", None) or {}
        net_names = {f.name for f in dataclasses.fields(NetworkOptions)}
        if set(net) - net_names:
            raise ValueError(f"unknown keys in flow_matching.network: {sorted(set(net) - net_names)}")
        if net:  # a network block written before the option existed meant "off" (see NetworkOptions)
            net.setdefault("deep_supervision", False)
        if d or net:  # so did a block written before own-estimate training / the time-scaled input were defaults
            d.setdefault("own_estimate_fraction", 0.0)
            net.setdefault("time_scaled_x_t", False)
        return cls(network=NetworkOptions(**net), **d)

    @classmethod
    def from_plans(cls, plans: dict[str, Any]) -> "FlowMatchingConfig":
        """Read the block from a plans dict; plans without one (plain nnU-Net plans) get the defaults."""
        return cls.from_dict(plans.get(PLANS_KEY))

    def replace(self, **changes: Any) -> "FlowMatchingConfig":
        return dataclasses.replace(self, **changes)

    def with_network(self, **changes: Any) -> "FlowMatchingConfig":
        return dataclasses.replace(self, network=dataclasses.replace(self.network, **changes))

    def with_overrides(self, flow: dict[str, Any], network: dict[str, Any]) -> "FlowMatchingConfig":
        """This configuration with ``flow`` keys and ``network`` keys changed in one step, so that only the
        result is validated (e.g. ``velocity`` with the plain input, from a block with the time-scaled one)."""
        return dataclasses.replace(self, network=dataclasses.replace(self.network, **network), **flow)
