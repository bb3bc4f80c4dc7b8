"""The set-up contract: the package's metadata leaves torch's build to the user, the CPU set-up pins it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_package_gives_torch_a_lower_bound_only():
    deps = re.findall(r'^\s*"(torch\b[^"]*)",', (ROOT / "pyproject.toml").read_text(), re.M)
    (torch_dep,) = deps
    assert ">=" in torch_dep and "<" not in torch_dep and "==" not in torch_dep, torch_dep


def test_make_installs_the_cpu_wheel_before_the_package():
    makefile = (ROOT / "Makefile").read_text()
    pin = makefile.index("pip install -q torch==2.13.0")
    assert pin < makefile.index("pip install -q -e")
    if not torch.cuda.is_available():  # the environment `make` built: the CPU wheel, no CUDA runtime
        assert torch.version.cuda is None, torch.__version__
