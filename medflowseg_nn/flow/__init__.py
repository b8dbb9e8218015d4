"""Flow matching, independent of networks and of nnU-Net: the probability path and time samplers (``path``), the
ODE solver (``solver``; it only sees ``velocity(x, t)``), the label space (segmentation ⇄ target in [−1, 1]) and the
loss. ``path`` and ``solver`` never import each other. May be imported by every other part of the project.
"""
