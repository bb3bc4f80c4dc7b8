import pytest

from opd_fast.benchmarking.shapes import Shape, grid, parse_dtypes, parse_shape, parse_shapes


def test_parse_shape_three_and_four_fields():
    assert parse_shape("2048x32768x1024") == Shape(2048, 32768, 1024, 1024)
    assert parse_shape("2048X131072x1024x2048") == Shape(2048, 131072, 1024, 2048)
    assert parse_shapes("8x16x4, 2x4x2x3") == [Shape(8, 16, 4, 4), Shape(2, 4, 2, 3)]


@pytest.mark.parametrize("bad", ["2048x32768", "ax2x3", "0x2x3", "1x2x3x4x5"])
def test_parse_shape_rejects_with_the_text_seen(bad):
    with pytest.raises(ValueError, match="shape must look like") as err:
        parse_shape(bad)
    assert repr(bad) in str(err.value)


def test_parse_dtypes():
    assert parse_dtypes("fp32, bf16") == ["fp32", "bf16"]
    with pytest.raises(ValueError, match="fp64"):
        parse_dtypes("fp32,fp64")


def test_grid_puts_cheap_cases_first():
    shapes = grid([8192, 2048], [131072, 32768], 1024)
    assert [(s.n, s.v) for s in shapes] == [(2048, 32768), (2048, 131072), (8192, 32768), (8192, 131072)]
    assert shapes[0].label == "N=2048 V=32768 H=1024"
