"""A non-editable install: build the wheel, install it into a fresh virtual environment (no download: the
dependencies come from the system site-packages), and run the CLI from another folder, so that presets, the
shipped teacher and the feature net must come from the installed package, not from this checkout."""
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "distill", "samplers", "search", "app", "configs")
BASE = Path(getattr(sys, "_base_executable", sys.executable))  # the interpreter this environment was made from
CAN_BUILD = "import importlib.util as u, sys; sys.exit(not (u.find_spec('setuptools.command.bdist_wheel') or u.find_spec('wheel')))"


def wheel_builder():
    """An interpreter here whose setuptools builds wheels without a download (>= 70.1, or with `wheel`)."""
    for python in dict.fromkeys((sys.executable, str(BASE))):
        if subprocess.run([python, "-c", CAN_BUILD], capture_output=True).returncode == 0:
            return python
    pytest.skip("no setuptools >= 70.1 (or wheel) here to build a wheel offline")


def _run(args, cwd, env):
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(map(str, args))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.timeout(900)
def test_wheel_installs_one_package_and_runs_from_elsewhere(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([wheel_builder(), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
          src], tmp_path, env)
    venv = tmp_path / "venv"
    _run([BASE, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path, env)
    python, dstudio = venv / "bin" / "python", venv / "bin" / "dstudio"
    if sys.prefix != sys.base_prefix:  # dependencies installed in this virtual environment: list its folders (a
        # .pth line only extends sys.path; the .pth files there, such as an editable install's finder, do not run)
        (purelib,) = {p for p in Path(venv / "lib").glob("python*/site-packages")}
        (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (wheel,) = (tmp_path / "dist").glob("dstudio-*.whl")
    _run([python, "-m", "pip", "install", "--no-deps", "-q", wheel], tmp_path, env)

    shown = _run([python, "-m", "pip", "show", "-f", "dstudio"], tmp_path, env)
    assert f"Location: {next(venv.glob('lib/python*/site-packages'))}" in shown
    files = shown.split("Files:")[1].split()
    top = {f.split("/")[0] for f in files if not f.startswith("..") and ".dist-info" not in f}
    assert top == {"dstudio"}, top
    assert any(f.startswith("dstudio/configs/") and f.endswith(".yaml") for f in files)
    assert "dstudio/distill/core/pipeline_dstudio.py" in files and "dstudio/samplers/schedulers.py" in files

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _imports_every_package_from(python, venv, elsewhere, env)
    where = _run([python, "-c", "import dstudio.distill.core.config as c; print(c.__file__); print(c.CONFIG_DIR)"],
                 elsewhere, env).split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    out = _run([dstudio, "distill", "dmd2", "--preset", "quick", "--steps", "2", "--set", "trainer.batch_size=8",
                "--eval-per-class", "0", "--out", "run"], elsewhere, env)
    assert "exported run/pipeline" in out and (elsewhere / "run" / "pipeline" / "scheduler" / "schedulers.py").is_file()
    _run([dstudio, "sample", "--pipeline", "run/pipeline", "--num-images", "4", "--out", "samples"], elsewhere, env)
    assert len(list((elsewhere / "samples").glob("*.png"))) == 4
    out = _run([dstudio, "fid", "--images", "samples"], elsewhere, env)  # the feature net's weights: package data
    assert out.startswith("FID-mnist ")


# every module of each package pyproject.toml lists, imported in the fresh environment: (name, its file) lines
IMPORT_ALL = """import importlib, pkgutil, sys
for name in sys.argv[1:]:
    package = importlib.import_module(name)
    print(name, list(package.__path__)[0])
    for info in pkgutil.iter_modules(package.__path__, name + "."):
        if not info.ispkg:
            print(info.name, importlib.import_module(info.name).__file__)
"""


def _imports_every_package_from(python, venv, cwd, env) -> None:
    """Each listed package and each of its modules imports from the installed wheel (a folder missing from the
    package list would be missing here, however well it imports in an editable install)."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = dict(line.split(" ", 1) for line in _run([python, "-c", IMPORT_ALL, *packages], cwd, env).splitlines())
    assert set(packages) <= set(found) and all(Path(f).is_relative_to(venv) for f in found.values()), found
    assert {"dstudio.distill.evaluation.fid", "dstudio.app.studio.page", "dstudio.app.parser"} <= set(found)


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_every_third_party_import_is_a_declared_dependency():
    """Each module the package, its tests and benchmarks import (at the top or inside a function) comes from a
    distribution pyproject.toml declares, in `dependencies` or an extra: one installed here by hand but not
    declared passes on this checkout and fails a clean CI install."""
    import ast
    import importlib.metadata as md
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(s) for s in project["dependencies"]}
    extras = {_requirement_name(s) for specs in project["optional-dependencies"].values() for s in specs}
    owners = md.packages_distributions()
    missing, stdlib = {}, set(sys.stdlib_module_names)
    local = {p.stem for folder in ("tests", "benchmarks") for p in (ROOT / folder).glob("*.py")}
    for folder in (*SOURCES[2:], "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in stdlib or top in local or top == "dstudio":
                        continue
                    dists = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                    if not dists & (declared | extras):
                        missing.setdefault(top, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
