"""benchmarks/gpu_check.py runs on the CPU without nnU-Net (the GPU image lacks it) and reads the shipped plans."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
BLOCKED = ("nnunetv2", "SimpleITK", "batchgenerators", "acvl_utils")


def test_runs_on_cpu_without_nnunet_and_reports_every_column(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = textwrap.dedent(f"""
        import runpy, sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None  # importing any of them now raises ImportError
        sys.argv = ["gpu_check.py", "--device", "cpu", "--tiny", "--networks", "plain", "ours", "--ks", "1", "2",
                    "--warmup", "0", "--iterations", "1", "--out", {str(out)!r}]
        runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["plan"], r["network"]) for r in rows] == [
        ("tiny_a/3d", "plain"), ("tiny_a/3d", "ours"), ("tiny_b/3d", "plain"), ("tiny_b/3d", "ours")]
    for r in rows:
        assert r["train step ms"] > 0 and r["infer ms"] > 0 and r["estimate (M el)"] > 0
        assert r["peak MB"] is None  # CUDA memory only on a GPU
    plain, ours = rows[0], rows[1]
    assert plain["train vs plain"] == 1.0
    assert ours["estimate (M el)"] > plain["estimate (M el)"]  # time modulation, conditioning encoder, x_t input
    assert abs(ours["K=2 loop ms"] - 2 * ours["infer ms"]) < 0.02 and ours["K=2 batched ms"] > 0
    assert "| tiny_b/3d | ours |" in result["table"]


def test_shipped_plans_build_every_network():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    plans = json.loads(gpu_check.PLANS_FILE.read_text())
    assert {"Dataset004_Hippocampus/3d_fullres", "Dataset140_LeftAtrium/3d_fullres"} <= set(plans)
    for plan in plans.values():
        params = {}
        for name, options in gpu_check.NETWORKS.items():
            net = gpu_check.build(plan, options)
            params[name] = sum(p.numel() for p in net.parameters())
            assert net.compute_conv_feature_map_size(plan["patch_size"]) > 0
        assert params["ours"] > params["ours noDBSA"] and params["ours"] > params["ours noFAA"] > params["plain"]
