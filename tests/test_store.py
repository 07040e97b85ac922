"""The shared store: versions per signature, links from runs, nothing deleted, gc."""
from __future__ import annotations

import os

import pytest

from pipeline import gc, store
from pipeline.config import ConfigError

SIG = "ab" * 32


def complete(version, sig=SIG):
    version.mkdir(parents=True, exist_ok=True)
    (version / "step_state.json").write_text(
        f'{{"step": "encode", "state": "COMPLETED", "signature": "{sig}"}}')


def test_a_new_signature_gets_its_own_folder_and_the_newest_complete_one_is_chosen(tmp_path):
    s = tmp_path / "store"
    first = store.choose(s, "encode", SIG, None, forced=False)
    assert first == s / "encode" / SIG[:16]
    complete(first)
    assert store.choose(s, "encode", SIG, None, forced=False) == first
    forced = store.choose(s, "encode", SIG, None, forced=True)
    assert forced.name == SIG[:16] + ".r2"
    forced.mkdir()                                   # begun, not complete: the old one is used
    assert store.choose(s, "encode", SIG, None, forced=False) == first
    complete(forced)
    assert store.choose(s, "encode", SIG, None, forced=False) == forced
    assert store.choose(s, "encode", "cd" * 32, None, forced=False).name == ("cd" * 32)[:16]


def test_a_version_is_chosen_only_for_the_upstream_versions_it_reads(tmp_path):
    s = tmp_path / "store"
    legacy = store.choose(s, "stage1", SIG, None, forced=False, inputs={"encode": "e1"})
    complete(legacy)                           # no inputs.json: made before they were recorded
    assert store.choose(s, "stage1", SIG, None, False, {"encode": "e1.r2"}) == legacy
    store.record_inputs(legacy, {"encode": "e1"})
    store.record_inputs(legacy, {"encode": "other"})          # written once, never changed
    assert store.read_inputs(legacy) == {"encode": "e1"}
    assert store.choose(s, "stage1", SIG, None, False, {"encode": "e1"}) == legacy
    other = store.choose(s, "stage1", SIG, None, False, {"encode": "e1.r2"})
    assert other.name == SIG[:16] + ".r2"
    assert store.choose(s, "stage1", SIG, None, False, None) == legacy


def test_link_points_the_run_at_a_version_relatively_and_refuses_to_replace_a_file(tmp_path):
    version = tmp_path / "runs" / "store" / "pairs" / SIG[:16]
    run = tmp_path / "runs" / "a"
    store.link(run, "pairs", version)
    assert os.readlink(run / "pairs") == os.path.join("..", "store", "pairs", SIG[:16])
    assert store.linked(run, "pairs") == version.resolve()
    other = version.with_name("other")
    store.link(run, "pairs", other)                  # relinking keeps the first version
    assert store.linked(run, "pairs") == other.resolve() and version.is_dir()
    (run / "encode").write_text("notes")
    with pytest.raises(ConfigError, match="in the way"):
        store.link(run, "encode", version.with_name("e"))
    assert (run / "encode").read_text() == "notes"


def test_a_runs_own_folder_moves_into_the_store_under_its_signature(tmp_path):
    run = tmp_path / "runs" / "old"
    (run / "stage1").mkdir(parents=True)
    (run / "stage1" / "last.pt").write_bytes(b"weights")
    moved = store.adopt(run, "stage1", tmp_path / "runs" / "store", SIG)
    assert moved == tmp_path / "runs" / "store" / "stage1" / SIG[:16]
    assert (run / "stage1" / "last.pt").read_bytes() == b"weights"   # through the link
    assert (run / "stage1").is_symlink()


def test_gc_lists_only_versions_no_run_links_to_and_deletes_only_when_told(tmp_path, capsys):
    root = tmp_path / "runs"
    used, unused = root / "store" / "encode" / "used", root / "store" / "encode" / "unused"
    for v in (used, unused):
        v.mkdir(parents=True)
        (v / "latents.npy").write_bytes(b"x" * 5000)
    store.link(root / "a", "encode", used)
    assert gc.unreferenced(root, root / "store") == [unused]
    assert gc.main(["--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "encode/unused" in out and "4.9 KB" in out and "encode/used " not in out
    assert unused.is_dir()
    assert gc.main(["--root", str(root), "--delete"]) == 0
    assert not unused.exists() and used.is_dir() and (root / "a" / "encode").is_dir()


def test_sharing_runs_are_the_other_runs_linking_the_same_version(tmp_path):
    root = tmp_path / "runs"
    shared, other = root / "store" / "stage1" / "s", root / "store" / "stage1" / "o"
    for run in ("a", "b"):
        store.link(root / run, "stage1", shared)
    store.link(root / "c", "stage1", other)
    (root / "mlflow.db").write_text("")
    assert store.sharing_runs(root / "a", "stage1") == [(root / "b").resolve()]
    assert store.sharing_runs(root / "c", "stage1") == []
    assert store.sharing_runs(root / "a", "stage2") == []
