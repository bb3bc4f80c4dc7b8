"""The installed command: user errors in one line (``--debug`` for the traceback), ``--version``, defaults in help."""

from __future__ import annotations

import subprocess
import sys

import opd_fast


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opd_fast.cli", *args], capture_output=True, text=True, timeout=120)


def test_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "missing.toml")
    plain = _cli("train", missing)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("opd-fast: error: ") and plain.stderr.count("\n") == 1
    assert "missing.toml" in plain.stderr
    debug = _cli("--debug", "train", missing)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_version_and_defaults_in_help():
    assert _cli("--version").stdout.strip() == f"opd-fast {opd_fast.__version__}"
    assert "(default: 32)" in _cli("generate", "--help").stdout
