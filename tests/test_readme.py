"""The README's code runs: every Python snippet, the quick start and the API table.

Each ```python block in README.md is preceded by a marker
``<!-- readme-test: backends=a,b -->`` naming the Keras backends it runs on.
A snippet runs in a fresh interpreter (Keras fixes its backend at import) with
``KERAS_BACKEND`` set; in a nox session only the session's backend runs, so
each (snippet, backend) pair runs exactly once across ``nox``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI_RUN = ROOT / ".ci" / "run"
BACKENDS = ("numpy", "jax", "torch", "tensorflow")
ACTIVE = os.environ.get("KERAS_BACKEND")

_SNIPPET = re.compile(
    r"<!-- readme-test: backends=(?P<backends>[\w,]+) -->\n```python\n(?P<code>.*?)\n```",
    re.DOTALL,
)


def _heading_before(pos: int) -> str:
    headings = re.findall(r"^#+ (.+)$", README[:pos], re.MULTILINE)
    return headings[-1] if headings else "top"


def _snippets() -> list[tuple[str, str, str]]:
    found = []
    for number, m in enumerate(_SNIPPET.finditer(README)):
        name = f"{number}-{_heading_before(m.start()).split()[0].lower()}"
        for backend in m.group("backends").split(","):
            found.append((name, backend, m.group("code")))
    return found


SNIPPETS = _snippets()


def test_every_python_block_is_tested():
    blocks = README.count("```python")
    marked = len(_SNIPPET.findall(README))
    assert blocks == marked, f"{blocks - marked} ```python block(s) lack a readme-test marker"
    assert {b for _, b, _ in SNIPPETS} == set(BACKENDS), "every backend has a snippet"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "code"),
    [pytest.param(b, c, id=f"{n}-{b}") for n, b, c in SNIPPETS],
)
def test_snippet_runs(backend: str, code: str, tmp_path: Path):
    if ACTIVE is not None and backend != ACTIVE:
        pytest.skip(f"runs in the {backend} session (KERAS_BACKEND={ACTIVE})")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"snippet failed on {backend}:\n{proc.stdout}\n{proc.stderr}"


def _quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)\n```", section, re.DOTALL)
    assert block, "the quick start has a ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    assert "python -m reference_experiments quickstart" in commands[0]
    ci_lines = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()]
    assert commands[1] in ci_lines, f".ci/run must run the README's test command {commands[1]!r}"
    assert os.access(CI_RUN, os.X_OK), ".ci/run is executable"


def test_api_table_names_every_public_loss():
    import ckd_core
    from ckd_core import functional

    table = README.split("## API", 1)[1].split("\n## ", 1)[0]
    names = [n for n in ckd_core.__all__ if n.endswith("Loss")] + list(functional.__all__)
    missing = [n for n in names if f"`{n}" not in table]
    assert not missing, f"README API table lacks {missing}"


def test_readme_cites_the_papers():
    for needle in (
        "Comparative Knowledge Distillation",
        "WACV 2025",
        "Relational Knowledge Distillation",
        "Knowledge Distillation from A Stronger Teacher",
        "Distilling the Knowledge in a Neural Network",
    ):
        assert needle in README
