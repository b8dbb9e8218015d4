"""Measuring tools used by tests and benchmarks, not by training or inference (no nnU-Net imports).

``memory``: exact accounting of the activations a forward pass saves for backward. May be imported by tests and
benchmarks; nothing in the training or inference path imports it.
"""
