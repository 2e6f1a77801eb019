"""Atomic writes of the dataset directory: readable results, nothing half-written on failure."""

from __future__ import annotations

import stat

import pyarrow as pa
import pytest

from magpie_hub.dataset.directory import atomic_path, atomic_write_text, write_parquet_atomic


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_are_world_readable(tmp_path):
    text = tmp_path / "d" / "magpie_manifest.json"
    atomic_write_text(text, "{}\n")
    table = tmp_path / "d" / "cfg" / "train-00000-of-00001.parquet"
    write_parquet_atomic(pa.table({"a": [1, 2]}), table)
    assert text.read_text() == "{}\n"
    assert _mode(text) == 0o644 and _mode(table) == 0o644
    assert sorted(p.name for p in (tmp_path / "d").rglob("*")) == sorted(
        ["magpie_manifest.json", "cfg", "train-00000-of-00001.parquet"])


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]
