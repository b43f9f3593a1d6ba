"""The package as a user installs it: one import namespace (``vqdiff.*``), every source folder in
it, and a wheel that serves the embedded default model from any directory."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("vqdiff", "model", "server", "kernels")


def setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def package_dir(package: str, mapping: dict[str, str]) -> Path:
    """The folder setuptools takes ``package`` from: the longest mapped prefix, else the package path."""
    for prefix in sorted(mapping, key=len, reverse=True):
        if package == prefix or package.startswith(prefix + "."):
            return ROOT / mapping[prefix] / package[len(prefix) + 1 :].replace(".", "/")
    return ROOT / package.replace(".", "/")


def test_every_source_folder_is_a_listed_package_and_every_listed_package_exists():
    config = setuptools_config()
    listed = {package_dir(p, config["package-dir"]).resolve() for p in config["packages"]}
    folders = {f.parent.resolve() for top in SOURCES for f in (ROOT / top).rglob("*.py") if "__pycache__" not in f.parts}
    assert folders - listed == set(), "folders with Python files that pyproject.toml does not install"
    assert all(d.is_dir() for d in listed), sorted(str(d) for d in listed if not d.is_dir())
    assert all(p == "vqdiff" or p.startswith("vqdiff.") for p in config["packages"])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel built from this tree, installed into a fresh venv whose dependencies are this
    interpreter's site-packages as a plain path entry (so this checkout's editable install, a .pth
    hook, is not seen there)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: setuptools writes build/ beside the sources it builds
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("vqdiff", "model", "server", "kernels", "models"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    isolation = [] if _setuptools_at_least(68) else ["--use-pep517"]
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)]
    build += ["--no-build-isolation"] if not isolation else isolation
    r = subprocess.run(build, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("vqdiff-*.whl")
    env = tmp / "venv"
    venv.create(env, with_pip=False)
    site = next((env / "lib").glob("python*/site-packages"))
    ours = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    (site / "deps.pth").write_text(ours + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q",
                        "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return env


def _setuptools_at_least(major: int) -> bool:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0]) >= major
    except importlib.metadata.PackageNotFoundError:
        return False


def test_the_wheel_installs_one_namespace_and_generates_from_any_directory(installed, tmp_path):
    site = next((installed / "lib").glob("python*/site-packages"))
    assert not {"model", "server", "kernels", "models"} & {p.name for p in site.iterdir()}
    assert (site / "vqdiff" / "models" / "default" / "model_index.json").is_file()
    python = str(installed / "bin" / "python")
    probe = ("import importlib.util, vqdiff._checkout as c, vqdiff.model.io.default as d; "
             "print(d.default_model_dir()); print(importlib.util.find_spec('model')); print(c.checkout_root())")
    r = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    where, spec, root = r.stdout.split()
    assert Path(where).is_relative_to(site) and spec == "None"
    assert root == "None"   # installed, site-packages is no checkout: vqdiff/_checkout.py's finder stays out
    out = tmp_path / "out.png"
    r = subprocess.run([str(installed / "bin" / "vqdiff"), "generate", "a red circle", "-o", str(out), "--steps", "4",
                        "--seed", "1", "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
