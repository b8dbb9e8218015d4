"""``mfs_ensemble -i DIR1 DIR2 ... -o OUT [-np N] [--save_npz]``: average the probabilities of prediction folders.

The members are folders written by ``mfs_predict --save_probabilities`` (or nnU-Net's predictor): folds,
configurations, or several ``--seed`` / ``--steps`` runs of one model. For every case with a ``CASE.npz`` in all
of them the probabilities ([C, *S]) are averaged and the segmentation written as nnU-Net's ensembling does
(``nnUNetv2_ensemble``'s flags). Where every member has ``uncertainty/`` maps (``--save_uncertainty``),
``OUT/uncertainty`` gets ``CASE_entropy.nii.gz`` (predictive entropy of the averaged probabilities, nats) and
``CASE_disagreement.nii.gz`` (fraction of the member pairs whose segmentations differ, 0 … 1). See
:mod:`medflowseg_nn.ensembling`.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from medflowseg_nn.cli.common import cli_errors, setup_logging
from medflowseg_nn.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mfs_ensemble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", nargs="+", required=True, help="prediction folders (with CASE.npz + CASE.pkl)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-np", type=int, default=2, help="merge processes (0: in this process; default 2)")
    p.add_argument("--save_npz", action="store_true", help="also write the averaged CASE.npz and CASE.pkl")
    p.add_argument("--verbose", action="store_true")
    return p


def run_ensemble(input_folders: Sequence[str], output_folder: str, num_processes: int = 2,
                 save_npz: bool = False) -> list[str]:
    """Ensemble the folders; returns the cases written."""
    from medflowseg_nn.ensembling import ensemble_folders

    if num_processes < 0:
        raise UserError(f"-np must be >= 0, got {num_processes}")
    return ensemble_folders(input_folders=input_folders, output_folder=output_folder,
                            save_probabilities=save_npz, num_processes=num_processes)


@cli_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    cases = run_ensemble(input_folders=args.i, output_folder=args.o, num_processes=args.np, save_npz=args.save_npz)
    print(f"{len(cases)} case(s) from {len(args.i)} folders ensembled into {args.o}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
