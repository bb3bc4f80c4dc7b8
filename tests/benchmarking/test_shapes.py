import argparse

import pytest

from opd_fast.benchmarking.shapes import SHAPE_PRESETS, Shape, grid, parse_dtypes, parse_shape, parse_shapes, shape_arg


def test_parse_shape_is_n_h_v_with_an_optional_teacher_hidden():
    assert parse_shape("2048x1024x32768") == Shape(2048, 32768, 1024, 1024)
    assert parse_shape("2048X1024/2048x131072") == Shape(2048, 131072, 1024, 2048)
    assert parse_shapes("8x4x16, 2x2/3x4") == [Shape(8, 16, 4, 4), Shape(2, 4, 2, 3)]


@pytest.mark.parametrize("shape", [Shape(2048, 32768, 1024, 1024), Shape(2, 4, 2, 3)])
def test_spec_round_trips(shape):
    assert parse_shape(shape.spec) == shape


@pytest.mark.parametrize("bad", ["2048x32768", "ax2x3", "0x2x3", "1x2x3x4", "2048x1024x2048x131072", "4x2/x8", ""])
def test_malformed_shapes_name_the_format_and_the_text(bad):
    with pytest.raises(ValueError, match="NxHxV") as err:
        parse_shape(bad)
    assert repr(bad) in str(err.value)


def test_a_shape_in_the_old_n_v_h_order_is_refused_not_misread():
    with pytest.raises(ValueError, match="hidden 32768 > vocab 1024"):
        parse_shape("2048x32768x1024")


def test_presets_expand_and_an_empty_list_is_an_error():
    assert parse_shapes("small") == parse_shapes(SHAPE_PRESETS["small"])
    assert max(s.n * s.v * s.h_s for s in parse_shapes("small")) < min(s.n * s.v * s.h_s for s in parse_shapes("large"))
    with pytest.raises(ValueError, match="no shapes"):
        parse_shapes(" , ")


def test_parse_dtypes():
    assert parse_dtypes("fp32, bf16") == ["fp32", "bf16"]
    with pytest.raises(ValueError, match="fp64"):
        parse_dtypes("fp32,fp64")


def test_grid_puts_cheap_cases_first():
    shapes = grid([8192, 2048], [131072, 32768], 1024)
    assert [(s.n, s.v) for s in shapes] == [(2048, 32768), (2048, 131072), (8192, 32768), (8192, 131072)]
    assert shapes[0].label == "N=2048 H=1024 V=32768"


def test_shape_arg_gives_argparse_the_reason():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=shape_arg)
    assert parser.parse_args(["--shape", "8x4x16"]).shape == Shape(8, 16, 4, 4)
    with pytest.raises(argparse.ArgumentTypeError, match="hidden 16 > vocab 4"):
        shape_arg("8x16x4")
