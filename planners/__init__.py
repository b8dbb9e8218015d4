"""nnU-Net ExperimentPlanner subclasses of MedFlowSeg-nn.

Installed as ``medflowseg_nn.planners`` (the repository folder ``planners/``, mapped by ``package_dir``), so no
other ``planners`` package on ``sys.path`` can shadow it. May import all of ``medflowseg_nn``; only the CLIs
import it.
"""
