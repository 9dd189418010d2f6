"""The CLI called in process by the tests (``python -m reference_experiments ARGV``)."""

from __future__ import annotations

import pytest


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``python -m reference_experiments ARGV`` in process: ``(exit status, stdout, stderr)``."""
    from reference_experiments import __main__ as cli

    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse: --help and usage errors
        rc = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return rc, out.out, out.err
