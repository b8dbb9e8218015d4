"""The package's layering, checked on the source: what may import what, private names, file sizes."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "medflowseg_nn"
PACKAGES = (LIBRARY, ROOT / "trainers", ROOT / "planners")
SOURCES = sorted(p for pkg in PACKAGES for p in pkg.rglob("*.py"))


def imported_modules(path: Path) -> list[str]:
    """Absolute module names imported anywhere in a file (also inside functions)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_sources_were_found():
    assert len(SOURCES) > 30 and LIBRARY / "inference" / "predictor.py" in SOURCES


@pytest.mark.parametrize("path", [p for p in SOURCES if p.is_relative_to(LIBRARY)], ids=lambda p: p.name)
def test_library_never_imports_trainers_or_planners(path):
    bad = [m for m in imported_modules(path) if m.split(".")[0] in ("trainers", "planners")
           or m.startswith(("medflowseg_nn.trainers", "medflowseg_nn.planners"))]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; find classes through medflowseg_nn.plugins instead"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_imported_from_another_module(path):
    private = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            private += [a.name for a in node.names if a.name.startswith("_")]
            if node.module and any(part.startswith("_") for part in node.module.split(".")):
                private.append(node.module)
        if isinstance(node, ast.Import):
            private += [a.name for a in node.names if any(p.startswith("_") for p in a.name.split("."))]
    assert not private, f"{path.relative_to(ROOT)} imports private names {private}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_files_stay_under_300_lines(path):
    assert len(path.read_text().splitlines()) <= 300


@pytest.mark.parametrize("pkg", [p for p in PACKAGES] + [p for p in LIBRARY.iterdir() if (p / "__init__.py").is_file()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_package_says_what_lives_there(pkg):
    doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text()))
    assert doc and "import" in doc, f"{pkg.relative_to(ROOT)}/__init__.py needs a docstring saying what may import it"


def test_core_runs_without_nnunetv2():
    """flow/, networks/, profiling/, config, errors and the nnU-Net-free inference rooms import with nnunetv2 blocked."""
    code = ("import sys; sys.modules['nnunetv2'] = None\n"
            "import medflowseg_nn.flow.path, medflowseg_nn.flow.solver, medflowseg_nn.flow.loss\n"
            "import medflowseg_nn.flow.label_space, medflowseg_nn.networks.vector_field_unet\n"
            "import medflowseg_nn.config, medflowseg_nn.errors, medflowseg_nn.model, medflowseg_nn.profiling.memory\n"
            "import medflowseg_nn.inference.sampler, medflowseg_nn.inference.sliding_window\n"
            "import medflowseg_nn.inference.uncertainty\n"
            "assert not [m for m in sys.modules if m.startswith('nnunetv2.')]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_trainers_and_planners_install_under_the_package_namespace(tmp_path):
    """Outside the repository, only the namespaced names exist (no top-level ``trainers`` to shadow or be shadowed)."""
    code = ("import importlib.util as u, medflowseg_nn.trainers.variants, medflowseg_nn.planners.mfs_planner\n"
            "assert u.find_spec('trainers') is None and u.find_spec('planners') is None\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_prediction_does_not_import_nnunets_trainer_module():
    """``mfs_predict`` and its spawned export workers import the runner; nnU-Net's trainer module (its logger's
    seaborn / matplotlib, torch._dynamo: seconds of start-up) is imported only by the trainer hooks that need it."""
    import subprocess
    import sys
    code = ("import sys, medflowseg_nn.cli.predict, medflowseg_nn.inference.runner; "
            "print('nnunetv2.training.nnUNetTrainer.nnUNetTrainer' in sys.modules, 'seaborn' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "False"]
