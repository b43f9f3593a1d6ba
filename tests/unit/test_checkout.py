"""Run from the checkout root, the top-level folders do not shadow installed distributions of the same
names (vqdiff/_checkout.py): transformers from 5.25 on imports the ``kernels`` distribution, which this
checkout's ``kernels/`` folder would otherwise replace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_site(tmp_path) -> Path:
    """A path entry holding a distribution named ``kernels``, as `pip install kernels` leaves it."""
    pkg = tmp_path / "kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('ORIGIN = "installed"\n')
    info = tmp_path / "kernels-0.19.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    return tmp_path


def probe(code: str, site: Path | None) -> str:
    """``python -c code`` started in the checkout root, so its '' path entry is the root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()


def test_the_checkout_root_shadows_the_installed_distribution_without_the_finder(fake_site):
    # the fault the finder exists for: the root's '' entry comes before PYTHONPATH
    where = probe("import kernels; print(kernels.__file__)", fake_site)
    assert Path(where) == ROOT / "kernels" / "__init__.py"


def test_after_importing_vqdiff_the_installed_distribution_wins(fake_site):
    out = probe("import vqdiff, kernels, vqdiff.kernels as ours, importlib.metadata as m; "
                "print(kernels.ORIGIN, ours.__file__, m.version('kernels'))", fake_site)
    origin, ours, version = out.split()
    assert origin == "installed" and version == "0.19.1"
    assert Path(ours) == ROOT / "kernels" / "__init__.py"   # vqdiff.kernels is still this checkout's


def test_the_finder_steps_aside_when_no_distribution_has_the_name():
    # nothing installed is called `model`: the bare name resolves as it did before, to the root's folder
    out = probe("import vqdiff, importlib.util as u; s = u.find_spec('model'); print(s.origin)", None)
    assert Path(out) == ROOT / "model" / "__init__.py"


def test_the_finder_leaves_submodules_and_other_names_alone():
    from vqdiff._checkout import InstalledFirst

    finder = InstalledFirst(ROOT)
    assert finder.find_spec("json", None) is None
    assert finder.find_spec("kernels.ops", [str(ROOT / "kernels")]) is None
    assert [type(f) for f in sys.meta_path].count(InstalledFirst) == 1   # installed once, by `import vqdiff`
