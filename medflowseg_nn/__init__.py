"""MedFlowSeg-nn: self-configuring segmentation by conditional flow matching on top of nnU-Net v2.

Layers, bottom up (each may import only the ones before it): ``errors``; ``flow/`` and ``networks/`` (no nnU-Net);
``config`` (the plans' ``flow_matching`` block), ``model`` (builds the vector field from plans), ``profiling/``;
``nnunet_compat`` (the only door to nnU-Net internals); ``evaluation``, ``calibration``, ``temperature``,
``nifti_integrity``, ``dataset_checks``; ``inference/``, ``synthetic``; ``plugins`` (finds trainers and planners by name); ``cli/``. The trainers and
planners (``medflowseg_nn.trainers``, ``medflowseg_nn.planners``, from the repository folders ``trainers/`` and
``planners/``) sit on top and are never imported from here.
"""
__version__ = "0.1.0"
