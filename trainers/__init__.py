"""nnUNetTrainer subclasses of MedFlowSeg-nn: the trainer (``mfs_trainer``) and one-concern variants (``variants``).

Installed as ``medflowseg_nn.trainers`` (the repository folder ``trainers/``, mapped by ``package_dir``), so no
other ``trainers`` package on ``sys.path`` can shadow it; import e.g.
``from medflowseg_nn.trainers.mfs_trainer import MedFlowSegTrainer``. The modules are registered in the entry
point group ``medflowseg_nn.trainer_modules``; the CLIs find classes by name through
:func:`medflowseg_nn.plugins.get_trainer_class`. May import all of ``medflowseg_nn``; nothing under
``medflowseg_nn/`` imports it.
"""
