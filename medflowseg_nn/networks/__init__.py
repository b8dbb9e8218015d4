"""The vector-field networks: ``VectorFieldUNet`` (built from nnU-Net's architecture keywords), Dual-Branch Spatial
Attention, Frequency-Aware Attention, time embedding, and small shared layers.

Pure torch: imports nothing of nnU-Net or of the rest of the project except itself. May be imported by every
other part of the project.
"""
