"""MedFlowSeg-nn: self-configuring segmentation by conditional flow matching on top of nnU-Net v2."""
__version__ = "0.1.0"
