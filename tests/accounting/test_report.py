"""`size_report` validation (the CLI end to end is tests/cli/test_size.py)."""

from __future__ import annotations

import pytest

from moelab.accounting.report import size_report
from moelab.accounting.spec import ArchSpec


def test_report_rejects_bad_settings():
    spec = ArchSpec.__new__(ArchSpec)  # never used: validation comes first
    with pytest.raises(ValueError, match="context"):
        size_report(spec, context=0)
