"""pytest-benchmark suites (``pytest bench/ --benchmark-only``), outside the default test run.

``OPD_BENCH_SHAPES`` (comma-separated ``NxHxV`` or a preset name) and ``OPD_BENCH_DTYPES`` choose the cases;
the defaults are the smallest shape of the README table.
"""

import os

import pytest

from opd_fast.benchmarking.shapes import parse_dtypes, parse_shapes

SHAPES = parse_shapes(os.environ.get("OPD_BENCH_SHAPES", "2048x1024x32768"))
DTYPES = parse_dtypes(os.environ.get("OPD_BENCH_DTYPES", "fp32,bf16"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", SHAPES, ids=[s.spec for s in SHAPES])
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", DTYPES)
