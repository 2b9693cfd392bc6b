"""flax_resnet.tables.format_table: the one table formatter (bench, the recipe list, the experiments, selftest.md)."""

from __future__ import annotations

import pytest

from flax_resnet.tables import format_table

HEADER = ["phase", "img/s", "status"]
ROWS = [["train step", 399, "ok"], ["eval", "1,459", ""]]


def test_plain_text_aligns_columns_two_spaces_apart_without_trailing_spaces():
    assert format_table(HEADER, ROWS, align="lrl", rule=True).splitlines() == [
        "phase       img/s  status",
        "-------------------------",
        "train step    399  ok",
        "eval        1,459",
    ]
    assert format_table(["a", "bb"], [["ccc", "d"]], align="ll", indent="  ", rule=True).splitlines() == [
        "  a    bb", "  -------", "  ccc  d"]


def test_markdown_pads_every_line_to_one_width_and_marks_right_aligned_columns():
    assert format_table(["a", "b"], [["x", 1.5], ["yy", "n/a"]], markdown=True).splitlines() == [
        "| a   |   b |",
        "| --- | --: |",
        "| x   | 1.5 |",
        "| yy  | n/a |",
    ]


def test_unpadded_markdown_keeps_each_rows_own_text():
    """selftest.md: a row reads the same whatever the other rows hold (its tests look for a row's text)."""
    table = format_table(HEADER, [*ROWS, ["a much longer phase name", 1, "ok"]], align="lrl", markdown=True, pad=False)
    assert table.splitlines()[:3] == ["| phase | img/s | status |", "| --- | ---: | --- |", "| train step | 399 | ok |"]


def test_a_header_only_table_and_the_default_alignment():
    assert format_table(["name", "value"], []) == "name  value"
    assert format_table(["name", "value"], [["a", 1]]).splitlines()[1] == "a         1"  # numbers on the right


@pytest.mark.parametrize(("align", "rows", "words"), [("lx", [["a", "b"]], "align is one letter"),
                                                        ("l", [["a", "b"]], "align is one letter"),
                                                        ("ll", [["a"]], "a row has 1 cells where the header has 2")])
def test_a_wrong_shape_is_one_clear_error(align, rows, words):
    with pytest.raises(ValueError, match=words):
        format_table(["x", "y"], rows, align=align)
