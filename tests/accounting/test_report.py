"""`size_report` validation (the CLI end to end is tests/cli/test_size.py)."""

from __future__ import annotations

import pytest

from moelab.accounting.report import size_report
from moelab.accounting.spec import ArchSpec


def test_report_rejects_bad_settings():
    spec = ArchSpec.__new__(ArchSpec)  # never used: validation comes first
    with pytest.raises(ValueError, match="context"):
        size_report(spec, context=0)


@pytest.mark.parametrize("name", ["textbook-8x7b", "mixtral-8x7b", "deepseek-v3", "llama-4-maverick", "dense-13b"])
def test_table_rows_are_the_printed_table(name):
    """`table_rows` (what the playground serves) is `render_table`'s text, cell for cell."""
    from moelab.accounting.report import render_table, resolve, table_rows

    spec, source, preset = resolve(name)
    r = size_report(spec, source=source, preset=preset)
    lines = render_table([r]).splitlines()
    rows = table_rows([r])
    printed = lines[1:lines.index("")]  # the header, the rows, then a blank line
    assert len(printed) == len(rows)
    for line, row in zip(printed, rows, strict=True):
        if isinstance(row, str):
            assert line == f"-- {row} --"
        else:
            label, (cell,) = row
            assert line.startswith(label) and line.endswith(cell) and not line[len(label):-len(cell)].strip()


def test_headline_says_what_the_table_says():
    from moelab.accounting.report import headline, render_table, resolve

    spec, source, preset = resolve("textbook-8x7b")
    r = size_report(spec, source=source, preset=preset)
    assert headline(r) == "63.0B total, 21.0B active, 6 of 8 experts skipped, 75% of feed-forward compute saved"
    assert f"in short (textbook-8x7b): {headline(r)}" in render_table([r])
    spec, source, preset = resolve("dense-13b")
    assert headline(size_report(spec, source=source, preset=preset)) == "13.0B total, 13.0B active"
    spec, source, preset = resolve("llama-4-maverick")  # MoE every other layer: one group, saved of that group
    h = headline(size_report(spec, source=source, preset=preset))
    assert "127 of 128 experts skipped" in h
