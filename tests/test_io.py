"""Atomic writes: nothing half-written on failure, ordinary permissions on success."""

from __future__ import annotations

import stat

import pytest

import moelab.io
from moelab.io import atomic_open, atomic_write_text


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_written_file_gets_umask_mode_not_mkstemp_0600(tmp_path, monkeypatch):
    # The umask is read once at import (reading it means setting it); use a known one.
    monkeypatch.setattr(moelab.io, "_UMASK", 0o022)
    atomic_write_text(tmp_path / "report.html", "<html></html>")
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o644
    monkeypatch.setattr(moelab.io, "_UMASK", 0o077)
    atomic_write_text(tmp_path / "private.json", "{}")
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
