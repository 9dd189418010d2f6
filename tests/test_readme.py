"""The README's and the docs' code runs: every Python block, the quick start, the CLI commands.

Each ```python block in README.md and docs/**/*.md is preceded by a marker
``<!-- readme-test: backends=a,b -->`` naming the Keras backends it runs on.
A block runs in a fresh interpreter (Keras fixes its backend at import) with
``KERAS_BACKEND`` set; in a nox session only the session's backend runs, so
each (block, backend) pair runs exactly once across ``nox``. The
``python -m reference_experiments`` commands of the shell blocks are checked
against the CLI's ``--help`` (and nox sessions, pip extras and benchmark flags
against their sources), and the API reference against the packages' ``__all__``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = {
    path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
    for path in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
}
CI_RUN = ROOT / ".ci" / "run"
BACKENDS = ("numpy", "jax", "torch", "tensorflow")
ACTIVE = os.environ.get("KERAS_BACKEND")
README_MAX_LINES = 200

_SNIPPET = re.compile(
    r"<!-- readme-test: backends=(?P<backends>[\w,]+) -->\n```python\n(?P<code>.*?)\n```",
    re.DOTALL,
)
_SHELL_BLOCK = re.compile(r"```bash\n(.*?)\n```", re.DOTALL)
_CLI = re.compile(r"-m reference_experiments\s+(?P<args>.*)")

# Words about how this project is run, not about the library: none belongs in the docs.
_INTERNAL_NOTES = (r"\bissues?\b", r"\blent\b", r"\bH200\b", r"GPU windows?", r"this project's")
# The reproduction guide names the GPU its run-time estimates are for.
_NAMED_HARDWARE = {"docs/reproduce.md": r"\bH200\b"}

# Modules whose ``__all__`` the API reference documents, and their source files.
API_MODULES = {
    "ckd_core": "src/ckd_core/__init__.py",
    "ckd_core.functional": "src/ckd_core/functional.py",
    "ckd_core.distillation": "src/ckd_core/distillation.py",
    "ckd_torch": "adapters/ckd_torch/__init__.py",
    "ckd_torch.distributed": "adapters/ckd_torch/distributed.py",
    "ckd_tensorflow": "adapters/ckd_tensorflow/__init__.py",
    "ckd_tensorflow.distributed": "adapters/ckd_tensorflow/distributed.py",
}


def _heading_before(text: str, pos: int) -> str:
    headings = re.findall(r"^#+ (.+)$", text[:pos], re.MULTILINE)
    return headings[-1] if headings else "top"


def _snippets() -> list[tuple[str, str, str]]:
    found = []
    for page, text in PAGES.items():
        stem = Path(page).stem.lower()
        for number, m in enumerate(_SNIPPET.finditer(text)):
            word = re.sub(r"\W", "", _heading_before(text, m.start()).split()[0].lower())
            for backend in m.group("backends").split(","):
                found.append((f"{stem}-{number}-{word}", backend, m.group("code")))
    return found


SNIPPETS = _snippets()


def test_every_python_block_is_tested():
    for page, text in PAGES.items():
        blocks = text.count("```python")
        marked = len(_SNIPPET.findall(text))
        assert blocks == marked, f"{page}: {blocks - marked} ```python block(s) lack a marker"
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
    block = _SHELL_BLOCK.search(section)
    assert block, "the quick start has a ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    assert "python -m reference_experiments quickstart" in commands[0]
    ci_lines = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()]
    assert commands[1] in ci_lines, f".ci/run must run the README's test command {commands[1]!r}"
    assert os.access(CI_RUN, os.X_OK), ".ci/run is executable"


def test_readme_is_short_and_about_the_library():
    lines = README.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"
    for page, text in PAGES.items():
        for pattern in _INTERNAL_NOTES:
            if _NAMED_HARDWARE.get(page) == pattern:
                continue
            hit = re.search(pattern, text, re.IGNORECASE)
            assert not hit, f"{page}: internal note {hit.group(0)!r}"


def test_readme_links_the_paper_the_official_code_and_the_docs():
    for needle in (
        "arxiv.org/abs/2311.02253",
        "github.com/alextxu/ckd",
        "WACV 2025",
        "docs/index.md",
        "TorchTeacherBudget",
    ):
        assert needle in README, needle


def test_local_links_point_at_files():
    for page, text in PAGES.items():
        folder = (ROOT / page).parent
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            assert (folder / target).exists(), f"{page} links to a missing {target}"


def test_every_docs_page_is_in_the_navigation():
    nav = set(re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages == nav, f"not in mkdocs.yml nav: {pages - nav}; missing files: {nav - pages}"


def test_loss_table_names_every_public_loss():
    import ckd_core
    from ckd_core import functional

    maths = PAGES["docs/maths.md"]
    table = maths.split("## Where each loss lives", 1)[1].split("\n## ", 1)[0]
    names = [n for n in ckd_core.__all__ if n.endswith("Loss")] + list(functional.__all__)
    missing = [n for n in names if f"`{n}" not in table]
    assert not missing, f"the loss table of docs/maths.md lacks {missing}"


def _public_names(source: str) -> list[str]:
    """``__all__`` of a module, read without importing it (importing picks a backend)."""
    tree = ast.parse((ROOT / source).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{source} has no __all__")


def test_api_reference_documents_every_public_name():
    api = "\n".join(text for page, text in PAGES.items() if page.startswith("docs/api/"))
    directives = set(re.findall(r"^::: (\S+)$", api, re.MULTILINE))
    # A submodule is documented through its own names; a name exported twice
    # (ckd_tensorflow's core losses, replica_sum) through one entry that the
    # other module's page names.
    documented = directives | set(API_MODULES)
    short_names = {target.rsplit(".", 1)[-1] for target in documented}
    missing = [
        f"{module}.{name}"
        for module, source in API_MODULES.items()
        for name in _public_names(source)
        if f"{module}.{name}" not in documented and not (name in short_names and f"`{name}`" in api)
    ]
    assert not missing, f"docs/api lacks a '::: name' entry for {missing}"


def _shell_lines() -> list[tuple[str, str]]:
    """(page, command) of every line of the ```bash blocks, continuations joined."""
    return [
        (page, line.split(" #")[0].strip())
        for page, text in PAGES.items()
        for block in _SHELL_BLOCK.findall(text)
        for line in block.replace("\\\n", " ").splitlines()
    ]


def _cli_commands() -> list[tuple[str, str, list[str]]]:
    """(page, subcommand, flags) of every ``-m reference_experiments`` shell command."""
    found = []
    for page, line in _shell_lines():
        m = _CLI.search(line)
        if m:
            sub, *rest = m.group("args").split()
            flags = [arg.split("=")[0] for arg in rest if arg.startswith("--")]
            found.append((page, sub, flags))
    return found


def test_shell_commands_name_existing_sessions_extras_and_flags():
    """``nox -s`` sessions, ``pip install ".[extra]"`` extras and benchmark flags exist."""
    noxfile = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    bench = (ROOT / "benchmarks" / "losses.py").read_text(encoding="utf-8")
    wrong, seen = [], set()
    for page, line in _shell_lines():
        sessions = line.split("nox -s ", 1)[1].split(" --")[0] if "nox -s " in line else ""
        for name, param in re.findall(r"(\w+)(?:\((\w+)\))?", sessions):
            seen.add("nox")
            if f"def {name}(" not in noxfile or (param and f'"{param}"' not in noxfile):
                wrong.append((page, f"nox session {name}({param})"))
        for extras in re.findall(r"pip install .*?-e \"\.\[([\w,]+)\]\"", line):
            seen.add("pip")
            wrong += [
                (page, x) for x in extras.split(",") if not re.search(rf"^{x} = ", pyproject, re.M)
            ]
        if "benchmarks/losses.py" in line:
            seen.add("bench")
            flags = [a.split("=")[0] for a in line.split() if a.startswith("--")]
            wrong += [(page, f) for f in flags if f'"{f}"' not in bench]
    assert seen == {"nox", "pip", "bench"}, seen
    assert not wrong, f"shell commands name what does not exist: {wrong}"


_HELP = """
import contextlib, io, json, sys
from reference_experiments.__main__ import main
helps = {}
for sub in sys.argv[1:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([sub, "--help"])
    helps[sub] = out.getvalue()
print(json.dumps(helps))
"""


@pytest.mark.slow
def test_cli_commands_use_existing_subcommands_and_flags():
    if ACTIVE not in (None, "torch") or importlib.util.find_spec("sklearn") is None:
        pytest.skip("the reference experiments run in the torch session")
    import json

    commands = _cli_commands()
    assert {sub for _, sub, _ in commands} >= {"quickstart", "student", "grid", "report"}
    subs = sorted({sub for _, sub, _ in commands})
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    proc = subprocess.run(
        [sys.executable, "-c", _HELP, *subs],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    helps = json.loads(proc.stdout.splitlines()[-1])
    wrong = [
        (page, sub, flag)
        for page, sub, flags in commands
        for flag in flags
        if not re.search(rf"{re.escape(flag)}\b", helps[sub])
    ]
    assert all(helps[sub].strip() for sub in subs), "every subcommand prints its help"
    assert not wrong, f"flags the CLI does not know: {wrong}"


def test_readme_cites_the_papers():
    for needle in (
        "Comparative Knowledge Distillation",
        "WACV 2025",
        "Relational Knowledge Distillation",
        "Knowledge Distillation from A Stronger Teacher",
        "Distilling the Knowledge in a Neural Network",
    ):
        assert needle in README


def test_docs_hook_renders_docstring_markup():
    """The API pages' reST leftovers: roles become code, maths goes to MathJax intact."""
    spec = importlib.util.spec_from_file_location("hook", DOCS / "hooks" / "docstring_markup.py")
    assert spec and spec.loader
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    html = (
        "<p>see :class:<code>ckd_core.TeacherBudget</code> and :math:<code>e_i</code></p>\n"
        "<p>.. math::\n    \\rho<em>{a} + \\rho</em>{b}</p>"
    )
    assert hook.on_page_content(html) == (
        "<p>see <code>ckd_core.TeacherBudget</code> and "
        '<span class="arithmatex">\\(e_i\\)</span></p>\n'
        '<div class="arithmatex">\\[\\rho_{a} + \\rho_{b}\\]</div>'
    )
