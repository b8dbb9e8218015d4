"""Inference: from a trained vector field to segmentations, probabilities and uncertainty maps on disk.

One room per concern, each importing only the rooms listed before it:

* ``uncertainty`` — maths on K samples: predictive entropy, pairwise disagreement, the sample accumulator.
* ``sampler`` — :class:`FlowSegmenter`: one patch → K sampled probability maps (seeded priors, ODE solver).
* ``sliding_window`` — patches of one case → :class:`CasePrediction` (logits and, as a return value, the
  K-sample disagreement), with nnU-Net's mirroring and Gaussian conventions.
* ``predictor`` — :class:`MedFlowSegPredictor`, nnU-Net's predictor with the sampler; loads trained models.
* ``export`` — pure function from a case's prediction to the arrays to write, and the atomic writer.
* ``overlay`` — quick-look PNGs.
* ``runner`` — folder prediction: find, check, skip, run, report (what ``mfs_predict`` calls).

``uncertainty``, ``sampler`` and ``sliding_window`` import no nnU-Net module. This package may be imported by
``medflowseg_nn.cli``, ``trainers`` and the benchmarks; it never imports ``trainers`` or ``planners``.
"""
