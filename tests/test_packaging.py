"""Packaging: one version, LICENSE and ``py.typed``, no top-level helper module, the
reference experiments and their configs in the wheel, and the Keras backend choice of
``import ckd_core`` / ``import ckd_torch`` (in fresh interpreters). ``nox -s wheel``
builds and installs the wheel itself."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
WHEEL = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]


def test_version_has_one_source():
    init = (ROOT / "src" / "ckd_core" / "__init__.py").read_text(encoding="utf-8")
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["hatch"]["version"]["path"] == "src/ckd_core/__init__.py"
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"$', init, re.M)


def test_license_changelog_and_typed_markers():
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (ROOT / "CHANGELOG.md").is_file()
    for package in ("src/ckd_core", "adapters/ckd_torch", "adapters/ckd_tensorflow"):
        assert (ROOT / package / "py.typed").is_file(), package
        assert package in WHEEL["packages"]


def test_wheel_has_no_top_level_helper_module_and_ships_the_experiments():
    assert not (ROOT / "adapters" / "ckd_backend.py").exists()
    assert "force-include" not in WHEEL
    assert "reference_experiments" in WHEEL["packages"]
    configs = sorted((ROOT / "reference_experiments" / "configs").glob("*.toml"))
    assert configs and not any(str(c.relative_to(ROOT)).startswith(tuple(WHEEL["exclude"]))
                               for c in configs)  # fmt: skip
    classifiers = PYPROJECT["project"]["classifiers"]
    assert "Typing :: Typed" in classifiers and PYPROJECT["project"]["urls"]


def _python(code: str, tmp_path: Path, **env: str | None) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with an empty KERAS_HOME and ``env`` (None: unset)."""
    full = {**os.environ, "KERAS_HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    for key, value in env.items():
        full.pop(key, None)
        if value is not None:
            full[key] = value
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)


def _installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


HIDE = "import sys\nfor name in {hidden!r}:\n    sys.modules[name] = None\n"


@pytest.mark.slow
@pytest.mark.skipif(not _installed("jax"), reason="needs jax installed")
def test_no_tensorflow_and_no_choice_picks_an_installed_backend_and_says_so(tmp_path):
    code = HIDE.format(hidden=["tensorflow"]) + (
        "import warnings\nwith warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n    import ckd_core, keras\n"
        "print(keras.backend.backend(), len(w), w[0].message)\n"
    )
    out = _python(code, tmp_path, KERAS_BACKEND=None)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("jax 1 ") and "KERAS_BACKEND" in out.stdout, out.stdout


@pytest.mark.slow
def test_no_backend_installed_is_one_clear_error(tmp_path):
    code = HIDE.format(hidden=["tensorflow", "jax", "torch"]) + (
        "try:\n    import ckd_core\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    out = _python(code, tmp_path, KERAS_BACKEND=None)
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.startswith("ERR ckd_core needs a Keras backend")
        and "KERAS_BACKEND" in out.stdout
    )


@pytest.mark.slow
@pytest.mark.skipif(not _installed("torch", "jax"), reason="needs torch and jax installed")
def test_ckd_torch_never_overrides_keras_backend(tmp_path):
    code = "try:\n    import ckd_torch\nexcept ImportError as e:\n    print('ERR', e)\n"
    out = _python(code, tmp_path, KERAS_BACKEND="jax")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "ERR ckd_torch needs the Keras 'torch' backend, but KERAS_BACKEND=jax"
    )


@pytest.mark.slow
@pytest.mark.skipif(not _installed("torch"), reason="needs torch installed")
def test_ckd_torch_selects_torch_when_nothing_is_chosen(tmp_path):
    (tmp_path / "keras.json").write_text('{"backend": "tensorflow"}')  # keras' own default
    out = _python("import ckd_torch, keras\nprint(keras.backend.backend())", tmp_path,
                  KERAS_BACKEND=None)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch"]
