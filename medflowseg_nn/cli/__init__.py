"""The ``mfs_*`` console scripts: each a thin argparse ``main(argv=None) -> int`` over a typed function called with
keywords, and the error policy of :mod:`medflowseg_nn.cli.common`. Trainers and planners are found by name through
:mod:`medflowseg_nn.plugins`. Nothing imports this package except its own modules and the tests.
"""
