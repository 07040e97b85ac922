"""Experiments the way researchers run them, on the local executor: runs share the data
steps through the store, a changed setting or --force keeps the old version, a stage is
continued with a new schedule, a sweep runs its points sharing their upstream steps."""
from __future__ import annotations

import json

import pytest

from pipeline import store
from tests.fixtures.pipeline import TINY, pipeline_cli, rows_by_step, submit

pytestmark = pytest.mark.integration   # pipeline runs, sweeps and continuations

DATA_STEPS = ("chunk", "pairs", "encode")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments") / "runs"
    res = submit("stage1", root, "a", "stage1.epochs=2", cluster="local")
    assert res.returncode == 0, res.stderr[-3000:]
    return root


def files(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_second_run_with_the_same_data_settings_does_no_data_work(root):
    res = submit("prepare", root, "b", cluster="local")
    assert res.returncode == 0, res.stderr[-3000:]
    for step in DATA_STEPS:
        assert f"{step}: complete with signature" in res.stderr
        assert store.linked(root / "b", step) == store.linked(root / "a", step)
    assert " ran as job " not in res.stderr


def test_a_changed_setting_makes_a_new_version_beside_the_old_one(root):
    old_pairs = store.linked(root / "b", "pairs")
    before = files(old_pairs)
    res = submit("prepare", root, "b", "pairs.stride=2", cluster="local")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "chunk: complete with signature" in res.stderr
    assert "pairs: ran as job" in res.stderr and "encode: ran as job" in res.stderr
    new_pairs = store.linked(root / "b", "pairs")
    assert new_pairs != old_pairs and files(old_pairs) == before   # untouched
    assert store.linked(root / "a", "pairs") == old_pairs


def test_new_augmentation_takes_the_clean_latents_of_the_version_before(root):
    old = store.linked(root / "a", "encode")
    res = submit("prepare", root, "c", "encode.augment.variants=2", cluster="local")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pairs: complete with signature" in res.stderr and "encode: ran as job" in res.stderr
    new = store.linked(root / "c", "encode")
    clean = sorted((old / "shards").glob("latents-*.npy"))
    assert new != old and clean
    assert all((new / "shards" / p.name).samefile(p) for p in clean)    # linked, not encoded
    manifest = json.loads((new / "manifest.json").read_text())
    assert manifest["augment"]["rows"] > 0 and manifest["shards"] == \
        json.loads((old / "manifest.json").read_text())["shards"]


def test_force_builds_a_new_revision_and_keeps_the_old_one(root):
    old = store.linked(root / "b", "encode")
    before = files(old)
    res = submit("prepare", root, "b", "pairs.stride=2", "--force", "encode", cluster="local")
    assert res.returncode == 0, res.stderr[-3000:]
    new = store.linked(root / "b", "encode")
    assert new.name == old.name + ".r2" and files(old) == before
    assert rows_by_step(root / "b")["encode"]["state"] == "COMPLETED"


def test_continue_a_stage_with_more_epochs_and_another_lr(root):
    old = store.linked(root / "a", "stage1")
    before = files(old)
    res = submit("stage1", root, "a", "--continue", "stage1", "stage1.epochs=4", "stage1.lr=5e-4",
                 cluster="local")
    assert res.returncode == 0, res.stderr[-3000:]
    new = store.linked(root / "a", "stage1")
    assert new != old and files(old) == before
    epochs = [json.loads(line)["epoch"] for line in
              (new / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line]
    assert epochs[-1] == 4 and epochs.count(3) == 1   # went on from epoch 2
    resolved = (root / "a" / "config.resolved.yaml").read_text()
    assert str(old / "last.pt") in resolved
    again = submit("stage1", root, "a", "--continue", "stage1", "stage1.epochs=4",
                   "stage1.lr=5e-4", cluster="local")
    assert again.returncode == 0 and "stage1: complete with signature" in again.stderr
    assert store.linked(root / "a", "stage1") == new


def test_sweep_runs_every_point_sharing_upstream_steps_and_status_shows_one_table(root, tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("name: g\nexperiment: demo\ntarget: stage1\noverrides: [stage1.epochs=1]\n"
                    "product:\n  stage1.lr: [1.0e-3, 2.0e-3]\n")
    res = pipeline_cli("sweep", "--grid", str(grid), "--cluster", "local", *TINY,
                       f"run.root={root}")
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [root / "g-lr=0.001", root / "g-lr=0.002"]
    for step in DATA_STEPS:
        assert store.linked(runs[0], step) == store.linked(runs[1], step) == \
            store.linked(root / "a", step)
    assert store.linked(runs[0], "stage1") != store.linked(runs[1], "stage1")
    assert res.stderr.count("stage1: ran as job") == 2 and "encode: ran as job" not in res.stderr
    table = pipeline_cli("status", "--root", str(root), "--sweep", "g")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert len(lines) == 4 and "stage1.lr=0.001" in lines[2] and "stage1.lr=0.002" in lines[3]
    assert all(line.split().count("done") == 4 for line in lines[2:]), table.stdout


def test_gc_lists_the_versions_no_run_uses(root):
    res = pipeline_cli("gc", "--root", str(root))
    assert res.returncode == 0, res.stderr
    listed = res.stdout
    # run b moved to stride 2 (its old pairs are still run a's), and the forced encode
    # replaced b's first stride-2 encode: that one is unused now
    assert "encode/" in listed and "delete them with" in listed
    assert store.linked(root / "a", "pairs").name not in listed


def test_a_forced_upstream_revision_gets_downstream_versions_of_its_own(root):
    """A forced chunk rerun (same signature, maybe new files) is read only by steps built
    from it: a later run does not pair it with a stage 1 trained on the old chunks."""
    res = submit("prepare", root, "d", "--force", "chunk", cluster="local")
    assert res.returncode == 0, res.stderr[-3000:]
    assert store.linked(root / "d", "chunk").name.endswith(".r2")
    res = submit("stage1", root, "e", "stage1.epochs=2", cluster="local")
    assert res.returncode == 0, res.stderr[-3000:]
    for step in DATA_STEPS:
        assert store.linked(root / "e", step) == store.linked(root / "d", step)
    assert "stage1: ran as job" in res.stderr
    new = store.linked(root / "e", "stage1")
    old = new.with_name(new.name.removesuffix(".r2"))     # run a's first stage 1 (then continued)
    assert new.name.endswith(".r2") and old.is_dir()
    assert store.read_inputs(new) == {"encode": store.linked(root / "d", "encode").name}
    assert store.read_inputs(old) == {"encode": store.linked(root / "a", "encode").name}
