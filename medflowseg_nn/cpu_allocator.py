"""Keep the memory of large CPU tensors in the process instead of handing it back to the OS after every use.

glibc's ``malloc`` serves every block above its mmap threshold (adjusted at run time, at most 32 MiB by default)
with fresh ``mmap`` pages and unmaps them on ``free``; memory freed at the top of the heap beyond the trim
threshold is returned as well. A sliding-window forward allocates feature maps of 10–200 MiB and frees them a few
milliseconds later, so the next tile's maps are new pages again: the kernel page-faults and zeroes each 4 KiB page
on first touch. Measured on a Hippocampus 3d_fullres tile (1 torch thread, ``resource.getrusage``): ~16–25 000
minor page faults per forward without this, 0 with it (``benchmarks/RESULTS.md`` 2026-12-05 for the timings).

:func:`tune_cpu_allocator` raises both thresholds with ``mallopt`` for this process and writes glibc's own
environment variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` for child processes (nnU-Net's
preprocessing and export workers, the augmentation workers), which read them at start. The cost: memory freed by
the network stays mapped in the process for the next tile, and a heap that holds maps of many sizes fragments, so
the mmap threshold stays below the largest maps of large volumes (:data:`MMAP_THRESHOLD`). Why not jemalloc or
tcmalloc, which PyTorch's CPU tuning guide recommends: they work only through ``LD_PRELOAD`` before the
interpreter starts, which a console script cannot do; ``mallopt`` needs nothing beyond glibc and is a no-op
elsewhere.

Only the ``mfs_*`` commands call it (a library import never changes a process's allocator). Off with
``MFS_TUNE_MALLOC=0``; glibc variables the user already set are kept as they are.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import MutableMapping, Optional

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
#: blocks below this come from the heap: every map of a Hippocampus tile (≤ ~12 MiB) and a LeftAtrium tile's
#: lower stages (≤ ~55 MiB); its full-resolution maps (~210 MiB) stay mmap-backed. Kept in the heap (1 GiB, and
#: 256 MiB alike) they fragmented it over TTA's 8 mirrored calls: LeftAtrium peak RSS 1.28–1.35× nnU-Net's
#: predictor, 1.11–1.14× at 64 MiB (``benchmarks/RESULTS.md`` 2026-12-05 09:39 and 11:07)
MMAP_THRESHOLD = 64 << 20
#: free memory at the top of the heap kept rather than returned (glibc's int range)
TRIM_THRESHOLD = (1 << 31) - 1
ENV_SWITCH = "MFS_TUNE_MALLOC"
GLIBC_ENV = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD}
#: glibc's variable -> its mallopt parameter
MALLOPT_PARAM = {"MALLOC_MMAP_THRESHOLD_": M_MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": M_TRIM_THRESHOLD}


def glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc (it has ``gnu_get_libc_version`` and ``mallopt``), else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def tune_cpu_allocator(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Raise glibc's mmap and trim thresholds for this process and its future children (module docstring).

    ``environ``: where the switch is read and the glibc variables are written (``os.environ`` by default).
    Returns whether this process's thresholds were set: ``False`` when switched off (``MFS_TUNE_MALLOC=0``), when
    the C library is not glibc, when the user set glibc's variables (then glibc applied theirs at start), or when
    ``mallopt`` refused one of them (the other, if accepted, stays raised and is written for the children)."""
    env = os.environ if environ is None else environ
    if env.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(name in env for name in GLIBC_ENV):
        logger.debug("keeping the user's %s", {k: env[k] for k in GLIBC_ENV if k in env})
        return False
    libc = glibc()
    if libc is None:
        return False
    # each setting on its own: the children get (through the env) exactly what this process got
    accepted = {name: bool(libc.mallopt(MALLOPT_PARAM[name], value)) for name, value in GLIBC_ENV.items()}
    for name, ok in accepted.items():
        if ok:
            env[name] = str(GLIBC_ENV[name])
    logger.debug("glibc malloc thresholds raised: %s", accepted)
    return all(accepted.values())
