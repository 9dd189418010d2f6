"""nox sessions: ``tests`` on every Keras backend, ``lint``, ``typecheck``,
``wheel`` and ``docs``.

Plain ``nox`` runs all of them (this is the README's test command and what
``.ci/run`` calls). ``nox -s "tests(torch)"`` runs one backend; arguments
after ``--`` replace the pytest paths, e.g. ``nox -s "tests(jax)" -- tests/test_x.py``.

Every install goes through ``constraints/ci.txt``, which pins the CPU build
of torch; each session fails if any ``nvidia-*`` package got installed.
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = str(ROOT / "constraints" / "ci.txt")
LINT_PATHS = [
    "src",
    "adapters",
    "reference_experiments",
    "benchmarks",
    "tests",
    "noxfile.py",
    "conftest.py",
    "docs/hooks",
]
TYPECHECK_PATHS = ["src", "adapters", "reference_experiments", "benchmarks", "docs/hooks"]
# Doctests in src/ and adapters/ run next to tests/; the root conftest.py
# skips each adapter's package unless its backend is the active one.
TEST_PATHS = ["tests", "src/ckd_core", "adapters"]

# What each backend session installs on top of `.[test]`. The numpy session
# also hosts the cross-backend equivalence test (tests/test_backends.py),
# which runs all four backends in subprocesses, so it gets every backend.
# Keras' numpy backend imports jax (keras/src/backend/numpy/math.py), and the
# adapter tests of the torch and tensorflow sessions start a numpy-backend
# keras as "another backend", so those sessions get jax too.
BACKEND_PACKAGES = {
    "numpy": ["jax", "torch", "tensorflow-cpu"],
    "jax": ["jax"],
    "torch": ["torch", "jax"],
    "tensorflow": ["tensorflow-cpu", "jax"],
}
# The PyTorch reference experiments' tests need the `experiments` extra and
# run in the torch session only.
EXPERIMENTS_BACKEND = "torch"
EXPERIMENT_TESTS = "tests/experiments"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["tests", "lint", "typecheck", "wheel", "docs"]
nox.options.error_on_external_run = True

_NO_NVIDIA = """
import importlib.metadata as md, sys
bad = sorted({d.metadata["Name"] for d in md.distributions()
              if (d.metadata["Name"] or "").lower().startswith("nvidia")})
if bad:
    sys.exit("ERROR: nvidia-* packages were installed (a CUDA build of torch?): " + ", ".join(bad))
try:
    print("torch", md.version("torch"))
except md.PackageNotFoundError:
    pass
"""


def _local_cpu_torch() -> bool:
    """Whether pip's find-links already offer the pinned CPU torch wheel."""
    dirs = os.environ.get("PIP_FIND_LINKS", "").split() + ["/opt/wheels"]
    return any(glob.glob(os.path.join(d, "torch-2.13.0+cpu-*.whl")) for d in dirs)


def _install(session: nox.Session, *packages: str) -> None:
    """pip install under the CI constraints; CPU torch from the local wheel or PyTorch's index."""
    # --no-compile: byte-compiling all of torch and TensorFlow at install
    # costs minutes of CPU per session; Python compiles what it imports.
    args = ["--no-compile", "-c", CONSTRAINTS, *packages]
    if "torch" in packages and not _local_cpu_torch():
        args = ["--extra-index-url", TORCH_CPU_INDEX, *args]
    session.install(*args)
    session.run("python", "-c", _NO_NVIDIA, silent=False)


@nox.session
@nox.parametrize("backend", [nox.param(b, id=b) for b in BACKEND_PACKAGES])
def tests(session: nox.Session, backend: str) -> None:
    """pytest (tests/ and doctests) with KERAS_BACKEND=<backend>.

    Set CI=1 for the "ci" hypothesis profile (>= 100 examples per property).
    """
    extras = "test,experiments" if backend == EXPERIMENTS_BACKEND else "test"
    _install(session, "-e", f".[{extras}]", *BACKEND_PACKAGES[backend])
    paths = list(TEST_PATHS)
    if backend != EXPERIMENTS_BACKEND:
        paths.append(f"--ignore={EXPERIMENT_TESTS}")
    env = {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    # One pytest-xdist worker per core: most tests are single-threaded.
    session.run("pytest", "-q", "-n", "auto", *(session.posargs or paths), env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    _install(session, "ruff")
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", *LINT_PATHS)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on src/, adapters/, reference_experiments/ and benchmarks/ (with torch
    installed, so the torch adapter and the experiments are checked)."""
    _install(session, "-e", ".", "mypy", "torch")
    session.run("mypy", *TYPECHECK_PATHS)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (MkDocs, Material theme, mkdocstrings) built with
    ``--strict`` into ``build/site/``: a broken link, anchor or docstring fails it. The API
    pages read the sources statically, so no backend is installed; ruff formats
    the signatures."""
    _install(session, "mkdocs", "mkdocs-material", "mkdocstrings[python]", "ruff")
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Loss benchmark (benchmarks/losses.py): ``--quick`` grid unless arguments follow ``--``.

    ``nox -s bench -- --full`` runs the grid of docs/performance.md's table
    (about an hour on 2 cores); results go to ``benchmarks/results/``. Not part
    of the default sessions: timings are not tests.
    """
    _install(session, "-e", ".", "torch", "jax", "tensorflow-cpu")
    session.run("python", "benchmarks/losses.py", *(session.posargs or ["--quick"]))


#: what the wheel must hold (and must not: a top-level module besides the packages)
_CHECK_WHEEL = """
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["ckd_core/py.typed", "ckd_torch/py.typed", "ckd_tensorflow/py.typed",
        "reference_experiments/__main__.py", "reference_experiments/configs/table1.toml"]
missing = [n for n in need if n not in names]
missing += [] if any(n.endswith("/licenses/LICENSE") for n in names) else ["LICENSE"]
top = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
stray = [t for t in top if t not in ("ckd_core", "ckd_torch", "ckd_tensorflow",
                                     "reference_experiments")]
if missing or stray:
    sys.exit(f"wheel: missing {missing}, unexpected top-level {stray}")
print("wheel holds", len(names), "files; top level:", ", ".join(top))
"""


_TIMED_HELP = """
import subprocess, sys, time
t0 = time.perf_counter()
subprocess.run([sys.executable, "-m", "reference_experiments", "--help"], check=True)
print(f"python -m reference_experiments --help: {time.perf_counter() - t0:.2f} s")
"""


@nox.session
def wheel(session: nox.Session) -> None:
    """Builds the wheel, checks its contents, installs it with the ``experiments`` extra
    into this fresh virtualenv and, from a folder outside the clone, imports the
    packages and runs ``python -m reference_experiments --help``."""
    dist = Path(session.create_tmp()).resolve() / "dist"
    session.run("python", "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT))
    (built,) = dist.glob("ckd_core-*.whl")
    session.run("python", "-c", _CHECK_WHEEL, str(built))
    _install(session, f"ckd-core[experiments] @ {built.as_uri()}", "torch")
    with tempfile.TemporaryDirectory() as outside:
        session.chdir(outside)
        env = {"KERAS_BACKEND": "torch", "PYTHONPATH": ""}
        smoke = "import ckd_core, ckd_torch; print('ckd_core', ckd_core.__version__)"
        session.run("python", "-c", smoke, env=env)
        session.run("python", "-c", _TIMED_HELP, env=env)
