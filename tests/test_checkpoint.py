"""Checkpoint files: RNG states round-trip, weights-only loading, atomic writes, clear
errors, and weight transfer by name and shape."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from jobs import checkpoint
from jobs.transfer import transfer_weights


class Custom:
    """A class a weights-only load must refuse to rebuild."""


def draws():
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(2).tolist(),
            [random.random() for _ in range(3)], random.gauss(0, 1))


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()                       # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)                      # and in python's
    path = tmp_path / "rng.pt"
    checkpoint.save(path, {"rng": checkpoint.rng_state()})
    expected = draws()
    draws()                                 # move every generator on
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])
    assert draws() == expected


def test_save_is_atomic_and_load_is_weights_only(tmp_path):
    path = tmp_path / "a.pt"
    checkpoint.save(path, {"w": torch.ones(2), "epoch": 3, "nested": {"x": [1, 2.5, "s", None]}})
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]          # no temp file left
    assert checkpoint.load(path)["nested"]["x"] == [1, 2.5, "s", None]
    torch.save({"obj": Custom()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):                   # refused, not unpickled
        checkpoint.load(tmp_path / "bad.pt")
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="trunc.pt"):
        checkpoint.load(tmp_path / "trunc.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        checkpoint.load(tmp_path / "missing.pt")


def test_random_bytes_in_the_middle_of_a_checkpoint_are_refused(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"w": torch.zeros(4096), "epoch": 3})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 100] = np.random.default_rng(0).integers(0, 256, 100, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    try:                                      # what a plain torch.load makes of it
        unchecked = torch.load(path, weights_only=True)["w"]
        assert not torch.equal(unchecked, torch.zeros(4096))
    except Exception:
        pass
    with pytest.raises(ValueError, match="last.pt is damaged.*CRC"):
        checkpoint.load(path)


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 1})

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        checkpoint.save(path, {"epoch": 2, "bad": Unsaveable()})
    assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_model_state_unwraps_and_copies():
    model = nn.Linear(2, 2)
    wrapped = nn.Module()
    wrapped.module = model
    state = checkpoint.model_state(wrapped)
    assert set(state) == {"weight", "bias"}
    state["weight"].zero_()
    assert model.weight.abs().sum() > 0                               # a copy, not a view


def test_transfer_by_name_and_shape():
    src = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    dst = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2))
    report = transfer_weights(dst, {**src.state_dict(), "extra.weight": torch.zeros(1)})
    assert report["loaded"] == ["0.weight", "0.bias"]
    assert report["new"] == ["2.weight", "2.bias"]
    assert [s["name"] for s in report["skipped_for_shape"]] == ["1.weight", "1.bias"]
    assert report["skipped_for_shape"][0]["source_shape"] == [4, 8]
    assert report["unused"] == ["extra.weight"]
    assert torch.equal(dst[0].weight, src[0].weight)
    assert not torch.equal(dst[1].bias[:4], src[1].bias)
