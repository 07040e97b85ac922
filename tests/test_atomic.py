"""Atomic writes leave either the old file or the new one, never a half file."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.atomic import atomic_path, atomic_save_npy, atomic_write_json, is_temp_file


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_npy_round_trip_without_extra_suffix(tmp_path):
    target = tmp_path / "a.npy"
    atomic_save_npy(target, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert np.array_equal(np.load(target), np.arange(6, dtype=np.float32).reshape(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


def test_temp_names_are_recognised(tmp_path):
    with atomic_path(tmp_path / "x.npy") as tmp:
        assert is_temp_file(tmp)
        tmp.write_bytes(b"1")
    assert not is_temp_file(tmp_path / "x.npy")
