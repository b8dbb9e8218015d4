"""Is a NIfTI file complete? Judged from its header and its size, without decoding the voxels.

SimpleITK (what nnU-Net reads images with) silently reads a truncated NIfTI, so ``mfs_predict`` checks every input
before predicting. Decoding every voxel for that (nibabel raises on truncation) doubles the reading cost of a
folder run, because nnU-Net decodes the file again to predict it. This module answers the same question from
the header (nibabel reads only the first bytes of a ``.nii.gz``) and the file's end:

* ``.nii``: the file is at least ``vox_offset + voxel bytes`` long;
* ``.nii.gz``: the gzip trailer's ISIZE (the last 4 bytes: the uncompressed length mod 2^32, RFC 1952) equals
  ``vox_offset + voxel bytes`` mod 2^32. A truncated stream ends in arbitrary compressed bytes, which match with
  probability 2^-32.

``None`` means "cannot tell this way" (not NIfTI, an unreadable header, several gzip members or trailing bytes
make ISIZE differ): the caller then decodes the voxels as before. Imports no nnunetv2.
"""
from __future__ import annotations

import os
import struct
from typing import Optional

import numpy as np

__all__ = ["nifti_payload_complete", "is_nifti"]


def is_nifti(path: str) -> bool:
    return path.lower().endswith((".nii", ".nii.gz"))


def nifti_payload_complete(path: str) -> Optional[bool]:
    """``True`` when ``path`` holds all the voxel bytes its header announces; ``None`` when this cannot be told
    from the header and the file size (the caller should read the voxels)."""
    if not is_nifti(path):
        return None
    import nibabel as nib

    try:
        header = nib.load(path).header
        # vox_offset as written (nibabel's get_data_offset() may report 0 here); at least the single-file minimum
        offset = max(int(header["vox_offset"]), int(getattr(header, "single_vox_offset", 0)))
        expected = offset + int(np.prod(header.get_data_shape(), dtype=np.int64)) * int(header.get_data_dtype().itemsize)
    except Exception:  # noqa: BLE001 - an unreadable header: let the full read report it
        return None
    if not path.lower().endswith(".gz"):
        return True if os.path.getsize(path) >= expected else None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:  # shorter than a gzip header + trailer
            return None
        f.seek(-4, os.SEEK_END)
        (isize,) = struct.unpack("<I", f.read(4))
    return True if isize == expected % 2 ** 32 else None
