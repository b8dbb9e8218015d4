"""``tune_cpu_allocator``: the switch, the user's own glibc variables, and on glibc the effect itself (a freed
48 MiB block, above glibc's own largest mmap threshold and below ours, is reused without new page faults) checked
in a fresh interpreter."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medflowseg_nn import cpu_allocator as A

CHILD = """
import json, resource, sys
import numpy as np
from medflowseg_nn.cpu_allocator import tune_cpu_allocator
env = {}
tuned = tune_cpu_allocator(env) if sys.argv[1] == "1" else False
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(12 << 20, dtype=np.float32)  # 48 MiB, touched
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "env": env, "faults": faults}))
"""


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_switched_off_changes_nothing(value):
    env = {A.ENV_SWITCH: value}
    assert A.tune_cpu_allocator(env) is False
    assert env == {A.ENV_SWITCH: value}


def test_users_glibc_variables_are_kept():
    env = {"MALLOC_TRIM_THRESHOLD_": "123"}
    assert A.tune_cpu_allocator(env) is False
    assert env == {"MALLOC_TRIM_THRESHOLD_": "123"}


def test_a_refused_setting_is_not_written_for_the_children(monkeypatch):
    """mallopt accepting the mmap threshold and refusing the trim one: False, and only the applied one in the env."""
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(param)
            return int(param == A.M_MMAP_THRESHOLD)

    monkeypatch.setattr(A, "glibc", FakeLibc)
    env = {}
    assert A.tune_cpu_allocator(env) is False
    assert sorted(calls) == sorted([A.M_MMAP_THRESHOLD, A.M_TRIM_THRESHOLD])
    assert env == {"MALLOC_MMAP_THRESHOLD_": str(A.MMAP_THRESHOLD)}


@pytest.mark.parametrize("command, argv, code", [("predict", ["-i", "in", "-o", "out"], 2),  # no -m / -d
                                                  ("train", ["4", "3d_fullres", "0", "-device", "cpu"], 0)])
def test_the_commands_tune_the_allocator_first(command, argv, code, monkeypatch):
    """``mfs_predict`` / ``mfs_train`` call it before any work (predict: before its first error; train: with the
    training itself replaced)."""
    import importlib
    module = importlib.import_module(f"medflowseg_nn.cli.{command}")
    calls = []
    monkeypatch.setattr(module, "tune_cpu_allocator", lambda: calls.append(True) or False)
    if command == "train":
        monkeypatch.setattr(module, "run_training", lambda **kw: calls.append("trained"))
    assert (module.main(argv) or 0) == code
    assert calls == ([True] if command == "predict" else [True, "trained"])


def run_child(tune: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if tune else "0"], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(A.glibc() is None, reason="needs glibc (mallopt)")
def test_freed_blocks_are_reused_without_page_faults():
    tuned = run_child(tune=True)
    assert tuned["tuned"] is True
    # children (spawned workers) get the same thresholds through glibc's own variables
    assert tuned["env"] == {k: str(v) for k, v in A.GLIBC_ENV.items()}
    pages = (48 << 20) // 4096
    assert max(tuned["faults"][1:]) < pages // 100, tuned["faults"]  # the 2nd and 3rd block reuse the 1st's pages
    plain = run_child(tune=False)
    assert plain["tuned"] is False and plain["env"] == {}
